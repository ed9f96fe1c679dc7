"""Fused (transformer-optimized) graphs and the ORT format: parity with torch, loadable."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from rankfed.edge_client.export import (
    export_onnx,
    logits_only,
    merged_model,
    read_adapter,
)
from rankfed.edge_client.infer import OnnxModel
from rankfed.protocol import LoraSettings

from .conftest import write_cls_data
from .test_export import _adapter_file


@pytest.fixture(scope="module")
def exported(bert_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("optimized")
    settings = LoraSettings(rank=4, alpha=8.0, target_modules=("query", "value"), modules_to_save=("classifier",))
    adapter = _adapter_file(bert_dir, "sequence-classification", settings, d / "adapter.safetensors", num_labels=3)
    val = write_cls_data(d / "val.jsonl", n=30, seed=3)
    report = export_onnx(bert_dir, adapter, d / "model.onnx", labels=["neg", "pos", "sport"], max_length=64,
                         quantize=True, validation=val, max_accuracy_drop=100.0, mobile=True)
    return report, adapter


def _padded_batch(seed: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, 40, size=(3, 21), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, 9:] = 0
    mask[2, 4:] = 0
    return ids, mask


def test_bert_is_fused_and_keeps_parity_with_torch(bert_dir, exported):
    report, adapter = exported
    assert report.exporter == "torchscript" and report.cls_only_last_layer
    # Two layers: the first fused whole; the last, [CLS]-row-only, keeps its LayerNorms fused.
    assert report.fused_ops.get("Attention") == 1 and report.fused_ops.get("SkipLayerNormalization") == 4
    ops = {n.op_type for n in onnx.load(report.path).graph.node}
    assert {"Attention", "SkipLayerNormalization"} <= ops  # the fused ops are what is saved
    ids, mask = _padded_batch()
    torch_model = logits_only(merged_model(bert_dir, read_adapter(adapter), "sequence-classification"),
                              "sequence-classification")
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    got = OnnxModel(report.path).logits(ids, mask)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert report.max_abs_diff <= 1e-4


def test_cls_only_last_layer_matches_the_full_model_and_leaves_it_whole(bert_dir, exported):
    from rankfed.edge_client.cls_only import ClsOnlyLastLayer, supports_cls_only

    _, adapter = exported
    model = merged_model(bert_dir, read_adapter(adapter), "sequence-classification")
    assert supports_cls_only(model)
    fast = ClsOnlyLastLayer(model).eval()
    ids, mask = (torch.from_numpy(x) for x in _padded_batch(13))
    with torch.no_grad():
        full = logits_only(model, "sequence-classification")(ids, mask)
        torch.testing.assert_close(fast(ids, mask), full, atol=1e-5, rtol=0)
    assert len(model.bert.encoder.layer) == 2 and model.bert.pooler is not None  # not cut by the wrapper
    assert len(fast.trunk.encoder.layer) == 1


def test_no_optimize_keeps_standard_onnx_ops(bert_dir, exported, tmp_path):
    _, adapter = exported
    report = export_onnx(bert_dir, adapter, tmp_path / "plain.onnx", max_length=64, optimize=False)
    domains = {n.domain for n in onnx.load(report.path).graph.node}
    assert report.fused_ops == {} and not report.cls_only_last_layer and domains <= {"", "ai.onnx"}


def test_ort_format_loads_and_matches_the_onnx_file(exported):
    report, _ = exported
    assert report.mobile_path.endswith("model.int8.ort")
    with open(report.mobile_path, "rb") as f:
        assert f.read(8)[4:8] == b"ORTM"  # the flatbuffer identifier of the ORT format
    ids, mask = _padded_batch(9)
    onnx_logits = OnnxModel(report.quantized_path).logits(ids, mask)
    mobile = OnnxModel(report.mobile_path)  # metadata (tokenizer, labels) survives the conversion
    np.testing.assert_allclose(mobile.logits(ids, mask), onnx_logits, atol=1e-5)
    assert mobile.labels == ["neg", "pos", "sport"]
    assert mobile.classify(["good movie"])[0].label in mobile.labels
    assert report.mobile_accuracy == report.quantized_accuracy


def test_ort_format_of_fp32_without_quantize(bert_dir, exported, tmp_path):
    _, adapter = exported
    report = export_onnx(bert_dir, adapter, tmp_path / "m.onnx", max_length=64, mobile=True)
    assert report.mobile_path.endswith("m.ort") and not report.quantized_path
    session = ort.InferenceSession(report.mobile_path, providers=["CPUExecutionProvider"])
    ids, mask = _padded_batch(11)
    got = session.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]
    np.testing.assert_allclose(got, OnnxModel(report.path).logits(ids, mask), atol=1e-5)


def test_fp16_weights_run_on_cpu_onnxruntime_close_to_torch(bert_dir, exported, tmp_path):
    _, adapter = exported
    val = write_cls_data(tmp_path / "val.jsonl", n=30, seed=4)
    report = export_onnx(bert_dir, adapter, tmp_path / "m.onnx", labels=["neg", "pos", "sport"], max_length=64,
                         fp16=True, validation=val, max_accuracy_drop=100.0)
    assert report.fp16_path.endswith("m.fp16.onnx") and not report.quantized_path and not report.fp16_forced
    model = onnx.load(report.fp16_path)
    weights = [t for t in model.graph.initializer if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
    fp16 = [t for t in weights if t.data_type == onnx.TensorProto.FLOAT16]
    assert len(fp16) == len(weights) > 0  # every float weight is stored as fp16
    # Inputs and outputs keep their types: int64 ids and mask in, fp32 logits out.
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [onnx.TensorProto.INT64] * 2
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    ids, mask = _padded_batch(17)
    torch_model = logits_only(merged_model(bert_dir, read_adapter(adapter), "sequence-classification"),
                              "sequence-classification")
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    got = OnnxModel(report.fp16_path).logits(ids, mask)  # metadata (tokenizer) survives the conversion
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=2e-2)  # fp16 rounding: ~3 significant digits
    assert 0 < report.fp16_max_abs_diff <= 2e-2 and report.fp16_argmax_agreement >= 0.9
    assert report.fp16_accuracy is not None and report.fp16_heldout_agreement is not None
    assert report.bytes / report.fp16_bytes > 1.5


def test_fp16_needs_validation_or_force(bert_dir, exported, tmp_path):
    from rankfed.edge_client.errors import ConfigError

    _, adapter = exported
    with pytest.raises(ConfigError, match="--fp16 needs --validation"):
        export_onnx(bert_dir, adapter, tmp_path / "m.onnx", max_length=64, fp16=True)
    report = export_onnx(bert_dir, adapter, tmp_path / "m.onnx", max_length=64, fp16=True, force=True)
    assert report.fp16_accuracy is None and (tmp_path / "m.fp16.onnx").is_file()
