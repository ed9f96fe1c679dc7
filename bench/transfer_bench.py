"""Upload and download throughput of one big adapter through the coordinator, against raw
loopback TCP moving the same bytes in the same run.

    python bench/transfer_bench.py                      # 128 MiB, 3 reps (+1 warm-up), ~1 min
    python bench/transfer_bench.py --adapter-mib 256 --reps 5

The coordinator runs as its own process (`python -m rankfed coordinator serve`) with
server.max_receive_message_bytes = 4 MiB and 1 MiB chunks; one client in this process joins
and does one round per repetition: DownloadAdapter (timed from the request to the last
chunk), then UploadUpdate (timed from the first UploadMessage to the receipt). The raw-TCP
reference is a separate process doing sendall / recv_into with 1 MiB buffers; its upload is
timed to a 1-byte acknowledgement, like the receipt. Repetitions interleave raw and gRPC.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _client as B  # noqa: E402
from rankfed.coordinator import heap  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "transfer.json"
# "_kept_heap": the server process keeps glibc's heap as the coordinator does
# (rankfed.coordinator.heap.keep_buffers); the plain kinds run with glibc's defaults.
BARE_KINDS = ("aio", "threaded", "aio_kept_heap", "threaded_kept_heap")


class LatencyProbe:
    """Health.Check every 20 ms from a thread; the worst latency per window shows how long
    the coordinator's event loop was unable to answer a trivial RPC."""

    def __init__(self, address: str) -> None:
        self._channel = grpc.insecure_channel(address)
        self._stub = health_pb2_grpc.HealthStub(self._channel)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._worst = 0.0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> LatencyProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)
        self._channel.close()

    def mark(self) -> float:
        with self._lock:
            worst, self._worst = self._worst, 0.0
        return worst

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.perf_counter()
            try:
                self._stub.Check(health_pb2.HealthCheckRequest(), timeout=60)
            except grpc.RpcError:
                pass
            dt = time.perf_counter() - t0
            with self._lock:
                self._worst = max(self._worst, dt)
            self._stop.wait(0.02)


PHASE_SUM = "rankfed_upload_phase_seconds_sum"
PHASES = ("begin", "receive", "drain", "verify", "sync", "commit", "receipt_sync", "fold")


def wait_folded(coordinator: B.CoordinatorProcess, folds: int, timeout: float = 120.0) -> tuple[str, int]:
    """Poll /metrics until `folds` uploads have been folded; (the last text, scrapes made)."""
    deadline = time.monotonic() + timeout
    scrapes = 0
    while True:
        text = coordinator.scrape()
        scrapes += 1
        if B.metric_samples(text, "rankfed_upload_phase_seconds_count").get("fold", 0) >= folds:
            return text, scrapes
        if time.monotonic() > deadline:
            raise TimeoutError(f"the coordinator did not fold upload {folds} in {timeout} s")
        time.sleep(0.005)


