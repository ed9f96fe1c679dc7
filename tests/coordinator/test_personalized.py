"""federation.mode = "personalized" (pFedLoRA): several admitted base models, one homogeneous
shared adapter averaged with FedAvg, per-client metrics and their spread in the round status."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest

from rankfed.aggregation import Adapter, LoraModule, encode_adapter
from rankfed.coordinator.config import load_config
from rankfed.coordinator.errors import ConfigError
from rankfed.protocol import FederationMode, ManifestError
from rankfed.protocol.manifest import BaseModelEntry, load_manifest, manifest_from_dict
from rankfed.v1 import common_pb2 as ProtoCommon
from tests.coordinator.harness import (
    CoordinatorThread,
    EdgeTestClient,
    decode,
    make_config,
    status,
    wait_for,
)

SHA_A = "a" * 64
SHA_B = "b" * 64
SHARED = {
    "encoder.layer.-1.attention.self.query": [8, 8],
    "encoder.layer.-1.attention.self.value": [8, 8],
}


def personalized_manifest(**changes) -> dict:
    data = {
        "format": "rankfed-model-manifest/1",
        "model_id": "shared-last-layer",
        "models": [{"model_id": "deep", "weights_sha256": SHA_A}, {"model_id": "shallow", "weights_sha256": SHA_B}],
        "task": "sequence-classification",
        "num_labels": 3,
        "target_modules": ["query", "value"],
        "modules": SHARED,
    }
    data.update(changes)
    return data


def test_manifest_with_several_models():
    m = manifest_from_dict(personalized_manifest())
    assert m.weights_sha256 == SHA_A  # defaults to the first model
    assert m.allowed_models() == (BaseModelEntry("deep", SHA_A), BaseModelEntry("shallow", SHA_B))
    assert m.model_for(SHA_B) == BaseModelEntry("shallow", SHA_B)
    assert m.model_for("c" * 64) is None
    assert manifest_from_dict(m.to_json_dict()) == m


def test_single_model_manifest_still_valid():
    single = personalized_manifest(weights_sha256=SHA_A)
    del single["models"]
    m = manifest_from_dict(single)
    assert m.models == () and m.allowed_models() == (BaseModelEntry("shared-last-layer", SHA_A),)
    assert "models" not in m.to_json_dict()


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"models": []}, "models = []: expected a non-empty list"),
        ({"models": [{"model_id": "x"}]}, "models[0]"),
        ({"models": [{"model_id": "x", "weights_sha256": "zz"}]}, "models[0].weights_sha256 = 'zz'"),
        ({"models": [{"model_id": "x", "weights_sha256": SHA_A}, {"model_id": "y", "weights_sha256": SHA_A}]},
         "listed twice"),
        ({"weights_sha256": "c" * 64}, "weights_sha256 is not one of models"),
    ],
)
def test_bad_models_field(changes, expected):
    with pytest.raises(ManifestError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        manifest_from_dict(personalized_manifest(**changes))


def _config(tmp_path, manifest: dict, **overrides):
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest))
    values = {
        "model.manifest": str(path), "federation.mode": "personalized", "federation.method": "fedit",
        "federation.min_clients": 2, "federation.rounds": 2, "lora.max_rank": 4,
    }
    values.update(overrides)
    return make_config(tmp_path / "data", **values)


def test_mode_and_manifest_must_agree(tmp_path):
    from rankfed.coordinator.context import check_manifest_for_mode

    cfg = _config(tmp_path, personalized_manifest())
    with pytest.raises(ConfigError, match="several models can only federate with federation.mode = 'personalized'"):
        check_manifest_for_mode(load_manifest(cfg.model.manifest), load_config(None))
    with_head = personalized_manifest(modules_to_save=["classifier"], dense={"classifier.weight": [3, 8]})
    cfg = _config(tmp_path, with_head)
    with pytest.raises(ConfigError, match="the head is private"):
        check_manifest_for_mode(load_manifest(cfg.model.manifest), cfg)


def _shared_update(rank: int, alpha: float, seed: int) -> Adapter:
    rng = np.random.default_rng(seed)
    return Adapter(modules={
        name: LoraModule(a=rng.standard_normal((rank, d_in)).astype(np.float32),
                         b=rng.standard_normal((d_out, rank)).astype(np.float32), alpha=alpha)
        for name, (d_out, d_in) in SHARED.items()
    })


def _upload(client: EdgeTestClient, round_no: int, adapter: Adapter, accuracy: float, num_examples: int):
    import hashlib

    from rankfed.v1 import edge_pb2 as ProtoEdge

    data = encode_adapter(adapter)
    header = ProtoEdge.UploadHeader(
        round=round_no, rank=adapter.max_rank, num_examples=num_examples, total_bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        metrics=ProtoCommon.TrainMetrics(loss_first=1.0, loss_last=0.5, steps=2, eval={"accuracy": accuracy}),
    )

    def messages():
        yield ProtoEdge.UploadMessage(header=header)
        yield ProtoEdge.UploadMessage(chunk=ProtoCommon.Chunk(offset=0, data=data))

    return client.stub.UploadUpdate(messages(), metadata=client.metadata, timeout=30)


def test_personalized_round_over_grpc(tmp_path):
    cfg = _config(tmp_path, personalized_manifest(), **{"federation.rounds": 1})
    server = CoordinatorThread(cfg)
    deep = EdgeTestClient(server.address, "deep-phone", "mobile")
    shallow = EdgeTestClient(server.address, "shallow-box", "cuda")
    stranger = EdgeTestClient(server.address, "stranger")
    try:
        joined = {c.name: c.join(sha) for c, sha in ((deep, SHA_A), (shallow, SHA_B))}
        # Each device is told the model it joined with, the mode, and the same shared rank.
        assert joined["deep-phone"].base_model.weights_sha256 == SHA_A
        assert joined["shallow-box"].base_model.weights_sha256 == SHA_B
        assert joined["shallow-box"].base_model.id == "shallow"
        for reply in joined.values():
            assert reply.mode == ProtoCommon.FEDERATION_MODE_PERSONALIZED
            assert reply.assignment.lora.rank == 4 and list(reply.assignment.lora.modules_to_save) == []
        with pytest.raises(grpc.RpcError) as err:
            stranger.join("c" * 64)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "deep" in err.value.details() and "shallow" in err.value.details()

        updates = []
        for i, (client, accuracy, n) in enumerate(((deep, 0.9, 10), (shallow, 0.5, 30))):
            task = client.wait_train()
            assert task.assignment.lora.rank == 4 and task.method == "fedit"
            start = decode(client.download(task.round).data)
            assert set(start.modules) == set(SHARED) and start.dense == {}
            update = _shared_update(4, task.assignment.lora.alpha, seed=i)
            _upload(client, task.round, update, accuracy, n)
            updates.append((update, n))
        wait_for(lambda: status(server.address).done, what="the federation to finish")
        st = status(server.address)
        assert st.mode is FederationMode.PERSONALIZED
        assert [(m.id, m.weights_sha256) for m in st.models] == [("deep", SHA_A), ("shallow", SHA_B)]
        metrics = st.history[0].metrics
        # Every client counts once in the personalized spread (the weighted mean stays too).
        assert metrics["personal_accuracy_mean"] == pytest.approx(0.7)
        assert metrics["personal_accuracy_std"] == pytest.approx(0.2)
        assert metrics["personal_accuracy_min"] == pytest.approx(0.5)
        assert metrics["personal_accuracy_max"] == pytest.approx(0.9)
        assert metrics["eval_accuracy"] == pytest.approx((0.9 * 10 + 0.5 * 30) / 40)
        per_client = {p.device_name: p.metrics.eval["accuracy"] for p in st.history[0].participants}
        assert per_client == pytest.approx({"deep-phone": 0.9, "shallow-box": 0.5})
        # The global shared adapter is the FedAvg of A and of scaling * B, weighted by examples.
        path = cfg.server.data_dir / "blobs" / "global" / "round-000001" / "adapter_model.safetensors"
        glob = decode(path.read_bytes())
        for name in SHARED:
            want_a = sum(u.modules[name].a * n for u, n in updates) / 40
            want_b = sum(u.modules[name].b * (u.modules[name].alpha / 4) * n for u, n in updates) / 40
            got = glob.modules[name]
            np.testing.assert_allclose(got.a, want_a, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(got.b * (got.alpha / got.rank), want_b, rtol=1e-5, atol=1e-5)
    finally:
        for client in (deep, shallow, stranger):
            client.close()
        server.stop()


def test_rank_heterogeneous_status_reports_its_mode(tmp_path):
    server = CoordinatorThread(make_config(tmp_path / "data"))
    try:
        st = status(server.address)
        assert st.mode is FederationMode.RANK_HETEROGENEOUS
        assert [m.weights_sha256 for m in st.models] == [st.base_model.weights_sha256]
    finally:
        server.stop()
