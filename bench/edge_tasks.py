"""The two tasks the edge benchmark scores exported models on, all offline.

- ``bbc``: BBC News, 5 classes, the demo's own split (`rankfed.datasets.federated_split`
  with the demo's defaults): the same 250 held-out articles the demo reports; training data
  is every client's share pooled, calibration data is client 0's share (one device's data).
- ``wordnet``: WordNet 3.0 noun supersenses (Debian `wordnet-base`): text = synset gloss,
  label = lexicographer file, classes with >= 300 glosses (24 classes); a stratified sample.

An adapter is trained centrally with the edge client's own `train_local` (LoRA r=8 on
query,value + head), a stand-in for a federated result with the same structure: the export
path does not care how the adapter was trained, only what its weights are.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

WORDNET_NOUNS = Path("/usr/share/wordnet/data.noun")
# lexnames(5WN): ids 03..28 are the noun files.
NOUN_LEXNAMES = (
    "Tops act animal artifact attribute body cognition communication event feeling food group location "
    "motive object person phenomenon plant possession process quantity relation shape state substance time"
).split()


@dataclass(frozen=True)
class Task:
    name: str
    labels: tuple[str, ...]
    train: Path  # jsonl {"text", "label"}
    heldout: Path
    calibration: Path  # one device's own training data
    max_length: int  # tokens per example, training and evaluation
    train_steps: int


def _write(path: Path, texts: list[str], labels: list[int], names: tuple[str, ...]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for text, label in zip(texts, labels, strict=True):
            f.write(json.dumps({"text": text, "label": names[int(label)]}) + "\n")
    return path


def bbc_task(work: Path, *, train_steps: int = 60) -> Task:
    from rankfed.datasets import federated_split, load_bbc, write_jsonl
    from rankfed.demo.run import DemoOptions

    opts = DemoOptions()
    split = federated_split(load_bbc(), num_clients=opts.clients, alpha=opts.alpha, seed=opts.seed,
                            test_limit=opts.test_limit)
    texts = [t for c in split.clients for t in c.texts]
    labels = [int(x) for c in split.clients for x in c.labels]
    return Task(
        name="bbc", labels=split.label_names,
        train=_write(work / "bbc-train.jsonl", texts, labels, split.label_names),
        heldout=write_jsonl(work / "bbc-heldout.jsonl", split.test),
        calibration=write_jsonl(work / "bbc-calibration.jsonl", split.clients[0]),
        max_length=opts.max_length, train_steps=train_steps,
    )


def read_wordnet_nouns(path: Path = WORDNET_NOUNS, min_per_class: int = 300) -> tuple[list[str], list[int], tuple[str, ...]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: apt-get install wordnet-base")
    texts: list[str] = []
    files: list[int] = []
    with open(path, encoding="ascii", errors="ignore") as f:
        for line in f:
            if line.startswith("  ") or " | " not in line:  # licence header
                continue
            head, gloss = line.split(" | ", 1)
            texts.append(re.sub(r"\s+", " ", gloss).strip())
            files.append(int(head.split()[1]))
    counts = np.bincount(files)
    keep = [lex for lex in range(len(counts)) if counts[lex] >= min_per_class]
    names = tuple(f"noun.{NOUN_LEXNAMES[lex - 3]}" for lex in keep)
    index = {lex: i for i, lex in enumerate(keep)}
    pairs = [(t, index[f]) for t, f in zip(texts, files, strict=True) if f in index]
    return [t for t, _ in pairs], [y for _, y in pairs], names


def wordnet_task(work: Path, *, train: int = 6000, heldout: int = 1000, calibration: int = 500,
                 train_steps: int = 250, seed: int = 0) -> Task:
    texts, labels, names = read_wordnet_nouns()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(texts))  # a uniform sample keeps the class frequencies

    def take(idx: np.ndarray) -> tuple[list[str], list[int]]:
        return [texts[i] for i in idx], [labels[i] for i in idx]

    test_idx, train_idx = order[:heldout], order[heldout : heldout + train]
    return Task(
        name="wordnet", labels=names,
        train=_write(work / "wordnet-train.jsonl", *take(train_idx), names),
        heldout=_write(work / "wordnet-heldout.jsonl", *take(test_idx), names),
        calibration=_write(work / "wordnet-calibration.jsonl", *take(train_idx[:calibration]), names),
        max_length=48, train_steps=train_steps,
    )


def train_adapter(model_dir: Path, task: Task, out: Path, *, seed: int = 0) -> Path:
    """LoRA r=8 on query,value + head, AdamW lr 2e-3, bs 16, `task.train_steps` steps."""
    import torch

    from rankfed.aggregation import encode_adapter
    from rankfed.edge_client.data import load_dataset
    from rankfed.edge_client.model import (
        adapter_from_peft,
        build_peft_model,
        load_base_model,
        load_tokenizer,
    )
    from rankfed.edge_client.train import TrainConfig, train_local
    from rankfed.protocol import LoraSettings

    torch.manual_seed(seed)
    settings = LoraSettings(rank=8, alpha=16.0, target_modules=("query", "value"), modules_to_save=("classifier",))
    base = load_base_model(model_dir, "sequence-classification", num_labels=len(task.labels))
    ds = load_dataset(task.train, load_tokenizer(model_dir), task="sequence-classification",
                      num_labels=len(task.labels), label_names=task.labels, max_length=task.max_length)
    model = build_peft_model(base, settings, "sequence-classification", copy_base=False)
    train_local(model, ds, TrainConfig(steps=task.train_steps, learning_rate=2e-3, batch_size=16, seed=seed))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(encode_adapter(adapter_from_peft(model)))
    return out
