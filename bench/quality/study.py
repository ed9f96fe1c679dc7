"""Study v2 (docs/results.md §3): the preregistered grid on `rankfed simulate`.

    OMP_NUM_THREADS=1 python bench/quality/study.py --out bench/results/study-v2 --jobs 2
    python bench/quality/study.py --out bench/results/study-v2 --report   # tables only

Each run is one `simulate()` of bench/quality/fleets/wordnet.toml with a few keys changed; its
rounds.jsonl and summary.json are kept under OUT/<run>/ (the coordinator's blobs are deleted
to keep the raw results small). Runs already present are skipped, so the grid resumes.
The frozen-layer states are shared by all runs (OUT/../study-cache): a device's data is the
same in every run of a seed.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

FLEET = Path(__file__).parent / "fleets" / "wordnet.toml"
SEEDS = (0, 1, 2, 3, 4)
RULES = ("zero_pad", "rbla", "replication", "fedavg_updates", "hetlora", "flexlora")  # as run (fedavg_updates: removed since, H5)
TUNE_SEED = 100
LRS = (2e-3, 5e-3, 1e-2, 2e-2)
ASSIGNMENTS = ("random", "aligned")


REPORTED = [
    "devices.profiles={ cuda-large = 1.0 }", "data.local_validation=0.2",
    'federation.coordinator={ "rank_policy.allocation" = "reported", "rank_policy.high_rank_fraction" = 0.2, '
    '"rank_policy.low_rank" = 2, "rank_policy.warmup_rounds" = 1, "rank_policy.reevaluate_every" = 1 }',
]
HOMOG = ((16, "cuda-large"), (4, "cpu"), (2, "mobile"))
ALIGNED_RULES = ("zero_pad", "rbla", "replication")


def tuning_grid() -> list[tuple[str, list[str]]]:
    """The learning-rate sweep on the tuning seed (validation accuracy decides)."""
    runs = []
    for lr in LRS:
        runs.append((f"tune-homog-r16-lr{lr:g}-s{TUNE_SEED}", [f"seed={TUNE_SEED}", 'method="zero_pad"',
                     "devices.profiles={ cuda-large = 1.0 }", f"training.learning_rate={lr}"]))
        runs.append((f"tune-zero_pad-random-lr{lr:g}-s{TUNE_SEED}", [f"seed={TUNE_SEED}", 'method="zero_pad"',
                     f"training.learning_rate={lr}"]))
    return runs


def grid(lr: float) -> list[tuple[str, list[str]]]:
    runs = []
    for seed in SEEDS:
        common = [f"seed={seed}", f"training.learning_rate={lr}"]
        for r, profile in HOMOG:
            runs.append((f"homog-r{r}-s{seed}", [*common, 'method="zero_pad"', f"devices.profiles={{ {profile} = 1.0 }}"]))
        for assignment in ASSIGNMENTS:
            for rule in RULES if assignment == "random" else ALIGNED_RULES:
                runs.append((f"{rule}-{assignment}-s{seed}", [*common, f'method="{rule}"',
                                                              f'devices.assignment="{assignment}"']))
        for rule in ("zero_pad", "rbla"):
            runs.append((f"{rule}-reported-s{seed}", [*common, f'method="{rule}"', *REPORTED]))
    return runs


def chosen_lr(out: Path) -> float | None:
    """The lr with the best mean final validation accuracy over the tuning runs (None until all ran)."""
    scores: dict[float, list[float]] = {}
    for name, _ in tuning_grid():
        path = out / name / "summary.json"
        if not path.is_file():
            return None
        s = json.loads(path.read_text())
        lr = float(name.split("-lr")[1].split("-s")[0])
        scores.setdefault(lr, []).append(s["final"]["validation"]["accuracy"])
    return max(scores, key=lambda lr: (sum(scores[lr]) / len(scores[lr]), -lr))


def run_one(name: str, sets: list[str], out: Path, cache: Path, fleet: Path = FLEET) -> str:
    target = out / name
    if (target / "summary.json").is_file():
        return f"{name}: kept"
    if target.exists():
        shutil.rmtree(target)
    cmd = [sys.executable, "-m", "rankfed", "simulate", str(fleet), "--out", str(target), "--cache-dir", str(cache),
           "--quiet"]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    (out / f"{name}.log").write_text(proc.stdout + proc.stderr)
    shutil.rmtree(target / "coordinator", ignore_errors=True)
    shutil.rmtree(target / "prefix-cache", ignore_errors=True)
    return f"{name}: exit {proc.returncode} {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ''}"


def run_grid(pool: Executor, runs: Iterable[tuple[str, list[str]]], out: Path, cache: Path,
             run: Callable[[str, list[str], Path, Path], str] = run_one) -> None:
    """Each (name, --set strings) run on the pool, in order; its outcome printed as it ends."""
    for line in pool.map(lambda r: run(r[0], r[1], out, cache), runs):
        print(line, flush=True)


def _t95(n: int) -> float:
    return {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}.get(n - 1, 1.96) if n > 1 else float("nan")


def _ci(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, _t95(n) * sd / math.sqrt(n)


Accuracies = dict[str, dict[int, float]]  # config -> seed -> final test accuracy


def summary_rows(acc: Accuracies, up: dict[str, dict[int, int]]) -> list[dict[str, Any]]:
    """Per config: final test accuracy per seed, mean ± 95 % t-interval, mean uplink MB."""
    rows = []
    for config in sorted(acc):
        vals = [acc[config][k] for k in sorted(acc[config])]
        mean, half = _ci(vals)
        rows.append({"config": config, "seeds": sorted(acc[config]), "test_acc": vals, "mean": mean, "ci95": half,
                     "uplink_mb": sum(up[config].values()) / len(up[config]) / 1e6})
    return rows


def paired_difference(acc: Accuracies, a: str, b: str) -> dict[str, Any] | None:
    """a − b in points over the seeds both ran: per seed, mean and 95 % t-interval."""
    seeds = sorted(set(acc.get(a, {})) & set(acc.get(b, {})))
    if not seeds:
        return None
    diffs = [100 * (acc[a][s] - acc[b][s]) for s in seeds]
    mean, half = _ci(diffs)
    return {"a": a, "b": b, "seeds": seeds, "diff_points": diffs, "mean": mean, "ci95": half}


def core_hypotheses(acc: Accuracies, rules: tuple[str, ...]) -> tuple[str | None, dict[str, Any]]:
    """H0-H3, the same in studies v2 and v3; and the best rule under random ranks (for H3)."""
    het = [f"{r}-random" for r in rules]
    best = max((c for c in het if c in acc), key=lambda c: sum(acc[c].values()) / len(acc[c]), default=None)
    return best, {
        "H0 homog r16 - r2 >= 5": paired_difference(acc, "homog-r16", "homog-r2"),
        "H1 aligned: rbla - zero_pad >= 2": paired_difference(acc, "rbla-aligned", "zero_pad-aligned"),
        "H2 random: rbla - zero_pad <= 0": paired_difference(acc, "rbla-random", "zero_pad-random"),
        f"H3 best het ({best}) - homog r16 >= -2": paired_difference(acc, best, "homog-r16") if best else None,
    }


def curves(out: Path) -> dict[str, dict[str, list[float]]]:
    """Per config: mean test accuracy over seeds at each scored round, and mean cumulative
    uplink bytes at those rounds."""
    per: dict[str, list[list[tuple[int, float, float]]]] = {}
    for rounds in sorted(out.glob("*/rounds.jsonl")):
        name = rounds.parent.name
        if name.startswith("tune-"):
            continue
        config = name.rsplit("-s", 1)[0]
        up, points = 0.0, []
        for line in rounds.read_text().splitlines():
            x = json.loads(line)
            up += x["bytes_up"]
            if "test" in x:
                points.append((x["round"], up / 1e6, x["test"]["accuracy"]))
        per.setdefault(config, []).append(points)
    result = {}
    for config, runs in per.items():
        n = min(len(r) for r in runs)
        result[config] = {
            "round": [runs[0][i][0] for i in range(n)],
            "uplink_mb": [sum(r[i][1] for r in runs) / len(runs) for i in range(n)],
            "test_acc": [sum(r[i][2] for r in runs) / len(runs) for i in range(n)],
            "seeds": [len(runs)],
        }
    return result


def plot(out: Path, data: dict[str, dict[str, list[float]]],
         title: str = "Study v2: WordNet supersenses, 50 devices, 10 % per round (bench/quality/study.py)") -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install 'rankfed[bench]'): no plot")
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    colours = plt.get_cmap("tab20").colors
    for i, config in enumerate(sorted(data)):
        d = data[config]
        style = "--" if config.startswith("homog") else (":" if config.endswith("reported") else "-")
        c = colours[i % len(colours)]
        ax1.plot(d["round"], [100 * a for a in d["test_acc"]], style, color=c, marker="o", ms=3, label=config)
        ax2.plot(d["uplink_mb"], [100 * a for a in d["test_acc"]], style, color=c, marker="o", ms=3, label=config)
    ax1.set_xlabel("round")
    ax2.set_xlabel("cumulative uplink (MB)")
    for ax in (ax1, ax2):
        ax.set_ylabel("test accuracy (%), mean over seeds")
        ax.grid(alpha=0.3)
    ax2.legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    path = out / "accuracy.png"
    fig.savefig(path, dpi=100)
    return path


def worst_rank(out: Path) -> dict[str, dict[str, Any]]:
    """Per config: the final accuracy of each rank's truncation (what a device of that rank
    trains), mean over the seeds that scored it, and the worst rank's."""
    per: dict[str, dict[str, list[float]]] = {}
    for summary in sorted(out.glob("*/summary.json")):
        name = summary.parent.name
        s = json.loads(summary.read_text())
        ranks = (s.get("final") or {}).get("test_per_rank")
        if name.startswith("tune-") or not ranks:
            continue
        config = name.rsplit("-s", 1)[0]
        for r, m in ranks.items():
            per.setdefault(config, {}).setdefault(r, []).append(m["accuracy"])
    out_: dict[str, dict[str, Any]] = {}
    for config, ranks in per.items():
        means = {r: sum(v) / len(v) for r, v in ranks.items()}
        worst = min(means, key=lambda r: means[r])
        out_[config] = {"per_rank": means, "worst_rank": worst, "worst_acc": means[worst],
                        "seeds": max(len(v) for v in ranks.values())}
    return out_


