"""Build and run the coordinator's grpc.aio server: EdgeService, AdminService, health and
reflection (so grpcurl and load balancers work out of the box), over TLS or mutual TLS
when configured, plus the Prometheus endpoint on its own HTTP port."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from rankfed.coordinator.config import CoordinatorConfig
from rankfed.coordinator.errors import ConfigError
from rankfed.coordinator.federation import Federation
from rankfed.coordinator.manifest import load_manifest
from rankfed.coordinator.metrics import CoordinatorMetrics, start_metrics_server
from rankfed.coordinator.servicer_admin import AdminServicer
from rankfed.coordinator.servicer_edge import EdgeServicer, add_edge_service
from rankfed.coordinator.store import open_store
from rankfed.tls import TlsError, is_loopback_address, server_credentials
from rankfed.v1 import admin_pb2, admin_pb2_grpc, edge_pb2

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
    metrics: CoordinatorMetrics | None = None
    metrics_port: int = 0
    _metrics_server: asyncio.Server | None = None
    health_port: int = 0
    _health_server: grpc.aio.Server | None = None

    async def stop(self, grace: float = 5.0) -> None:
        await self.health.enter_graceful_shutdown()
        if self._health_server is not None:
            await self._health_server.stop(0)
        await self.server.stop(grace)
        await self.federation.stop()
        if self._metrics_server is not None:
            self._metrics_server.close()
            await self._metrics_server.wait_closed()
        self._store.close()


def transport_credentials(config: CoordinatorConfig) -> grpc.ServerCredentials | None:
    """TLS (or mutual TLS) credentials from the config, or None for plaintext; refuses
    plaintext on a non-loopback address unless server.insecure (--insecure) is set."""
    server = config.server
    if server.tls_cert_file:
        try:
            return server_credentials(server.tls_cert_file, server.tls_key_file, server.tls_client_ca_file or None)
        except TlsError as exc:
            raise ConfigError(str(exc)) from None
    if not server.insecure and not is_loopback_address(server.address):
        raise ConfigError(
            f"server.address = {server.address!r} is not loopback and TLS is off: set server.tls_cert_file and "
            "server.tls_key_file (deploy/make-certs.sh), or pass --insecure (server.insecure = true) to serve "
            "plaintext anyway, e.g. behind a TLS-terminating proxy"
        )
    return None


async def start_coordinator(config: CoordinatorConfig) -> Coordinator:
    """Open the data directory, resume the federation and serve; returns once listening."""
    credentials = transport_credentials(config)  # before any state is touched
    manifest = load_manifest(Path(config.model.manifest))
    data_dir = Path(config.server.data_dir)
    store, blobs = open_store(data_dir)
    federation = Federation(config, store, blobs, manifest)
    await federation.start()
    metrics = CoordinatorMetrics()
    metrics.bind(federation)
    server = grpc.aio.server(options=server_options(config))
    add_edge_service(EdgeServicer(federation, metrics), server)
    admin_pb2_grpc.add_AdminServiceServicer_to_server(
        AdminServicer(federation, config.server.admin_token, metrics), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (EDGE_SERVICE, ADMIN_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    if credentials is None:
        port = server.add_insecure_port(config.server.address)
    else:
        port = server.add_secure_port(config.server.address, credentials)
    if port == 0:
        raise OSError(f"could not bind {config.server.address}")
    metrics_server, metrics_port = None, 0
    if config.server.metrics_address:
        metrics_server, metrics_port = await start_metrics_server(metrics, config.server.metrics_address)
    health_server, health_port = None, 0
    if config.server.health_address:
        # Only the health service, in plaintext, for probes that cannot do TLS (Kubernetes).
        health_server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
        health_port = health_server.add_insecure_port(config.server.health_address)
        if health_port == 0:
            raise OSError(f"could not bind {config.server.health_address} (server.health_address)")
        await health_server.start()
    await server.start()
    for name in ("", EDGE_SERVICE, ADMIN_SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("coordinator serving", extra={
        "address": config.server.address, "port": port, "data_dir": str(data_dir),
        "federation_id": federation.federation_id, "method": config.federation.method,
        "transport": "plaintext" if credentials is None else "mtls" if config.server.tls_client_ca_file else "tls",
        "metrics_port": metrics_port or None, "health_port": health_port or None,
    })
    return Coordinator(
        server=server, federation=federation, health=health_servicer, port=port, _store=store,
        metrics=metrics, metrics_port=metrics_port, _metrics_server=metrics_server,
        health_port=health_port, _health_server=health_server,
    )


async def serve(
    config: CoordinatorConfig, *, port_file: Path | None = None, exit_when_done: bool = False, linger: float = 10.0
) -> int:
    """Serve until SIGTERM/SIGINT (graceful: health goes NOT_SERVING, calls drain), or, with
    exit_when_done, `linger` seconds after the last round so clients can learn it is over.

    Returns the process exit status: 1 when the round loop died of an unexpected error, so
    that systemd or Kubernetes restart the daemon and it resumes from its data directory
    instead of answering health checks while no round can progress."""
    coordinator = await start_coordinator(config)
    gc.freeze()  # the manifest, global adapter and modules stay: no collection needs to scan them again
    if port_file is not None:
        tmp = port_file.with_suffix(port_file.suffix + ".tmp")
        tmp.write_text(f"{coordinator.port}\n")
        tmp.replace(port_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    fatal = asyncio.create_task(coordinator.federation.wait_fatal())
    waiters = [asyncio.create_task(stop.wait()), fatal]
    if exit_when_done:
        async def done_then_linger() -> None:
            await coordinator.federation.wait_done()
            await asyncio.sleep(linger)

        waiters.append(asyncio.create_task(done_then_linger()))
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    for waiter in waiters:
        waiter.cancel()
    status = 0
    if fatal.done() and not fatal.cancelled():
        log.error("round loop stopped: %r; exiting so a supervisor restarts the coordinator", fatal.result())
        status = 1
    log.info("coordinator stopping")
    await coordinator.stop()
    log.info("coordinator stopped")
    return status
