"""A real coordinator for tests: served by grpc.aio on 127.0.0.1:0 in a background thread
(or as a real process for crash tests), and a small scripted gRPC client that speaks the
protocol directly, so each test can send exactly the bytes it wants."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from rankfed.aggregation import Adapter, LoraModule, decode_adapter, encode_adapter
from rankfed.coordinator.admin_client import AdminClient
from rankfed.coordinator.config import CoordinatorConfig, load_config
from rankfed.protocol import FederationStatus
from rankfed.protocol.manifest import ModelManifest, load_manifest
from rankfed.tls import TlsOptions, channel_for
from rankfed.v1 import admin_pb2_grpc, edge_pb2_grpc
from rankfed.v1 import common_pb2 as ProtoCommon
from rankfed.v1 import edge_pb2 as ProtoEdge

MANIFEST = Path(__file__).parent / "data" / "tiny-manifest.json"
CHUNK = 64 * 1024
DEVICE = {"cpu": ProtoCommon.DEVICE_CLASS_CPU, "cuda": ProtoCommon.DEVICE_CLASS_CUDA, "mobile": ProtoCommon.DEVICE_CLASS_MOBILE}


def make_certs(out: Path, *args: str) -> Path:
    """A test PKI made by deploy/make-certs.sh (openssl): ca.pem, server.pem, edge-1..3, operator."""
    script = Path(__file__).resolve().parents[2] / "deploy" / "make-certs.sh"
    subprocess.run(["bash", str(script), str(out), *args], check=True, capture_output=True, timeout=60)
    return out


def make_config(data_dir: Path, **overrides) -> CoordinatorConfig:
    values = {
        "server.address": "127.0.0.1:0",
        "server.data_dir": str(data_dir),
        "server.max_chunk_bytes": CHUNK,
        "server.long_poll_seconds": 2.0,
        # Tests reach the operator API from loopback without a token; the default (a generated
        # token) has its own tests in test_operator_token.py.
        "server.loopback_operators": True,
        "model.manifest": str(MANIFEST),
        "federation.rounds": 2,
        "federation.min_clients": 3,
        "federation.round_deadline_seconds": 30.0,
        "federation.wait_for_clients_seconds": 30.0,
        "federation.straggler_grace_seconds": 5.0,
        "federation.heartbeat_interval_seconds": 1.0,
        "federation.heartbeat_timeout_seconds": 10.0,
    }
    values.update(overrides)
    return load_config(None, overrides=values)


class CoordinatorThread:
    """The real server, on its own event loop in a daemon thread."""

    def __init__(self, config: CoordinatorConfig) -> None:
        from rankfed.coordinator.server import start_coordinator

        self.config = config
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.coordinator = asyncio.run_coroutine_threadsafe(start_coordinator(config), self.loop).result(30)
        self.address = f"127.0.0.1:{self.coordinator.port}"

    @property
    def federation(self):
        return self.coordinator.federation

    def call(self, fn, *args):
        """Run a plain function on the server's loop (core state is loop-owned)."""

        async def run():
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(30)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.coordinator.stop(0.5), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


class CoordinatorProcess:
    """`python -m rankfed coordinator serve` as a real process (for kill -9 tests)."""

    def __init__(self, config_path: Path, data_dir: Path, log_path: Path) -> None:
        self.config_path, self.data_dir, self.log_path = config_path, data_dir, log_path
        self.proc: subprocess.Popen | None = None
        self.address = ""

    def start(self, address: str = "127.0.0.1:0", timeout: float = 60.0) -> str:
        port_file = self.data_dir.parent / "port"
        port_file.unlink(missing_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rankfed", "coordinator", "serve", "--config", str(self.config_path),
             "--data-dir", str(self.data_dir), "--address", address, "--port-file", str(port_file)],
            stdout=log, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()
        deadline = time.monotonic() + timeout
        while not port_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"coordinator exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"coordinator did not start:\n{self.log_path.read_text()}")
            time.sleep(0.05)
        self.address = f"127.0.0.1:{port_file.read_text().strip()}"
        return self.address

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            return self.proc.wait(30)
        return self.proc.returncode


def random_adapter(manifest: ModelManifest, rank: int, alpha: float, seed: int) -> Adapter:
    rng = np.random.default_rng(seed)
    modules = {
        name: LoraModule(
            a=rng.standard_normal((rank, d_in)).astype(np.float32),
            b=rng.standard_normal((d_out, rank)).astype(np.float32),
            alpha=alpha,
        )
        for name, (d_out, d_in) in manifest.modules.items()
    }
    dense = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in manifest.dense.items()}
    return Adapter(modules=modules, dense=dense)


@dataclass
class Download:
    manifest: ProtoEdge.TransferManifest
    data: bytes


