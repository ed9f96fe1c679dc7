"""Two threads on a shared machine (issue 16): onnxruntime's spin-waiting on and off, torch
eager beside it, batch 1, in interleaved rounds.

onnxruntime's intra-op pool spins between parallel sections by default
(`session.intra_op.allow_spinning` = 1); torch's OpenMP pool spins according to
OMP_WAIT_POLICY (libgomp's default: spin a while, then sleep). When other jobs hold the cores
a spinning thread burns the time slice its partner needs. Run once as is and once with
OMP_WAIT_POLICY=PASSIVE to see torch both ways:

    OMP_NUM_THREADS=1 python bench/edge_threads.py --adapter ADAPTER [--threads 2] [--runs 30]
    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python bench/edge_threads.py --adapter ADAPTER
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(Path(__file__).resolve().parent), str(ROOT)]

import numpy as np  # noqa: E402

TASK = "sequence-classification"


def session(path: Path, threads: int, spinning: bool) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seq", type=int, nargs="+", default=[16, 128])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--out", default="")
    a = ap.parse_args()

    import torch
    from edge_bench import minilm_dir

    from rankfed.edge_client.export import export_onnx, logits_only, merged_model, read_adapter

    torch.set_num_threads(a.threads)
    model_dir = minilm_dir()
    result: dict[str, Any] = {"threads": a.threads, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"),
                              "load_avg_start": os.getloadavg(), "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        report = export_onnx(model_dir, a.adapter, Path(tmp) / "m.onnx", quantize=True, force=True)
        eager = logits_only(merged_model(model_dir, read_adapter(a.adapter), TASK), TASK)
        calls_for: dict[str, Any] = {}
        for name, path in (("fp32 optimized", Path(report.path)), ("int8 per-channel", Path(report.quantized_path))):
            for spin in (True, False):
                calls_for[f"{name}, spinning {'on' if spin else 'off'}"] = session(path, a.threads, spin)
        for seq in a.seq:
            ids = np.random.default_rng(seq).integers(1000, 30000, size=(1, seq), dtype=np.int64)
            feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
            t_ids, t_mask = torch.from_numpy(ids), torch.from_numpy(feed["attention_mask"])
            calls: dict[str, Any] = {"torch eager": lambda i=t_ids, m=t_mask: eager(i, m)}
            for name, s in calls_for.items():
                calls[name] = lambda s=s, f=feed: s.run(["logits"], f)
            wall: dict[str, list[float]] = {k: [] for k in calls}
            cpu: dict[str, list[float]] = {k: [] for k in calls}
            load0 = os.getloadavg()[0]
            with torch.inference_mode():
                for _ in range(3):
                    for f in calls.values():
                        f()
                for _ in range(a.runs):
                    for name, f in calls.items():
                        t, c = time.perf_counter(), time.process_time()
                        f()
                        cpu[name].append(time.process_time() - c)
                        wall[name].append(time.perf_counter() - t)
            base = statistics.median(wall["torch eager"])
            for name in calls:
                w = sorted(wall[name])
                result["rows"].append({
                    "seq": seq, "variant": name, "wall_p50_ms": round(1e3 * statistics.median(w), 2),
                    "wall_p95_ms": round(1e3 * w[round(0.95 * (len(w) - 1))], 2),
                    "process_cpu_p50_ms": round(1e3 * statistics.median(cpu[name]), 2),
                    "x_eager_wall": round(base / statistics.median(w), 2),
                    "load_avg": [round(load0, 2), round(os.getloadavg()[0], 2)],
                })
    result["load_avg_end"] = os.getloadavg()
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"threads {a.threads}, OMP_WAIT_POLICY {result['omp_wait_policy']}")
    print("| tokens | variant | wall p50 ms | wall p95 ms | process CPU p50 ms | x eager (wall p50) | load |")
    print("|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        print(f"| {r['seq']} | {r['variant']} | {r['wall_p50_ms']} | {r['wall_p95_ms']} | {r['process_cpu_p50_ms']} | "
              f"{r['x_eager_wall']} | {r['load_avg'][0]} |")


if __name__ == "__main__":
    main()
