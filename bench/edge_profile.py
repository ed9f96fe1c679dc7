"""Where the time goes at batch 1, one thread (issue 16): onnxruntime vs torch eager.

For one merged model (all-MiniLM-L6-v2 + an adapter), in one process and one run:

1. Graph and session variants, each timed in the same interleaved rounds (main-thread CPU
   time per call, so descheduling by other load does not count; wall p50 beside it), with
   their parity (max abs logit difference vs torch eager on the export's parity batches):
   the export now, the transformer optimizer's other settings (opt_level 1/2/99, FastGelu,
   no cls-only last layer), a graph pre-optimized at ORT_ENABLE_ALL and saved, and session
   options (optimization level, memory arena, parallel execution mode).
2. torch eager variants: SDPA (what the bench uses) vs eager attention, inference_mode vs
   no_grad, and torch with the same cls-only last layer the export uses.
3. Per-op profiles at each length: onnxruntime `enable_profiling` (kernel time summed by op
   type) and torch.profiler (self CPU time by aten op), so the share of each runtime's time
   spent in matrix products is read from the same run. Both profilers report wall time of
   their spans: under load read them as shares, not as milliseconds.
4. The model's own matrix-product shapes alone (x @ W + b, one thread, main-thread CPU):
   MLAS (an onnxruntime MatMul+Add session, weights pre-packed) vs torch (nn.Linear, MKL):
   the speed-up onnxruntime can get on the part of the model both spend most time in.

    OMP_NUM_THREADS=1 python bench/edge_profile.py --adapter ADAPTER [--seq 128] [--runs 30] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(Path(__file__).resolve().parent), str(ROOT)]

import numpy as np  # noqa: E402

TASK = "sequence-classification"
MATMUL_OPS = {"MatMul", "FusedMatMul", "Gemm", "Attention", "MatMulNBits", "QAttention", "MatMulInteger",
              "DynamicQuantizeMatMul"}


def _optimize(src: Path, dst: Path, *, opt_level: int, cfg: Any, **fusion: bool) -> dict[str, int]:
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    for key, value in fusion.items():
        setattr(options, key, value)
    m = optimize_model(str(src), model_type="bert", num_heads=cfg.num_attention_heads, hidden_size=cfg.hidden_size,
                       opt_level=opt_level, optimization_options=options)
    m.save_model_to_file(str(dst), use_external_data_format=False)
    counts: dict[str, int] = defaultdict(int)
    for n in m.model.graph.node:
        counts[n.op_type] += 1
    return dict(sorted(counts.items()))


def build_graphs(model: Any, work: Path) -> dict[str, dict[str, Any]]:
    """{name: {"path", "nodes"}} of every graph variant."""
    import onnxruntime as ort

    from rankfed.edge_client.export import _trace

    cfg = model.config
    raw_cls, raw_full = work / "raw-cls.onnx", work / "raw-full.onnx"
    _trace(model, TASK, raw_cls, exporter="torchscript", max_length=512, cls_only=True)
    _trace(model, TASK, raw_full, exporter="torchscript", max_length=512, cls_only=False)
    out: dict[str, dict[str, Any]] = {}
    for name, src, level, fusion in (
        ("fused opt0 (export now)", raw_cls, 0, {}),
        ("fused opt0 no cls-only", raw_full, 0, {}),
        ("fused opt0 FastGelu", raw_cls, 0, {"enable_gelu_approximation": True}),
        ("fused opt0 no Attention", raw_cls, 0, {"enable_attention": False}),
        ("fused opt0 MultiHeadAttention", raw_cls, 0, {"use_multi_head_attention": True}),
        ("fused opt0 no EmbedLayerNorm", raw_cls, 0, {"enable_embed_layer_norm": False}),
        ("fused opt1", raw_cls, 1, {}),
        ("fused opt2", raw_cls, 2, {}),
        ("fused opt99", raw_cls, 99, {}),
    ):
        path = work / (name.replace(" ", "_").replace("(", "").replace(")", "") + ".onnx")
        out[name] = {"path": path, "nodes": _optimize(src, path, opt_level=level, cfg=cfg, **fusion)}
    out["unfused (raw TorchScript, cls-only)"] = {"path": raw_cls, "nodes": _loaded_ops(raw_cls, work)}
    # The fused graph after onnxruntime's own ALL-level optimizations, saved as .onnx.
    pre = work / "pre-all.onnx"
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(pre)
    ort.InferenceSession(str(out["fused opt0 (export now)"]["path"]), so, providers=["CPUExecutionProvider"])
    out["pre-optimized ALL, saved"] = {"path": pre, "nodes": {}, "load_level": "disable"}
    return out


def _loaded_ops(path: Path, work: Path) -> dict[str, int]:
    """Op counts of ``path`` after onnxruntime's own EXTENDED-level optimizations at load."""
    import onnx
    import onnxruntime as ort

    dst = work / f"{path.stem}.loaded.onnx"
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    counts: dict[str, int] = defaultdict(int)
    for n in onnx.load(str(dst)).graph.node:
        counts[n.op_type] += 1
    return dict(sorted(counts.items()))


