"""Shared pieces of the benchmarks: a coordinator run as a real process, a minimal edge
client speaking rankfed.v1 directly, a raw loopback TCP reference, stats and machine info.

Not a test helper and not the production edge client: every step is explicit so the
benchmarks time exactly the calls they name.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from rankfed.aggregation import Adapter, LoraModule, encode_adapter
from rankfed.coordinator.admin_client import AdminClient
from rankfed.protocol import FederationStatus, RoundPhase, RoundStatus
from rankfed.v1 import common_pb2 as ProtoCommon
from rankfed.v1 import edge_pb2 as ProtoEdge
from rankfed.v1 import edge_pb2_grpc

MiB = 1 << 20
CHUNK = 1 * MiB  # server.max_chunk_bytes and the raw-TCP buffer size
WEIGHTS_SHA256 = "5e" * 32  # any 64-hex string; clients send the same at Join
# Each LoRA module is [D, D] at rank RANK in float32: RANK * 2D * 4 bytes = 1 MiB per module.
D = 8192
RANK = 16
CHANNEL_OPTIONS = [  # room for the largest chunk a coordinator may advertise (64 MiB + framing)
    ("grpc.max_receive_message_length", 65 * MiB),
]


# ----------------------------------------------------------------------------- setup


def write_manifest(path: Path, adapter_mib: int) -> Path:
    """A causal-LM manifest whose rank-16 float32 adapter is `adapter_mib` MiB (+ header)."""
    modules = {f"model.layers.{i}.self_attn.q_proj": [D, D] for i in range(adapter_mib)}
    path.write_text(json.dumps({
        "format": "rankfed-model-manifest/1",
        "model_id": f"bench-{adapter_mib}mib",
        "weights_sha256": WEIGHTS_SHA256,
        "task": "causal-lm",
        "target_modules": ["q_proj"],
        "modules_to_save": [],
        "modules": modules,
        "dense": {},
    }, indent=1))
    return path


def write_config(path: Path, manifest: Path, *, rounds: int, clients: int, method: str = "rbla",
                 max_upload_bytes: int, deadline: float = 1800.0, chunk_bytes: int | None = None) -> Path:
    """Every client gets rank 16 (no tiers), the round starts as soon as `clients` are online.

    chunk_bytes None: the coordinator's defaults for server.max_chunk_bytes and
    max_receive_message_bytes (clients use what Join advertises)."""
    chunking = "" if chunk_bytes is None else (
        f"max_chunk_bytes = {chunk_bytes}\nmax_receive_message_bytes = {max(4 * MiB, chunk_bytes + 128 * 1024)}\n")
    chunking += server_setting_lines()
    path.write_text(f"""\
[server]
loopback_operators = true  # a local benchmark: its tools ask without a token
{chunking}max_upload_bytes = {max_upload_bytes}
long_poll_seconds = 30.0

[model]
manifest = "{manifest}"

[lora]
max_rank = {RANK}
alpha_rule = "constant_scaling"
scaling = 2.0

[federation]
rounds = {rounds}
method = "{method}"
min_clients = {clients}
clients_per_round = {clients}
wait_for_clients_seconds = 600.0
round_deadline_seconds = {deadline}
straggler_grace_seconds = 600.0
heartbeat_interval_seconds = 60.0
heartbeat_timeout_seconds = 1800.0

