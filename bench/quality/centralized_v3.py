"""Study v3's centralized reference (docs/results.md §4): rank-16 LoRA trained on the pooled
data of the whole fleet, in the study's regime, with the same step budget as a federated run.

    OMP_NUM_THREADS=1 python bench/quality/centralized_v3.py --out bench/results/study-v3 --tasks wordnet
    python bench/quality/centralized_v3.py --out bench/results/study-v3 --report

What "centralized" means here: the 50 devices' training data of the fleet file and seed
(`build_population`, so the same examples and the same flipped labels the devices hold)
pooled in one place; the same model, LoRA on query/value of the top two encoder layers,
lora_alpha fixed at 16 (rank 16: scale 1), trained from cached layer-4 states like the
devices. Budget: a federated round is 5 devices x 10 steps of batch 16, so a centralized
"round" is 50 steps with a fresh AdamW (train_local's, as the devices use), 20 rounds.
Validation and test are the fleet's global sets, scored at rounds 10 and 20.

The learning rate is chosen per task on validation accuracy at round 20 on tuning seed 100
(test is not computed there) from {3e-3, 1e-2, 3e-2}; then seeds 0-4 run at that lr.
One JSON file per run in <out>/<task>/centralized-*.json; runs present are skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import study  # noqa: E402  (a sibling script: the t-interval over seeds)

FLEETS = Path(__file__).parent / "fleets"
TASKS = ("wordnet", "tweets", "bbc")
SEEDS = (0, 1, 2, 3, 4)
TUNE_SEED = 100
LRS = (3e-3, 1e-2, 3e-2)
RANK, ALPHA = 16, 16.0
ROUNDS, STEPS_PER_ROUND, EVAL_ROUNDS = 20, 5 * 10, (10, 20)


def _prefix_cache(model: Any, dataset: Any, k: int | None, base_sha256: str, cache_dir: Path) -> Any:
    """The dataset's layer-k states, kept on disk (the three tuning runs share their data)."""
    from rankfed.edge_client.layer_cache import PrefixCache, cache_key

    if k is None:
        return None
    return PrefixCache.load_or_build(model, dataset, k, cache_dir / f"{cache_key(base_sha256, dataset, k)}.npz")[0]


def run_one(task: str, seed: int, lr: float, *, test: bool, cache_dir: Path) -> dict[str, Any]:
    from rankfed.simulation.fleet import load_fleet

    fleet = load_fleet(FLEETS / f"{task}.toml", overrides={"seed": seed})
    return {"task": task, **train_centralized(fleet, lr, test=test, cache_dir=cache_dir)}


