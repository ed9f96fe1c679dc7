"""`rankfed simulate` at scale: device-steps per second per backend (with and without the
exact frozen-layer cache), and time per round and peak RSS for 10, 100 and 1,000 virtual
devices at 10 % participation. A table and JSON (bench/results/simulate.json).

    OMP_NUM_THREADS=1 python bench/simulate_bench.py                  # everything
    OMP_NUM_THREADS=1 python bench/simulate_bench.py --only steps     # backends x cache
    OMP_NUM_THREADS=1 python bench/simulate_bench.py --only scale     # 10 / 100 / 1,000 devices

Steps: BBC News on all-MiniLM-L6-v2 (max 64 tokens), 8 devices all taking part, 2 rounds of
20 local steps, 2 compute slots; the baseline is the local threads backend without the cache
(LoRA on every layer), and each row's ratio is against it, in the same run. The cached rows
put LoRA on the top layer only (freeze_below_layer = 5): the states entering it come from the
cache (built in round 1 and timed with it).

Scale: the no-training workload (`training.synthetic`: each device uploads its downloaded
adapter plus noise; rank 16 on query/key/value, 0.9 MB per update), 3 rounds, the whole
coordinator path (selection, downloads, streamed uploads, aggregation, global on disk).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rankfed.simulation.driver import simulate  # noqa: E402
from rankfed.simulation.fleet import load_fleet  # noqa: E402

OUT = Path(__file__).parent / "results" / "simulate.json"


def _steps_fleet(kind: str, mode: str, cache: bool) -> dict[str, object]:
    return {
        "seed": 0, "rounds": 2, "method": "rbla",
        "devices.count": 8, "devices.profiles": {"cuda-large": 0.25, "cpu-fast": 0.25, "mobile": 0.5},
        "data.dataset": "bbc", "data.examples_per_device": 96, "data.validation_examples": 64,
        "data.test_examples": 64, "data.max_length": 64,
        "training.local_steps": 20, "training.batch_size": 16, "training.learning_rate": 5e-3,
        "training.freeze_below_layer": 5 if cache else None,
        "federation.participation": 8, "backend.kind": kind, "backend.mode": mode, "backend.workers": 2,
        "eval.every": 100, "eval.test": False,
    }


def steps_rows(tmp: Path) -> list[dict[str, object]]:
    rows = []
    for kind, mode in (("local", "threads"), ("local", "processes"), ("ray", "threads")):
        for cache in (False, True):
            values = {k: v for k, v in _steps_fleet(kind, mode, cache).items() if v is not None}
            fleet = load_fleet(None, values)
            name = f"{kind if kind == 'ray' else mode}{' + cache' if cache else ''}"
            out = tmp / name.replace(" + ", "-")
            start = time.perf_counter()
            result = simulate(fleet, out, progress=None)
            wall = time.perf_counter() - start
            steps = sum(d.get("steps", 0) for line in result.rounds for d in line["devices"])
            train = sum(line["seconds"]["train"] for line in result.rounds)
            rows.append({"backend": name, "device_steps": steps, "train_seconds": round(train, 2),
                         "device_steps_per_s": round(steps / train, 2), "wall_seconds": round(wall, 2),
                         "peak_rss_mb": {"driver": result.summary["peak_rss_bytes"]["driver"] // 2**20,
                                         "workers": [(w or 0) // 2**20 for w in result.summary["peak_rss_bytes"]["workers"]]}})
            print(f"{name:22s} {steps / train:8.2f} device-steps/s ({steps} steps, {train:.1f} s training, {wall:.1f} s wall)",
                  flush=True)
    base = rows[0]["device_steps_per_s"]
    for r in rows:
        r["vs_threads_no_cache"] = round(float(r["device_steps_per_s"]) / float(base), 2)  # type: ignore[arg-type]
    return rows


def scale_rows(tmp: Path, sizes: list[int]) -> list[dict[str, object]]:
    rows = []
    for n in sizes:
        values = {
            "seed": 0, "rounds": 3, "method": "zero_pad", "devices.count": n,
            "devices.profiles": {"cuda-large": 1.0}, "data.dataset": "tweets", "data.examples_per_device": 20,
            "data.quality_fraction": 1.0,  # IID, equal sizes: FedAvg weights every update alike
            "data.validation_examples": 10, "data.test_examples": 10, "data.max_length": 32,
            "training.synthetic": True, "training.target_modules": ["query", "key", "value"],
            "federation.participation": 0.1, "backend.workers": 2,
        }
        fleet = load_fleet(None, values)
        start = time.perf_counter()
        result = simulate(fleet, tmp / f"scale-{n}", progress=None)
        wall = time.perf_counter() - start
        per_round = [line["seconds"]["round"] for line in result.rounds]
        up = result.summary["uplink_bytes"]
        rows.append({"devices": n, "participants": fleet.participants, "rounds_done": result.summary["rounds_done"],
                     "round_seconds": per_round, "mean_round_s": round(sum(per_round) / len(per_round), 3),
                     "setup_seconds": result.summary["setup_seconds"], "wall_seconds": round(wall, 2),
                     "uplink_mb": round(up / 1e6, 1), "update_mb": round(up / 1e6 / max(1, fleet.participants * 3), 3),
                     "peak_rss_mb": result.summary["peak_rss_bytes"]["driver"] // 2**20})
        print(f"{n:5d} devices ({fleet.participants} per round): {rows[-1]['mean_round_s']:.2f} s/round, "
              f"setup {result.summary['setup_seconds']:.1f} s, peak RSS {rows[-1]['peak_rss_mb']} MiB", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=("steps", "scale"))
    ap.add_argument("--sizes", default="10,100,1000")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    result: dict[str, object] = json.loads(args.out.read_text()) if args.out.is_file() else {}
    result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                         "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    tmp = Path(tempfile.mkdtemp(prefix="rankfed-simbench-"))
    try:
        if args.only in (None, "steps"):
            result["steps"] = steps_rows(tmp)
        if args.only in (None, "scale"):
            result["scale"] = scale_rows(tmp, [int(x) for x in args.sizes.split(",")])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