def run(args: argparse.Namespace) -> dict:
    started_at = B.now_iso()
    load_before = B.loadavg()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="rankfed-transfer-"))
    workdir.mkdir(parents=True, exist_ok=True)
    manifest = B.write_manifest(workdir / "manifest.json", args.adapter_mib)
    rounds = args.reps + args.warmup
    chunk_bytes = args.chunk_kib * 1024 if args.chunk_kib else None
    config = B.write_config(
        workdir / "coordinator.toml", manifest, rounds=rounds, clients=1, method=args.method,
        max_upload_bytes=args.adapter_mib * B.MiB + 8 * B.MiB, chunk_bytes=chunk_bytes,
    )

    ctx = mp.get_context("spawn")
    port_queue, stop_raw = ctx.Queue(), ctx.Event()
    raw_proc = ctx.Process(target=B.raw_server_main, args=(port_queue, stop_raw), daemon=True)
    raw_proc.start()
    raw_port = port_queue.get(timeout=60)

    coordinator = B.CoordinatorProcess(workdir, config, metrics_port=B.free_port())
    address = coordinator.start()
    print(f"coordinator pid {coordinator.pid} at {address}; raw TCP server pid {raw_proc.pid}; workdir {workdir}", flush=True)
    reps: list[dict] = []
    bare: dict[str, B.BareGrpcServer] = {}
    try:
        client = B.EdgeClient(address, "bench-transfer")
        joined = client.join()
        # The bare servers get the chunk size the coordinator advertised and its receive limit.
        max_receive = max(4 * B.MiB, client.chunk + 128 * 1024)
        for kind in BARE_KINDS:
            bare[kind] = B.BareGrpcServer(ctx, kind, max_receive)
        bare_clients = {kind: B.EdgeClient(server.address, f"bare-{kind}") for kind, server in bare.items()}
        for bare_client in bare_clients.values():
            bare_client.chunk = client.chunk
        alpha = joined.assignment.lora.alpha
        t0 = time.perf_counter()
        update = B.random_update(args.adapter_mib, alpha=alpha, seed=7)
        update_sha = B.sha256_hex(update)
        print(f"update: {len(update)} bytes, built in {time.perf_counter() - t0:.1f} s", flush=True)
        raw = B.RawClient(raw_port)
        buf = bytearray(len(update) + 16 * B.MiB)
        phase_sums = B.metric_samples(coordinator.scrape(), PHASE_SUM)
        with B.RssSampler(coordinator.pid) as rss, LatencyProbe(address) as probe:
            last_receipt = time.perf_counter()
            for i in range(rounds):
                probe.mark()
                train = client.wait_train()
                if train is None:
                    raise RuntimeError("federation finished early")
                gap = time.perf_counter() - last_receipt
                gap_probe = probe.mark()
                nbytes = train.adapter_bytes
                if len(buf) < nbytes:
                    buf = bytearray(nbytes)

                raw_down = raw.download(nbytes, buf)
                raw_up = raw.upload(update)
                bare_up, bare_cpu = {}, {}
                for kind, bare_client in bare_clients.items():
                    c0 = B.cpu_seconds(bare[kind].pid)
                    bare_receipt, bare_up[kind], _ = bare_client.upload(train.round, train.rank, update, update_sha)
                    bare_cpu[kind] = B.cpu_seconds(bare[kind].pid) - c0
                    if bare_receipt.bytes_received != len(update):
                        raise RuntimeError(f"bare {kind} server counted {bare_receipt.bytes_received} bytes")

                rss.mark()
                cpu0 = B.cpu_seconds(coordinator.pid)
                got, grpc_down = client.download(train.round, buf)
                cpu1 = B.cpu_seconds(coordinator.pid)
                if got != nbytes or B.sha256_hex(memoryview(buf)[:got]) != train.adapter_sha256:
                    raise RuntimeError(f"download of round {train.round} is corrupt ({got} of {nbytes} bytes)")
                probe.mark()
                counters2 = B.proc_counters(coordinator.pid)
                receipt, grpc_up, grpc_up_tail = client.upload(train.round, train.rank, update, update_sha)
                counters3 = B.proc_counters(coordinator.pid)
                upload_counters = B.counters_delta(counters2, counters3)
                last_receipt = time.perf_counter()
                # The receipt comes before the fold, and the round's close (its aggregation)
                # right after it, so CPU sampled later would count the close: the fold is
                # taken from the coordinator's phase metric instead (wall seconds of a
                # single-threaded numpy loop, so at least its CPU).
                text, scrapes = wait_folded(coordinator, i + 1)
                sums = B.metric_samples(text, PHASE_SUM)
                phases = {k: v - phase_sums.get(k, 0.0) for k, v in sums.items()}  # a phase's first upload: from 0
                if set(phases) != set(PHASES):
                    raise RuntimeError(f"the coordinator reported phases {sorted(phases)}, expected {sorted(PHASES)}")
                phase_sums = sums
                upload_probe = probe.mark()
                if receipt.bytes_received != len(update):
                    raise RuntimeError(f"receipt says {receipt.bytes_received} bytes, sent {len(update)}")
                rep = {
                    "round": train.round,
                    "warmup": i < args.warmup,
                    "download_bytes": nbytes,
                    "upload_bytes": len(update),
                    "raw_download_s": raw_down,
                    "raw_upload_s": raw_up,
                    "grpc_download_s": grpc_down,
                    "grpc_upload_s": grpc_up,
                    "raw_download_mib_s": nbytes / B.MiB / raw_down,
                    "raw_upload_mib_s": len(update) / B.MiB / raw_up,
                    "grpc_download_mib_s": nbytes / B.MiB / grpc_down,
                    "grpc_upload_mib_s": len(update) / B.MiB / grpc_up,
                    "grpc_upload_after_last_chunk_s": grpc_up_tail,
                    **{f"bare_{k}_upload_s": v for k, v in bare_up.items()},
                    **{f"bare_{k}_upload_mib_s": len(update) / B.MiB / v for k, v in bare_up.items()},
                    **{f"bare_{k}_cpu_ms_per_mib": 1000 * v / (len(update) / B.MiB) for k, v in bare_cpu.items()},
                    "coordinator_cpu_download_s": cpu1 - cpu0,
                    "coordinator_cpu_upload_s": upload_counters["user_s"] + upload_counters["system_s"],
                    "coordinator_upload_counters": upload_counters,
                    "upload_phase_s": phases,
                    "metrics_scrapes_after_receipt": scrapes,
                    "coordinator_rss_peak_transfer_bytes": rss.mark(),
                    "gap_before_train_s": gap,
                    "health_worst_latency_in_gap_s": gap_probe,
                    "health_worst_latency_during_upload_s": upload_probe,
                    "loadavg": B.loadavg(),
                }
                reps.append(rep)
                tag = " (warm-up)" if rep["warmup"] else ""
                print(
                    f"round {train.round}{tag}: down raw {rep['raw_download_mib_s']:.0f} / gRPC "
                    f"{rep['grpc_download_mib_s']:.0f} MiB/s; up raw {rep['raw_upload_mib_s']:.0f} / bare aio "
                    f"{rep.get('bare_aio_upload_mib_s', 0):.0f} / bare threaded {rep.get('bare_threaded_upload_mib_s', 0):.0f} "
                    f"/ coordinator {rep['grpc_upload_mib_s']:.0f} MiB/s "
                    f"({1000 * rep['coordinator_cpu_upload_s'] / (len(update) / B.MiB):.2f} CPU ms/MiB); "
                    f"load {rep['loadavg'][0]}", flush=True,
                )
            final = B.finished_round(address, rounds)
            rss_peak_sampled = rss.peak
        hwm = B.hwm_bytes(coordinator.pid)
        history = B.round_status(address).history
        raw.close()
        client.close()
    finally:
        coordinator.stop()
        for server in bare.values():
            server.stop()
        stop_raw.set()
        raw_proc.join(10)
        if not args.workdir and not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)  # several GB of updates at 128 MiB

    measured = [r for r in reps if not r["warmup"]]
    result: dict = {}
    for key in ("raw_download_mib_s", "grpc_download_mib_s", "raw_upload_mib_s", "grpc_upload_mib_s"):
        result[key] = B.summary([r[key] for r in measured])
    result["download_ratio"] = B.summary([r["grpc_download_mib_s"] / r["raw_download_mib_s"] for r in measured])
    result["upload_ratio"] = B.summary([r["grpc_upload_mib_s"] / r["raw_upload_mib_s"] for r in measured])
    result["download_ratio_of_medians"] = result["grpc_download_mib_s"]["median"] / result["raw_download_mib_s"]["median"]
    result["upload_ratio_of_medians"] = result["grpc_upload_mib_s"]["median"] / result["raw_upload_mib_s"]["median"]
    for kind in BARE_KINDS:
        result[f"bare_{kind}_upload_mib_s"] = B.summary([r[f"bare_{kind}_upload_mib_s"] for r in measured])
        result[f"bare_{kind}_cpu_ms_per_mib"] = B.summary([r[f"bare_{kind}_cpu_ms_per_mib"] for r in measured])
        result[f"bare_{kind}_ratio_to_raw"] = B.summary(
            [r[f"bare_{kind}_upload_mib_s"] / r["raw_upload_mib_s"] for r in measured])
        # Same repetition, same bytes: what fraction of the bare transport the coordinator reaches.
        result[f"upload_ratio_to_bare_{kind}"] = B.summary(
            [r["grpc_upload_mib_s"] / r[f"bare_{kind}_upload_mib_s"] for r in measured])
    result["grpc_upload_after_last_chunk_s"] = B.summary([r["grpc_upload_after_last_chunk_s"] for r in measured])
    result["upload_phase_s"] = {phase: B.summary([r["upload_phase_s"][phase] for r in measured])
                                for phase in PHASES}
    result["grpc_upload_streaming_mib_s"] = B.summary(
        [r["upload_bytes"] / B.MiB / (r["grpc_upload_s"] - r["grpc_upload_after_last_chunk_s"]) for r in measured])
    result["coordinator_cpu_ms_per_mib_download"] = B.summary(
        [1000 * r["coordinator_cpu_download_s"] / (r["download_bytes"] / B.MiB) for r in measured])
    result["coordinator_cpu_ms_per_mib_upload"] = B.summary(
        [1000 * r["coordinator_cpu_upload_s"] / (r["upload_bytes"] / B.MiB) for r in measured])
    result["coordinator_ms_per_mib_upload_with_fold"] = B.summary(
        [1000 * (r["coordinator_cpu_upload_s"] + r["upload_phase_s"]["fold"]) / (r["upload_bytes"] / B.MiB)
         for r in measured])
    result["gap_before_train_s"] = B.summary([r["gap_before_train_s"] for r in reps[1:]] or [0.0])
    result["health_worst_latency_in_gap_s"] = B.summary([r["health_worst_latency_in_gap_s"] for r in reps[1:]] or [0.0])
    result["aggregation_seconds"] = B.summary(
        [h.metrics["aggregation_seconds"] for h in history if "aggregation_seconds" in h.metrics] or [0.0])
    return {
        "benchmark": "transfer",
        "started_at": started_at,
        "finished_at": B.now_iso(),
        "machine": B.machine_info(),
        "loadavg_before": load_before,
        "loadavg_after": B.loadavg(),
        "params": {
            "adapter_mib": args.adapter_mib, "reps": args.reps, "warmup": args.warmup, "method": args.method,
            "chunk_bytes": client.chunk, "bare_server_max_receive_message_bytes": max_receive,
            "upload_bytes": len(update), "download_bytes": measured[0]["download_bytes"] if measured else 0,
        },
        "summary": result,
        "coordinator_peak_rss_bytes": {"vm_hwm": hwm, "sampled": rss_peak_sampled},
        "final_round_phase": final.phase,
        "reps": reps,
    }


