"""Load: one coordinator process against a fleet of simulated devices.

N virtual devices (default 10,000), spread over P worker processes of grpc.aio clients and
multiplexed over a few channels per process (one HTTP/2 connection carries the calls of
`--devices-per-channel` devices, each with its own session token), join, then long-poll
GetTask and heartbeat. The round selects K of them (default 1,000); they download the
global adapter, wait at a barrier until the whole fleet has joined, then upload a 1 MiB
update at once, while the rest keep polling and heart-beating. The run holds the fleet a
few seconds more after the round closes, then every worker stops by itself. Each worker
reports its own CPU time, and the machine's idle share is sampled, to show whether the
generator itself had CPU to spare.

Reports p50/p99/max latency per RPC as the clients saw it (GetTask split by answer: TRAIN,
WAIT after a held long-poll, DONE) and as the coordinator measured it (its /metrics
histograms, free of the client processes' own scheduling delays), coordinator CPU seconds and mean cores, and peak RSS (VmHWM), as a table
and JSON (bench/results/load.json).

    python bench/load_bench.py                        # 10,000 devices, 1,000 uploads of 1 MiB
    python bench/load_bench.py --devices 1000 --uploaders 100 --update-mib 4    # the earlier run
    python bench/load_bench.py --devices 200 --uploaders 20 --workers 2    # a quick look

Loopback only. Not a test: nothing here asserts, it measures.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._client import (  # noqa: E402
    coordinator_launch,
    machine_info,
    metric_samples,
    server_setting_lines,
)

MiB = 1 << 20
D = 8192  # one [D, D] module at rank 16 in float32 is 1 MiB of A+B
RANK = 16
WEIGHTS_SHA256 = "1e" * 32
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", 4 * MiB)]


# ----------------------------------------------------------------------------- setup


def write_setup(work: Path, args: argparse.Namespace) -> Path:
    manifest = work / "manifest.json"
    manifest.write_text(json.dumps({
        "format": "rankfed-model-manifest/1", "model_id": "load-bench", "weights_sha256": WEIGHTS_SHA256,
        "task": "causal-lm", "target_modules": ["q_proj"], "modules_to_save": [],
        "modules": {f"model.layers.{i}.self_attn.q_proj": [D, D] for i in range(args.update_mib)}, "dense": {},
    }))
    config = work / "coordinator.toml"
    server_settings = server_setting_lines(args.server_setting)
    config.write_text(f"""