[rank_policy]
default_rank = {RANK}
tiers = []
""")
    return path


def random_update(adapter_mib: int, *, alpha: float, seed: int) -> bytes:
    """Safetensors bytes of a rank-16 update for the manifest written by write_manifest."""
    rng = np.random.default_rng(seed)
    modules = {
        f"model.layers.{i}.self_attn.q_proj": LoraModule(
            a=rng.standard_normal((RANK, D), dtype=np.float32) * 0.01,
            b=rng.standard_normal((D, RANK), dtype=np.float32) * 0.01,
            alpha=alpha,
        )
        for i in range(adapter_mib)
    }
    return encode_adapter(Adapter(modules=modules, dense={}))


COORDINATOR_SRC = "RANKFED_BENCH_COORDINATOR_SRC"
SERVER_SETTINGS = "RANKFED_BENCH_SERVER_SETTINGS"


def server_setting_lines(extra: Sequence[str] = ()) -> str:
    """Extra lines for a bench coordinator's [server] table: those of
    RANKFED_BENCH_SERVER_SETTINGS="key = value; key2 = value2", then `extra` (load_bench's
    --server-setting): an A/B of one setting at one commit."""
    lines = [*os.environ.get(SERVER_SETTINGS, "").split(";"), *extra]
    return "".join(line.strip() + "\n" for line in lines if line.strip())


def coordinator_launch() -> tuple[dict[str, str], str | None]:
    """(environment, working directory) of a coordinator process. With
    RANKFED_BENCH_COORDINATOR_SRC=DIR (a checkout, e.g. `git worktree add DIR <commit>`) the
    coordinator runs that tree's rankfed while the bench, its clients and its baselines stay
    this tree's: a before/after pair measured with one load generator."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    src = os.environ.get(COORDINATOR_SRC)
    if not src:
        return env, None
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH", "")]))
    return env, src  # `python -m` puts the working directory first on sys.path


class CoordinatorProcess:
    """`python -m rankfed coordinator serve` as a separate process, as in production."""

    def __init__(self, workdir: Path, config: Path, *, metrics_port: int = 0) -> None:
        """metrics_port: serve /metrics there (0: not at all)."""
        self.workdir = workdir
        self.config = config
        self.metrics_port = metrics_port
        self.port_file = workdir / "port"
        self.log_path = workdir / "coordinator.log"
        self.proc: subprocess.Popen | None = None
        self.address = ""

    def start(self, timeout: float = 120.0) -> str:
        self.port_file.unlink(missing_ok=True)
        log = open(self.log_path, "ab")
        env, cwd = coordinator_launch()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rankfed", "coordinator", "serve", "--config", str(self.config),
             "--data-dir", str(self.workdir / "data"), "--address", "127.0.0.1:0",
             "--port-file", str(self.port_file), "--log-format", "text", "--log-level", "warning",
             *(["--metrics-address", f"127.0.0.1:{self.metrics_port}"] if self.metrics_port else [])],
            stdout=log, stderr=log, env=env, cwd=cwd,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while not self.port_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"coordinator exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"coordinator did not start:\n{self.log_path.read_text()}")
            time.sleep(0.05)
        self.address = f"127.0.0.1:{self.port_file.read_text().strip()}"
        return self.address

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


    def scrape(self) -> str:
        """The coordinator's /metrics text (Prometheus exposition)."""
        return scrape(self.metrics_port)


def scrape(port: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as reply:
        return reply.read().decode()


def metric_samples(text: str, name: str) -> dict[str, float]:
    """{label value: sample} of one single-label family in a /metrics text (e.g. the
    `_sum` or `_count` of a histogram by its label)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                out[next(iter(sample.labels.values()), "")] = sample.value
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ----------------------------------------------------------------------------- memory


def rss_bytes(pid: int) -> int:
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss
    except ImportError:
        return _proc_status_kib(pid, "VmRSS") * 1024


def hwm_bytes(pid: int) -> int:
    """Peak RSS since the process started (VmHWM)."""
    return _proc_status_kib(pid, "VmHWM") * 1024


def _proc_status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the command name (which may hold spaces): field 0 is the state."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (from /proc/PID/stat)."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_counters(pid: int) -> dict[str, float]:
    """User and system CPU seconds, minor and major page faults (/proc/PID/stat) and the
    voluntary and involuntary context switches of all its threads: which of them grows
    tells a slow repetition's cause."""
    fields = _stat_fields(pid)
    tick = os.sysconf("SC_CLK_TCK")
    counters = {"user_s": int(fields[11]) / tick, "system_s": int(fields[12]) / tick,
                "minor_faults": float(fields[7]), "major_faults": float(fields[9]),
                "voluntary_switches": 0.0, "involuntary_switches": 0.0}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "status").read_text()
        except OSError:
            continue  # the thread ended meanwhile
        for line in text.splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                counters["voluntary_switches"] += int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches:"):
                counters["involuntary_switches"] += int(line.split()[1])
    return counters


