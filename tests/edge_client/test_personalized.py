"""Personalized mode (pFedLoRA) on the device: shared-module mapping across models of
different depth, the alternating schedule's freezing, the private state on disk, and a
mixed-model federation over real gRPC whose uploads hold only the shared adapter."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from rankfed.aggregation import Adapter, LoraModule, decode_adapter
from rankfed.edge_client.data import load_dataset, split_holdout
from rankfed.edge_client.manifest import build_personalized_manifest, write_manifest
from rankfed.edge_client.model import load_base_model, load_tokenizer
from rankfed.edge_client.personal import (
    PersonalModel,
    PersonalStore,
    PrivateSettings,
    resolve_shared,
)
from rankfed.edge_client.strategies import PersonalizedStrategy
from rankfed.edge_client.train import TrainConfig, evaluate, train_local
from rankfed.protocol import LoraSettings
from tests.edge_client.conftest import make_bert_dir, write_cls_data

SHARED_NAMES = ("encoder.layer.-1.attention.self.query", "encoder.layer.-1.attention.self.value")


@pytest.fixture(scope="module")
def deep_dir(tmp_path_factory) -> Path:
    return make_bert_dir(tmp_path_factory.mktemp("deep-bert"), seed=1, num_hidden_layers=3)


@pytest.fixture(scope="module")
def shallow_dir(tmp_path_factory) -> Path:
    return make_bert_dir(tmp_path_factory.mktemp("shallow-bert"), seed=2, num_hidden_layers=2)


def _shared(rank: int = 2, seed: int = 0, d: int = 32) -> Adapter:
    rng = np.random.default_rng(seed)
    return Adapter(modules={
        n: LoraModule(a=rng.standard_normal((rank, d)).astype(np.float32) * 0.1,
                      b=rng.standard_normal((d, rank)).astype(np.float32) * 0.1, alpha=2.0 * rank)
        for n in SHARED_NAMES
    })


def _settings(rank: int = 2) -> LoraSettings:
    return LoraSettings(rank=rank, alpha=2.0 * rank, target_modules=("query", "value"))


def test_shared_names_resolve_to_each_models_last_layer(deep_dir, shallow_dir):
    deep = load_base_model(deep_dir, "sequence-classification", num_labels=3)
    shallow = load_base_model(shallow_dir, "sequence-classification", num_labels=3)
    assert resolve_shared(deep, SHARED_NAMES) == {
        "encoder.layer.-1.attention.self.query": "bert.encoder.layer.2.attention.self.query",
        "encoder.layer.-1.attention.self.value": "bert.encoder.layer.2.attention.self.value",
    }
    assert resolve_shared(shallow, ["encoder.layer.-2.attention.self.query"]) == {
        "encoder.layer.-2.attention.self.query": "bert.encoder.layer.0.attention.self.query"
    }
    from rankfed.edge_client.errors import ModelError

    with pytest.raises(ModelError, match="no layer -3"):
        resolve_shared(shallow, ["encoder.layer.-3.attention.self.query"])


def test_personalized_manifest_admits_both_models(deep_dir, shallow_dir):
    from rankfed.protocol.manifest import manifest_from_dict

    data = build_personalized_manifest([deep_dir, shallow_dir], task="sequence-classification", num_labels=3,
                                       target_modules=("query", "value"), shared_layers=(-1,))
    assert data["modules"] == {n: [32, 32] for n in SHARED_NAMES}
    assert data["dense"] == {} and data["modules_to_save"] == []
    m = manifest_from_dict(data)  # the coordinator accepts it
    assert len(m.allowed_models()) == 2


def test_alternating_schedule_freezes_exactly_one_part(shallow_dir, cls_data):
    import torch

    base = load_base_model(shallow_dir, "sequence-classification", num_labels=3)
    pm = PersonalModel(base, "sequence-classification", _settings(), _shared(), PrivateSettings(rank=4))
    assert pm.private_names == ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.value"]
    _, private = pm.split()
    # The private part: the other layers' LoRA at the device's rank, the head and the pooler.
    assert set(private.ranks.values()) == {4}
    assert {"classifier.weight", "classifier.bias", "bert.pooler.dense.weight"} <= set(private.dense)
    rng = np.random.default_rng(3)
    private = Adapter(
        modules={n: LoraModule(a=m.a, b=rng.standard_normal(m.b.shape).astype(np.float32) * 0.1, alpha=m.alpha)
                 for n, m in private.modules.items()},
        dense=private.dense,
    )
    pm.load(_shared(), private)
    data = load_dataset(cls_data, load_tokenizer(shallow_dir), task="sequence-classification", num_labels=3)
    batch = next(data.batches(8, seed=0))

    def grads(phase: str) -> tuple[dict, dict]:
        pm.set_phase(phase)
        pm.model.zero_grad(set_to_none=True)
        out = pm.model(input_ids=torch.from_numpy(batch.input_ids), attention_mask=torch.from_numpy(batch.attention_mask),
                       labels=torch.from_numpy(batch.labels))
        out.loss.backward()
        shared, priv = pm.parameters_by_part()
        return ({n: p.grad for n, p in shared.items()}, {n: p.grad for n, p in priv.items()})

    shared_g, private_g = grads("private")
    assert len(shared_g) == 4 and all(g is None for g in shared_g.values())
    assert private_g and all(g is not None and g.abs().sum() > 0 for g in private_g.values())
    shared_g, private_g = grads("shared")
    assert all(g is not None and g.abs().sum() > 0 for g in shared_g.values())
    assert all(g is None for g in private_g.values())
    pm.model.zero_grad(set_to_none=True)

    # Training a phase changes its part and leaves the other bit for bit.
    for phase in ("private", "shared"):
        before_shared, before_private = pm.split()
        pm.set_phase(phase)
        train_local(pm.model, data, TrainConfig(steps=3, learning_rate=0.05, batch_size=8))
        after_shared, after_private = pm.split()
        moved_shared = any(not np.array_equal(before_shared.modules[n].b, after_shared.modules[n].b) for n in SHARED_NAMES)
        moved_private = any(not np.array_equal(before_private.modules[n].b, after_private.modules[n].b)
                            for n in before_private.modules)
        moved_head = not np.array_equal(before_private.dense["classifier.weight"], after_private.dense["classifier.weight"])
        assert (moved_shared, moved_private, moved_head) == (
            (False, True, True) if phase == "private" else (True, False, False)
        ), phase
        if phase == "private":
            for n in SHARED_NAMES:
                np.testing.assert_array_equal(before_shared.modules[n].a, after_shared.modules[n].a)
        else:
            for n, m in before_private.modules.items():
                np.testing.assert_array_equal(m.a, after_private.modules[n].a)
            for n, v in before_private.dense.items():
                np.testing.assert_array_equal(v, after_private.dense[n])
    pm.set_phase("frozen")
    assert not any(p.requires_grad for p in pm.model.parameters())
    scores = evaluate(pm.model, data)
    assert 0.0 <= scores["accuracy"] <= 1.0 and scores["loss"] > 0


def test_fedper_shape_shares_every_layer_and_keeps_only_the_head(shallow_dir, cls_data):
    """FedPer on the personalized seams: every layer's LoRA is shared, the private part is the
    head (and pooler) alone, and the "joint" phase trains both; "frozen" trains nothing."""
    import torch

    base = load_base_model(shallow_dir, "sequence-classification", num_labels=3)
    names = tuple(f"encoder.layer.{i}.attention.self.{m}" for i in (-2, -1) for m in ("query", "value"))
    rng = np.random.default_rng(5)
    body = Adapter(modules={
        n: LoraModule(a=rng.standard_normal((2, 32)).astype(np.float32) * 0.1,
                      b=rng.standard_normal((32, 2)).astype(np.float32) * 0.1, alpha=4.0)
        for n in names
    })
    pm = PersonalModel(base, "sequence-classification", _settings(), body, PrivateSettings(rank=4))
    assert pm.private_names == []
    _, private = pm.split()
    pm.load(body, private)  # non-zero B everywhere, so every LoRA factor gets a gradient
    shared, private = pm.split()
    assert set(shared.modules) == set(names) and private.modules == {}
    assert set(private.dense) == {"classifier.weight", "classifier.bias", "bert.pooler.dense.weight",
                                  "bert.pooler.dense.bias"}
    data = load_dataset(cls_data, load_tokenizer(shallow_dir), task="sequence-classification", num_labels=3)
    batch = next(data.batches(8, seed=0))
    pm.set_phase("joint")
    out = pm.model(input_ids=torch.from_numpy(batch.input_ids), attention_mask=torch.from_numpy(batch.attention_mask),
                   labels=torch.from_numpy(batch.labels))
    out.loss.backward()
    shared_p, private_p = pm.parameters_by_part()
    assert len(shared_p) == 8 and len(private_p) == 4
    zero = [n for n, p in {**shared_p, **private_p}.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert zero == [], zero
    pm.model.zero_grad(set_to_none=True)
    train_local(pm.model, data, TrainConfig(steps=2, learning_rate=0.05, batch_size=8))
    after_shared, after_private = pm.split()
    assert any(not np.array_equal(shared.modules[n].b, after_shared.modules[n].b) for n in names)
    assert not np.array_equal(private.dense["classifier.weight"], after_private.dense["classifier.weight"])
    pm.set_phase("frozen")
    assert not any(p.requires_grad for p in pm.model.parameters())


def test_private_store_round_trip_and_model_check(tmp_path, shallow_dir):
    base = load_base_model(shallow_dir, "sequence-classification", num_labels=3)
    pm = PersonalModel(base, "sequence-classification", _settings(), _shared(), PrivateSettings(rank=4))
    _, private = pm.split()
    store = PersonalStore(tmp_path / "me")
    assert store.load("f" * 64) is None
    store.save(private, {"base_model_sha256": "f" * 64, "rounds": 3})
    loaded, info = store.load("f" * 64)
    assert info["rounds"] == 3 and set(loaded.modules) == set(private.modules) and set(loaded.dense) == set(private.dense)
    for n, v in private.dense.items():
        np.testing.assert_array_equal(loaded.dense[n], v)
    from rankfed.edge_client.errors import ConfigError

    with pytest.raises(ConfigError, match="another base model"):
        store.load("e" * 64)


def test_split_holdout_is_deterministic(shallow_dir, cls_data):
    data = load_dataset(cls_data, load_tokenizer(shallow_dir), task="sequence-classification", num_labels=3)
    train, held = split_holdout(data, 0.25, seed=0)
    again_train, again_held = split_holdout(data, 0.25, seed=0)
    assert len(held) == 15 and len(train) == 45
    assert held.examples == again_held.examples and train.examples == again_train.examples


# ------------------------------------------------------------------ a federation over gRPC


def _coordinator(tmp_path: Path, manifest_path: Path, rounds: int):
    from tests.coordinator.harness import CoordinatorThread, make_config

    return CoordinatorThread(make_config(
        tmp_path / "state", **{
            "model.manifest": str(manifest_path), "federation.mode": "personalized", "federation.method": "fedit",
            "federation.min_clients": 2, "federation.rounds": rounds, "lora.max_rank": 2,
            "federation.local_steps": 4, "federation.learning_rate": 0.02, "federation.batch_size": 8,
            "federation.round_deadline_seconds": 120.0, "federation.wait_for_clients_seconds": 60.0,
            "federation.straggler_grace_seconds": 60.0,
        },
    ))


def _runner(address: str, model_dir: Path, data: Path, name: str, personal: Path, events: list, strategy=None, **kw):
    from rankfed.edge_client.credentials import DeviceKeys
    from rankfed.edge_client.runner import EdgeRunner, RunnerConfig
    from rankfed.edge_client.transport import EdgeTransport

    config = RunnerConfig(model_dir=model_dir, data_path=data, device_name=name, max_wait_s=2.0,
                          personal_dir=personal, private=PrivateSettings(rank=4), **kw)
    # The device key lives in the personal directory, as a device's own files survive its
    # restart: the restarted client rejoins under its name.
    transport = EdgeTransport(address, keys=DeviceKeys(personal / "keys"))
    return transport, EdgeRunner(transport, config, on_event=lambda n, f: events.append((name, n, f)),
                                 strategy=strategy)


def _run_all(runners) -> dict:
    results: dict = {}

    def go(name, runner):
        try:
            results[name] = runner.run()
        except BaseException as exc:  # surfaced below
            results[name] = exc

    threads = [threading.Thread(target=go, args=(n, r)) for n, r in runners.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    for name, value in results.items():
        if isinstance(value, BaseException):
            raise AssertionError(f"{name} failed") from value
    return results


def test_mixed_model_federation_over_grpc(tmp_path, deep_dir, shallow_dir):
    manifest_path = tmp_path / "manifest.json"
    write_manifest(build_personalized_manifest(
        [deep_dir, shallow_dir], task="sequence-classification", num_labels=3, target_modules=("query", "value"),
    ), manifest_path)
    data = {name: write_cls_data(tmp_path / f"{name}.jsonl", n=40, seed=i) for i, name in enumerate(("deep", "shallow"))}
    server = _coordinator(tmp_path, manifest_path, rounds=3)
    events: list = []
    transports = []
    try:
        # Round 1 with both; then "deep" stops (max_rounds) and a fresh process-like runner
        # on the same --personal-dir carries on: its private state must survive.
        runners = {}
        for name, model_dir, extra in (("deep", deep_dir, {"max_rounds": 1}), ("shallow", shallow_dir, {})):
            t, r = _runner(server.address, model_dir, data[name], name, tmp_path / f"personal-{name}", events, **extra)
            transports.append(t)
            runners[name] = r
        first: dict = {}
        shallow_thread = threading.Thread(target=lambda: first.update(shallow=runners["shallow"].run()))
        shallow_thread.start()
        first["deep"] = runners["deep"].run()
        assert len(first["deep"].rounds) == 1
        saved, info = PersonalStore(tmp_path / "personal-deep").load(runners["deep"].base_sha256)
        assert info["rounds"] == 1 and info["shared_modules"]["encoder.layer.-1.attention.self.query"] == (
            "bert.encoder.layer.2.attention.self.query")
        assert {"bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.attention.self.value"} <= set(saved.modules)

        loaded_private: list = []

        class Spy(PersonalizedStrategy):
            """Records the private part the restarted client's first round starts from."""

            def model_for(self, base, adapter, ctx):
                model = super().model_for(base, adapter, ctx)
                if not loaded_private:
                    loaded_private.append(self.private)
                return model

        spy = Spy(private=PrivateSettings(rank=4), personal_dir=tmp_path / "personal-deep")
        t, restarted = _runner(server.address, deep_dir, data["deep"], "deep", tmp_path / "personal-deep", events,
                               strategy=spy)
        transports.append(t)
        second = _run_all({"deep": restarted})
        shallow_thread.join(180)
        assert first["shallow"].final_round == 3 and second["deep"].final_round == 3
        # The restarted client began from the private state on disk, not from scratch.
        assert ("deep", "personal_state", {"loaded": str(tmp_path / "personal-deep"), "rounds": 1}) in events
        for n, m in saved.modules.items():
            np.testing.assert_array_equal(loaded_private[0].modules[n].b, m.b)
        np.testing.assert_array_equal(loaded_private[0].dense["classifier.weight"], saved.dense["classifier.weight"])
        _, final_info = PersonalStore(tmp_path / "personal-deep").load(restarted.base_sha256)
        assert final_info["rounds"] == 3 and [h["round"] for h in final_info["history"]] == [1, 2, 3]

        # What the coordinator stored holds the shared adapter only: no private layer, no head.
        stored = sorted((tmp_path / "state" / "blobs" / "updates").rglob("*.safetensors"))
        assert len(stored) == 6
        for path in stored:
            update = decode_adapter(path.read_bytes())
            assert set(update.modules) == set(SHARED_NAMES) and update.dense == {}
            assert set(update.ranks.values()) == {2}
        # Round status: per-client held-out accuracy and its spread across clients.
        from tests.coordinator.harness import status

        st = status(server.address)
        for r in st.history:
            assert r.metrics["updates"] == 2
            assert 0.0 <= r.metrics["personal_accuracy_min"] <= r.metrics["personal_accuracy_mean"] <= r.metrics["personal_accuracy_max"] <= 1.0
            assert "personal_accuracy_std" in r.metrics
            assert all("accuracy" in p.metrics.eval for p in r.participants)
        uploaded = [f for name, ev, f in events if ev == "uploaded"]
        assert all(u["private_steps"] == 2 and u["shared_steps"] == 2 for u in uploaded)
        assert json.loads((tmp_path / "personal-shallow" / "personal.json").read_text())["rounds"] == 3
    finally:
        for t in transports:
            t.close()
        server.stop()