def report(out: Path) -> dict[str, Any]:
    acc: dict[str, dict[int, float]] = {}
    up: dict[str, dict[int, int]] = {}
    best_val: dict[str, dict[int, float]] = {}
    for summary in sorted(out.glob("*/summary.json")):
        s = json.loads(summary.read_text())
        name = summary.parent.name
        if name.startswith("tune-"):
            continue
        config, seed = name.rsplit("-s", 1)
        if s.get("final") and s["final"].get("test"):
            acc.setdefault(config, {})[int(seed)] = s["final"]["test"]["accuracy"]
            up.setdefault(config, {})[int(seed)] = s["uplink_bytes"]
            best_val.setdefault(config, {})[int(seed)] = (s["best_by_validation"]["test"] or {}).get("accuracy", float("nan"))
    rows = summary_rows(acc, up)

    def paired(a: str, b: str) -> dict[str, Any] | None:
        return paired_difference(acc, a, b)

    best, hyp = core_hypotheses(acc, RULES)
    extra = {f"{r}: aligned - random": paired(f"{r}-aligned", f"{r}-random") for r in ALIGNED_RULES}
    extra.update({f"random: {r} - zero_pad": paired(f"{r}-random", "zero_pad-random") for r in RULES[1:]})
    extra.update({f"aligned: {r} - zero_pad": paired(f"{r}-aligned", "zero_pad-aligned") for r in ALIGNED_RULES[1:]})
    extra["random: replication - rbla (noise floor)"] = paired("replication-random", "rbla-random")
    hyp["H4a reported zero_pad - homog r4"] = paired("zero_pad-reported", "homog-r4")
    hyp["H4b reported rbla - homog r4"] = paired("rbla-reported", "homog-r4")
    extra["reported rbla - homog r16"] = paired("rbla-reported", "homog-r16")
    result = {"rows": rows, "hypotheses": hyp, "comparisons": extra,
              "uplink_ratio_best_het_vs_r16": (sum(up[best].values()) / sum(up["homog-r16"].values()))
              if best and "homog-r16" in up else None}
    (out / "report.json").write_text(json.dumps(result, indent=2))
    lr = chosen_lr(out)
    tuning = {}
    for name, _ in tuning_grid():
        path = out / name / "summary.json"
        if path.is_file():
            tuning[name] = json.loads(path.read_text())["final"]["validation"]["accuracy"]
    result["learning_rate"] = {"chosen": lr, "validation_accuracy": tuning}
    result["curves"] = curves(out)
    result["per_rank"] = worst_rank(out)
    png = plot(out, result["curves"])
    result["plot"] = str(png) if png else None
    (out / "report.json").write_text(json.dumps(result, indent=2))
    print(f"learning rate chosen on validation: {lr}  ({', '.join(f'{k}: {v:.3f}' for k, v in tuning.items())})")
    print(f"{'config':28s} {'seeds':>8s} {'test acc (mean ± 95% CI)':>26s} {'uplink MB':>10s}")
    for r in rows:
        print(f"{r['config']:28s} {len(r['seeds']):8d} {100 * r['mean']:17.1f} ± {100 * r['ci95']:5.1f} {r['uplink_mb']:10.2f}")
    print()
    print()
    for config, w in sorted(result["per_rank"].items()):
        ranks = ", ".join(f"{r} {100 * a:.1f}" for r, a in sorted(w["per_rank"].items(), key=lambda x: int(x[0][1:])))
        print(f"{config:28s} per-rank test acc: {ranks}; worst {w['worst_rank']} ({w['seeds']} seeds)")
    print()
    for title, p in {**hyp, **extra}.items():
        if p:
            print(f"{title:45s} {p['mean']:+6.1f} ± {p['ci95']:4.1f} points  per seed {['%+.1f' % d for d in p['diff_points']]}")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results/study-v2"))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--report", action="store_true", help="only print the tables of the runs present")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report:
        cache = args.out.parent / "study-cache"
        with ThreadPoolExecutor(args.jobs) as pool:
            run_grid(pool, tuning_grid(), args.out, cache)
            lr = chosen_lr(args.out)
            print(f"learning rate chosen on validation: {lr}", flush=True)
            assert lr is not None
            # Seed-major order: every seed's runs finish before the next seed starts.
            run_grid(pool, grid(lr), args.out, cache)
    report(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
