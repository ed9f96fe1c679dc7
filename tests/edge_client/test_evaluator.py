"""The evaluator role: `score_adapter` on the tiny BERT, and a federation over real gRPC on
loopback where the evaluator (the real `Evaluator` over `EvaluatorTransport`, then the
`rankfed edge evaluate` command) scores two devices' updates on a validation set and the
next round's ranks follow the scores (rank_policy.allocation = "validation")."""

from __future__ import annotations

import json
import threading

import pytest

from rankfed.aggregation import decode_adapter, encode_adapter
from rankfed.edge_client.data import load_dataset
from rankfed.edge_client.errors import AdapterError
from rankfed.edge_client.evaluator import Evaluator, EvaluatorConfig, score_adapter
from rankfed.edge_client.evaluator_transport import EvaluatorTransport
from rankfed.edge_client.manifest import build_manifest, write_manifest
from rankfed.edge_client.model import (
    adapter_from_peft,
    build_peft_model,
    load_base_model,
    load_tokenizer,
    peft_model_for_adapter,
)
from rankfed.edge_client.train import TrainConfig, evaluate, train_local
from rankfed.protocol import LoraSettings, serde
from tests.edge_client.conftest import randomize_lora, write_cls_data

TASK = "sequence-classification"
TOKEN = "evaluator-token"


@pytest.fixture(scope="module")
def validation(bert_dir, tmp_path_factory):
    path = write_cls_data(tmp_path_factory.mktemp("val") / "val.jsonl", n=30, seed=7)
    return path, load_dataset(path, load_tokenizer(bert_dir), task=TASK, num_labels=3)


def test_score_adapter_is_evaluate_on_the_model_with_that_adapter(bert_dir, validation):
    _, dataset = validation
    base = load_base_model(bert_dir, TASK, num_labels=3)
    settings = LoraSettings(rank=4, alpha=8.0, target_modules=("query", "value"), modules_to_save=("classifier",))
    model = build_peft_model(base, settings, TASK)
    randomize_lora(model, seed=3)
    blob = encode_adapter(adapter_from_peft(model))
    scores = score_adapter(base, blob, dataset)
    assert set(scores) == {"loss", "accuracy"}
    assert scores == pytest.approx(evaluate(model, dataset))
    again = score_adapter(base, blob, dataset)  # the base model is left as it was
    assert again == pytest.approx(scores)
    with pytest.raises(AdapterError, match="malformed"):
        score_adapter(base, b"not safetensors", dataset)


def _device_update(base, task_proto, download: bytes, cls_data, *, noisy: bool) -> bytes:
    """What a device uploads: the downloaded adapter trained on its data (or, noisy, wrecked)."""
    lora = serde.lora_from_proto(task_proto.assignment.lora)
    model = peft_model_for_adapter(base, decode_adapter(download), lora, TASK)
    if noisy:
        randomize_lora(model, seed=5, scale=1.5)
    else:
        tokenizer = load_tokenizer(base.name_or_path)
        data = load_dataset(cls_data, tokenizer, task=TASK, num_labels=3)
        train_local(model, data, TrainConfig(steps=40, learning_rate=0.02, batch_size=8, seed=0))
    return encode_adapter(adapter_from_peft(model))


def test_the_evaluators_scores_rank_the_next_round(bert_dir, cls_data, validation, tmp_path, capsys):
    from rankfed.cli import main
    from tests.coordinator.harness import CoordinatorThread, EdgeTestClient, make_config

    manifest_path = tmp_path / "manifest.json"
    manifest = build_manifest(bert_dir, task=TASK, num_labels=3, target_modules=("query", "value"))
    write_manifest(manifest, manifest_path)
    server = CoordinatorThread(make_config(tmp_path / "state", **{
        "model.manifest": str(manifest_path), "lora.max_rank": 8, "federation.min_clients": 2,
        "federation.rounds": 2, "federation.straggler_grace_seconds": 0.0,
        "rank_policy.allocation": "validation", "rank_policy.high_rank_fraction": 0.5, "rank_policy.low_rank": 2,
        "rank_policy.evaluator_wait_seconds": 120.0, "server.evaluator_token": TOKEN,
    }))
    clients = {name: EdgeTestClient(server.address, name, "cuda", memory_gb=24.0) for name in ("careful", "sloppy")}
    try:
        base = load_base_model(bert_dir, TASK, num_labels=3)
        for client in clients.values():
            client.join(manifest["weights_sha256"])
        for name, client in clients.items():  # round 1, warm-up: both at their capability rank 8
            task = client.wait_train()
            assert task.assignment.lora.rank == 8
            blob = _device_update(base, task, client.download(task.round).data, cls_data, noisy=name == "sloppy")
            client.upload_bytes(task.round, 8, blob)
        events: list = []
        val_path, _ = validation
        with EvaluatorTransport(server.address, token=TOKEN) as transport:
            config = EvaluatorConfig(model_dir=bert_dir, data_path=val_path, max_wait_s=5.0, globals=False,
                                     max_tasks=2)
            summary = Evaluator(transport, config, on_event=lambda n, f: events.append((n, f))).run()
        losses = {r["device_name"]: r["loss"] for r in summary.scored}
        assert set(losses) == {"careful", "sloppy"} and losses["careful"] < losses["sloppy"]
        assert all(r["kind"] == "update" and r["round"] == 1 for r in summary.scored)
        second = {}

        def take(name):
            second[name] = clients[name].wait_train(60)

        threads = [threading.Thread(target=take, args=(name,)) for name in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        assert second["careful"].assignment.lora.rank == 8 and second["sloppy"].assignment.lora.rank == 2
        assert second["careful"].assignment.reason.startswith("validation score rank 1/2 (loss ")
        # The command: round 1's global adapter, with the token from a file.
        token_file = tmp_path / "evaluator-token"
        token_file.write_text(TOKEN + "\n")
        capsys.readouterr()
        assert main(["edge", "evaluate", "--coordinator", server.address, "--model", str(bert_dir), "--data",
                     str(val_path), "--token-file", str(token_file), "--no-updates", "--max-tasks", "1",
                     "--max-wait", "5", "--threads", "1", "--json"]) == 0
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
        scored = [e for e in lines if e["event"] == "scored"]
        assert len(scored) == 1 and scored[0]["kind"] == "global" and scored[0]["round"] == 1
        stored = server.call(lambda: server.federation.store.list_scores("validation"))
        assert [s.round for s in stored] == [1] and stored[0].metrics["accuracy"] == scored[0]["accuracy"]
    finally:
        for client in clients.values():
            client.close()
        server.stop()


def test_the_evaluate_command_refuses_a_wrong_token(bert_dir, validation, tmp_path, capsys):
    from rankfed.cli import main
    from tests.coordinator.harness import CoordinatorThread, make_config

    manifest_path = tmp_path / "manifest.json"
    write_manifest(build_manifest(bert_dir, task=TASK, num_labels=3, target_modules=("query", "value")), manifest_path)
    server = CoordinatorThread(make_config(tmp_path / "state", **{
        "model.manifest": str(manifest_path), "server.loopback_operators": False, "server.admin_token": "admin",
        "server.evaluator_token": TOKEN,
    }))
    try:
        code = main(["edge", "evaluate", "--coordinator", server.address, "--model", str(bert_dir), "--data",
                     str(validation[0]), "--token", "wrong", "--max-wait", "0"])
        assert code == 1
        assert "UNAUTHENTICATED" in capsys.readouterr().err
    finally:
        server.stop()