def counters_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in before}


class RssSampler:
    """Samples a process's RSS every `interval` seconds in a thread; `mark()` starts a new window."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid, self.interval = pid, interval
        self.peak = 0
        self.window_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)

    def mark(self) -> int:
        """Peak of the window that ends now; the next window starts."""
        peak, self.window_peak = self.window_peak, 0
        return peak

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                value = rss_bytes(self.pid)
            except (OSError, ProcessLookupError, Exception):  # process gone
                return
            self.peak = max(self.peak, value)
            self.window_peak = max(self.window_peak, value)
            self._stop.wait(self.interval)


# ----------------------------------------------------------------------------- edge client


@dataclass
class Train:
    round: int
    rank: int
    alpha: float
    adapter_bytes: int
    adapter_sha256: str


class EdgeClient:
    """Join -> GetTask long-poll -> DownloadAdapter -> UploadUpdate (header + chunks)."""

    def __init__(self, address: str, name: str) -> None:
        self.channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.stub = edge_pb2_grpc.EdgeServiceStub(self.channel)
        self.name = name
        self.metadata: tuple = ()
        self.chunk = CHUNK

    def close(self) -> None:
        self.channel.close()

    def join(self) -> ProtoEdge.JoinResponse:
        capability = ProtoCommon.DeviceCapability(
            device_class=ProtoCommon.DEVICE_CLASS_CPU, memory_total_bytes=8 * 10**9, cpu_cores=2, compute_gflops=50.0,
        )
        reply = self.stub.Join(ProtoEdge.JoinRequest(
            device_name=self.name, capability=capability, base_model_sha256=WEIGHTS_SHA256, num_examples=100,
        ), timeout=60)
        self.metadata = (("authorization", f"Bearer {reply.session_token}"),)
        self.chunk = reply.max_chunk_bytes or CHUNK
        return reply

    def wait_train(self, timeout: float = 600.0) -> Train | None:
        """The next TRAIN task, or None when the federation is done."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            request = ProtoEdge.GetTaskRequest()
            request.max_wait.FromSeconds(20)
            task = self.stub.GetTask(request, metadata=self.metadata, timeout=120)
            kind = task.WhichOneof("kind")
            if kind == "train":
                t = task.train
                return Train(t.round, t.assignment.lora.rank, t.assignment.lora.alpha, t.adapter_bytes, t.adapter_sha256)
            if kind == "done":
                return None
            time.sleep(min(task.wait.retry_after.ToNanoseconds() / 1e9, 0.2))
        raise TimeoutError(f"{self.name}: no TRAIN task within {timeout} s")

    def download(self, round_no: int, into: bytearray) -> tuple[int, float]:
        """Stream the round's adapter into `into`; returns (bytes, seconds from request to last chunk)."""
        t0 = time.perf_counter()
        n = 0
        view = memoryview(into)
        for message in self.stub.DownloadAdapter(
            ProtoEdge.DownloadRequest(round=round_no), metadata=self.metadata, timeout=600
        ):
            if message.WhichOneof("kind") == "chunk":
                data = message.chunk.data
                view[n:n + len(data)] = data
                n += len(data)
        return n, time.perf_counter() - t0

    def upload(self, round_no: int, rank: int, data: bytes, sha256: str) -> tuple[ProtoEdge.UploadReceipt, float, float]:
        """Header then 1 MiB chunks; returns (receipt, seconds from the first message to the
        receipt, seconds from the last chunk handed to gRPC to the receipt)."""
        header = ProtoEdge.UploadHeader(
            round=round_no, rank=rank, num_examples=100, total_bytes=len(data), sha256=sha256,
            metrics=ProtoCommon.TrainMetrics(loss_first=1.0, loss_last=0.9, steps=1),
        )
        chunk = self.chunk
        marks: dict[str, float] = {}

        def messages():
            marks["first"] = time.perf_counter()
            yield ProtoEdge.UploadMessage(header=header)
            for off in range(0, len(data), chunk):
                yield ProtoEdge.UploadMessage(chunk=ProtoCommon.Chunk(offset=off, data=data[off:off + chunk]))
            # gRPC asks for the next message once the last one is in its send buffer: from
            # here on the client only waits for the coordinator to finish the upload.
            marks["last"] = time.perf_counter()

        t_call = time.perf_counter()
        receipt = self.stub.UploadUpdate(messages(), metadata=self.metadata, timeout=600)
        t1 = time.perf_counter()
        return receipt, t1 - marks.get("first", t_call), t1 - marks.get("last", t1)


