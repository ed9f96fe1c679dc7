"""Held-out accuracy of exported ONNX files: what gates a lossy export (int8, fp16).

The validation file has the training data's format (JSONL or CSV, ``text,label``; labels as
ids or names). It is tokenized once with the tokenizer stored in the file and scored by
each candidate in the same batches, so two files' predictions compare example by example.
Needs onnxruntime, numpy and tokenizers only (no torch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data import label_ids, read_records
from .errors import AccuracyGateError, DataError
from .infer import OnnxModel

DEFAULT_EVAL_MAX_LENGTH = 128  # what `rankfed edge run` trains with by default


@dataclass(frozen=True)
class HeldoutSet:
    """Token ids in length-sorted batches of (ids (b, s), mask (b, s)), and labels in that order."""

    batches: tuple[tuple[np.ndarray, np.ndarray], ...]
    labels: np.ndarray  # (n,)
    path: str


@dataclass(frozen=True)
class Score:
    accuracy: float
    predictions: np.ndarray  # (n,) argmax, HeldoutSet order

    def agreement(self, other: Score) -> float:
        return float(np.mean(self.predictions == other.predictions))


def load_heldout(
    path: str | Path, model: OnnxModel, *, max_length: int = DEFAULT_EVAL_MAX_LENGTH, batch_size: int = 32
) -> HeldoutSet:
    """Read and tokenize ``path`` with ``model``'s tokenizer; label names are ``model.labels``."""
    path = Path(path)
    if model.task != "sequence-classification":
        raise DataError(f"held-out accuracy needs a sequence-classification model, {path} is for {model.task}")
    rows = read_records(path)
    texts = [str(r.get("text", "")) for r in rows]
    if not all(texts):
        raise DataError(f"{path}: every example needs a non-empty 'text' field")
    num_labels = len(model.labels or ())
    labels = np.asarray(label_ids([r.get("label") for r in rows], num_labels=num_labels, names=model.labels, path=path))
    tok = model.tokenizer
    tok.enable_truncation(min(max_length, model.max_length))
    try:
        encodings = tok.encode_batch(texts)
    finally:
        tok.enable_truncation(model.max_length)
    order = np.argsort([len(e.ids) for e in encodings], kind="stable")  # less padding per batch
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        seq = max(2, max(len(encodings[i].ids) for i in chunk))
        ids = np.full((len(chunk), seq), model.pad_id, dtype=np.int64)
        mask = np.zeros((len(chunk), seq), dtype=np.int64)
        for row, i in enumerate(chunk):
            n = len(encodings[i].ids)
            ids[row, :n] = encodings[i].ids
            mask[row, :n] = 1
        batches.append((ids, mask))
    return HeldoutSet(batches=tuple(batches), labels=labels[order], path=str(path))


def score(model: OnnxModel, heldout: HeldoutSet) -> Score:
    preds = np.concatenate([model.logits(ids, mask).argmax(-1) for ids, mask in heldout.batches])
    return Score(accuracy=float(np.mean(preds == heldout.labels)), predictions=preds)


def score_files(paths: Sequence[str | Path], validation: str | Path, *, max_length: int = DEFAULT_EVAL_MAX_LENGTH,
                threads: int = 1) -> list[Score]:
    """Score several exports of one model on ``validation``, tokenized once (by the first)."""
    models = [OnnxModel(p, threads=threads) for p in paths]
    heldout = load_heldout(validation, models[0], max_length=max_length)
    return [score(m, heldout) for m in models]


def accuracy_gate(fp32: float, lossy: float, *, max_drop: float, what: str, where: str) -> float:
    """The drop in points (fp32 - lossy, accuracies in [0, 1]); raises AccuracyGateError when
    it is more than ``max_drop`` points. ``what`` names the lossy file, ``where`` the data."""
    drop = 100.0 * (fp32 - lossy)
    if drop > max_drop + 1e-9:  # 1e-9: a drop of exactly max_drop passes despite rounding
        raise AccuracyGateError(
            f"{what}: held-out accuracy {lossy:.1%} is {drop:.1f} points below fp32 {fp32:.1%} on {where} "
            f"(allowed {max_drop:g}); not written (--force writes it anyway)",
            fp32_accuracy=fp32, int8_accuracy=lossy, max_drop=max_drop,
        )
    return drop
