"""Uploads over a bad link: resumed from the bytes the coordinator kept, against sent again
from byte 0 (what clients did before UploadStatus), through a throttled TCP relay that cuts
the connection at 3 random points of each upload.

    python bench/bad_link_bench.py                        # 8 MiB, 4 MiB/s, 5 paired trials, ~1-2 min
    python bench/bad_link_bench.py --adapter-mib 4 --rate-mib 2 --trials 10 --chunk-kib 256

The coordinator runs as its own process (`python -m rankfed coordinator serve`, default
server settings unless --chunk-kib); the devices are the production edge transport
(rankfed.edge_client.transport.EdgeTransport, default RetryPolicy: full-jitter backoff from
0.5 s) dialing the relay of tests/faultlink.py. All devices join one round and download
their adapter over the unbroken link; then, one at a time, each uploads an update of the
adapter's size while the relay, throttled to --rate-mib each way, resets the connection
each time the client->server bytes on the wire (counted from the upload's start) reach
one of 3 marks drawn uniformly from 5%..95% of the update. Trial k draws its marks and
its backoff jitter from seed k and runs them in both modes, so the pairs differ only in
resuming. A clean upload per mode (no cut) gives the baseline.

Reported per mode: time from the upload call to its receipt, bytes on the wire (relay
count, client -> server, gRPC/HTTP/2 framing included), re-sent bytes (wire bytes minus
the clean upload's), and attempts.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _client as B  # noqa: E402
from rankfed.edge_client.transport import EdgeTransport  # noqa: E402
from rankfed.protocol import Capability, DeviceClass, JoinRequest, TrainTask, UploadHeader  # noqa: E402
from tests.faultlink import FaultyLink  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "bad_link.json"
MODES = ("resume", "restart")
CUTS = 3


def _device(address: str, name: str, *, seed: int, resume: bool) -> tuple[EdgeTransport, JoinRequest]:
    transport = EdgeTransport(address, seed=seed, resume_uploads=resume)
    request = JoinRequest(device_name=name, base_model_sha256=B.WEIGHTS_SHA256, num_examples=100, capability=Capability(
        device_class=DeviceClass.CUDA, memory_total_bytes=32 * 10**9, accelerator_memory_bytes=16 * 10**9,
        cpu_cores=8, compute_gflops=1000.0))
    return transport, request


def run(args: argparse.Namespace) -> dict:
    size_hint = args.adapter_mib * B.MiB
    plan = [(mode, trial) for trial in range(args.trials) for mode in MODES] + [(mode, -1) for mode in MODES]
    with tempfile.TemporaryDirectory(prefix="rankfed-badlink-") as tmp:
        workdir = Path(tmp)
        manifest = B.write_manifest(workdir / "manifest.json", args.adapter_mib)
        config = B.write_config(workdir / "coordinator.toml", manifest, rounds=1, clients=len(plan),
                                max_upload_bytes=2 * size_hint + B.MiB,
                                chunk_bytes=None if args.chunk_kib is None else args.chunk_kib * 1024)
        coordinator = B.CoordinatorProcess(workdir, config)
        address = coordinator.start()
        link = FaultyLink(address).start()
        devices: list[tuple[str, int, EdgeTransport]] = []
        try:
            for i, (mode, trial) in enumerate(plan):
                transport, request = _device(link.address, f"dev-{i}", seed=max(trial, 0), resume=mode == "resume")
                transport.join(request)
                devices.append((mode, trial, transport))
            tasks = []
            for _, _, transport in devices:
                while not isinstance(task := transport.get_task(30.0), TrainTask):
                    pass
                transport.download(task.round)
                tasks.append(task)
            link.throttle(args.rate_mib * B.MiB)
            records = []
            for (mode, trial, transport), task in zip(devices, tasks):
                lora = task.assignment.lora
                data = B.random_update(args.adapter_mib, alpha=lora.alpha, seed=len(records))
                header = UploadHeader(round=task.round, rank=lora.rank, num_examples=100, total_bytes=len(data),
                                      sha256=hashlib.sha256(data).hexdigest())
                rng = random.Random(trial)  # the same marks for both modes of a trial
                marks = [] if trial < 0 else sorted(int(rng.uniform(0.05, 0.95) * len(data)) for _ in range(CUTS))
                wire_before, cuts_before = link.bytes_up, link.cuts
                link.cut_after(up=marks)
                started = time.monotonic()
                receipt = transport.upload(header, data)
                seconds = time.monotonic() - started
                assert receipt.sha256 == header.sha256, receipt
                stats = transport.last_upload
                records.append({
                    "mode": mode, "trial": trial, "bytes": len(data), "cut_marks": marks,
                    "cuts": link.cuts - cuts_before, "seconds": round(seconds, 3),
                    "wire_bytes": link.bytes_up - wire_before, "payload_bytes": stats.payload_bytes,
                    "attempts": stats.attempts, "resumed_from": stats.resumed_from,
                })
                print(f"  {mode:8s} trial {trial:2d}: {seconds:6.2f} s, {records[-1]['wire_bytes'] / B.MiB:6.2f} MiB "
                      f"on the wire, {stats.attempts} attempts, resumed from {stats.resumed_from}", flush=True)
        finally:
            for _, _, transport in devices:
                transport.close()
            link.close()
            coordinator.stop()
    return {"records": records, "bytes": records[0]["bytes"]}


def report(records: list[dict]) -> dict[str, dict]:
    clean = {r["mode"]: r for r in records if r["trial"] < 0}
    out = {}
    for mode in MODES:
        cut = [r for r in records if r["mode"] == mode and r["trial"] >= 0]
        out[mode] = {
            "clean_seconds": clean[mode]["seconds"],
            "clean_wire_bytes": clean[mode]["wire_bytes"],
            "seconds": B.summary([r["seconds"] for r in cut]),
            "wire_bytes": B.summary([r["wire_bytes"] for r in cut]),
            "resent_bytes": B.summary([r["wire_bytes"] - clean[mode]["wire_bytes"] for r in cut]),
            "attempts": B.summary([r["attempts"] for r in cut]),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter-mib", type=int, default=8, help="update size in MiB (default 8)")
    parser.add_argument("--rate-mib", type=float, default=4.0, help="link rate each way, MiB/s (default 4)")
    parser.add_argument("--trials", type=int, default=5, help="paired trials, 3 cuts each (default 5)")
    parser.add_argument("--chunk-kib", type=int, default=None,
                        help="server.max_chunk_bytes in KiB (default: the coordinator's, 1024)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    started_at, load_before = B.now_iso(), B.loadavg()
    result = run(args)
    summaries = report(result["records"])
    mib = B.MiB
    print(f"\n{args.adapter_mib} MiB update ({result['bytes']} bytes), link {args.rate_mib:g} MiB/s, "
          f"{CUTS} cuts per upload, {args.trials} paired trials; median [min..max]")
    print(f"{'mode':8s} | {'clean s':>7s} | {'time s':>22s} | {'on the wire MiB':>22s} | {'re-sent MiB':>22s} | attempts")
    for mode, s in summaries.items():
        wire = {k: v / mib if k != "n" else v for k, v in s["wire_bytes"].items()}
        resent = {k: v / mib if k != "n" else v for k, v in s["resent_bytes"].items()}
        print(f"{mode:8s} | {s['clean_seconds']:7.2f} | {B.fmt_range(s['seconds'], 2):>22s} | "
              f"{B.fmt_range(wire, 2):>22s} | {B.fmt_range(resent, 2):>22s} | {s['attempts']['median']:.0f}")
    B.write_json(args.out, {
        "benchmark": "bad_link",
        "command": "python bench/bad_link_bench.py " + " ".join(sys.argv[1:]),
        "started_at": started_at,
        "finished_at": B.now_iso(),
        "parameters": {"adapter_mib": args.adapter_mib, "rate_mib_per_s": args.rate_mib, "trials": args.trials,
                       "cuts_per_upload": CUTS, "chunk_kib": args.chunk_kib or 1024},
        "summary": summaries,
        "records": result["records"],
        "machine": B.machine_info(),
        "loadavg_before": load_before,
        "loadavg_after": B.loadavg(),
    })
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
