"""Accuracy of an adapter on a held-out set, in the process that asks (demo, simulation,
benchmark). The base model and the tokenized test set are loaded once; each adapter is put
into a fresh peft model shaped like it (its ranks and alphas), with the edge client's own
strict loader, and run without gradients."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rankfed.aggregation import Adapter, decode_adapter
from rankfed.datasets import TextCorpus

TASK = "sequence-classification"


@dataclass(frozen=True)
class EvalResult:
    accuracy: float
    loss: float
    examples: int
    per_class_recall: tuple[float, ...]
    predicted_histogram: tuple[int, ...]


class Evaluator:
    def __init__(self, model_dir: str | Path, test: TextCorpus, *, max_length: int, batch_size: int = 32) -> None:
        from rankfed.edge_client.model import load_base_model, load_tokenizer

        self.model_dir = Path(model_dir)
        self.test = test
        self.num_labels = len(test.label_names)
        self.batch_size = batch_size
        self._base = load_base_model(self.model_dir, TASK, num_labels=self.num_labels)
        tokenizer = load_tokenizer(self.model_dir)
        enc = tokenizer(list(test.texts), truncation=True, max_length=max_length, padding=True, return_tensors="np")
        self._ids = enc["input_ids"].astype(np.int64)
        self._mask = enc["attention_mask"].astype(np.int64)

    def evaluate_file(self, path: str | Path) -> EvalResult:
        return self.evaluate(decode_adapter(Path(path).read_bytes()))

    def model_for(self, adapter: Adapter) -> Any:
        from rankfed.edge_client.export import settings_for_adapter
        from rankfed.edge_client.model import peft_model_for_adapter

        return peft_model_for_adapter(self._base, adapter, settings_for_adapter(adapter), TASK).eval()

    def evaluate(self, adapter: Adapter) -> EvalResult:
        import torch

        model = self.model_for(adapter)
        logits = []
        with torch.no_grad():
            for start in range(0, len(self._ids), self.batch_size):
                sl = slice(start, start + self.batch_size)
                ids, mask = torch.from_numpy(self._ids[sl]), torch.from_numpy(self._mask[sl])
                width = int(mask.sum(dim=1).max())  # drop columns that are padding in every row
                out = model(input_ids=ids[:, :width], attention_mask=mask[:, :width])
                logits.append(out.logits.float())
        all_logits = torch.cat(logits)
        labels = torch.from_numpy(self.test.labels)
        loss = float(torch.nn.functional.cross_entropy(all_logits, labels))
        pred = all_logits.argmax(dim=1).numpy()
        truth = self.test.labels
        recall = tuple(
            float((pred[truth == c] == c).mean()) if (truth == c).any() else float("nan")
            for c in range(self.num_labels)
        )
        return EvalResult(
            accuracy=float((pred == truth).mean()),
            loss=loss,
            examples=len(truth),
            per_class_recall=recall,
            predicted_histogram=tuple(int(x) for x in np.bincount(pred, minlength=self.num_labels)),
        )
