"""The real coordinator core (`Federation`) on an asyncio loop in a background thread, without
gRPC: the same round loop, rank policy, streamed uploads, accumulator and blob store as
`rankfed coordinator serve`, minus the sockets.

Every call into the federation runs on its loop (the core's state is loop-owned), submitted
from client threads with `run_coroutine_threadsafe`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from rankfed.coordinator.bundled import manifest_path
from rankfed.coordinator.config import CoordinatorConfig
from rankfed.coordinator.federation import Federation
from rankfed.coordinator.store import open_store
from rankfed.coordinator.tracking import Tracking, open_tracking
from rankfed.protocol.manifest import load_manifest

T = TypeVar("T")


class FederationHost:
    """Owns the event loop thread, the store and the `Federation`; use as a context manager."""

    def __init__(self, config: CoordinatorConfig, *, clock: Callable[[], float] | None = None) -> None:
        self.config = config
        self.clock = clock  # the federation's clock (None: wall time); a simulation's is virtual
        self.data_dir = Path(config.server.data_dir)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="rankfed-sim-loop", daemon=True)
        self._store: Any = None
        self._tracking: Tracking | None = None  # [tracking] of the config, as the daemon does
        self.federation: Federation | None = None

    def __enter__(self) -> FederationHost:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._thread.start()

        async def start() -> Federation:
            manifest = load_manifest(manifest_path(self.config.model.manifest))
            store, blobs = open_store(self.data_dir)
            self._store = store
            federation = (Federation(self.config, store, blobs, manifest) if self.clock is None
                          else Federation(self.config, store, blobs, manifest, clock=self.clock))
            await federation.start()
            self._tracking = open_tracking(self.config, federation)
            return federation

        self.federation = self.submit(start(), timeout=60.0)

    def stop(self) -> None:
        if self.federation is not None:
            self.submit(self.federation.stop(), timeout=30.0)
            self.federation = None
        if self._tracking is not None:
            self._tracking.close()
            self._tracking = None
        if self._store is not None:
            self._store.close()
            self._store = None
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
        if not self.loop.is_running():
            self.loop.close()

    def submit(self, coro: Awaitable[T], timeout: float | None = None) -> T:
        """Run a coroutine on the federation's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def call(self, fn: Callable[..., T], *args: Any, timeout: float | None = 60.0) -> T:
        """Run a plain (non-async) federation method on its loop."""

        async def run() -> T:
            return fn(*args)

        return self.submit(run(), timeout)

    def fed(self) -> Federation:
        if self.federation is None:
            raise RuntimeError("the federation host is not started")
        return self.federation

    def wait_done(self, timeout: float | None = None) -> None:
        self.submit(self.fed().wait_done(), timeout)
