from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest
import torch

from rankfed.aggregation import Adapter, LoraModule, decode_adapter, encode_adapter
from rankfed.edge_client.errors import AdapterError, ModelError
from rankfed.edge_client.model import (
    adapter_from_peft,
    build_peft_model,
    load_adapter,
    load_base_model,
    peft_model_for_adapter,
    weights_sha256,
)
from rankfed.protocol import LoraSettings

from .conftest import randomize_lora

SETTINGS = LoraSettings(rank=4, alpha=8.0, target_modules=("query", "value"), modules_to_save=("classifier",))
TASK = "sequence-classification"


@pytest.fixture(scope="module")
def base(bert_dir):
    return load_base_model(bert_dir, TASK, num_labels=3)


@pytest.fixture(scope="module")
def trained(base):
    model = build_peft_model(base, SETTINGS, TASK)
    randomize_lora(model)
    return model


def _logits(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 40, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def test_weights_sha256_is_the_file_digest(bert_dir, tmp_path):
    expected = hashlib.sha256((bert_dir / "model.safetensors").read_bytes()).hexdigest()
    assert weights_sha256(bert_dir) == expected
    with pytest.raises(ModelError, match="config.json"):
        weights_sha256(tmp_path)


def test_peft_adapter_round_trip_is_exact(base, trained):
    adapter = adapter_from_peft(trained)
    assert set(adapter.ranks.values()) == {4}
    assert set(adapter.dense) == {"classifier.weight", "classifier.bias"}
    assert all(np.abs(m.b).sum() > 0 for m in adapter.modules.values())
    # through the wire codec and into a fresh model
    restored = peft_model_for_adapter(base, decode_adapter(encode_adapter(adapter)), SETTINGS, TASK)
    assert torch.equal(_logits(restored), _logits(trained))


def test_scaling_matches_dense_delta(base, trained):
    """Merged weights equal W + (alpha/r) B @ A computed from the Adapter alone."""
    adapter = adapter_from_peft(trained)
    name = "bert.encoder.layer.1.attention.self.value"
    w0 = dict(base.named_parameters())[f"{name}.weight"].detach().numpy()
    import copy

    merged = copy.deepcopy(trained).merge_and_unload()
    w1 = dict(merged.named_parameters())[f"{name}.weight"].detach().numpy()
    np.testing.assert_allclose(w1 - w0, adapter.delta(name), atol=1e-6)


def test_per_module_rank_and_alpha(base):
    rng = np.random.default_rng(0)
    modules = {}
    for layer in range(2):
        for proj, r, alpha in (("query", 2, 3.0), ("value", 6, 12.0)):
            modules[f"bert.encoder.layer.{layer}.attention.self.{proj}"] = LoraModule(
                a=rng.normal(size=(r, 32)), b=rng.normal(size=(32, r)), alpha=alpha
            )
    dense = {"classifier.weight": rng.normal(size=(3, 32)), "classifier.bias": np.zeros(3)}
    adapter = Adapter(modules=modules, dense=dense)
    model = peft_model_for_adapter(base, adapter, SETTINGS, TASK)
    layer = model.base_model.model.bert.encoder.layer[0].attention.self
    assert layer.query.r["default"] == 2 and layer.query.scaling["default"] == pytest.approx(1.5)
    assert layer.value.r["default"] == 6 and layer.value.scaling["default"] == pytest.approx(2.0)
    back = adapter_from_peft(model)
    for name, module in adapter.modules.items():
        np.testing.assert_array_equal(back.modules[name].a, module.a)
        np.testing.assert_array_equal(back.modules[name].b, module.b)
        assert back.modules[name].alpha == module.alpha


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: Adapter({k: v for k, v in a.modules.items() if "layer.0.attention.self.query" not in k}, a.dense),
         "missing key .*layer.0.attention.self.query.lora_A"),
        (lambda a: Adapter({**a.modules, "bert.encoder.layer.0.attention.self.key": a.modules["bert.encoder.layer.0.attention.self.query"]}, a.dense),
         "unexpected LoRA module 'bert.encoder.layer.0.attention.self.key'"),
        (lambda a: Adapter(a.modules, {"classifier.weight": a.dense["classifier.weight"]}),
         "missing key 'base_model.model.classifier.bias'"),
        (lambda a: Adapter(a.modules, {**a.dense, "pooler.dense.weight": np.zeros((32, 32))}),
         "unexpected key 'base_model.model.pooler.dense.weight'"),
        (lambda a: Adapter({k: LoraModule(v.a[:2], v.b[:, :2], v.alpha) for k, v in a.modules.items()}, a.dense),
         r"lora_A.weight: adapter shape \(2, 32\), the model expects \(4, 32\)"),
        (lambda a: Adapter({k: LoraModule(v.a, v.b, 99.0) for k, v in a.modules.items()}, a.dense),
         "adapter alpha 99.0 but the model has 8.0"),
        (lambda a: Adapter(a.modules, a.dense, use_rslora=True), "use_rslora"),
    ],
    ids=["missing-module", "unexpected-module", "missing-dense", "unexpected-dense", "rank", "alpha", "rslora"],
)
def test_load_adapter_is_strict_and_names_the_key(trained, mutate, match):
    adapter = adapter_from_peft(trained)
    with pytest.raises(AdapterError, match=match):
        load_adapter(trained, mutate(adapter))


def test_build_peft_model_leaves_base_untouched(base):
    before = {k: v.clone() for k, v in base.state_dict().items()}
    build_peft_model(base, SETTINGS, TASK)
    assert not any("lora" in n for n, _ in base.named_modules())
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_unknown_target_module_is_an_adapter_error(base):
    with pytest.raises(AdapterError, match="nope"):
        build_peft_model(base, dataclasses.replace(SETTINGS, target_modules=("nope",)), TASK)
