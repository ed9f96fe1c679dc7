"""Benchmarks of rankfed.aggregation: fold throughput, factored vs dense SVD, per-rule time.

    python bench/aggregation_bench.py            # full run (the dense 4096² SVD takes a while)
    python bench/aggregation_bench.py --quick    # smaller dense SVD, fewer repeats

Prints a table and writes bench/results/aggregation.json. Timings are medians of repeats
in one process; on a shared 2-core machine treat absolute numbers as ±30 % and read the
ratios, which are measured side by side in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

# One BLAS thread for every measurement, baselines included: on 2 shared cores a second
# OpenBLAS thread that gets descheduled stalls each call (a 384x384 QR + SVD took 860 ms
# with 2 threads under load, 51 ms with 1). Set OPENBLAS_NUM_THREADS to override.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from rankfed.aggregation import (
    METHODS,
    Adapter,
    AdapterSpec,
    LoraModule,
    factored_svd,
    get_method,
)

RESULTS = Path(__file__).parent / "results" / "aggregation.json"
# MiniLM-L6 (hidden 384, 6 layers): query and value of every layer = 12 modules of 384x384
MINILM = AdapterSpec({f"encoder.layer.{i}.attention.self.{t}": (384, 384) for i in range(6) for t in ("query", "value")})
# Llama-8B-like q/v (32 layers of 4096x4096; k/v projections taken square for simplicity):
# at rank 16 the adapter (27 MB) and the accumulator together exceed the 32 MiB L3, so this
# is the memory-bound regime a coordinator sees with real models.
WIDE = AdapterSpec({f"layers.{i}.{t}": (4096, 4096) for i in range(32) for t in ("q_proj", "v_proj")})


def median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def random_adapter(spec: AdapterSpec, rank: int, seed: int) -> Adapter:
    rng = np.random.default_rng(seed)
    return Adapter(
        {
            n: LoraModule(
                rng.standard_normal((rank, d_in), np.float32) * 0.05,
                rng.standard_normal((d_out, rank), np.float32) * 0.05,
                alpha=2.0 * rank,
            )
            for n, (d_out, d_in) in spec.modules.items()
        }
    )


def bench_fold(spec: AdapterSpec, label: str, rank: int, folds: int, repeats: int) -> list[dict]:
    """GB/s of adapter bytes folded, against copying the same arrays (np.copyto per tensor,
    the same number of calls) and one contiguous memcpy of the same byte count."""
    adapters = [random_adapter(spec, rank, seed) for seed in range(3)]
    nbytes = adapters[0].nbytes
    arrays = [x for m in adapters[0].modules.values() for x in (m.a, m.b)]
    targets = [np.empty_like(x) for x in arrays]
    flat_src = np.random.default_rng(0).standard_normal(nbytes // 4, np.float32)
    flat_dst = np.empty_like(flat_src)

    def per_tensor_copy() -> None:
        for _ in range(folds):
            for src, dst in zip(arrays, targets):
                np.copyto(dst, src)

    def one_memcpy() -> None:
        for _ in range(folds):
            np.copyto(flat_dst, flat_src)

    copy_t = median_time(per_tensor_copy, repeats)
    memcpy_t = median_time(one_memcpy, repeats)
    rows = []
    for name in ("zero_pad", "rbla", "hetlora", "flexlora"):
        # The coordinator's accumulator lives for the whole round: time the folds into it,
        # not its allocation (first-touch page faults of its zeroed sums).
        acc = get_method(name).accumulator(spec, global_rank=rank)
        acc.fold(adapters[0], 1.0)

        def fold_all(acc=acc) -> None:
            for k in range(folds):
                acc.fold(adapters[k % len(adapters)], 1.0 + k)

        fold_t = median_time(fold_all, repeats)
        gbps = nbytes * folds / fold_t / 1e9
        rows.append({
            "adapter": label, "rule": name, "rank": rank, "adapter_bytes": nbytes, "folds": folds,
            "fold_gb_s": gbps,
            "copy_per_tensor_gb_s": nbytes * folds / copy_t / 1e9,
            "memcpy_gb_s": nbytes * folds / memcpy_t / 1e9,
            "vs_copy_per_tensor": gbps / (nbytes * folds / copy_t / 1e9),
            "vs_memcpy": gbps / (nbytes * folds / memcpy_t / 1e9),
        })
    return rows


def bench_svd(d: int, clients: int, rank: int, repeats: int) -> dict:
    """Truncated rank-`rank` SVD of Σ_k w_k B_k A_k: factored vs forming ΔW + dense SVD."""
    rng = np.random.default_rng(0)
    bs = [rng.standard_normal((d, rank), np.float32) for _ in range(clients)]
    as_ = [rng.standard_normal((rank, d), np.float32) for _ in range(clients)]
    weights = rng.uniform(0.5, 1.5, clients)
    factored_t = median_time(lambda: factored_svd(bs, as_, weights, rank), repeats)
    us, vt = factored_svd(bs, as_, weights, rank)

    def dense() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        total = np.zeros((d, d), np.float32)
        for w, b, a in zip(weights, bs, as_):
            total += np.float32(w) * (b @ a)  # (d, r) @ (r, d)
        return np.linalg.svd(total, full_matrices=False)

    start = time.perf_counter()
    u, s, v = dense()
    dense_t = time.perf_counter() - start
    expected = (u[:, :rank] * s[:rank]) @ v[:rank]
    got = us @ vt
    return {
        "d": d, "clients": clients, "client_rank": rank, "total_rank": clients * rank, "svd_rank": rank,
        "factored_s": factored_t, "dense_s": dense_t, "speedup": dense_t / factored_t,
        "product_rel_diff": float(np.linalg.norm(got - expected) / np.linalg.norm(expected)),
    }


def bench_rules(clients: int, repeats: int) -> list[dict]:
    """Time to aggregate `clients` MiniLM-L6 q/v adapters at ranks cycling {2, 4, 8, 16}."""
    cycle = [2, 4, 8, 16]
    adapters = [random_adapter(MINILM, cycle[k % 4], k) for k in range(clients)]
    same = [random_adapter(MINILM, 8, k) for k in range(clients)]  # FedIT needs equal ranks
    weights = [float(100 + k) for k in range(clients)]
    rows = []
    for name, method in METHODS.items():
        group = same if name == "fedit" else adapters

        def stream(method=method, group=group) -> Adapter:
            acc = method.accumulator(MINILM, global_rank=16)
            for adapter, weight in zip(group, weights):
                acc.fold(adapter, weight)
            return acc.result()

        def batch(method=method, group=group) -> Adapter:
            return method.aggregate(group, weights, global_rank=16)

        acc = method.accumulator(MINILM, global_rank=16)
        for adapter, weight in zip(group, weights):
            acc.fold(adapter, weight)
        rows.append({
            "rule": name, "clients": clients, "ranks": "8 (equal)" if name == "fedit" else "2,4,8,16",
            "streaming_s": median_time(stream, repeats), "batch_s": median_time(batch, repeats),
            "accumulator_bytes": acc.nbytes, "global_ranks": sorted(set(acc.result().ranks.values())),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="d=1024 dense SVD, fewer repeats")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    repeats = 3 if args.quick else 5

    fold = bench_fold(MINILM, "MiniLM-L6 q,v (12x384x384)", 16, 200, repeats)
    fold += bench_fold(WIDE, "Llama-8B-like q,v (64x4096x4096)", 16, 8, repeats)
    svd = bench_svd(1024 if args.quick else 4096, 8, 8, repeats)
    rules = bench_rules(100, 3 if args.quick else 3)

    print("\nFold throughput (GB/s of client adapter bytes; fp32 factors, decoded)")
    print(f"{'adapter':30} {'rule':9} {'MB':>6} {'fold':>7} {'copy/t':>7} {'memcpy':>7} {'vs copy':>8} {'vs memcpy':>9}")
    for r in fold:
        print(f"{r['adapter']:30} {r['rule']:9} {r['adapter_bytes']/1e6:6.2f} {r['fold_gb_s']:7.2f} "
              f"{r['copy_per_tensor_gb_s']:7.2f} {r['memcpy_gb_s']:7.2f} {r['vs_copy_per_tensor']:8.0%} {r['vs_memcpy']:9.0%}")
    print(f"\nTruncated SVD of a sum of {svd['clients']} rank-{svd['client_rank']} products at d={svd['d']}")
    print(f"  factored {svd['factored_s']*1e3:9.1f} ms   dense {svd['dense_s']*1e3:9.1f} ms   "
          f"speedup {svd['speedup']:7.0f}x   product rel. diff {svd['product_rel_diff']:.1e}")
    print("\nAggregate 100 clients, MiniLM-L6 q,v, global rank 16")
    print(f"{'rule':12} {'ranks':10} {'streaming s':>12} {'batch s':>9} {'acc MB':>8}")
    for r in rules:
        print(f"{r['rule']:12} {r['ranks']:10} {r['streaming_s']:12.3f} {r['batch_s']:9.3f} {r['accumulator_bytes']/1e6:8.2f}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
                    "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"), "quick": args.quick},
        "fold": fold, "svd": svd, "rules": rules,
    }, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