def round_status(address: str, history_limit: int = 0) -> FederationStatus:
    with AdminClient(address, timeout_s=60) as admin:
        return admin.status(history_limit)


def finished_round(address: str, round_no: int, timeout: float = 600.0, interval: float = 0.02) -> RoundStatus:
    """Poll until round `round_no` is DONE or FAILED; returns its status."""
    deadline = time.monotonic() + timeout
    with AdminClient(address, timeout_s=60) as admin:
        while time.monotonic() < deadline:
            status = admin.status()
            for r in [*status.history, *([status.current] if status.current else [])]:
                if r.round == round_no and r.phase in (RoundPhase.DONE, RoundPhase.FAILED):
                    return r
            time.sleep(interval)
    raise TimeoutError(f"round {round_no} did not finish within {timeout} s")


# ----------------------------------------------------------------------------- raw TCP reference

# Protocol: the client sends op (b"D" download / b"U" upload) + uint64 length. D: the server
# sendall()s that many bytes in 1 MiB slices. U: the server recv_into()s a 1 MiB buffer until
# it has them all, then answers b"K" (the raw-TCP counterpart of the receipt).
_REQ = struct.Struct("!cQ")


def raw_server_main(port_queue, stop_event) -> None:
    """A raw-TCP server process: one thread per connection (sendall/recv_into release the GIL)."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=256)
    listener.settimeout(0.2)
    port_queue.put(listener.getsockname()[1])
    payload = memoryview(np.random.default_rng(1).bytes(CHUNK))

    def serve(conn: socket.socket) -> None:
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            buf = bytearray(CHUNK)
            view = memoryview(buf)
            while True:
                head = _recv_exact(conn, _REQ.size)
                if head is None:
                    return
                op, n = _REQ.unpack(head)
                if op == b"D":
                    left = n
                    while left:
                        k = min(left, CHUNK)
                        conn.sendall(payload[:k])
                        left -= k
                else:
                    left = n
                    while left:
                        got = conn.recv_into(view[:min(left, CHUNK)])
                        if not got:
                            return
                        left -= got
                    conn.sendall(b"K")

    while not stop_event.is_set():
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        threading.Thread(target=serve, args=(conn,), daemon=True).start()
    listener.close()


def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        piece = conn.recv(n - len(data))
        if not piece:
            return None
        data += piece
    return data


class RawClient:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        self.sock.close()

    def download(self, n: int, into: bytearray) -> float:
        view = memoryview(into)
        t0 = time.perf_counter()
        self.sock.sendall(_REQ.pack(b"D", n))
        got = 0
        while got < n:
            k = self.sock.recv_into(view[got:min(n, got + CHUNK)])
            if not k:
                raise ConnectionError("raw server closed")
            got += k
        return time.perf_counter() - t0

    def upload(self, data: bytes) -> float:
        view = memoryview(data)
        t0 = time.perf_counter()
        self.sock.sendall(_REQ.pack(b"U", len(data)))
        for off in range(0, len(data), CHUNK):
            self.sock.sendall(view[off:off + CHUNK])
        if _recv_exact(self.sock, 1) != b"K":
            raise ConnectionError("raw server did not acknowledge")
        return time.perf_counter() - t0


# ----------------------------------------------------------------------------- bare gRPC reference


class _BareEdge(edge_pb2_grpc.EdgeServiceServicer):
    """UploadUpdate that only receives: parse each UploadMessage (protobuf, as the coordinator
    must) and count the chunk bytes. No auth, no checks, no disk: the transport's own cost."""

    async def _aio_upload(self, request_iterator, context):
        n = 0
        async for message in request_iterator:
            if message.WhichOneof("kind") == "chunk":
                n += len(message.chunk.data)
        return ProtoEdge.UploadReceipt(bytes_received=n)

    def _sync_upload(self, request_iterator, context):
        n = 0
        for message in request_iterator:
            if message.WhichOneof("kind") == "chunk":
                n += len(message.chunk.data)
        return ProtoEdge.UploadReceipt(bytes_received=n)


