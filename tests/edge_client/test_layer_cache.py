"""The frozen-layer cache is exact: cached training gives the uncached run's per-step losses
(and adapter) on a tiny 4-layer BERT with LoRA on its top layer(s), with dropout on."""

from __future__ import annotations

import pytest
import torch

from rankfed.edge_client.data import load_dataset
from rankfed.edge_client.errors import ConfigError, TrainingError
from rankfed.edge_client.layer_cache import PrefixCache
from rankfed.edge_client.model import adapter_from_peft, build_peft_model, load_base_model, load_tokenizer
from rankfed.edge_client.train import TrainConfig, train_local
from rankfed.protocol import LoraSettings

from .conftest import make_bert_dir, randomize_lora

TASK = "sequence-classification"
# LoRA dropout too: every random draw of the trained part must happen in both paths alike.
SETTINGS = LoraSettings(
    rank=4, alpha=8.0, target_modules=("query", "value"), dropout=0.1, modules_to_save=("classifier",)
)
LAYERS = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory, cls_data):
    path = make_bert_dir(tmp_path_factory.mktemp("bert4"), num_hidden_layers=LAYERS)
    # Dropout on (the conftest model has none): the frozen prefix must run in eval mode in
    # both paths, and the dropout of the trained layers must draw alike in both.
    base = load_base_model(path, TASK, num_labels=3, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    ds = load_dataset(cls_data, load_tokenizer(path), task=TASK, num_labels=3)
    return base, ds


def _model(base, k):
    model = build_peft_model(base, SETTINGS, TASK, freeze_below_layer=k)
    randomize_lora(model)  # non-zero B: the trained layers change the loss from step 1
    return model


@pytest.mark.parametrize("k", [LAYERS - 1, LAYERS - 2], ids=["top1", "top2"])
def test_cached_losses_equal_uncached(setup, k):
    base, ds = setup
    cfg = TrainConfig(steps=12, learning_rate=2e-2, batch_size=8, seed=3, freeze_below_layer=k)
    plain, cached = _model(base, k), _model(base, k)
    ref = train_local(plain, ds, cfg)
    cache = PrefixCache.build(cached, ds, k, batch_size=7)  # other padding than training's
    calls = []
    hook = cached.get_base_model().bert.encoder.layer[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        got = train_local(cached, ds, cfg, prefix_cache=cache)
    finally:
        hook.remove()
    assert calls == []  # the prefix did not run while training from the cache
    diff = max(abs(a - b) for a, b in zip(ref.losses, got.losses, strict=True))
    print(f"max abs loss difference, cached vs uncached (k={k}): {diff:.3g}")
    assert len(got.losses) == 12 and diff < 1e-5, diff
    assert ref.losses[-1] < ref.losses[0]  # it trained (so equal losses are not two no-ops)
    a, b = adapter_from_peft(plain), adapter_from_peft(cached)
    assert sorted(a.modules) == sorted(b.modules)
    assert {int(m.split(".")[3]) for m in a.modules} == set(range(k, LAYERS))  # LoRA on layers >= k only
    for name, mod in a.modules.items():
        assert abs(mod.b - b.modules[name].b).max() < 1e-5, name
    # and the model is whole again: a full forward after cached training gives the same logits
    x = torch.tensor([ds.examples[0].input_ids])
    assert torch.allclose(plain(input_ids=x).logits, cached(input_ids=x).logits, atol=1e-5)


def test_frozen_prefix_is_inference_only(setup):
    """With dropout on, freeze_below_layer changes the uncached run (the prefix is in eval
    mode): this is what makes the cache exact, so it must not silently go away."""
    base, ds = setup
    k = LAYERS - 1
    on = TrainConfig(steps=3, batch_size=8, seed=3, freeze_below_layer=k)
    off = TrainConfig(steps=3, batch_size=8, seed=3)
    assert train_local(_model(base, k), ds, on).losses != train_local(_model(base, k), ds, off).losses


def test_cache_refuses_what_it_cannot_make_exact(setup, llama_dir, lm_data):
    base, ds = setup
    everywhere = build_peft_model(base, SETTINGS, TASK)  # LoRA in layer 0 as well
    with pytest.raises(ConfigError, match="layer.0"):
        PrefixCache.build(everywhere, ds, 2)
    with pytest.raises(TrainingError, match="below layer 2 is trainable"):
        train_local(everywhere, ds, TrainConfig(steps=1, freeze_below_layer=2))
    model = _model(base, 2)
    cache = PrefixCache.build(model, ds, 2)
    with pytest.raises(TrainingError, match="prefix cache"):
        train_local(model, ds, TrainConfig(steps=1, freeze_below_layer=3), prefix_cache=cache)
    with pytest.raises(ConfigError, match=r"\[1, 3\]"):
        build_peft_model(base, SETTINGS, TASK, freeze_below_layer=LAYERS)
    llama = load_base_model(llama_dir, "causal-lm")
    with pytest.raises(ConfigError, match="not a BERT-like encoder"):
        build_peft_model(llama, LoraSettings(rank=2, alpha=4.0, target_modules=("q_proj",)), "causal-lm",
                         freeze_below_layer=1)


def test_saved_cache_loads_the_same_states_and_key_follows_the_data(setup, tmp_path):
    from rankfed.edge_client.data import TextDataset
    from rankfed.edge_client.layer_cache import cache_key

    base, ds = setup
    model = _model(base, LAYERS - 1)
    cache = PrefixCache.build(model, ds, LAYERS - 1)
    cache.save(tmp_path / "c.npz")
    back = PrefixCache.load(tmp_path / "c.npz")
    assert back.k == cache.k and len(back) == len(cache)
    assert all(torch.equal(a, b) for a, b in zip(cache.states, back.states, strict=True))
    key = cache_key("sha", ds, LAYERS - 1)
    assert key == cache_key("sha", ds, LAYERS - 1)
    assert key != cache_key("sha", ds, LAYERS - 2) and key != cache_key("other", ds, LAYERS - 1)
    fewer = TextDataset(ds.examples[:-1], task=ds.task, pad_id=ds.pad_id)
    assert key != cache_key("sha", fewer, LAYERS - 1)


def test_load_or_build_keeps_the_states_once_and_loads_them_after(setup, tmp_path):
    base, ds = setup
    model = _model(base, LAYERS - 1)
    path = tmp_path / "kept" / "c.npz"
    built, loaded = PrefixCache.load_or_build(model, ds, LAYERS - 1, path)
    assert not loaded and path.is_file()
    again, loaded = PrefixCache.load_or_build(model, ds, LAYERS - 1, path)
    assert loaded and all(torch.equal(a, b) for a, b in zip(built.states, again.states, strict=True))
    unkept, loaded = PrefixCache.load_or_build(model, ds, LAYERS - 1, None)
    assert not loaded and len(unkept) == len(built)


def test_cached_evaluation_equals_uncached(setup):
    from rankfed.edge_client.train import evaluate

    base, ds = setup
    model = _model(base, LAYERS - 2)
    cache = PrefixCache.build(model, ds, LAYERS - 2, batch_size=5)
    ref = evaluate(model, ds, batch_size=8)
    got = evaluate(model, ds, batch_size=8, prefix_cache=cache)
    assert got["accuracy"] == ref["accuracy"]
    assert abs(got["loss"] - ref["loss"]) < 1e-5
    with pytest.raises(TrainingError):
        evaluate(model, ds, prefix_cache=PrefixCache(LAYERS - 2, cache.states[:-1]))
