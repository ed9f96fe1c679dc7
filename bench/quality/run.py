"""Learning-quality benchmark: the same federation under every aggregation rule.

    python bench/quality/run.py                        # the full grid (~60 min on 2 quiet cores)
    python bench/quality/run.py --seeds 0 --skews 1.0 --rules rbla,zero_pad   # a slice
    python bench/quality/report.py                     # tables + plot from the results

Every federated run is `rankfed.simulation.run_simulation`: the real `Federation` round loop
(rank policy, streamed accumulators, redistribution) and the real `EdgeRunner` /
`train_local` on all-MiniLM-L6-v2, with every client in every round. The task is BBC News
(5 classes) with a stratified held-out test set; training articles are split over the
clients by Dirichlet(alpha). Client i gets the i-th rank of the rank distribution through a
device profile the coordinator's default tiers map to that rank.

Grid: rules x rank distributions x label skews x seeds, where the two homogeneous baselines
(FedIT with everyone at the maximum rank 16, and FedIT with lora.max_rank = 2, the minimum
rank) do not depend on the rank distribution. Also: centralized LoRA (rank 16, the pooled
training data, as many steps as one client does in the whole federation times the number of
clients) and TF-IDF + logistic regression on the same split.

Each run writes runs/<id>.json under --out-dir as soon as it ends, so the grid can be
interrupted and resumed; jobs go seed by seed so a cut-short grid still has whole seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

# ---------------------------------------------------------------- the grid (documented in docs/results.md)

NUM_CLIENTS = 4
RANK_DISTRIBUTIONS = {
    "balanced": (16, 8, 4, 2),
    "skewed": (16, 2, 2, 2),
}
# label -> (aggregation method, lora.max_rank or None, depends on the rank distribution)
RULES = {
    "homog-max": ("fedit", 16, False),
    "homog-min": ("fedit", 2, False),
    "zero_pad": ("zero_pad", None, True),
    "hetlora": ("hetlora", None, True),
    "replication": ("replication", None, True),
    "rbla": ("rbla", None, True),
    "flexlora": ("flexlora", None, True),
    "flora": ("flora", None, True),
}
# Not the shipped code: FlexLoRA/FLoRA with a local patch of the fix proposed in
# docs/results.md (A = B = 0 components of the SVD redistribution get peft's A init). Run
# after the whole grid, only when asked (--extra). Superseded by the shipped fix (commit
# c371b70, rankfed.aggregation.revive_inert): kept for comparing against older commits.
EXTRA_RULES = {
    "flexlora+init": ("flexlora", None, True),
    "flora+init": ("flora", None, True),
}
SKEWS = (1.0, 0.3)
SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class Setup:
    rounds: int = 4
    local_steps: int = 10
    batch_size: int = 8
    learning_rate: float = 5e-3
    max_length: int = 32
    train_limit: int = 400
    test_limit: int = 300
    hetlora_lambda: float = 0.01
    hetlora_gamma: float = 0.99


@dataclass(frozen=True)
class Job:
    kind: str  # "federated" | "centralized" | "tfidf"
    rule: str
    dist: str  # rank distribution or "-"
    alpha: float
    seed: int

    @property
    def id(self) -> str:
        return f"{self.kind}-{self.rule}-{self.dist}-a{self.alpha:g}-s{self.seed}"


def make_jobs(
    rules: list[str], dists: list[str], skews: list[float], seeds: list[int], baselines: bool,
    extra: list[str] | None = None,
) -> list[Job]:
    """Seed by seed (a grid cut short still has whole seeds), the extra rules last."""
    table = {**RULES, **EXTRA_RULES}
    jobs: list[Job] = []
    for seed in seeds:
        if baselines:
            jobs.append(Job("tfidf", "tfidf", "-", 1.0, seed))
            jobs.append(Job("centralized", "centralized", "-", 1.0, seed))
        for alpha in skews:
            for rule in rules:
                if table[rule][2]:
                    jobs += [Job("federated", rule, d, alpha, seed) for d in dists]
                else:
                    jobs.append(Job("federated", rule, "-", alpha, seed))
    for seed in seeds:
        for alpha in skews:
            jobs += [Job("federated", rule, d, alpha, seed) for rule in extra or () for d in dists]
    return jobs


def _patch_svd_redistribution():
    """The proposed fix, for the "+init" rules only: SVD components with zero singular value
    (B column = 0) get A rows drawn like peft's init (U(-1/sqrt(d_in), 1/sqrt(d_in)), seeded by
    module name, the same for every client) instead of A = 0. The delta is unchanged; the
    gradients no longer vanish. Returns a function that undoes the patch."""
    import zlib

    import numpy as np

    from rankfed.aggregation import Adapter, LoraModule, registry

    original = registry.redistribute_svd

    def patched(global_adapter, *, rank, alpha, use_rslora=False, **options):
        out = original(global_adapter, rank=rank, alpha=alpha, use_rslora=use_rslora, **options)
        modules = {}
        for name, m in out.modules.items():
            a = np.array(m.a, dtype=np.float32)
            dead = ~np.any(a != 0, axis=1) & ~np.any(np.asarray(m.b) != 0, axis=0)
            if dead.any():
                rng = np.random.default_rng(zlib.crc32(name.encode()))
                bound = 1.0 / np.sqrt(a.shape[1])
                a[dead] = rng.uniform(-bound, bound, size=(int(dead.sum()), a.shape[1]))
            modules[name] = LoraModule(a=a, b=m.b, alpha=m.alpha)
        return Adapter(modules=modules, dense=out.dense, use_rslora=out.use_rslora)

    registry.redistribute_svd = patched

    def undo() -> None:
        registry.redistribute_svd = original

    return undo


# ---------------------------------------------------------------- one run (in a worker process)


def _split(setup: Setup, alpha: float, seed: int):
    from rankfed.demo.data import federated_split, load_bbc

    return federated_split(load_bbc(), num_clients=NUM_CLIENTS, alpha=alpha, seed=seed,
                           train_limit=setup.train_limit, test_limit=setup.test_limit, min_per_client=8)


def run_job(job: Job, setup: Setup, out_dir: Path, threads: int) -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging

    import torch

    torch.set_num_threads(threads)
    logging.getLogger("rankfed").setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    started = time.time()
    cpu0 = time.process_time()
    split = _split(setup, job.alpha, job.seed)
    if job.kind == "tfidf":
        result = _tfidf(split, setup)
    elif job.kind == "centralized":
        result = _centralized(split, setup, job.seed)
    else:
        result = _federated(job, split, setup)
    result.update({
        "job": asdict(job), "id": job.id, "setup": asdict(setup),
        "majority_fraction": split.test.majority_fraction(),
        "client_examples": [len(c) for c in split.clients],
        "client_label_histograms": [[int(x) for x in __import__("numpy").bincount(c.labels, minlength=5)]
                                    for c in split.clients],
        "wall_seconds": round(time.time() - started, 2),
        "cpu_seconds": round(time.process_time() - cpu0, 2),
    })
    path = out_dir / "runs" / f"{job.id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)
    return result


def _federated(job: Job, split: Any, setup: Setup) -> dict[str, Any]:
    from rankfed.demo.data import model_dir, write_jsonl
    from rankfed.demo.evaluate import Evaluator
    from rankfed.simulation.engine import (
        RANK_PROFILE,
        SimClient,
        SimConfig,
        run_simulation,
    )

    method, max_rank, by_dist = {**RULES, **EXTRA_RULES}[job.rule]
    undo = _patch_svd_redistribution() if job.rule.endswith("+init") else None
    ranks = RANK_DISTRIBUTIONS[job.dist] if by_dist else RANK_DISTRIBUTIONS["balanced"]
    work = Path(tempfile.mkdtemp(prefix=f"rankfed-quality-{job.id}-"))
    try:
        clients = [SimClient(f"client-{i}", RANK_PROFILE[r], write_jsonl(work / "data" / f"client-{i}.jsonl", part))
                   for i, (r, part) in enumerate(zip(ranks, split.clients, strict=True))]
        cfg = SimConfig(
            method=method, rounds=setup.rounds, local_steps=setup.local_steps, learning_rate=setup.learning_rate,
            batch_size=setup.batch_size, max_rank=max_rank or 16, max_length=setup.max_length, seed=job.seed,
            hetlora_lambda=setup.hetlora_lambda, hetlora_gamma=setup.hetlora_gamma,
        )
        evaluator = Evaluator(model_dir(), split.test, max_length=setup.max_length)
        res = run_simulation(model_dir(), clients, cfg, work_dir=work, label_names=split.label_names,
                             evaluate=evaluator.evaluate_file)
        rounds = []
        for r in res.rounds:
            rounds.append({
                "round": r.round, "phase": r.phase, "accuracy": r.accuracy, "eval_loss": r.eval_loss,
                "predicted_histogram": r.predicted_histogram, "ranks": [c["rank"] for c in r.clients],
                "bytes_up": r.bytes_up, "bytes_down": r.bytes_down,
                "bytes_up_per_client": [c["bytes_up"] for c in r.clients],
                "bytes_down_per_client": [c["bytes_down"] for c in r.clients],
                "loss_first": r.loss_first, "loss_last": r.loss_last, "seconds": round(r.seconds, 2),
            })
        return {"rounds": rounds, "final_accuracy": rounds[-1]["accuracy"] if rounds else None,
                "assigned_ranks": list(ranks if method != "fedit" else [max_rank] * NUM_CLIENTS)}
    finally:
        if undo is not None:
            undo()
        shutil.rmtree(work, ignore_errors=True)


def _centralized(split: Any, setup: Setup, seed: int) -> dict[str, Any]:
    """Rank-16 LoRA on the pooled training data with the edge client's own training loop;
    scored after each 'round' worth of steps (clients x local steps)."""
    import numpy as np

    from rankfed.demo.data import TextCorpus, model_dir, write_jsonl
    from rankfed.demo.evaluate import Evaluator
    from rankfed.edge_client.data import load_dataset
    from rankfed.edge_client.model import (
        adapter_from_peft,
        build_peft_model,
        load_tokenizer,
    )
    from rankfed.edge_client.train import TrainConfig, train_local
    from rankfed.protocol import LoraSettings

    pooled = TextCorpus(
        tuple(t for c in split.clients for t in c.texts),
        np.concatenate([c.labels for c in split.clients]),
        split.label_names,
    )
    work = Path(tempfile.mkdtemp(prefix="rankfed-quality-central-"))
    try:
        path = write_jsonl(work / "train.jsonl", pooled)
        evaluator = Evaluator(model_dir(), split.test, max_length=setup.max_length)
        dataset = load_dataset(path, load_tokenizer(model_dir()), task="sequence-classification",
                               num_labels=len(split.label_names), label_names=split.label_names,
                               max_length=setup.max_length)
        settings = LoraSettings(rank=16, alpha=32.0, target_modules=("query", "value"), modules_to_save=("classifier",))
        model = build_peft_model(evaluator._base, settings, "sequence-classification")
        steps = NUM_CLIENTS * setup.local_steps
        rounds = []
        for r in range(1, setup.rounds + 1):
            # A fresh AdamW per 'round' like the clients; one pass over a fresh permutation.
            res = train_local(model, dataset, TrainConfig(steps=steps, batch_size=setup.batch_size,
                                                          learning_rate=setup.learning_rate, seed=seed * 1000 + r))
            ev = evaluator.evaluate(adapter_from_peft(model))
            rounds.append({"round": r, "accuracy": ev.accuracy, "eval_loss": ev.loss, "steps": r * steps,
                           "loss_first": res.loss_first, "loss_last": res.loss_last,
                           "predicted_histogram": list(ev.predicted_histogram)})
        return {"rounds": rounds, "final_accuracy": rounds[-1]["accuracy"]}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _tfidf(split: Any, setup: Setup) -> dict[str, Any]:
    """TF-IDF (1-2-grams) + logistic regression on the pooled training articles: on the full
    text, and on the same first `max_length` tokens the transformer sees."""
    import numpy as np
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    from rankfed.demo.data import model_dir
    from rankfed.edge_client.model import load_tokenizer

    train_texts = [t for c in split.clients for t in c.texts]
    train_labels = np.concatenate([c.labels for c in split.clients])
    tok = load_tokenizer(model_dir())

    def truncated(texts: list[str]) -> list[str]:
        ids = tok(texts, truncation=True, max_length=setup.max_length)["input_ids"]
        return tok.batch_decode(ids, skip_special_tokens=True)

    out: dict[str, Any] = {}
    for name, (tr, te) in {
        "full_text": (train_texts, list(split.test.texts)),
        "truncated": (truncated(train_texts), truncated(list(split.test.texts))),
    }.items():
        vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
        clf = LogisticRegression(max_iter=2000, C=10.0)
        clf.fit(vec.fit_transform(tr), train_labels)
        out[f"accuracy_{name}"] = float((clf.predict(vec.transform(te)) == split.test.labels).mean())
    out["final_accuracy"] = out["accuracy_truncated"]
    return out


# ---------------------------------------------------------------- driver


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results" / "quality")
    p.add_argument("--rules", default=",".join(RULES))
    p.add_argument("--dists", default=",".join(RANK_DISTRIBUTIONS))
    p.add_argument("--skews", default=",".join(f"{a:g}" for a in SKEWS))
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    p.add_argument("--extra", default="", help=f"also these rules, after the grid: {','.join(EXTRA_RULES)}")
    p.add_argument("--no-baselines", action="store_true", help="skip centralized LoRA and TF-IDF")
    p.add_argument("--workers", type=int, default=2, help="runs at once (processes)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--rerun", action="store_true", help="run jobs whose result file exists again")
    for f, v in asdict(Setup()).items():
        p.add_argument(f"--{f.replace('_', '-')}", type=type(v), default=v)
    args = p.parse_args(argv)
    setup = Setup(**{f: getattr(args, f) for f in asdict(Setup())})
    jobs = make_jobs(
        [r for r in args.rules.split(",") if r], [d for d in args.dists.split(",") if d],
        [float(a) for a in args.skews.split(",") if a], [int(s) for s in args.seeds.split(",") if s],
        not args.no_baselines, [r for r in args.extra.split(",") if r],
    )
    todo = [j for j in jobs if args.rerun or not (args.out_dir / "runs" / f"{j.id}.json").exists()]
    print(f"{len(jobs)} jobs, {len(todo)} to run, {args.workers} workers x {args.threads} threads; setup {setup}",
          flush=True)
    (args.out_dir).mkdir(parents=True, exist_ok=True)
    (args.out_dir / "setup.json").write_text(json.dumps({"setup": asdict(setup), "num_clients": NUM_CLIENTS,
                                                          "rank_distributions": RANK_DISTRIBUTIONS,
                                                          "rules": {k: list(v) for k, v in {**RULES, **EXTRA_RULES}.items()}}, indent=1))
    t0 = time.time()
    import multiprocessing as mp

    with ProcessPoolExecutor(max_workers=args.workers, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(run_job, j, setup, args.out_dir, args.threads): j for j in todo}
        for n, fut in enumerate(as_completed(futures), 1):
            job = futures[fut]
            try:
                res = fut.result()
            except Exception as exc:  # noqa: BLE001 - report and go on with the grid
                print(f"[{time.time() - t0:7.0f}s] {n}/{len(todo)} {job.id} FAILED: {exc!r}", flush=True)
                continue
            accs = [r.get("accuracy") for r in res.get("rounds", [])]
            print(f"[{time.time() - t0:7.0f}s] {n}/{len(todo)} {job.id}: final {res['final_accuracy']:.3f} "
                  f"per round {['%.3f' % a for a in accs if a is not None]} ({res['wall_seconds']:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
