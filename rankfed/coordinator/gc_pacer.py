"""When the garbage collector may walk the coordinator's objects.

CPython's collector is generational, and a coordinator's objects are mostly *medium*-lived:
a held GetTask long-poll (its task, coroutine frames, future, event, timer, gRPC call)
lives up to 30 s, so it survives the young collections and piles up in the older
generations. With 10,000 devices polling, one generation-1 collection walked hundreds of
thousands of such objects and held the event loop 0.37-0.43 s, a dozen times in a
90-second run (LoopWatch's `gc_s`; docs/benchmarks.md, fourth capacity pass), and every
device's answers waited.

`GcPacer` moves every object that has lived `freeze_every` seconds into the permanent
generation (`gc.freeze()`, a constant-time list splice), so the automatic collections
only ever walk the last seconds' objects. Reference counting still frees frozen objects;
only garbage *cycles* among them wait, until the full collection it runs every
`full_every` seconds (`gc.unfreeze()` then `gc.collect()`): one pause of a full walk at a
known interval instead of many unplanned ones, and cyclic garbage bounded by what that
interval produces.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable

log = logging.getLogger("rankfed.coordinator")


class GcPacer:
    def __init__(self, *, full_every: float, freeze_every: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if full_every <= 0 or freeze_every <= 0:
            raise ValueError("full_every and freeze_every must be > 0")
        self.full_every, self.freeze_every = full_every, freeze_every
        self._clock = clock
        self.full_collections = 0

    async def run(self) -> None:
        """Every `freeze_every` s freeze what is alive, or, every `full_every` s, collect
        everything first (full_collection freezes what survives); forever."""
        last_full = self._clock()
        while True:
            await asyncio.sleep(self.freeze_every)
            if self._clock() - last_full >= self.full_every:
                self.full_collection()
                last_full = self._clock()
            else:
                gc.freeze()

    def full_collection(self) -> None:
        started = self._clock()
        gc.unfreeze()
        found = gc.collect()
        gc.freeze()
        self.full_collections += 1
        log.info("full garbage collection", extra={"seconds": round(self._clock() - started, 3), "collected": found})
