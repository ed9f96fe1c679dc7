"""Build and run the coordinator's grpc.aio server: EdgeService, AdminService,
EvaluatorService, health and reflection (so grpcurl and load balancers work out of the
box), over TLS or mutual TLS when configured, plus the Prometheus endpoint on its own
HTTP port."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import secrets
import signal
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from rankfed.coordinator.bundled import manifest_path
from rankfed.coordinator.config import CoordinatorConfig
from rankfed.coordinator.errors import ConfigError
from rankfed.coordinator.federation import Federation
from rankfed.coordinator.gc_pacer import GcPacer
from rankfed.coordinator.hooks import add_round_closed
from rankfed.coordinator.http import HttpListener, start_http_listener
from rankfed.coordinator.loop_watch import LoopWatch
from rankfed.coordinator.metrics import CoordinatorMetrics
from rankfed.coordinator.retention import UpdateRetention, disk_usage
from rankfed.coordinator.servicer_admin import AdminServicer
from rankfed.coordinator.servicer_edge import EdgeServicer, add_edge_service
from rankfed.coordinator.servicer_evaluator import EvaluatorServicer
from rankfed.coordinator.store import BlobStore, SqliteStore, StateStore, open_store
from rankfed.coordinator.tracking import Tracking, open_tracking
from rankfed.protocol import ManifestError
from rankfed.protocol.manifest import ModelManifest, load_manifest
from rankfed.tls import TlsError, is_loopback_address, server_credentials
from rankfed.v1 import admin_pb2, admin_pb2_grpc, edge_pb2, evaluator_pb2, evaluator_pb2_grpc

log = logging.getLogger("rankfed.coordinator")

EDGE_SERVICE = edge_pb2.DESCRIPTOR.services_by_name["EdgeService"].full_name
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name
EVALUATOR_SERVICE = evaluator_pb2.DESCRIPTOR.services_by_name["EvaluatorService"].full_name


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
    _store: StateStore
    metrics: CoordinatorMetrics | None = None
    metrics_port: int = 0
    _http: HttpListener | None = None
    health_port: int = 0
    _health_server: grpc.aio.Server | None = None
    _tracking: Tracking | None = None
    _loop_watch: LoopWatch | None = None

    async def stop(self, grace: float = 5.0) -> None:
        await self.health.enter_graceful_shutdown()
        if self._health_server is not None:
            await self._health_server.stop(0)
        await self.server.stop(grace)
        await self.federation.stop()
        if self._http is not None:
            await self._http.close()
        if self._tracking is not None:
            await asyncio.to_thread(self._tracking.close)
        if self._loop_watch is not None:
            await self._loop_watch.stop()
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
    """Open the data directory, resume the federation and serve; returns once listening.
    A failure part-way (a port in use, a tracking extra missing) undoes what was started."""
    credentials = transport_credentials(config)  # before any state is touched
    try:
        manifest = load_manifest(manifest_path(config.model.manifest))
    except ManifestError as exc:
        raise ConfigError(str(exc)) from None
    data_dir = Path(config.server.data_dir)
    async with contextlib.AsyncExitStack() as undo:
        store, blobs = _open_data_dir(data_dir)
        undo.callback(store.close)
        _check_data_dir_model(store, manifest, data_dir)
        admin_token = operator_token(config, data_dir)
        federation = Federation(config, store, blobs, manifest)
        await federation.start()
        undo.push_async_callback(federation.stop)
        metrics = CoordinatorMetrics()
        metrics.bind(federation, disk_usage=lambda: disk_usage(data_dir, blobs))
        federation.ingest.on_phase = metrics.upload_phase
        retention = UpdateRetention(
            config.storage.updates_keep_rounds, store, blobs, global_exists=federation.global_adapter_exists,
            on_deleted=metrics.updates_deleted.inc,
        )
        retention.sweep()  # rounds closed before a restart
        add_round_closed(federation, metrics.round_closed, "metrics")
        add_round_closed(federation, retention.round_closed, "retention")
        server = grpc.aio.server(options=server_options(config))
        add_edge_service(EdgeServicer(federation, metrics), server)
        admin_pb2_grpc.add_AdminServiceServicer_to_server(
            AdminServicer(federation, admin_token, metrics), server
        )
        evaluator_pb2_grpc.add_EvaluatorServiceServicer_to_server(
            EvaluatorServicer(federation, admin_token, config.server.evaluator_token, metrics), server
        )
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (EDGE_SERVICE, ADMIN_SERVICE, EVALUATOR_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        port = _bind(server, config.server.address, credentials, "server.address")
        http, metrics_port = None, 0
        if config.server.metrics_address:
            try:
                http = await start_http_listener(
                    metrics, config.server.metrics_address, federation=federation,
                    admin_token=admin_token,
                )
            except OSError as exc:
                raise ConfigError(_bind_problem(config.server.metrics_address, "server.metrics_address", exc)) from None
            undo.push_async_callback(http.close)
            metrics_port = http.port
        health_server, health_port = None, 0
        if config.server.health_address:
            # Only the health service, in plaintext, for probes that cannot do TLS (Kubernetes).
            health_server = grpc.aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
            health_port = _bind(health_server, config.server.health_address, None, "server.health_address")
            await health_server.start()
            undo.push_async_callback(health_server.stop, 0)
        tracking = open_tracking(config, federation)
        if tracking is not None:
            undo.callback(tracking.close)
        await server.start()
        loop_watch = LoopWatch(stall_seconds=config.server.loop_stall_seconds, on_lag=metrics.loop_lag.observe)
        loop_watch.start()
        undo.push_async_callback(loop_watch.stop)
        undo.pop_all()  # everything started: from here on Coordinator.stop() owns it
    for name in ("", EDGE_SERVICE, ADMIN_SERVICE, EVALUATOR_SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("coordinator serving", extra={
        "address": config.server.address, "port": port, "data_dir": str(data_dir),
        "federation_id": federation.federation_id, "method": config.federation.method,
        "transport": "plaintext" if credentials is None else "mtls" if config.server.tls_client_ca_file else "tls",
        "metrics_port": metrics_port or None, "health_port": health_port or None,
    })
    return Coordinator(
        server=server, federation=federation, health=health_servicer, port=port, _store=store,
        metrics=metrics, metrics_port=metrics_port, _http=http,
        health_port=health_port, _health_server=health_server, _tracking=tracking, _loop_watch=loop_watch,
    )


ADMIN_TOKEN_FILE = "admin-token"


def operator_token(config: CoordinatorConfig, data_dir: Path) -> str:
    """The operator API's bearer token: server.admin_token, or "" with the loopback opt-in,
    or else one generated once into DATA_DIR/admin-token (0600) for local tools to read."""
    if config.server.admin_token or config.server.loopback_operators:
        return config.server.admin_token
    path = data_dir / ADMIN_TOKEN_FILE
    if path.is_file():
        return path.read_text(encoding="utf-8").strip()
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(token + "\n")
    log.info("operator token generated", extra={"path": str(path)})
    return token


def _open_data_dir(data_dir: Path) -> tuple[SqliteStore, BlobStore]:
    """open_store, with the usual failures (not writable, not a directory, not a database)
    as one ConfigError naming the directory and the fix."""
    import sqlite3

    from rankfed.coordinator.errors import StorageError

    try:
        return open_store(data_dir)
    except (StorageError, OSError, sqlite3.Error) as exc:
        raise ConfigError(
            f"server.data_dir = {str(data_dir)!r} cannot be used: {exc}; give the coordinator's user write access "
            "(systemd: StateDirectory=, Kubernetes: fsGroup) or choose another with --data-dir"
        ) from None


_MODEL_KEY = "model_weights_sha256"


def _check_data_dir_model(store: StateStore, manifest: ModelManifest, data_dir: Path) -> None:
    """A data directory belongs to one base model: its rounds, adapters and tokens mean
    nothing for another. The first start records the model; later starts must match."""
    held = store.get_meta(_MODEL_KEY)
    if held is None:
        store.set_meta(_MODEL_KEY, manifest.weights_sha256)
        store.set_meta("model_id", manifest.model_id)
    elif held != manifest.weights_sha256:
        held_id = store.get_meta("model_id") or "another model"
        raise ConfigError(
            f"data directory {data_dir} holds a federation of {held_id} (weights sha256 {held[:12]}…), "
            f"but this coordinator serves {manifest.model_id} ({manifest.weights_sha256[:12]}…): use another "
            "--data-dir, or point --manifest at that model's manifest (start over: docs/operations.md)"
        )


def _bind_problem(address: str, setting: str, detail: object) -> str:
    port = address.rpartition(":")[2]
    return (f"{setting} = {address!r}: cannot listen there ({detail}); is another process using port {port}? "
            f"(`ss -ltnp 'sport = :{port}'`) choose another address or stop it")


def _bind(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None, setting: str) -> int:
    """Bind a port; a port in use or a foreign address is a ConfigError naming the setting."""
    try:
        port = server.add_insecure_port(address) if credentials is None else server.add_secure_port(address, credentials)
    except RuntimeError as exc:  # grpc raises RuntimeError("Failed to bind to address ...")
        raise ConfigError(_bind_problem(address, setting, str(exc).splitlines()[0])) from None
    if port == 0:
        raise ConfigError(_bind_problem(address, setting, "bind failed"))
    return port


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
    pacer: asyncio.Task[None] | None = None
    if config.server.gc_full_collection_seconds:
        pacer = asyncio.create_task(GcPacer(full_every=config.server.gc_full_collection_seconds).run(),
                                    name="rankfed-gc-pacer")
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
    if pacer is not None:
        pacer.cancel()
    await coordinator.stop()
    log.info("coordinator stopped")
    return status