def print_table(report: dict) -> None:
    s = report["summary"]
    print()
    print(f"{report['params']['adapter_mib']} MiB adapter, {report['params']['chunk_bytes'] // 1024} KiB chunks, median [min..max] of {s['grpc_upload_mib_s']['n']} "
          f"(load {report['loadavg_before'][0]} -> {report['loadavg_after'][0]}, {report['machine']['cores']} cores)")
    print(f"{'direction':<10} {'raw TCP MiB/s':>22} {'gRPC MiB/s':>22} {'gRPC/raw':>20} {'coord CPU ms/MiB':>17}")
    for d in ("download", "upload"):
        ratio = s[f"{d}_ratio"]
        print(f"{d:<10} {B.fmt_range(s[f'raw_{d}_mib_s']):>22} {B.fmt_range(s[f'grpc_{d}_mib_s']):>22} "
              f"{ratio['median'] * 100:>5.0f}% [{ratio['min'] * 100:.0f}..{ratio['max'] * 100:.0f}%] "
              f"{B.fmt_range(s[f'coordinator_cpu_ms_per_mib_{d}'], 2):>17}")
    print("upload, same stream of messages to a server that only receives them (same run, same chunks):")
    print(f"{'server':<22} {'MiB/s':>22} {'of raw TCP':>20} {'server CPU ms/MiB':>18} {'coordinator / this':>22}")
    for kind in BARE_KINDS:
        r, q = s[f"bare_{kind}_ratio_to_raw"], s[f"upload_ratio_to_bare_{kind}"]
        print(f"{'bare grpc ' + kind:<22} {B.fmt_range(s[f'bare_{kind}_upload_mib_s']):>22} "
              f"{r['median'] * 100:>5.0f}% [{r['min'] * 100:.0f}..{r['max'] * 100:.0f}%] "
              f"{B.fmt_range(s[f'bare_{kind}_cpu_ms_per_mib'], 2):>18} "
              f"{q['median'] * 100:>8.0f}% [{q['min'] * 100:.0f}..{q['max'] * 100:.0f}%]")
    print(f"upload split: streaming {B.fmt_range(s['grpc_upload_streaming_mib_s'])} MiB/s until the last chunk is "
          f"handed to gRPC, then {B.fmt_range(s['grpc_upload_after_last_chunk_s'], 2)} s until the receipt "
          "(coordinator: rest of the stream, verify, fsync, receipt)")
    phases = s["upload_phase_s"]
    print("coordinator, per upload (s): " + ", ".join(
        f"{phase} {B.fmt_range(phases[phase], 3)}" for phase in PHASES) + " (fold: after the receipt)")
    print(f"coordinator upload cost with the fold (CPU to the receipt + the fold's wall time): "
          f"{B.fmt_range(s['coordinator_ms_per_mib_upload_with_fold'], 2)} ms/MiB")
    rss = report["coordinator_peak_rss_bytes"]
    print(f"coordinator peak RSS {rss['vm_hwm'] / B.MiB:.0f} MiB (VmHWM); between rounds: "
          f"gap {B.fmt_range(s['gap_before_train_s'], 2)} s, aggregation {B.fmt_range(s['aggregation_seconds'], 2)} s, "
          f"worst Health.Check latency {B.fmt_range(s['health_worst_latency_in_gap_s'], 2)} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter-mib", type=int, default=128, help="adapter size in MiB (default 128)")
    parser.add_argument("--reps", type=int, default=3, help="measured repetitions (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured first rounds (default 1)")
    parser.add_argument("--method", default="rbla", help="aggregation method (default rbla)")
    parser.add_argument("--chunk-kib", type=int, default=0,
                        help="server.max_chunk_bytes in KiB (default: the coordinator's own default)")
    parser.add_argument("--workdir", help="where the coordinator's data goes (default: a new temp dir, removed at the end)")
    parser.add_argument("--keep-workdir", action="store_true", help="keep the default temp dir (logs, blobs)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON output (default {RESULTS})")
    args = parser.parse_args(argv)
    B.machine_info()  # the commits as the run starts (the report is written at its end)
    # The client here stands for a device's sender; with the coordinator's heap settings its
    # 1 MiB message buffers are reused, so the generator is not what limits the upload.
    heap.keep_buffers()
    report = run(args)
    print_table(report)
    B.write_json(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
