"""Round overhead with no training: N clients, each a separate process, download the global
adapter and upload an update of the same size in every round; compared with raw loopback
TCP moving the same bytes (the same N processes, against one raw-TCP server process) in
the same run. Also the coordinator's peak RSS against the global adapter size.

    python bench/round_bench.py                          # N = 8 and 32, 16 MiB, 3 rounds each, ~2-4 min
    python bench/round_bench.py --clients 8 16 32 64 --rounds 5 --method zero_pad

Per round, every client: GetTask long-poll until TRAIN -> barrier -> raw TCP: download the
adapter's size, upload the update's size (to a 1-byte ack) -> barrier -> gRPC: DownloadAdapter,
then UploadUpdate to the receipt. Timings use the shared wall clock (time.time()):

    raw_s        last raw ack - first raw start             (N x (down + up) bytes over raw TCP)
    transfer_s   last receipt - first DownloadAdapter call   (the same bytes through the coordinator)
    round_s      round finished_at (global adapter written, DONE) - first DownloadAdapter call
    close_s      finished_at - last receipt                  (includes aggregation_seconds)

Round start is the moment all clients hold their TRAIN task (the barrier).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _client as B  # noqa: E402
from rankfed.coordinator import heap  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "rounds.json"
ALPHA = 32.0  # constant_scaling 2.0 x rank 16 (see _client.write_config)


def client_main(index: int, address: str, raw_port: int, update_path: str, barrier, results) -> None:
    """One edge device: a separate process doing every round until the federation is done."""
    heap.keep_buffers()  # as the coordinator: the generator's message buffers are reused
    try:
        update = Path(update_path).read_bytes()
        update_sha = B.sha256_hex(update)
        client = B.EdgeClient(address, f"bench-client-{index:03d}")
        joined = client.join()
        if joined.assignment.lora.rank != B.RANK or joined.assignment.lora.alpha != ALPHA:
            raise RuntimeError(f"assigned rank {joined.assignment.lora.rank} alpha {joined.assignment.lora.alpha}")
        raw = B.RawClient(raw_port)
        buf = bytearray(len(update) + 4 * B.MiB)
        while True:
            train = client.wait_train()
            if train is None:
                break
            if len(buf) < train.adapter_bytes:
                buf = bytearray(train.adapter_bytes)
            barrier.wait(600)
            t0 = time.time()
            raw.download(train.adapter_bytes, buf)
            raw.upload(update)
            t1 = time.time()
            barrier.wait(600)
            t2 = time.time()
            got, down_s = client.download(train.round, buf)
            t_down = time.time()
            if got != train.adapter_bytes or B.sha256_hex(memoryview(buf)[:got]) != train.adapter_sha256:
                raise RuntimeError(f"download of round {train.round} is corrupt ({got} of {train.adapter_bytes} bytes)")
            receipt, up_s, up_tail = client.upload(train.round, train.rank, update, update_sha)
            t3 = time.time()
            results.put({
                "client": index, "round": train.round, "raw_start": t0, "raw_end": t1, "grpc_start": t2,
                "download_end": t_down, "receipt": t3, "download_s": down_s, "upload_s": up_s,
                "upload_after_last_chunk_s": up_tail, "download_bytes": got, "upload_bytes": receipt.bytes_received,
            })
        raw.close()
        client.close()
    except BaseException as exc:  # reported to the driver, which stops the run
        barrier.abort()
        results.put({"client": index, "error": f"{type(exc).__name__}: {exc}"})
        raise


def run_n(n: int, args: argparse.Namespace, ctx, raw_port: int, root: Path) -> dict:
    workdir = root / f"n{n}"
    workdir.mkdir(parents=True, exist_ok=True)
    manifest = B.write_manifest(workdir / "manifest.json", args.adapter_mib)
    config = B.write_config(
        workdir / "coordinator.toml", manifest, rounds=args.rounds, clients=n, method=args.method,
        max_upload_bytes=args.adapter_mib * B.MiB + 8 * B.MiB,
    )
    update_path = workdir / "update.safetensors"
    update_path.write_bytes(B.random_update(args.adapter_mib, alpha=ALPHA, seed=n))
    coordinator = B.CoordinatorProcess(workdir, config)
    address = coordinator.start()
    time.sleep(0.5)
    idle_rss = B.rss_bytes(coordinator.pid)
    print(f"N={n}: coordinator pid {coordinator.pid} at {address} (idle RSS {idle_rss / B.MiB:.0f} MiB); "
          f"starting {n} client processes", flush=True)
    barrier = ctx.Barrier(n)
    results = ctx.Queue()
    procs = [ctx.Process(target=client_main, args=(i, address, raw_port, str(update_path), barrier, results), daemon=True)
             for i in range(n)]
    rounds: list[dict] = []
    try:
        with B.RssSampler(coordinator.pid) as rss:
            for p in procs:
                p.start()
            for r in range(1, args.rounds + 1):
                rows = []
                while len(rows) < n:
                    row = results.get(timeout=900)
                    if "error" in row:
                        raise RuntimeError(f"client {row['client']}: {row['error']}")
                    rows.append(row)
                status = B.finished_round(address, r)
                load = B.loadavg()
                cpu = B.cpu_seconds(coordinator.pid)
                finished = status.finished_at
                first_grpc = min(x["grpc_start"] for x in rows)
                last_receipt = max(x["receipt"] for x in rows)
                raw_s = max(x["raw_end"] for x in rows) - min(x["raw_start"] for x in rows)
                total_bytes = sum(x["download_bytes"] + x["upload_bytes"] for x in rows)
                row = {
                    "round": r,
                    "phase": status.phase.value,
                    "clients": n,
                    "bytes_moved": total_bytes,
                    "raw_s": raw_s,
                    "transfer_s": last_receipt - first_grpc,
                    "round_s": finished - first_grpc,
                    "close_s": finished - last_receipt,
                    "last_download_end_s": max(x["download_end"] for x in rows) - first_grpc,
                    "aggregation_seconds": status.metrics.get("aggregation_seconds", float("nan")),
                    "round_over_raw": (finished - first_grpc) / raw_s,
                    "raw_mib_s": total_bytes / B.MiB / raw_s,
                    "grpc_mib_s": total_bytes / B.MiB / (last_receipt - first_grpc),
                    "client_download_s": B.summary([x["download_s"] for x in rows]),
                    "client_upload_s": B.summary([x["upload_s"] for x in rows]),
                    "client_upload_after_last_chunk_s": B.summary([x["upload_after_last_chunk_s"] for x in rows]),
                    "coordinator_rss_peak_bytes": rss.mark(),
                    "coordinator_cpu_s_total": cpu,
                    "loadavg": load,
                }
                rounds.append(row)
                print(f"  round {r}: {row['phase']}, raw {raw_s:.2f} s, gRPC transfers {row['transfer_s']:.2f} s, "
                      f"round {row['round_s']:.2f} s ({row['round_over_raw']:.1f}x raw), close {row['close_s']:.2f} s "
                      f"(aggregation {row['aggregation_seconds']:.2f} s), peak RSS "
                      f"{row['coordinator_rss_peak_bytes'] / B.MiB:.0f} MiB, load {load[0]}", flush=True)
            for p in procs:
                p.join(120)
            peak_sampled = rss.peak
        hwm = B.hwm_bytes(coordinator.pid)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        coordinator.stop()
    global_bytes = rounds[0]["bytes_moved"] // (2 * n)  # the download and the upload are the same size
    return {
        "clients": n,
        "global_adapter_bytes": global_bytes,
        "coordinator_idle_rss_bytes": idle_rss,
        "coordinator_peak_rss_bytes": {"vm_hwm": hwm, "sampled": peak_sampled},
        "peak_rss_over_global": hwm / global_bytes,
        "summary": {
            key: B.summary([r[key] for r in rounds])
            for key in ("raw_s", "transfer_s", "round_s", "close_s", "aggregation_seconds", "round_over_raw",
                        "raw_mib_s", "grpc_mib_s")
        },
        "rounds": rounds,
    }


def print_table(report: dict) -> None:
    p = report["params"]
    print()
    print(f"{p['adapter_mib']} MiB adapters, method {p['method']}, {p['rounds']} rounds per N, median [min..max] "
          f"(load {report['loadavg_before'][0]} -> {report['loadavg_after'][0]}, {report['machine']['cores']} cores)")
    print(f"{'N':>3} {'moved MiB':>9} {'raw TCP s':>18} {'round s':>18} {'round/raw':>16} {'transfers s':>18} "
          f"{'close s':>16} {'aggregation s':>16} {'peak RSS MiB':>12} {'RSS/global':>10}")
    for run in report["runs"]:
        s = run["summary"]
        moved = run["rounds"][0]["bytes_moved"] / B.MiB
        print(f"{run['clients']:>3} {moved:>9.0f} {B.fmt_range(s['raw_s'], 2):>18} {B.fmt_range(s['round_s'], 2):>18} "
              f"{B.fmt_range(s['round_over_raw'], 1):>16} {B.fmt_range(s['transfer_s'], 2):>18} "
              f"{B.fmt_range(s['close_s'], 2):>16} {B.fmt_range(s['aggregation_seconds'], 2):>16} "
              f"{run['coordinator_peak_rss_bytes']['vm_hwm'] / B.MiB:>12.0f} {run['peak_rss_over_global']:>10.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 32], help="client counts (default 8 32)")
    parser.add_argument("--adapter-mib", type=int, default=16, help="adapter size in MiB (default 16)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per client count (default 3)")
    parser.add_argument("--method", default="rbla", help="aggregation method (default rbla)")
    parser.add_argument("--workdir", help="where the coordinators' data goes (default: a new temp dir, removed at the end)")
    parser.add_argument("--keep-workdir", action="store_true", help="keep the default temp dir (logs, blobs)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON output (default {RESULTS})")
    args = parser.parse_args(argv)
    B.machine_info()  # the commits as the run starts (the report is written at its end)

    started_at, load_before = B.now_iso(), B.loadavg()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="rankfed-rounds-"))
    ctx = mp.get_context("spawn")
    port_queue, stop_raw = ctx.Queue(), ctx.Event()
    raw_proc = ctx.Process(target=B.raw_server_main, args=(port_queue, stop_raw), daemon=True)
    raw_proc.start()
    raw_port = port_queue.get(timeout=60)
    try:
        runs = [run_n(n, args, ctx, raw_port, root) for n in args.clients]
    finally:
        stop_raw.set()
        raw_proc.join(10)
        if not args.workdir and not args.keep_workdir:
            shutil.rmtree(root, ignore_errors=True)  # each N's coordinator data: GBs of updates
    report = {
        "benchmark": "rounds",
        "started_at": started_at,
        "finished_at": B.now_iso(),
        "machine": B.machine_info(),
        "loadavg_before": load_before,
        "loadavg_after": B.loadavg(),
        "params": {"clients": args.clients, "adapter_mib": args.adapter_mib, "rounds": args.rounds,
                   "method": args.method, "chunk_bytes": B.CHUNK, "server_max_receive_message_bytes": 4 * B.MiB},
        "flower_reference_s_per_round": 28.0,
        "runs": runs,
    }
    print_table(report)
    B.write_json(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
