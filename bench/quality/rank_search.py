"""Study v3, step 1: find a regime where LoRA rank matters (docs/results.md §4).

Study v2 (WordNet, LoRA on query/value of the top two layers, alpha = 2r) found homog r16
no better than homog r2 (-6.9 ± 8.2 points), so no rank-aware rule could be told apart.
Two things in that setting can hide the rank:
  * alpha = scaling * r ("constant_scaling") grows the update's size with the rank, so rank
    16 is also a larger step: it diverged at lr 2e-2 and varied most across seeds. peft's own
    convention, a fixed alpha (scale alpha / r), keeps the step size and changes only the
    number of directions.
  * two modules on two layers may simply not need more than two directions; LoRA on every
    linear map of those layers (query, key, value and the three dense maps) asks for more.

This pilot runs homog r2 and homog r16 on the tuning seed only (100, never a study seed),
scores VALIDATION accuracy only (test is switched off), and tries three learning rates for
each (variant, rank), because a fixed alpha changes which lr suits which rank.

Decision rule, fixed before any run: for each variant, gap = best-lr validation accuracy of
r16 minus best-lr validation accuracy of r2. The study (study.py --variant) uses the variant
with the largest gap, with each rank's best lr; if no gap reaches 5 points, it still runs that
variant and H0 is reported as not held.

    OMP_NUM_THREADS=1 python bench/quality/rank_search.py --out bench/results/rank-search --jobs 2
    python bench/quality/rank_search.py --out bench/results/rank-search --report
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from study import run_grid  # noqa: E402  (a sibling script, not a package)

SEED = 100
RANKS = ((2, "mobile"), (16, "cuda-large"))
LRS = (3e-3, 1e-2, 3e-2)
FIXED = 'federation.coordinator={ "lora.alpha_rule" = "fixed", "lora.alpha" = 16 }'
ALL_LINEAR = 'training.target_modules=["query","key","value","dense"]'
VARIANTS: dict[str, list[str]] = {
    "qv-fixed": [FIXED],
    "all-fixed": [FIXED, ALL_LINEAR],
}


def grid() -> list[tuple[str, list[str]]]:
    runs = []
    for variant, sets in VARIANTS.items():
        for r, profile in RANKS:
            for lr in LRS:
                runs.append((f"{variant}-r{r}-lr{lr:g}-s{SEED}", [
                    f"seed={SEED}", 'method="zero_pad"', f"devices.profiles={{ {profile} = 1.0 }}",
                    f"training.learning_rate={lr}", "eval.test=false", *sets]))
    return runs


def report(out: Path) -> dict[str, Any]:
    val: dict[str, dict[int, dict[float, float]]] = {}
    for name, _ in grid():
        path = out / name / "summary.json"
        if not path.is_file():
            continue
        variant, rest = name.split("-r", 1)
        r = int(rest.split("-lr")[0])
        lr = float(rest.split("-lr")[1].split("-s")[0])
        val.setdefault(variant, {}).setdefault(r, {})[lr] = json.loads(path.read_text())["final"]["validation"]["accuracy"]
    result: dict[str, Any] = {"seed": SEED, "variants": {}}
    for variant, ranks in val.items():
        best = {r: max(lrs.items(), key=lambda kv: kv[1]) for r, lrs in ranks.items()}
        gap = 100 * (best[16][1] - best[2][1]) if 2 in best and 16 in best else None
        result["variants"][variant] = {"validation": {f"r{r}": {f"{lr:g}": a for lr, a in lrs.items()}
                                                      for r, lrs in ranks.items()},
                                       "best_lr": {f"r{r}": lr for r, (lr, _) in best.items()},
                                       "gap_points": gap}
        cells = "  ".join(f"r{r} lr {lr:g}: {100 * a:.1f}" for r in sorted(ranks) for lr, a in sorted(ranks[r].items()))
        print(f"{variant:10s} {cells}   gap r16 - r2 (best lr each): "
              f"{'n/a' if gap is None else f'{gap:+.1f}'} points")
    done = {v: d["gap_points"] for v, d in result["variants"].items() if d["gap_points"] is not None}
    if done:
        chosen = max(done, key=lambda v: done[v])
        result["chosen"] = {"variant": chosen, "gap_points": done[chosen],
                            "best_lr": result["variants"][chosen]["best_lr"], "qualifies": done[chosen] >= 5}
        print(f"chosen: {chosen} (gap {done[chosen]:+.1f}; {'qualifies' if done[chosen] >= 5 else 'below 5 points'})")
    (out / "report.json").write_text(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results/rank-search"))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report:
        cache = args.out.parent / "study-cache"
        with ThreadPoolExecutor(args.jobs) as pool:
            run_grid(pool, grid(), args.out, cache)
    report(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
