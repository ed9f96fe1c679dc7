"""The deployed path a simulation is compared with: a grpc.aio coordinator served on
127.0.0.1:0 and one EdgeRunner thread per device over EdgeTransport."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

from rankfed.coordinator.config import CoordinatorConfig
from rankfed.edge_client.runner import EdgeRunner, RunnerConfig
from rankfed.protocol import Capability


def run_over_grpc(config: CoordinatorConfig, devices: Sequence[tuple[RunnerConfig, Capability]]) -> None:
    """Serve ``config`` and run every device to the end of the federation; re-raises the
    first device error."""
    from rankfed.coordinator.server import start_coordinator
    from rankfed.edge_client.transport import EdgeTransport

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    coordinator = asyncio.run_coroutine_threadsafe(start_coordinator(config), loop).result(30)
    errors: list[BaseException] = []

    def device(runner_config: RunnerConfig, capability: Capability) -> None:
        try:
            with EdgeTransport(f"127.0.0.1:{coordinator.port}") as transport:
                EdgeRunner(transport, runner_config, capability=capability).run()
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    try:
        threads = [threading.Thread(target=device, args=d) for d in devices]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=180)
        assert not errors, errors
    finally:
        asyncio.run_coroutine_threadsafe(coordinator.stop(0.5), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