def session(path: Path, *, level: str = "all", arena: bool = True, parallel: bool = False,
            profile: str | None = None) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    so.enable_cpu_mem_arena = arena
    so.execution_mode = ort.ExecutionMode.ORT_PARALLEL if parallel else ort.ExecutionMode.ORT_SEQUENTIAL
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = profile
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def parity(model: Any, path: Path) -> float:
    from rankfed.edge_client.export import compare

    return compare(model, TASK, str(path), vocab_size=model.config.vocab_size)[0]


def time_calls(calls: dict[str, Any], runs: int) -> dict[str, dict[str, float]]:
    cpu: dict[str, list[float]] = {k: [] for k in calls}
    wall: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(3):
        for f in calls.values():
            f()
    for _ in range(runs):
        for name, f in calls.items():
            t, c = time.perf_counter(), time.thread_time()
            f()
            cpu[name].append(time.thread_time() - c)
            wall[name].append(time.perf_counter() - t)
    return {k: {"cpu_p50_ms": round(1e3 * statistics.median(cpu[k]), 3),
                "cpu_min_ms": round(1e3 * min(cpu[k]), 2),
                "wall_p50_ms": round(1e3 * statistics.median(wall[k]), 2)} for k in calls}


def ort_profile(path: Path, feed: dict[str, np.ndarray], runs: int, prefix: str) -> dict[str, Any]:
    s = session(path, profile=prefix)
    for _ in range(runs):
        s.run(["logits"], feed)
    trace = json.loads(Path(s.end_profiling()).read_text())
    by_op: dict[str, float] = defaultdict(float)
    total = 0.0
    for ev in trace:
        if ev.get("cat") == "Node" and ev["name"].endswith("_kernel_time"):
            by_op[ev["args"]["op_name"]] += ev["dur"]
        if ev.get("cat") == "Session" and ev["name"] == "model_run":
            total += ev["dur"]
    ms = {k: round(v / runs / 1e3, 3) for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])}
    mm = sum(v for k, v in ms.items() if k in MATMUL_OPS)
    return {"model_run_ms": round(total / runs / 1e3, 3), "kernel_ms_by_op": ms,
            "matmul_like_ms": round(mm, 3), "kernels_ms": round(sum(ms.values()), 3)}


def torch_profile(fn: Any, runs: int) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(runs):
            fn()
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    ms = {e.key: round(e.self_cpu_time_total / runs / 1e3, 3) for e in rows[:15]}
    total = sum(e.self_cpu_time_total for e in prof.key_averages()) / runs / 1e3
    mm_keys = ("aten::addmm", "aten::mm", "aten::bmm", "aten::linear", "aten::matmul", "aten::baddbmm",
               "mkldnn", "aten::_scaled_dot_product_flash_attention_for_cpu")
    mm = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key.startswith(mm_keys)) / runs / 1e3
    return {"self_cpu_total_ms": round(total, 3), "self_cpu_ms_top": ms, "matmul_like_ms": round(mm, 3)}


