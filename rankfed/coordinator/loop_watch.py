"""How late the event loop runs, and what held it when it stalled.

Every RPC of every device is answered on one asyncio loop, so anything that holds it (a
slow store query, a burst of wake-ups, a long garbage collection, a callback that should
have been in a thread) delays every device at once: a GetTask long-poll answers WAIT past
its due time, a heartbeat answer waits. `LoopWatch` measures that from inside:

* a coroutine on the loop sleeps `interval` seconds at a time and reports how much later
  than asked it woke (`on_lag`, the `rankfed_event_loop_lag_seconds` histogram);
* a daemon thread looks at the last beat every `interval`; once the loop has not beaten
  for `stall_seconds` it logs, once per stall, a warning with the loop thread's Python
  stack at that moment (what is holding it), and when the loop beats again, how long the
  stall lasted and how much of it the garbage collector took (`gc_s`, from gc.callbacks:
  a full collection walks every live object, and allocation on the loop triggers it).
  Nothing is logged while the loop keeps time.

A stall inside a C call that keeps the GIL (the thread cannot run then) is reported when
the call returns, with its length but without the stack.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import threading
import time
import traceback
from collections.abc import Callable

log = logging.getLogger("rankfed.coordinator")

STACK_FRAMES = 12  # innermost frames logged with a stall


class LoopWatch:
    def __init__(self, *, interval: float = 0.05, stall_seconds: float = 0.25,
                 on_lag: Callable[[float], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """stall_seconds 0: no stall is logged (and no thread watches); the lag is still measured."""
        if interval <= 0 or stall_seconds < 0:
            raise ValueError("interval must be > 0 and stall_seconds >= 0")
        self.interval, self.stall_seconds = interval, stall_seconds
        self._on_lag = on_lag
        self._clock = clock
        self._beat = clock()
        self._loop_thread = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._task: asyncio.Task[None] | None = None
        self.stalls = 0  # stalls seen so far (each logged once)
        self.gc_seconds = 0.0  # spent in garbage collections since start (any thread)
        self._gc_started: float | None = None

    def start(self) -> None:
        """Start beating on the running loop and watching from a thread."""
        self._loop_thread = threading.get_ident()
        self._beat = self._clock()
        self._task = asyncio.get_running_loop().create_task(self._beats(), name="rankfed-loop-watch")
        if self.stall_seconds:
            self._thread = threading.Thread(target=self._watch, name="rankfed-loop-watch", daemon=True)
            self._thread.start()
            gc.callbacks.append(self._on_gc)

    async def stop(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 5.0)

    async def _beats(self) -> None:
        while True:
            asked = self._clock()
            await asyncio.sleep(self.interval)
            self._beat = now = self._clock()
            if self._on_lag is not None:
                self._on_lag(max(0.0, now - asked - self.interval))

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = self._clock()
        elif self._gc_started is not None:
            self.gc_seconds += self._clock() - self._gc_started
            self._gc_started = None

    def _watch(self) -> None:
        stalled_since: float | None = None  # the beat the current stall started from
        gc_before = 0.0  # gc_seconds when the current stall was seen
        while not self._stop.wait(self.interval):
            beat = self._beat
            held = self._clock() - beat
            if held >= self.stall_seconds and stalled_since != beat:
                stalled_since, gc_before = beat, self.gc_seconds
                self.stalls += 1
                log.warning("event loop stalled", extra={
                    "stalled_for_s": round(held, 3), "loop_stack": self._loop_stack(),
                })
            elif stalled_since is not None and beat != stalled_since:
                log.warning("event loop stall ended", extra={
                    "stalled_for_s": round(beat - stalled_since, 3),
                    "gc_s": round(self.gc_seconds - gc_before, 3),  # collections that ended after it was seen
                })
                stalled_since = None

    def _loop_stack(self) -> str:
        frame = sys._current_frames().get(self._loop_thread)
        if frame is None:
            return ""
        return "".join(traceback.format_stack(frame)[-STACK_FRAMES:])
