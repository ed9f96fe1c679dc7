"""The accuracy gate of lossy exports, end to end: real tiny exports, real onnxruntime scores."""

from __future__ import annotations

import json

import pytest

from rankfed.cli import main
from rankfed.edge_client.errors import AccuracyGateError, ConfigError
from rankfed.edge_client.evaluate import accuracy_gate
from rankfed.edge_client.export import export_onnx
from rankfed.protocol import LoraSettings

from .conftest import write_cls_data
from .test_export import _adapter_file

LABELS = ["neg", "pos", "sport"]


@pytest.fixture(scope="module")
def adapter(bert_dir, tmp_path_factory):
    settings = LoraSettings(rank=4, alpha=8.0, target_modules=("query", "value"), modules_to_save=("classifier",))
    path = tmp_path_factory.mktemp("gate") / "adapter.safetensors"
    return _adapter_file(bert_dir, "sequence-classification", settings, path, num_labels=3)


@pytest.fixture(scope="module")
def validation(tmp_path_factory):
    return write_cls_data(tmp_path_factory.mktemp("val") / "val.jsonl", n=30, seed=7)


def test_gate_arithmetic_is_in_points():
    assert accuracy_gate(0.90, 0.895, max_drop=1.0, what="int8", where="v") == pytest.approx(0.5)
    assert accuracy_gate(0.90, 0.89, max_drop=1.0, what="int8", where="v") == pytest.approx(1.0)  # exactly 1: ok
    assert accuracy_gate(0.80, 0.85, max_drop=0.0, what="int8", where="v") == pytest.approx(-5.0)  # int8 better
    with pytest.raises(AccuracyGateError, match="is 1.5 points below fp32 90.0%") as info:
        accuracy_gate(0.90, 0.885, max_drop=1.0, what="int8", where="v.jsonl")
    assert (info.value.fp32_accuracy, info.value.int8_accuracy, info.value.max_drop) == (0.90, 0.885, 1.0)


def test_quantize_accepted_reports_both_accuracies(bert_dir, adapter, validation, tmp_path):
    report = export_onnx(bert_dir, adapter, tmp_path / "m.onnx", labels=LABELS, max_length=64, quantize=True,
                         validation=validation, max_accuracy_drop=100.0)
    assert report.validation_examples == 30 and not report.forced
    assert report.accuracy is not None and report.quantized_accuracy is not None
    assert 0.0 <= report.quantized_heldout_agreement <= 1.0
    assert (tmp_path / "m.int8.onnx").is_file()


def test_quantize_refused_writes_no_int8(bert_dir, adapter, validation, tmp_path):
    # A negative margin asks int8 to beat fp32 by 100 points, which no real score does: the
    # refusal path, with the accuracies onnxruntime really measured.
    with pytest.raises(AccuracyGateError, match=r"points below fp32 .* not written") as info:
        export_onnx(bert_dir, adapter, tmp_path / "m.onnx", labels=LABELS, max_length=64, quantize=True,
                    validation=validation, max_accuracy_drop=-100.0)
    assert 0.0 <= info.value.int8_accuracy <= 1.0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["m.onnx"]  # fp32 passed parity and stays; no int8, no partial files


def test_force_writes_int8_past_the_gate(bert_dir, adapter, validation, tmp_path):
    report = export_onnx(bert_dir, adapter, tmp_path / "m.onnx", labels=LABELS, max_length=64, quantize=True,
                         validation=validation, max_accuracy_drop=-100.0, force=True)
    assert report.forced and (tmp_path / "m.int8.onnx").is_file()


def test_quantize_without_validation_needs_force(bert_dir, adapter, tmp_path):
    with pytest.raises(ConfigError, match="--quantize needs --validation"):
        export_onnx(bert_dir, adapter, tmp_path / "m.onnx", quantize=True)
    assert list(tmp_path.iterdir()) == []


def test_cli_refusal_is_one_line_and_exit_1(bert_dir, adapter, validation, tmp_path, capsys):
    argv = ["edge", "export", "--model", str(bert_dir), "--adapter", str(adapter), "--out", str(tmp_path / "m.onnx"),
            "--labels", ",".join(LABELS), "--max-length", "64", "--quantize", "--validation", str(validation)]
    assert main([*argv, "--max-accuracy-drop", "-100"]) == 1
    err = capsys.readouterr().err  # transformers' "Loading weights" progress bar may come first
    last = err.strip().splitlines()[-1].split("\r")[-1]
    assert last.startswith("rankfed edge export: error: int8 (m.int8.onnx): held-out accuracy")
    assert "Traceback" not in err and "error" not in err.replace(last, "")
    assert main([*argv, "--max-accuracy-drop", "100", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["quantized_accuracy"] is not None and report["accuracy"] is not None