def train_centralized(fleet: Any, lr: float, *, test: bool, cache_dir: Path, rounds: int = ROUNDS,
                      steps_per_round: int = STEPS_PER_ROUND, eval_rounds: tuple[int, ...] = EVAL_ROUNDS,
                      ) -> dict[str, Any]:
    """Train on the pooled data of ``fleet``'s devices; scored at ``eval_rounds``."""
    import torch

    from rankfed.datasets import model_dir
    from rankfed.edge_client.data import load_dataset
    from rankfed.edge_client.model import (
        build_peft_model,
        default_modules_to_save,
        load_base_model,
        load_tokenizer,
        weights_sha256,
    )
    from rankfed.edge_client.train import TrainConfig, evaluate, train_local
    from rankfed.protocol import LoraSettings
    from rankfed.simulation.population import build_population

    torch.set_num_threads(1)
    start, cpu0 = time.perf_counter(), time.process_time()
    seed = fleet.seed
    pop = build_population(fleet)
    k = fleet.training.freeze_below_layer
    names = pop.label_names
    mdir = Path(fleet.training.model) if fleet.training.model else model_dir()
    tokenizer = load_tokenizer(mdir)
    with tempfile.TemporaryDirectory(prefix="rankfed-central-") as tmp:
        sets = {"train": b"".join(d.data for d in pop.devices), "validation": pop.validation}
        if test:
            sets["test"] = pop.test
        data = {}
        for name, blob in sets.items():
            path = Path(tmp) / f"{name}.jsonl"
            path.write_bytes(blob)
            data[name] = load_dataset(path, tokenizer, task="sequence-classification", num_labels=len(names),
                                      label_names=names, max_length=fleet.data.max_length)
    torch.manual_seed(seed)  # the classifier head's initialization
    base = load_base_model(mdir, "sequence-classification", num_labels=len(names))
    settings = LoraSettings(rank=RANK, alpha=ALPHA, target_modules=tuple(fleet.training.target_modules),
                            modules_to_save=default_modules_to_save(base, "sequence-classification"))
    model = build_peft_model(base, settings, "sequence-classification", copy_base=False, freeze_below_layer=k)
    caches = {name: _prefix_cache(model, ds, k, weights_sha256(mdir), cache_dir) for name, ds in data.items()}
    scored = []
    for r in range(1, rounds + 1):
        res = train_local(model, data["train"], TrainConfig(
            steps=steps_per_round, batch_size=fleet.training.batch_size, learning_rate=lr,
            seed=seed * 1000 + r, freeze_below_layer=k), prefix_cache=caches["train"])
        if r in eval_rounds:
            row: dict[str, Any] = {"round": r, "loss_last": res.loss_last}
            for name in ("validation", "test") if test else ("validation",):
                row[name] = evaluate(model, data[name], batch_size=64, prefix_cache=caches[name])
            scored.append(row)
    return {"seed": seed, "learning_rate": lr, "rank": RANK, "alpha": ALPHA,
            "train_examples": len(data["train"]), "steps": rounds * steps_per_round, "rounds": scored,
            "final": scored[-1], "wall_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu0}


def _path(out: Path, task: str, seed: int, lr: float) -> Path:
    return out / task / f"centralized-lr{lr:g}-s{seed}.json"


def _save(out: Path, result: dict[str, Any]) -> None:
    path = _path(out, result["task"], result["seed"], result["learning_rate"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")


def chosen_lr(out: Path, task: str) -> float | None:
    scores = {}
    for lr in LRS:
        path = _path(out, task, TUNE_SEED, lr)
        if not path.is_file():
            return None
        scores[lr] = json.loads(path.read_text())["final"]["validation"]["accuracy"]
    return max(LRS, key=lambda lr: (scores[lr], -lr))


def report(out: Path) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for task in TASKS:
        lr = chosen_lr(out, task)
        if lr is None:
            continue
        accs = {s: json.loads(_path(out, task, s, lr).read_text())["final"]["test"]["accuracy"] * 100
                for s in SEEDS if _path(out, task, s, lr).is_file()}
        tune = {f"{g:g}": json.loads(_path(out, task, TUNE_SEED, g).read_text())["final"]["validation"]["accuracy"]
                for g in LRS}
        if not accs:
            continue
        mean, ci = study._ci(list(accs.values()))
        result[task] = {"learning_rate": lr, "validation_by_lr": tune, "test_by_seed": accs, "mean": mean, "ci95": ci}
        print(f"{task}: lr {lr:g} (validation {tune}); test {mean:.1f} ± {ci:.1f} "
              f"over seeds {sorted(accs)}: {', '.join(f'{a:.1f}' for a in accs.values())}")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results/study-v3"))
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--report", action="store_true", help="only print the table of the runs present")
    args = ap.parse_args(argv)
    if not args.report:
        cache = args.out.parent / "study-cache"
        for task in [t for t in args.tasks.split(",") if t]:
            for lr in LRS:
                if not _path(args.out, task, TUNE_SEED, lr).is_file():
                    _save(args.out, run_one(task, TUNE_SEED, lr, test=False, cache_dir=cache))
                    print(f"{task} tune lr {lr:g} done", flush=True)
            lr_star = chosen_lr(args.out, task)
            assert lr_star is not None
            for seed in SEEDS:
                if not _path(args.out, task, seed, lr_star).is_file():
                    _save(args.out, run_one(task, seed, lr_star, test=True, cache_dir=cache))
                    print(f"{task} seed {seed} done", flush=True)
    summary = report(args.out)
    if not args.report:
        (args.out / "centralized.json").write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