class EdgeTestClient:
    """Speaks EdgeService directly; every step is explicit so tests can break any of them."""

    def __init__(self, address: str, name: str, device: str = "cpu", *, gflops: float = 20.0, memory_gb: float = 8.0,
                 tls: TlsOptions | None = None) -> None:
        self.channel = channel_for(address, tls)
        self.stub = edge_pb2_grpc.EdgeServiceStub(self.channel)
        self.name, self.device, self.gflops, self.memory_gb = name, device, gflops, memory_gb
        self.token = ""
        self.device_key = ""
        self.client_id = ""

    def close(self) -> None:
        self.channel.close()

    @property
    def metadata(self):
        return (("authorization", f"Bearer {self.token}"),)

    def join(self, weights_sha256: str, **fields) -> ProtoEdge.JoinResponse:
        capability = ProtoCommon.DeviceCapability(
            device_class=DEVICE[self.device], memory_total_bytes=int(self.memory_gb * 1e9), cpu_cores=4,
            compute_gflops=self.gflops, accelerator_memory_bytes=int(self.memory_gb * 1e9) if self.device == "cuda" else 0,
        )
        request = ProtoEdge.JoinRequest(
            device_name=self.name, capability=capability, base_model_sha256=weights_sha256, num_examples=10
        )
        for key, value in fields.items():
            if key == "capability":  # a message field is copied, not assigned
                request.capability.CopyFrom(value)
            else:
                setattr(request, key, value)
        if self.device_key and "device_key" not in fields:
            request.device_key = self.device_key  # the key this device got at its first Join
        reply = self.stub.Join(request, timeout=10)
        self.token, self.client_id = reply.session_token, reply.client_id
        self.device_key = reply.device_key or self.device_key
        return reply

    def get_task(self, max_wait: float = 5.0) -> ProtoEdge.Task:
        request = ProtoEdge.GetTaskRequest()
        request.max_wait.FromNanoseconds(int(max_wait * 1e9))
        return self.stub.GetTask(request, metadata=self.metadata, timeout=max_wait + 10)

    def wait_train(self, timeout: float = 30.0) -> ProtoEdge.TrainTask:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            task = self.get_task(2.0)
            if task.WhichOneof("kind") == "train":
                return task.train
            if task.WhichOneof("kind") == "done":
                raise AssertionError(f"{self.name}: federation done: {task.done.reason}")
        raise TimeoutError(f"{self.name}: no TRAIN task within {timeout} s")

    def download(self, round_no: int, offset: int = 0, full: bool = False) -> Download:
        messages = list(self.stub.DownloadAdapter(
            ProtoEdge.DownloadRequest(round=round_no, offset=offset, full=full), metadata=self.metadata, timeout=30
        ))
        manifest = messages[0].manifest
        data = b"".join(m.chunk.data for m in messages[1:])
        return Download(manifest=manifest, data=data)

    def upload_bytes(self, round_no: int, rank: int, data: bytes, *, sha256: str | None = None,
                     total_bytes: int | None = None, num_examples: int = 10, chunk: int = CHUNK,
                     chunks=None, loss: float = 1.0, accuracy: float = 0.5,
                     eval: dict[str, float] | None = None, resume_offset: int = 0,
                     stop_at: int | None = None) -> ProtoEdge.UploadReceipt:
        """`resume_offset`: send the header with it and the chunks from there; `stop_at`:
        end the stream cleanly once that many bytes are sent (a short upload)."""
        header = ProtoEdge.UploadHeader(
            round=round_no, rank=rank, num_examples=num_examples,
            total_bytes=len(data) if total_bytes is None else total_bytes,
            sha256=hashlib.sha256(data).hexdigest() if sha256 is None else sha256,
            metrics=ProtoCommon.TrainMetrics(loss_first=loss + 0.5, loss_last=loss, steps=3,
                                          eval={"accuracy": accuracy} if eval is None else eval),
            resume_offset=resume_offset,
        )
        end = len(data) if stop_at is None else stop_at

        def messages():
            yield ProtoEdge.UploadMessage(header=header)
            pieces = chunks if chunks is not None else [
                (off, data[off:min(off + chunk, end)]) for off in range(resume_offset, end, chunk)
            ]
            for off, piece in pieces:
                yield ProtoEdge.UploadMessage(chunk=ProtoCommon.Chunk(offset=off, data=piece))

        return self.stub.UploadUpdate(messages(), metadata=self.metadata, timeout=30)

    def upload_status(self, round_no: int, data: bytes, *, sha256: str | None = None,
                      total_bytes: int | None = None) -> ProtoEdge.UploadStatusResponse:
        request = ProtoEdge.UploadStatusRequest(
            round=round_no, total_bytes=len(data) if total_bytes is None else total_bytes,
            sha256=hashlib.sha256(data).hexdigest() if sha256 is None else sha256,
        )
        return self.stub.UploadStatus(request, metadata=self.metadata, timeout=30)

    def upload(self, round_no: int, adapter: Adapter, **kwargs) -> ProtoEdge.UploadReceipt:
        return self.upload_bytes(round_no, adapter.max_rank, encode_adapter(adapter), **kwargs)

    def heartbeat(self, round_no: int, state=ProtoCommon.PARTICIPANT_STATE_TRAINING) -> ProtoEdge.HeartbeatResponse:
        return self.stub.Heartbeat(
            ProtoEdge.HeartbeatRequest(round=round_no, state=state, progress=0.5), metadata=self.metadata, timeout=10
        )

    def leave(self) -> None:
        self.stub.Leave(ProtoEdge.LeaveRequest(reason="test"), metadata=self.metadata, timeout=10)


def admin_stub(address: str, tls: TlsOptions | None = None) -> tuple[grpc.Channel, admin_pb2_grpc.AdminServiceStub]:
    channel = channel_for(address, tls)
    return channel, admin_pb2_grpc.AdminServiceStub(channel)


def status(address: str, tls: TlsOptions | None = None, token: str = "") -> FederationStatus:
    with AdminClient(address, admin_token=token, tls=tls, timeout_s=10) as admin:
        return admin.status()


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out waiting for {what}")


def manifest() -> ModelManifest:
    return load_manifest(MANIFEST)


def update_files(data_dir: Path) -> list[str]:
    """Every file under the updates directory, temporaries included."""
    root = data_dir / "blobs" / "updates"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def staged_files(data_dir: Path) -> list[str]:
    """Every file of the staging area (bytes of broken uploads kept for a resume)."""
    root = data_dir / "blobs" / "staging"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def decode(data: bytes) -> Adapter:
    return decode_adapter(data)


def dump_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


