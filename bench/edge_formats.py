"""Exported formats against torch eager, in one process and one run (issue 16).

Variants of one merged model (all-MiniLM-L6-v2 + a trained LoRA adapter and head):

    torch eager          the merged transformers model, inference_mode (the reference)
    fp32 dynamo          torch.onnx.export(dynamo=True), no fusion (the export before issue 16)
    fp32 optimized       TorchScript export + onnxruntime transformer fusions (the export now)
    int8 per-tensor      dynamic int8 of the dynamo graph, per-tensor scales (before)
    int8 per-channel     dynamic int8 of the optimized graph, per-channel scales (now)
    int8 ORT format      the per-channel int8 model as .ort (what mobile builds load)
    fp16 weights         the optimized graph with fp16 weights, fp32 inputs/outputs (`--fp16`)

Accuracy: every variant scores the same tokenized held-out batches; agreement is the share
of held-out examples where its argmax equals torch eager's. Latency: batch 1, random token
ids, `runs` rounds in which every variant runs once (interleaved, so load drift hits all
alike); p50/p95 of wall time, plus the main thread's CPU time (robust to descheduling with
one thread) and the process's CPU time (all threads: the measure for the 2-thread rows).
Ratios are torch eager p50 / variant p50 from the same rounds, of wall and of CPU time.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

TASK = "sequence-classification"
VARIANTS = ("torch eager", "fp32 dynamo", "fp32 optimized", "int8 per-tensor", "int8 per-channel", "int8 ORT format",
            "fp16 weights")


def export_variants(model_dir: Path, adapter: Path, work: Path, *, labels: tuple[str, ...], heldout: Path,
                    eval_max_length: int) -> dict[str, Any]:
    """Every file variant of ``adapter``; {name: path} plus the export reports."""
    from rankfed.edge_client.export import export_onnx
    from rankfed.edge_client.quantize import QuantizeSettings, quantize_int8

    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    before = export_onnx(model_dir, adapter, work / "dynamo.onnx", labels=list(labels), exporter="dynamo",
                         optimize=False)
    dynamo_s = time.perf_counter() - t
    t = time.perf_counter()
    # force: the bench reports the gate's verdict instead of stopping at it.
    now = export_onnx(model_dir, adapter, work / "optimized.onnx", labels=list(labels), quantize=True,
                      validation=heldout, eval_max_length=eval_max_length, mobile=True, fp16=True, force=True)
    optimized_s = time.perf_counter() - t
    quantize_int8(Path(before.path), work / "dynamo.int8-per-tensor.onnx", QuantizeSettings(per_channel=False))
    files = {
        "fp32 dynamo": Path(before.path),
        "fp32 optimized": Path(now.path),
        "int8 per-tensor": work / "dynamo.int8-per-tensor.onnx",
        "int8 per-channel": Path(now.quantized_path),
        "int8 ORT format": Path(now.mobile_path),
        "fp16 weights": Path(now.fp16_path),
    }
    return {
        "files": files,
        "export": {
            "dynamo_seconds": round(dynamo_s, 1), "optimized_total_seconds": round(optimized_s, 1),
            "fused_ops": now.fused_ops, "parity_dynamo": before.max_abs_diff, "parity_optimized": now.max_abs_diff,
            "gate_forced": now.forced, "exporter": now.exporter, "parity_fp16": now.fp16_max_abs_diff,
            "fp16_gate_forced": now.fp16_forced,
        },
    }


def _torch_model(model_dir: Path, adapter: Path) -> Any:
    from rankfed.edge_client.export import logits_only, merged_model, read_adapter

    return logits_only(merged_model(model_dir, read_adapter(adapter), TASK), TASK)


def accuracy_table(model_dir: Path, adapter: Path, files: dict[str, Path], heldout: Path, *,
                   eval_max_length: int) -> dict[str, dict[str, float]]:
    """{variant: accuracy, agreement with torch eager, size} on the held-out file."""
    import torch

    from rankfed.edge_client.evaluate import Score, load_heldout, score
    from rankfed.edge_client.infer import OnnxModel

    models = {name: OnnxModel(path) for name, path in files.items()}
    data = load_heldout(heldout, models["fp32 optimized"], max_length=eval_max_length)
    torch_model = _torch_model(model_dir, adapter)
    with torch.inference_mode():
        preds = np.concatenate([torch_model(torch.from_numpy(i), torch.from_numpy(m)).numpy().argmax(-1)
                                for i, m in data.batches])
    reference = Score(accuracy=float(np.mean(preds == data.labels)), predictions=preds)
    out = {"torch eager": {"accuracy": reference.accuracy, "agreement": 1.0, "mib": None, "examples": len(preds)}}
    for name, model in models.items():
        s = score(model, data)
        out[name] = {"accuracy": s.accuracy, "agreement": s.agreement(reference),
                     "mib": round(files[name].stat().st_size / 2**20, 1), "examples": len(preds)}
    return out


def latency_table(model_dir: Path, adapter: Path, files: dict[str, Path], *, seqs: tuple[int, ...],
                  threads: tuple[int, ...], runs: int) -> list[dict[str, Any]]:
    import torch

    from rankfed.edge_client.export import ort_session

    torch_model = _torch_model(model_dir, adapter)
    rows: list[dict[str, Any]] = []
    for th in threads:
        torch.set_num_threads(th)
        sessions = {name: ort_session(str(path), th) for name, path in files.items()}
        for seq in seqs:
            ids = np.random.default_rng(seq).integers(1000, 30000, size=(1, seq), dtype=np.int64)
            mask = np.ones_like(ids)
            feed = {"input_ids": ids, "attention_mask": mask}
            tids, tmask = torch.from_numpy(ids), torch.from_numpy(mask)
            calls: dict[str, Callable[[], Any]] = {
                "torch eager": lambda t=tids, m=tmask: torch_model(t, m)}
            for name, s in sessions.items():
                calls[name] = lambda s=s, feed=feed: s.run(["logits"], feed)
            wall: dict[str, list[float]] = {k: [] for k in calls}
            cpu: dict[str, list[float]] = {k: [] for k in calls}
            pcpu: dict[str, list[float]] = {k: [] for k in calls}
            load0 = os.getloadavg()[0]
            with torch.inference_mode():
                for _ in range(3):  # warm-up: allocator, pre-packed weights
                    for f in calls.values():
                        f()
                for _ in range(runs):
                    for name, f in calls.items():
                        t, c, pc = time.perf_counter(), time.thread_time(), time.process_time()
                        f()
                        cpu[name].append(time.thread_time() - c)
                        pcpu[name].append(time.process_time() - pc)
                        wall[name].append(time.perf_counter() - t)
            eager = statistics.median(wall["torch eager"])
            eager_cpu = statistics.median(pcpu["torch eager"])
            for name in calls:
                p50 = statistics.median(wall[name])
                pcpu50 = statistics.median(pcpu[name])
                rows.append({
                    "variant": name, "threads": th, "seq": seq,
                    "p50_ms": round(1e3 * p50, 3), "p95_ms": round(1e3 * _quantile(wall[name], 0.95), 3),
                    "cpu_p50_ms": round(1e3 * statistics.median(cpu[name]), 3),
                    "process_cpu_p50_ms": round(1e3 * pcpu50, 3),
                    "x_eager": round(eager / p50, 2),
                    "x_eager_cpu": round(eager_cpu / pcpu50, 2),
                    "load_avg": [round(load0, 2), round(os.getloadavg()[0], 2)],
                })
    return rows


def _quantile(xs: list[float], q: float) -> float:
    return sorted(xs)[min(len(xs) - 1, round(q * (len(xs) - 1)))]
