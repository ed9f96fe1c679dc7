"""Local training data: JSONL or CSV files, tokenized with the base model's tokenizer.

- sequence-classification: columns ``text`` and ``label``. Labels are integers, or names
  resolved through an explicit label list (``--labels``) or the model config's ``label2id``.
  Names are never numbered by their order in one client's file: clients see different
  subsets, and the federation must agree on the ids.
- causal-lm: columns ``prompt`` and ``response``; the loss covers the response tokens only
  (prompt and padding labels are -100). An EOS token ends every response.

Batches are deterministic for a seed: the order is a permutation from numpy's PCG64, batches
are padded to their longest row.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .errors import DataError

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...] | int  # int for classification, per-token for causal-lm


@dataclass(frozen=True)
class Batch:
    input_ids: np.ndarray  # (batch, seq) int64
    attention_mask: np.ndarray  # (batch, seq) int64
    labels: np.ndarray  # (batch,) or (batch, seq) int64

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a .jsonl/.json-lines or .csv file as dicts; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    rows: list[dict[str, Any]] = []
    if suffix in (".jsonl", ".ndjson", ".json"):
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{lineno}: not valid JSON: {err.msg}") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object per line")
                rows.append(row)
    elif suffix in (".csv", ".tsv"):
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            rows = [dict(r) for r in reader]
    else:
        raise DataError(f"{path}: unsupported data format {suffix!r}; use .jsonl or .csv")
    if not rows:
        raise DataError(f"{path} holds no examples")
    return rows


def _field(row: dict[str, Any], name: str, path: Path, index: int) -> Any:
    if name not in row or row[name] is None or row[name] == "":
        raise DataError(f"{path}: example {index + 1} has no {name!r} field (has {sorted(row)})")
    return row[name]


def label_ids(
    raw: Sequence[Any], *, num_labels: int, names: Sequence[str] | None, path: Path
) -> list[int]:
    """Resolve labels to ids in [0, num_labels): ints (or int strings), or names via ``names``."""
    lookup = {n: i for i, n in enumerate(names or ())}
    out = []
    for i, value in enumerate(raw):
        if isinstance(value, bool):
            raise DataError(f"{path}: example {i + 1}: label {value!r} is a boolean")
        if isinstance(value, str) and value in lookup:
            label = lookup[value]
        else:
            try:
                label = int(value)
            except (TypeError, ValueError):
                raise DataError(
                    f"{path}: example {i + 1}: label {value!r} is not an integer and not a known "
                    f"label name ({', '.join(lookup) or 'none given'}); pass --labels with the "
                    "federation's label names in id order"
                ) from None
        if not 0 <= label < num_labels:
            raise DataError(f"{path}: example {i + 1}: label {label} outside [0, {num_labels})")
        out.append(label)
    return out


def model_label_names(config: Any) -> list[str] | None:
    """The model config's label names, unless they are transformers' LABEL_<i> defaults."""
    id2label = getattr(config, "id2label", None) or {}
    names = [str(id2label[i]) for i in sorted(id2label)]
    if not names or all(n == f"LABEL_{i}" for i, n in enumerate(names)):
        return None
    return names


class TextDataset:
    """Tokenized examples plus deterministic batching."""

    def __init__(self, examples: Sequence[Example], *, task: str, pad_id: int) -> None:
        if not examples:
            raise DataError("no examples")
        self.examples = list(examples)
        self.task = task
        self.pad_id = pad_id

    def __len__(self) -> int:
        return len(self.examples)

    def collate(self, items: Sequence[Example]) -> Batch:
        seq = max(len(e.input_ids) for e in items)
        ids = np.full((len(items), seq), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(items), seq), dtype=np.int64)
        labels: npt.NDArray[np.int64]  # (batch, seq) for causal-lm, (batch,) class ids otherwise
        if self.task == "causal-lm":
            labels = np.full((len(items), seq), IGNORE_INDEX, dtype=np.int64)
        else:
            labels = np.zeros(len(items), dtype=np.int64)
        for row, e in enumerate(items):
            n = len(e.input_ids)
            ids[row, :n] = e.input_ids
            mask[row, :n] = 1
            if isinstance(e.labels, int):
                labels[row] = e.labels
            else:
                labels[row, :n] = e.labels
        return Batch(ids, mask, labels)

    def index_batches(self, batch_size: int, *, seed: int, epochs: int | None = None) -> Iterator[np.ndarray]:
        """The example indices of each shuffled batch, a fresh permutation per epoch; endless
        when ``epochs`` is None. (The frozen-layer cache looks its states up by index.)"""
        if batch_size < 1:
            raise DataError(f"batch size must be >= 1, got {batch_size}")
        rng = np.random.default_rng(seed)
        epoch = 0
        while epochs is None or epoch < epochs:
            order = rng.permutation(len(self.examples))
            for start in range(0, len(order), batch_size):
                yield order[start : start + batch_size]
            epoch += 1

    def batches(self, batch_size: int, *, seed: int, epochs: int | None = None) -> Iterator[Batch]:
        """The batches of `index_batches`, collated."""
        for indices in self.index_batches(batch_size, seed=seed, epochs=epochs):
            yield self.collate([self.examples[i] for i in indices])


def load_dataset(
    path: str | Path,
    tokenizer: Any,
    *,
    task: str,
    num_labels: int = 0,
    label_names: Sequence[str] | None = None,
    max_length: int = 128,
    limit: int | None = None,
) -> TextDataset:
    """Read ``path`` and tokenize it with ``tokenizer`` (the base model's)."""
    path = Path(path)
    rows = read_records(path)[:limit]
    if max_length < 2:
        raise DataError(f"max_length must be >= 2, got {max_length}")
    examples: list[Example] = []
    if task == "sequence-classification":
        texts = [str(_field(r, "text", path, i)) for i, r in enumerate(rows)]
        labels = label_ids(
            [_field(r, "label", path, i) for i, r in enumerate(rows)],
            num_labels=num_labels,
            names=label_names,
            path=path,
        )
        encoded = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        examples = [Example(tuple(ids), label) for ids, label in zip(encoded, labels, strict=True)]
    elif task == "causal-lm":
        prompts = [str(_field(r, "prompt", path, i)) for i, r in enumerate(rows)]
        responses = [str(_field(r, "response", path, i)) for i, r in enumerate(rows)]
        eos = tokenizer.eos_token_id
        p_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
        r_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
        for i, (p, r) in enumerate(zip(p_ids, r_ids, strict=True)):
            r = list(r) + ([eos] if eos is not None else [])
            ids = (list(p) + r)[:max_length]
            labels_row = ([IGNORE_INDEX] * len(p) + r)[:max_length]
            if all(x == IGNORE_INDEX for x in labels_row):
                raise DataError(
                    f"{path}: example {i + 1}: the prompt fills max_length={max_length}, "
                    "no response token is left to train on"
                )
            examples.append(Example(tuple(ids), tuple(labels_row)))
    else:
        raise DataError(f"unknown task {task!r}")
    pad = tokenizer.pad_token_id
    return TextDataset(examples, task=task, pad_id=int(pad if pad is not None else 0))


def split_holdout(dataset: TextDataset, fraction: float, *, seed: int = 0) -> tuple[TextDataset, TextDataset]:
    """(train, held-out): a deterministic ``fraction`` of the examples held out for evaluation
    (at least one, and at least one left to train on). The same file and seed give the same
    split on every run, so a restarted client evaluates on the same examples."""
    if not 0 < fraction < 1:
        raise DataError(f"held-out fraction must be in (0, 1), got {fraction}")
    n = len(dataset)
    if n < 2:
        raise DataError(f"{n} example(s): too few to hold any out for evaluation")
    k = min(n - 1, max(1, round(n * fraction)))
    order = np.random.default_rng(seed).permutation(n)
    held = [dataset.examples[i] for i in sorted(order[:k])]
    train = [dataset.examples[i] for i in sorted(order[k:])]
    return (
        TextDataset(train, task=dataset.task, pad_id=dataset.pad_id),
        TextDataset(held, task=dataset.task, pad_id=dataset.pad_id),
    )