[server]
loopback_operators = true  # a local benchmark: its tools ask without a token
max_chunk_bytes = {MiB}
long_poll_seconds = {args.long_poll}
upload_idle_timeout_seconds = 120.0
{server_settings}[model]
manifest = "{manifest}"
[lora]
max_rank = {RANK}
[federation]
rounds = 1
method = "fedit"
min_clients = {args.uploaders}
clients_per_round = {args.uploaders}
wait_for_clients_seconds = 600.0
round_deadline_seconds = 600.0
straggler_grace_seconds = 600.0
heartbeat_interval_seconds = {args.heartbeat}
heartbeat_timeout_seconds = {max(60.0, 6 * args.heartbeat)}
""")
    return config


def encoded_update(update_mib: int, seed: int) -> bytes:
    import numpy as np

    from rankfed.aggregation import Adapter, LoraModule, encode_adapter

    rng = np.random.default_rng(seed)
    modules = {
        f"model.layers.{i}.self_attn.q_proj": LoraModule(
            a=(rng.standard_normal((RANK, D)) * 0.01).astype(np.float32),
            b=(rng.standard_normal((D, RANK)) * 0.01).astype(np.float32), alpha=2.0 * RANK)
        for i in range(update_mib)
    }
    return encode_adapter(Adapter(modules=modules, dense={}))


# ----------------------------------------------------------------------------- one worker process


class Stats:
    def __init__(self) -> None:
        self.latency: dict[str, list[float]] = {}
        self.errors: dict[str, int] = {}

    def add(self, rpc: str, seconds: float) -> None:
        self.latency.setdefault(rpc, []).append(seconds)

    def error(self, rpc: str, code: str) -> None:
        self.errors[f"{rpc}:{code}"] = self.errors.get(f"{rpc}:{code}", 0) + 1


async def device(name: str, stub, stats: Stats, update: bytes, work: Path, args, stop_at: float) -> None:
    import grpc

    from rankfed.v1 import common_pb2 as ProtoCommon
    from rankfed.v1 import edge_pb2 as ProtoEdge

    capability = ProtoCommon.DeviceCapability(
        device_class=ProtoCommon.DEVICE_CLASS_CPU, memory_total_bytes=16 * 10**9, cpu_cores=8, compute_gflops=100.0)
    started = time.perf_counter()
    for attempt in range(5):
        try:
            reply = await stub.Join(ProtoEdge.JoinRequest(
                device_name=name, capability=capability, base_model_sha256=WEIGHTS_SHA256, num_examples=10),
                timeout=60)
            break
        except grpc.aio.AioRpcError as exc:
            stats.error("Join", exc.code().name)
            await asyncio.sleep(0.5 * (attempt + 1))
    else:
        (work / "gave_up" / name).touch()  # the driver stops waiting for this one
        return
    stats.add("Join", time.perf_counter() - started)
    (work / "joined" / name).touch()
    metadata = (("authorization", f"Bearer {reply.session_token}"),)
    state = {"round": 0, "state": ProtoCommon.PARTICIPANT_STATE_UNSPECIFIED}

    async def heartbeat() -> None:
        await asyncio.sleep(random.uniform(0, args.heartbeat))
        while time.monotonic() < stop_at and not (work / "stop").exists():
            t = time.perf_counter()
            try:
                await stub.Heartbeat(ProtoEdge.HeartbeatRequest(
                    round=state["round"], state=state["state"], progress=0.5), metadata=metadata, timeout=30)
                stats.add("Heartbeat", time.perf_counter() - t)
            except grpc.aio.AioRpcError as exc:
                stats.error("Heartbeat", exc.code().name)
            await asyncio.sleep(args.heartbeat)

    beats = asyncio.create_task(heartbeat())
    try:
        while time.monotonic() < stop_at and not (work / "stop").exists():
            request = ProtoEdge.GetTaskRequest()
            request.max_wait.FromNanoseconds(int(args.long_poll * 1e9))
            t = time.perf_counter()
            try:
                task = await stub.GetTask(request, metadata=metadata, timeout=args.long_poll + 30)
            except grpc.aio.AioRpcError as exc:
                stats.error("GetTask", exc.code().name)
                await asyncio.sleep(1.0)
                continue
            kind = task.WhichOneof("kind")
            label = {"train": "GetTask(train)", "wait": "GetTask(long-poll)", "done": "GetTask(done)"}[kind]
            stats.add(label, time.perf_counter() - t)
            if kind == "done":  # nothing left to poll for: keep the connection and heart-beat until stop
                while time.monotonic() < stop_at and not (work / "stop").exists():
                    await asyncio.sleep(2.0)
                break
            if kind != "train":
                continue
            if state["round"] == task.train.round:  # our upload for it failed: a device retries later,
                await asyncio.sleep(args.long_poll)  # not in a tight loop of TRAIN answers
                continue
            state["round"] = task.train.round
            await participate(stub, metadata, task.train.round, state, stats, update, work)
    finally:
        beats.cancel()


async def participate(stub, metadata, round_no: int, state: dict, stats: Stats, update: bytes, work: Path) -> None:
    import grpc

    from rankfed.v1 import common_pb2 as ProtoCommon
    from rankfed.v1 import edge_pb2 as ProtoEdge

    t = time.perf_counter()
    size = 0
    try:
        async for message in stub.DownloadAdapter(ProtoEdge.DownloadRequest(round=round_no), metadata=metadata,
                                                  timeout=300):
            size += len(message.chunk.data)
        stats.add("DownloadAdapter", time.perf_counter() - t)
    except grpc.aio.AioRpcError as exc:
        stats.error("DownloadAdapter", exc.code().name)
        return
    state["state"] = ProtoCommon.PARTICIPANT_STATE_TRAINING
    while not (work / "go").exists():  # every uploader starts together, once the whole fleet is in
        await asyncio.sleep(0.2)

    def messages():
        yield ProtoEdge.UploadMessage(header=ProtoEdge.UploadHeader(
            round=round_no, rank=RANK, num_examples=10, total_bytes=len(update),
            sha256=hashlib.sha256(update).hexdigest()))
        for offset in range(0, len(update), MiB):
            yield ProtoEdge.UploadMessage(chunk=ProtoCommon.Chunk(offset=offset, data=update[offset:offset + MiB]))

    state["state"] = ProtoCommon.PARTICIPANT_STATE_UPLOADING
    t = time.perf_counter()
    try:
        await stub.UploadUpdate(messages(), metadata=metadata, timeout=300)
        stats.add("UploadUpdate", time.perf_counter() - t)
    except grpc.aio.AioRpcError as exc:
        stats.error("UploadUpdate", exc.code().name)
    state["state"] = ProtoCommon.PARTICIPANT_STATE_UPLOADED
    (work / "uploaded" / str(id(state))).touch()  # the driver counts finished uploads, OK or not


def worker(index: int, names: list[str], address: str, work: Path, args: argparse.Namespace, stop_at: float) -> None:
    import grpc

    from rankfed.v1 import edge_pb2_grpc

    update = encoded_update(args.update_mib, seed=index)
    stats = Stats()
    cpu0, wall0 = time.process_time(), time.monotonic()

    async def run() -> None:
        per = max(1, args.devices_per_channel)
        # Local subchannel pools: each channel is its own TCP connection, not one shared by all.
        channels = [grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) for _ in range(0, len(names), per)]
        stubs = [edge_pb2_grpc.EdgeServiceStub(c) for c in channels]
        tasks = []
        for i, name in enumerate(names):  # ramp up instead of a thundering herd of joins
            tasks.append(asyncio.create_task(device(name, stubs[i // per], stats, update, work, args, stop_at)))
            await asyncio.sleep(args.ramp_seconds / max(len(names), 1))
        await asyncio.gather(*tasks, return_exceptions=True)
        for channel in channels:
            await channel.close()

    asyncio.run(run())
    (work / f"worker-{index}.json").write_text(json.dumps({
        "latency": stats.latency, "errors": stats.errors,
        "cpu_seconds": time.process_time() - cpu0, "wall_seconds": time.monotonic() - wall0,
    }))


# ----------------------------------------------------------------------------- coordinator process


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def admin_status(address: str):
    from rankfed.coordinator.admin_client import AdminClient

    with AdminClient(address, timeout_s=30) as admin:
        return admin.status()


def server_quantiles(metrics_text: str, q: float, name: str = "rankfed_rpc_duration_seconds") -> dict[str, float]:
    """Per-method quantile of a coordinator histogram (rankfed_rpc_duration_seconds by
    default), interpolated in its buckets (the coordinator's own view, free of the client
    processes' scheduling delays). A histogram without a method label is keyed "all"."""
    buckets: dict[str, list[tuple[float, float]]] = {}
    prefix = name + "_bucket{"
    for line in metrics_text.splitlines():
        if line.startswith(prefix):
            labels, value = line[len(prefix):].rsplit("} ", 1)
            fields = dict(part.split("=", 1) for part in labels.split(","))
            le = fields["le"].strip('"')
            buckets.setdefault(fields.get("method", '"all"').strip('"'), []).append(
                (float("inf") if le == "+Inf" else float(le), float(value)))
    out = {}
    for method, rows in buckets.items():
        rows.sort()
        total = rows[-1][1]
        rank, lower, below = q * total, 0.0, 0.0
        for bound, cumulative in rows:
            if cumulative >= rank:
                if bound == float("inf"):
                    out[method] = lower
                else:
                    share = (rank - below) / max(cumulative - below, 1e-9)
                    out[method] = lower + (bound - lower) * share
                break
            lower, below = bound, cumulative
    return out


def server_count_above(metrics_text: str, name: str, bound: float) -> tuple[float, float]:
    """(observations above `bound`, all observations) of a label-less coordinator histogram;
    `bound` must be one of its bucket bounds. Exact, where a quantile is interpolated."""
    cumulative = metric_samples(metrics_text, name + "_bucket")  # {le: observations up to it}
    within = next(v for le, v in cumulative.items() if le != "+Inf" and float(le) == bound)
    return cumulative["+Inf"] - within, cumulative["+Inf"]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--uploaders", type=int, default=1000)
    parser.add_argument("--update-mib", type=int, default=1)
    parser.add_argument("--workers", type=int, default=4, help="client processes")
    parser.add_argument("--devices-per-channel", type=int, default=250,
                        help="virtual devices sharing one gRPC channel (one TCP connection)")
    parser.add_argument("--long-poll", type=float, default=30.0, help="GetTask max_wait, seconds")
    parser.add_argument("--heartbeat", type=float, default=30.0, help="heartbeat interval, seconds")
    parser.add_argument("--ramp-seconds", type=float, default=60.0, help="spread the joins over this long")
    parser.add_argument("--hold-seconds", type=float, default=10.0, help="keep the fleet up after the round")
    parser.add_argument("--max-seconds", type=float, default=540.0, help="hard stop for the whole run")
    parser.add_argument("--metrics-port", type=int, default=19464, help="coordinator /metrics port (loopback)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "load.json")
    parser.add_argument("--server-setting", action="append", default=[], metavar="KEY = VALUE",
                        help="a line for the coordinator config's [server] table, e.g. "
                             "'gc_full_collection_seconds = 0' (repeatable)")
    parser.add_argument("--coordinator-log", type=Path,
                        help="copy the coordinator's log here at the end (e.g. with PYTHONASYNCIODEBUG=1, "
                             "which logs every event-loop step over 100 ms)")
    args = parser.parse_args()
    machine_info()  # the commits as the run starts (the report is written at its end)

    with tempfile.TemporaryDirectory(prefix="rankfed-load-") as tmp:
        work = Path(tmp)
        (work / "joined").mkdir()
        (work / "gave_up").mkdir()
        (work / "uploaded").mkdir()
        config = write_setup(work, args)
        port_file = work / "port"
        log = open(work / "coordinator.log", "wb")
        env, cwd = coordinator_launch()
        coordinator = subprocess.Popen(
            [sys.executable, "-m", "rankfed", "coordinator", "serve", "--config", str(config), "--data-dir",
             str(work / "data"), "--address", "127.0.0.1:0", "--port-file", str(port_file), "--log-level", "warning",
             "--metrics-address", f"127.0.0.1:{args.metrics_port}"],
            stdout=log, stderr=log, env=env, cwd=cwd)
        try:
            while not port_file.exists():
                if coordinator.poll() is not None:
                    raise SystemExit(f"coordinator exited:\n{(work / 'coordinator.log').read_text()}")
                time.sleep(0.1)
            address = f"127.0.0.1:{port_file.read_text().strip()}"
            cpu0, wall0 = proc_cpu_seconds(coordinator.pid), time.monotonic()
            busy0, total0 = machine_busy()
            load_before = os.getloadavg()
            stop_at = time.monotonic() + args.max_seconds
            names = [f"dev-{i:05d}" for i in range(args.devices)]
            ctx = mp.get_context("spawn")
            procs = [ctx.Process(target=worker, args=(i, names[i::args.workers], address, work, args, stop_at))
                     for i in range(args.workers)]
            for p in procs:
                p.start()
            while (len(os.listdir(work / "joined")) + len(os.listdir(work / "gave_up")) < args.devices
                   and time.monotonic() < stop_at):
                time.sleep(0.5)
            joined_at = time.monotonic()
            joined = len(os.listdir(work / "joined"))
            print(f"{joined} devices joined in {joined_at - wall0:.1f} s; uploads start",
                  flush=True)
            (work / "go").touch()
            go_wall = time.time()
            round_s = None
            # Neither GetRoundStatus (1,000 participants: ~60 ms of coordinator CPU) nor
            # /metrics (its gauges list every client: ~0.4 s at 10,000) may be polled while we
            # measure: wait for the uploaders' own markers, then read the round's finished_at.
            while len(os.listdir(work / "uploaded")) < args.uploaders and time.monotonic() < stop_at:
                time.sleep(0.5)
            while time.monotonic() < stop_at:
                st = admin_status(address)
                if st.history:
                    round_s = st.history[0].finished_at - go_wall  # AdminClient: seconds since the epoch
                    break
                time.sleep(1.0)
            online = admin_status(address).clients_online
            closed = f"closed {round_s:.1f} s after the barrier" if round_s is not None else "NOT closed by --max-seconds"
            print(f"round {closed}; {online} clients online; holding {args.hold_seconds:.0f} s", flush=True)
            time.sleep(args.hold_seconds)
            cpu1, wall1 = proc_cpu_seconds(coordinator.pid), time.monotonic()
            busy1, total1 = machine_busy()
            load_after = os.getloadavg()
            hwm = proc_hwm_mib(coordinator.pid)
            final = admin_status(address)
            sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
            from bench._client import scrape  # here: the generator processes stay free of its imports

            metrics_text = scrape(args.metrics_port)
            (work / "stop").touch()
            for p in procs:
                p.join(args.long_poll + 60)
                if p.is_alive():
                    p.terminate()
        finally:
            coordinator.send_signal(signal.SIGTERM)
            try:
                coordinator.wait(30)
            except subprocess.TimeoutExpired:
                coordinator.kill()
            log.close()
            if args.coordinator_log:
                shutil.copyfile(work / "coordinator.log", args.coordinator_log)

        latency: dict[str, list[float]] = {}
        errors: dict[str, int] = {}
        workers_cpu: list[tuple[float, float]] = []
        for path in work.glob("worker-*.json"):
            data = json.loads(path.read_text())
            workers_cpu.append((data["cpu_seconds"], data["wall_seconds"]))
            for rpc, values in data["latency"].items():
                latency.setdefault(rpc, []).extend(values)
            for key, n in data["errors"].items():
                errors[key] = errors.get(key, 0) + n

    record = final.history[0] if final.history else None
    result = {
        "benchmark": "load",
        "devices": args.devices, "uploaders": args.uploaders, "update_mib": args.update_mib,
        "workers": args.workers, "long_poll_seconds": args.long_poll, "heartbeat_seconds": args.heartbeat,
        "round_phase": record.phase if record else None,
        "round_updates": record.metrics["updates"] if record else 0,
        "round_seconds_after_barrier": round_s,
        "clients_online_at_end": final.clients_online,
        "coordinator_cpu_seconds": cpu1 - cpu0,
        "coordinator_mean_cores": (cpu1 - cpu0) / (wall1 - wall0),
        "coordinator_wall_seconds": wall1 - wall0,
        "coordinator_peak_rss_mib": hwm,
        "devices_joined": joined,
        "devices_per_channel": args.devices_per_channel,
        "generator_cpu_seconds": sum(c for c, _ in workers_cpu),
        "generator_mean_cores": sum(c / w for c, w in workers_cpu if w),
        "generator_busiest_worker_share": max((c / w for c, w in workers_cpu if w), default=0.0),
        "machine_busy_share": (busy1 - busy0) / max(total1 - total0, 1),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in load_after],
        "rpcs": {rpc: {"count": len(v), "p50_ms": 1e3 * pct(v, 0.5), "p99_ms": 1e3 * pct(v, 0.99),
                       "max_ms": 1e3 * max(v), "mean_ms": 1e3 * statistics.fmean(v)}
                 for rpc, v in sorted(latency.items())},
        "server_side_ms": {method: {"p50": 1e3 * p50, "p99": 1e3 * server_quantiles(metrics_text, 0.99)[method]}
                           for method, p50 in sorted(server_quantiles(metrics_text, 0.5).items())},
        # prometheus_client's own gc collector: a collection of an older generation walks the
        # objects of every younger one too, and 10,000 held long-polls are many objects.
        "coordinator_gc_collections": {
            gen: metric_samples(metrics_text, "python_gc_collections_total").get(gen, 0.0) for gen in ("0", "1", "2")},
        "server_get_task_overrun_ms": {
            "p50": 1e3 * server_quantiles(metrics_text, 0.5, "rankfed_get_task_overrun_seconds").get("all", float("nan")),
            "p99": 1e3 * server_quantiles(metrics_text, 0.99, "rankfed_get_task_overrun_seconds").get("all", float("nan")),
            # the goal (answered within 50 ms of due at p99), counted, not interpolated
            "over_50ms_and_total": server_count_above(metrics_text, "rankfed_get_task_overrun_seconds", 0.05),
        },
        "errors": errors,
        "machine": {"cpus": os.cpu_count(), **machine_info()},
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    print(f"\n{'rpc':<20} {'count':>7} {'p50 ms':>9} {'p99 ms':>9} {'max ms':>9}")
    for rpc, row in result["rpcs"].items():
        print(f"{rpc:<20} {row['count']:>7} {row['p50_ms']:>9.1f} {row['p99_ms']:>9.1f} {row['max_ms']:>9.1f}")
    print("\ncoordinator's own view (rankfed_rpc_duration_seconds, interpolated in buckets):")
    for method, row in result["server_side_ms"].items():
        print(f"{method:<20} {'':>7} {row['p50']:>9.1f} {row['p99']:>9.1f}")
    overrun = result["server_get_task_overrun_ms"]
    late, waits = overrun["over_50ms_and_total"]
    print(f"{'GetTask(WAIT) late':<20} {'':>7} {overrun['p50']:>9.1f} {overrun['p99']:>9.1f}   "
          f"(past the long-poll's due time; {late:.0f} of {waits:.0f} WAITs = {100 * late / max(waits, 1):.2f} % "
          "later than 50 ms)")
    closed = f"closed {round_s:.1f} s after the barrier" if round_s is not None else "not closed"
    print(f"\nround: {result['round_updates']:.0f}/{args.uploaders} updates of {args.update_mib} MiB, {closed}; "
          f"{final.clients_online}/{args.devices} online at the end")
    gcs = result["coordinator_gc_collections"]
    print(f"coordinator garbage collections by generation 0/1/2: {gcs['0']:.0f}/{gcs['1']:.0f}/{gcs['2']:.0f}")
    print(f"coordinator: {result['coordinator_cpu_seconds']:.1f} CPU s over {result['coordinator_wall_seconds']:.1f} s "
          f"({result['coordinator_mean_cores']:.2f} cores), peak RSS {hwm:.0f} MiB; errors: {errors or 'none'}")
    print(f"generator: {len(workers_cpu)} processes, {result['generator_mean_cores']:.2f} cores in all, busiest process "
          f"{100 * result['generator_busiest_worker_share']:.0f}% of a core; machine busy "
          f"{100 * result['machine_busy_share']:.0f}% of {os.cpu_count()} cores; load {result['loadavg_before'][0]} -> "
          f"{result['loadavg_after'][0]}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