def sgemm_table(shapes: tuple[tuple[int, int, int], ...], runs: int) -> list[dict[str, Any]]:
    """x (1, m, k) @ W (k, n) + b, one thread: onnxruntime vs torch, interleaved."""
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    rows = []
    for m, k, n in shapes:
        w = rng.standard_normal((k, n)).astype(np.float32)
        b = rng.standard_normal(n).astype(np.float32)
        x = rng.standard_normal((1, m, k)).astype(np.float32)
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])], "linear",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, m, k])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, m, n])],
            [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        s = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
                                 .SerializeToString(), so, providers=["CPUExecutionProvider"])
        linear = torch.nn.Linear(k, n)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(w.T.copy()))  # (n, k)
            linear.bias.copy_(torch.from_numpy(b))
        tx = torch.from_numpy(x)
        with torch.inference_mode():
            t = time_calls({"ort": lambda: s.run(None, {"x": x}), "torch": lambda: linear(tx)}, runs)
        flop = 2 * m * k * n
        rows.append({"m": m, "k": k, "n": n, "ort_ms": t["ort"]["cpu_p50_ms"], "torch_ms": t["torch"]["cpu_p50_ms"],
                     "ort_gflops": round(flop / t["ort"]["cpu_p50_ms"] / 1e6), 
                     "torch_gflops": round(flop / t["torch"]["cpu_p50_ms"] / 1e6),
                     "torch_over_ort": round(t["torch"]["cpu_p50_ms"] / t["ort"]["cpu_p50_ms"], 2)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--seq", type=int, nargs="+", default=[128])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--out", default="")
    a = ap.parse_args()

    import torch
    from edge_bench import minilm_dir

    from rankfed.edge_client.cls_only import ClsOnlyLastLayer
    from rankfed.edge_client.export import logits_only, merged_model, read_adapter

    torch.set_num_threads(1)
    model_dir = minilm_dir()
    model = merged_model(model_dir, read_adapter(a.adapter), TASK)
    result: dict[str, Any] = {"load_avg_start": os.getloadavg(), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        graphs = build_graphs(model, work)  # sets eager attention on `model` (the export does)
        result["graphs"] = {k: {"nodes": v["nodes"], "mib": round(v["path"].stat().st_size / 2**20, 1),
                                "parity": parity(model, v["path"])} for k, v in graphs.items()}
        sdpa = merged_model(model_dir, read_adapter(a.adapter), TASK)  # default attention, as edge_bench
        torch_sdpa, torch_eager_attn = logits_only(sdpa, TASK), logits_only(model, TASK)
        torch_cls = ClsOnlyLastLayer(model).eval()
        now = graphs["fused opt0 (export now)"]["path"]
        sessions = {name: session(g["path"], level=g.get("load_level", "all")) for name, g in graphs.items()}
        sessions["export now, level extended"] = session(now, level="extended")
        sessions["export now, level basic"] = session(now, level="basic")
        sessions["export now, no mem arena"] = session(now, arena=False)
        sessions["export now, parallel mode"] = session(now, parallel=True)
        result["timing"] = {}
        for seq in a.seq:
            ids = np.random.default_rng(seq).integers(1000, 30000, size=(1, seq), dtype=np.int64)
            feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
            t_ids, t_mask = torch.from_numpy(ids), torch.from_numpy(feed["attention_mask"])

            def no_grad(m: Any = torch_sdpa, i: Any = t_ids, k: Any = t_mask) -> Any:
                with torch.no_grad():
                    return m(i, k)

            calls: dict[str, Any] = {
                "torch eager SDPA, inference_mode (bench)": lambda i=t_ids, k=t_mask: torch_sdpa(i, k),
                "torch eager SDPA, no_grad": no_grad,
                "torch eager attention": lambda i=t_ids, k=t_mask: torch_eager_attn(i, k),
                "torch cls-only last layer": lambda i=t_ids, k=t_mask: torch_cls(i, k),
            }
            for name, s in sessions.items():
                calls[f"ort {name}"] = lambda s=s, f=feed: s.run(["logits"], f)
            with torch.inference_mode():
                timing = time_calls(calls, a.runs)
                base = timing["torch eager SDPA, inference_mode (bench)"]["cpu_p50_ms"]
                for v in timing.values():
                    v["x_eager_cpu"] = round(base / v["cpu_p50_ms"], 2)
                result["timing"][str(seq)] = {"load_avg": os.getloadavg(), "rows": timing}
                result.setdefault("profiles", {})[str(seq)] = {
                    "ort export now": ort_profile(now, feed, a.runs, str(work / f"ort{seq}")),
                    "ort unfused": ort_profile(graphs["unfused (raw TorchScript, cls-only)"]["path"], feed, a.runs,
                                               str(work / f"ortu{seq}")),
                    "ort no Attention": ort_profile(graphs["fused opt0 no Attention"]["path"], feed, a.runs,
                                                    str(work / f"ortn{seq}")),
                    "torch eager SDPA": torch_profile(lambda i=t_ids, k=t_mask: torch_sdpa(i, k), a.runs),
                }
    cfg = model.config
    d, ff = cfg.hidden_size, cfg.intermediate_size
    shapes = tuple((seq, k, n) for seq in a.seq for k, n in ((d, d), (d, 3 * d), (d, ff), (ff, d)))
    result["sgemm"] = {"load_avg": os.getloadavg(), "rows": sgemm_table(shapes, 5 * a.runs)}
    result["load_avg_end"] = os.getloadavg()
    text = json.dumps(result, indent=2, default=str)
    if a.out:
        Path(a.out).write_text(text + "\n")
    for seq, t in result["timing"].items():
        print(f"\nseq {seq}, load {t['load_avg'][0]:.2f}")
        print("| variant | CPU p50 ms | CPU min ms | wall p50 ms | x eager (CPU p50) | parity |")
        print("|---|---|---|---|---|---|")
        for name, v in t["rows"].items():
            g = name.removeprefix("ort ")
            par = result["graphs"].get(g, {}).get("parity", "")
            par = f"{par:.1e}" if isinstance(par, float) else ""
            print(f"| {name} | {v['cpu_p50_ms']} | {v['cpu_min_ms']} | {v['wall_p50_ms']} | {v['x_eager_cpu']} | {par} |")
        p = result["profiles"][seq]
        tp = p["torch eager SDPA"]
        for key in ("ort export now", "ort unfused", "ort no Attention"):
            o = p[key]
            print(f"{key}: model_run {o['model_run_ms']} ms, kernels {o['kernels_ms']}, matmul-like "
                  f"{o['matmul_like_ms']}: {json.dumps(dict(list(o['kernel_ms_by_op'].items())[:8]))}")
        print(f"torch: self CPU {tp['self_cpu_total_ms']} ms, matmul-like {tp['matmul_like_ms']}: "
              f"{json.dumps(dict(list(tp['self_cpu_ms_top'].items())[:8]))}")
    print(f"\nx @ W + b alone, one thread, load {result['sgemm']['load_avg'][0]:.2f}")
    print("| m x k x n | onnxruntime ms (GFLOP/s) | torch ms (GFLOP/s) | torch / onnxruntime |")
    print("|---|---|---|---|")
    for r in result["sgemm"]["rows"]:
        print(f"| {r['m']}x{r['k']}x{r['n']} | {r['ort_ms']} ({r['ort_gflops']}) | {r['torch_ms']} ({r['torch_gflops']}) | "
              f"{r['torch_over_ort']} |")


if __name__ == "__main__":
    main()
