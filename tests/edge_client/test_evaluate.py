"""Held-out scoring of ONNX exports: labels by name or id, batches, agreement."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rankfed.edge_client.errors import DataError
from rankfed.edge_client.evaluate import load_heldout, score, score_files
from rankfed.edge_client.infer import OnnxModel

from .test_export import bert_export  # noqa: F401  (the shared tiny export fixture)

TEXTS = ["good movie", "the team won the match", "awful boring film today", "a nice song", "stock fell sharply"]


def _write(path, labels):
    path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(TEXTS, labels, strict=True)))
    return path


def test_accuracy_matches_classify_with_names_or_ids(bert_export, tmp_path):  # noqa: F811
    report, _ = bert_export
    model = OnnxModel(report.path)
    predicted = [p.label_id for p in model.classify(TEXTS)]
    names = ["neg", "pos", "sport"]
    by_name = _write(tmp_path / "v.jsonl", [names[i] for i in predicted])
    held = load_heldout(by_name, model, batch_size=2)
    assert len(held.batches) == 3 and sorted(held.labels.tolist()) == sorted(predicted)
    assert score(model, held).accuracy == 1.0  # labels are the model's own predictions
    wrong = _write(tmp_path / "w.jsonl", [(i + 1) % 3 for i in predicted])  # ids, all wrong
    fp32, int8 = score_files([report.path, report.quantized_path], wrong)
    assert fp32.accuracy == 0.0
    assert int8.agreement(fp32) == float(np.mean(int8.predictions == fp32.predictions))


def test_unknown_label_names_the_file(bert_export, tmp_path):  # noqa: F811
    report, _ = bert_export
    bad = _write(tmp_path / "bad.jsonl", ["neg", "pos", "cats", "neg", "pos"])
    with pytest.raises(DataError, match=r"bad.jsonl: example 3: label 'cats'"):
        load_heldout(bad, OnnxModel(report.path))