def bare_grpc_server_main(kind: str, port_queue, stop_event, max_receive: int = 4 * MiB) -> None:
    """A gRPC server process with the coordinator's message-size options whose UploadUpdate
    only counts bytes. kind: "aio" (grpc.aio, one event loop, as the coordinator) or
    "threaded" (grpc.server with a thread pool), with glibc's default heap, or with
    "_kept_heap" appended: the heap settings the coordinator runs with."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    if kind.endswith("_kept_heap"):
        from rankfed.coordinator import heap

        heap.limit_arenas()
        heap.keep_buffers()
        kind = kind.removesuffix("_kept_heap")

    options = [("grpc.max_receive_message_length", max_receive), ("grpc.max_send_message_length", max_receive)]
    servicer = _BareEdge()
    if kind == "threaded":
        servicer.UploadUpdate = servicer._sync_upload
        server = grpc.server(ThreadPoolExecutor(max_workers=8), options=options)
        edge_pb2_grpc.add_EdgeServiceServicer_to_server(servicer, server)
        port_queue.put(server.add_insecure_port("127.0.0.1:0"))
        server.start()
        stop_event.wait()
        server.stop(0)
        return

    async def serve() -> None:
        servicer.UploadUpdate = servicer._aio_upload
        server = grpc.aio.server(options=options)
        edge_pb2_grpc.add_EdgeServiceServicer_to_server(servicer, server)
        port_queue.put(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        while not stop_event.is_set():
            await asyncio.sleep(0.1)
        await server.stop(0)

    asyncio.run(serve())


class BareGrpcServer:
    """bare_grpc_server_main in a spawned process; `address`, `pid`, `stop()`."""

    def __init__(self, ctx, kind: str, max_receive: int = 4 * MiB) -> None:
        self.kind = kind
        ports, self._stop = ctx.Queue(), ctx.Event()
        self._proc = ctx.Process(target=bare_grpc_server_main, args=(kind, ports, self._stop, max_receive), daemon=True)
        self._proc.start()
        self.address = f"127.0.0.1:{ports.get(timeout=60)}"

    @property
    def pid(self) -> int:
        return self._proc.pid

    def stop(self) -> None:
        self._stop.set()
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()


# ----------------------------------------------------------------------------- reporting


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def fmt_range(s: dict[str, float], digits: int = 0) -> str:
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}..{s['max']:.{digits}f}]"


_MACHINE_AT_START: dict[str, object] = {}


def machine_info() -> dict[str, object]:
    """The machine and the commits (the bench's, the coordinator's); the commits as they
    were at the first call, so call it once at a bench's start: a commit made while a long
    bench runs must not be recorded as the code it ran."""
    if not _MACHINE_AT_START:
        _MACHINE_AT_START.update(_machine_info())
    return dict(_MACHINE_AT_START)


def _machine_info() -> dict[str, object]:
    try:
        import psutil

        memory = psutil.virtual_memory().total
    except ImportError:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_bytes": memory,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "grpcio": grpc.__version__,
        "numpy": np.__version__,
        "git_commit": _git_commit(),
        "coordinator_commit": _git_commit(coordinator_launch()[1]),
    }


def _git_commit(where: str | Path | None = None) -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=where or Path(__file__).parent, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def sha256_hex(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)
