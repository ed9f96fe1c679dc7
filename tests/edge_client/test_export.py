"""Real merges, real dynamo exports and onnxruntime parity; one export per model, shared."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from rankfed.aggregation import encode_adapter
from rankfed.edge_client import export as export_mod
from rankfed.edge_client.errors import ParityError
from rankfed.edge_client.export import (
    export_onnx,
    logits_only,
    merged_model,
    read_adapter,
)
from rankfed.edge_client.model import (
    adapter_from_peft,
    build_peft_model,
    load_base_model,
    load_tokenizer,
)
from rankfed.protocol import LoraSettings

from .conftest import randomize_lora


def _adapter_file(model_dir, task, settings, path, num_labels=0):
    base = load_base_model(model_dir, task, num_labels=num_labels)
    model = build_peft_model(base, settings, task)
    randomize_lora(model, scale=0.3)
    path.write_bytes(encode_adapter(adapter_from_peft(model)))
    return path


@pytest.fixture(scope="module")
def bert_export(bert_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("bert-export")
    settings = LoraSettings(rank=4, alpha=8.0, target_modules=("query", "value"), modules_to_save=("classifier",))
    adapter = _adapter_file(bert_dir, "sequence-classification", settings, d / "adapter.safetensors", num_labels=3)
    report = export_onnx(bert_dir, adapter, d / "model.onnx", labels=["neg", "pos", "sport"], max_length=64, quantize=True,
                         force=True)  # int8 unchecked: the accuracy gate has its own tests (test_export_gate.py)
    return report, adapter


@pytest.fixture(scope="module")
def llama_export(llama_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("llama-export")
    settings = LoraSettings(rank=2, alpha=4.0, target_modules=("q_proj", "v_proj", "down_proj"))
    adapter = _adapter_file(llama_dir, "causal-lm", settings, d / "adapter.safetensors")
    report = export_onnx(llama_dir, adapter, d / "model.onnx", max_length=64)
    return report, adapter


def test_bert_export_is_one_file_with_parity(bert_export):
    report, _ = bert_export
    assert report.task == "sequence-classification"
    assert report.max_abs_diff < 1e-4 and report.parity_batches >= 3
    files = sorted(p.name for p in __import__("pathlib").Path(report.path).parent.iterdir())
    assert files == ["adapter.safetensors", "model.int8.onnx", "model.onnx"]  # no .onnx.data
    model = onnx.load(report.path)
    props = {p.key: p.value for p in model.metadata_props}
    assert props["rankfed.task"] == "sequence-classification"
    assert json.loads(props["rankfed.labels"]) == ["neg", "pos", "sport"]
    assert "model" in json.loads(props["rankfed.tokenizer"])
    dims = [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert all(dims), f"input axes should be dynamic, got {dims}"


def test_merged_export_differs_from_the_base(bert_dir, bert_export):
    """The adapter is really in the exported weights (randomised B, so delta W != 0)."""
    report, adapter_path = bert_export
    import onnxruntime as ort

    base = logits_only(load_base_model(bert_dir, "sequence-classification", num_labels=3), "sequence-classification")
    merged = logits_only(merged_model(bert_dir, read_adapter(adapter_path), "sequence-classification"), "sequence-classification")
    ids = torch.randint(5, 40, (2, 12))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        b, m = base(ids, mask).numpy(), merged(ids, mask).numpy()
    got = ort.InferenceSession(report.path, providers=["CPUExecutionProvider"]).run(
        ["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    )[0]
    assert np.abs(b - m).max() > 1e-2
    np.testing.assert_allclose(got, m, atol=1e-4)


def test_quantized_model_is_smaller_and_close(bert_export):
    report, _ = bert_export
    assert report.quantized_path.endswith("model.int8.onnx")
    assert report.quantized_bytes < report.bytes
    assert report.quantized_argmax_agreement >= 0.5
    assert np.isfinite(report.quantized_max_abs_diff)


def test_llama_export_parity(llama_export):
    report, _ = llama_export
    assert report.task == "causal-lm" and report.max_abs_diff < 1e-4


def test_infer_classifies_like_torch(bert_dir, bert_export):
    from rankfed.edge_client.infer import OnnxModel

    report, adapter_path = bert_export
    texts = ["good movie", "the team won the match", "awful boring film today"]
    preds = OnnxModel(report.path).classify(texts)
    tok = load_tokenizer(bert_dir)
    enc = tok(texts, padding=True, return_tensors="pt")
    model = merged_model(bert_dir, read_adapter(adapter_path), "sequence-classification")
    with torch.no_grad():
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    assert [p.label_id for p in preds] == logits.argmax(-1).tolist()
    assert all(p.label in ("neg", "pos", "sport") for p in preds)
    probs = torch.softmax(logits, -1).numpy()
    np.testing.assert_allclose([p.scores for p in preds], probs, atol=1e-4)


def test_infer_generates_with_the_llama(llama_export):
    from rankfed.edge_client.infer import OnnxModel

    report, _ = llama_export
    model = OnnxModel(report.path)
    out = model.generate("what is the film", max_new_tokens=4)
    assert isinstance(out, str)


def test_infer_cli_runs_without_torch(bert_export):
    """`rankfed edge infer` with torch and transformers made unimportable."""
    report, _ = bert_export
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None; sys.modules['peft'] = None\n"
        "from rankfed.cli import main\n"
        f"sys.exit(main(['edge', 'infer', '--onnx', {report.path!r}, '--text', 'good movie', '--json']))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    pred = json.loads(out.stdout.strip().splitlines()[-1])
    assert pred["label"] in ("neg", "pos", "sport") and len(pred["scores"]) == 3


def test_parity_failure_writes_nothing(bert_dir, bert_export, tmp_path, monkeypatch):
    _, adapter_path = bert_export
    monkeypatch.setattr(export_mod, "compare", lambda *a, **k: (0.5, 1.0))
    with pytest.raises(ParityError, match=r"differs from torch by 0.5") as info:
        export_onnx(bert_dir, adapter_path, tmp_path / "bad.onnx", max_length=32)
    assert info.value.max_abs_diff == 0.5
    assert list(tmp_path.iterdir()) == []


def test_a_global_adapter_directory_exports_with_only_the_base_model(bert_dir, tmp_path):
    """The card in the adapter (task, labels) replaces --task/--labels: a device's final
    directory, as `rankfed edge run --out` writes it, exports with the base model alone."""
    from rankfed.protocol.artifact import AdapterCard, write_adapter_dir

    settings = LoraSettings(rank=2, alpha=4.0, target_modules=("query", "value"), modules_to_save=("classifier",))
    base = load_base_model(bert_dir, "sequence-classification", num_labels=3)
    model = build_peft_model(base, settings, "sequence-classification")
    randomize_lora(model, scale=0.3)
    card = AdapterCard(task="sequence-classification", target_modules=("query", "value"), labels=("cats", "dogs", "eels"),
                       num_labels=3, modules_to_save=("classifier",), base_model_id="tiny-bert", round=3)
    write_adapter_dir(tmp_path / "final", encode_adapter(adapter_from_peft(model), metadata=card.to_metadata()))
    assert (tmp_path / "final" / "adapter_config.json").is_file()
    report = export_onnx(bert_dir, tmp_path / "final", tmp_path / "model.onnx", max_length=32)
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "model.onnx")).metadata_props}
    assert report.task == "sequence-classification"
    assert json.loads(props["rankfed.labels"]) == ["cats", "dogs", "eels"]


def test_two_thread_sessions_sleep_by_default_and_match_one_thread(bert_export):
    from rankfed.edge_client.infer import OnnxModel, session_options

    report, _ = bert_export
    assert session_options(2).get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert session_options(2, spin=True).get_session_config_entry("session.intra_op.allow_spinning") == "1"
    rng = np.random.default_rng(3)
    ids = rng.integers(5, 40, size=(2, 33), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, 20:] = 0
    one = OnnxModel(report.path, threads=1).logits(ids, mask)
    for spin in (False, True):
        np.testing.assert_allclose(OnnxModel(report.path, threads=2, spin=spin).logits(ids, mask), one, atol=1e-5)
    session = export_mod.ort_session(report.path, 2)
    got = session.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]
    np.testing.assert_allclose(got, one, atol=1e-5)


def test_infer_cli_spin_flag(bert_export, capsys):
    from rankfed.cli import main

    report, _ = bert_export
    assert main(["edge", "infer", "--onnx", report.path, "--text", "good movie", "--threads", "2", "--spin",
                 "--json"]) == 0
    pred = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert pred["label"] in ("neg", "pos", "sport")
