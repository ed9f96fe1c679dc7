"""Build and run the coordinator's grpc.aio server: EdgeService, AdminService, health and
reflection (so grpcurl and load balancers work out of the box)."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from rankfed.coordinator.config import CoordinatorConfig
from rankfed.coordinator.federation import Federation
from rankfed.coordinator.manifest import load_manifest
from rankfed.coordinator.servicer_admin import AdminServicer
from rankfed.coordinator.servicer_edge import EdgeServicer
from rankfed.coordinator.store import open_store
from rankfed.v1 import admin_pb2, admin_pb2_grpc, edge_pb2, edge_pb2_grpc

log = logging.getLogger("rankfed.coordinator")

EDGE_SERVICE = edge_pb2.DESCRIPTOR.services_by_name["EdgeService"].full_name
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name


def server_options(config: CoordinatorConfig) -> list[tuple[str, int]]:
    # Unknown option names are silently ignored by gRPC: keep them here, in one place.
    return [
        ("grpc.max_receive_message_length", config.server.max_receive_message_bytes),
        ("grpc.max_send_message_length", config.server.max_receive_message_bytes),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ]


@dataclass
class Coordinator:
    """A running coordinator: its server, federation, health servicer and bound port."""

    server: grpc.aio.Server
    federation: Federation
    health: health.aio.HealthServicer
    port: int
    _store: object

    async def stop(self, grace: float = 5.0) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        await self.federation.stop()
        self._store.close()


async def start_coordinator(config: CoordinatorConfig) -> Coordinator:
    """Open the data directory, resume the federation and serve; returns once listening."""
    manifest = load_manifest(Path(config.model.manifest))
    data_dir = Path(config.server.data_dir)
    store, blobs = open_store(data_dir)
    federation = Federation(config, store, blobs, manifest)
    await federation.start()
    server = grpc.aio.server(options=server_options(config))
    edge_pb2_grpc.add_EdgeServiceServicer_to_server(EdgeServicer(federation), server)
    admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(federation, config.server.admin_token), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (EDGE_SERVICE, ADMIN_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    port = server.add_insecure_port(config.server.address)
    if port == 0:
        raise OSError(f"could not bind {config.server.address}")
    await server.start()
    for name in ("", EDGE_SERVICE, ADMIN_SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("coordinator serving", extra={
        "address": config.server.address, "port": port, "data_dir": str(data_dir),
        "federation_id": federation.federation_id, "method": config.federation.method,
    })
    return Coordinator(server=server, federation=federation, health=health_servicer, port=port, _store=store)


async def serve(
    config: CoordinatorConfig, *, port_file: Path | None = None, exit_when_done: bool = False, linger: float = 10.0
) -> None:
    """Serve until SIGTERM/SIGINT (graceful: health goes NOT_SERVING, calls drain), or, with
    exit_when_done, `linger` seconds after the last round so clients can learn it is over."""
    coordinator = await start_coordinator(config)
    if port_file is not None:
        tmp = port_file.with_suffix(port_file.suffix + ".tmp")
        tmp.write_text(f"{coordinator.port}\n")
        tmp.replace(port_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    waiters = [asyncio.create_task(stop.wait())]
    if exit_when_done:
        async def done_then_linger() -> None:
            await coordinator.federation.wait_done()
            await asyncio.sleep(linger)

        waiters.append(asyncio.create_task(done_then_linger()))
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    for waiter in waiters:
        waiter.cancel()
    log.info("coordinator stopping")
    await coordinator.stop()
    log.info("coordinator stopped")
