"""`rankfed coordinator export`: a round's global adapter out of the data directory, chosen
by number, as the last, or as the best by the devices' reported evaluation; it describes
itself (task, labels, target modules) and loads with PeftModel.from_pretrained."""

from __future__ import annotations

import dataclasses
import json

import pytest

from rankfed.aggregation import read_adapter_metadata
from rankfed.cli import main
from rankfed.coordinator.export import global_adapter_dir
from rankfed.protocol.artifact import AdapterCard
from rankfed.protocol.manifest import write_manifest
from tests.coordinator.harness import random_adapter, status, wait_for


@pytest.fixture
def finished(start, clients, tiny_manifest, tmp_path):
    """Two rounds: round 1 reports accuracy 0.9, round 2 0.6. The manifest names its labels."""
    labelled = dataclasses.replace(tiny_manifest, labels=("neg", "neu", "pos"))
    path = tmp_path / "labelled-manifest.json"
    write_manifest(labelled, path)
    server = start(**{"federation.rounds": 2, "federation.min_clients": 1, "model.manifest": str(path)})
    (client,) = clients(server.address, "solo")
    for accuracy in (0.9, 0.6):
        task = client.wait_train()
        client.download(task.round)
        adapter = random_adapter(labelled, task.assignment.lora.rank, task.assignment.lora.alpha, task.round)
        client.upload(task.round, adapter, accuracy=accuracy)
        wait_for(lambda r=task.round: any(h.round == r for h in status(server.address).history), what="round")
    wait_for(lambda: status(server.address).done, what="federation done")
    return server


@pytest.mark.parametrize(("which", "expected"), [("last", 2), ("best", 1), ("2", 2)])
def test_export_picks_the_round(finished, tmp_path, capsys, which, expected):
    data_dir = finished.config.server.data_dir
    out = tmp_path / f"out-{which}"
    assert main(["coordinator", "export", "--data-dir", str(data_dir), "--round", which, "--out", str(out)]) == 0
    assert f"wrote round {expected}" in capsys.readouterr().out
    info = json.loads((out / "rankfed-export.json").read_text())
    assert info["round"] == expected and info["metrics"]["eval_accuracy"] == pytest.approx(1.5 - 0.3 * expected - 0.3)
    data = (out / "adapter_model.safetensors").read_bytes()
    assert data == (global_adapter_dir(data_dir, expected) / "adapter_model.safetensors").read_bytes()
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    card = AdapterCard.from_metadata(read_adapter_metadata(data))
    assert card is not None and card.labels == ("neg", "neu", "pos") and card.round == expected
    assert card.task == "sequence-classification" and card.target_modules == tuple(finished.federation.manifest.target_modules)


@pytest.mark.parametrize(("args", "code", "message"), [
    (["--round", "7"], 1, "round 7 has no global adapter (finished rounds: 1, 2)"),
    (["--round", "soon"], 2, "expected a round number, 'last' or 'best'"),
    (["--round", "best", "--metric", "eval_f1"], 1, "no finished round reports 'eval_f1'"),
])
def test_export_refuses_with_one_clear_line(finished, tmp_path, capsys, args, code, message):
    data_dir = finished.config.server.data_dir
    assert main(["coordinator", "export", "--data-dir", str(data_dir), *args, "--out", str(tmp_path / "o")]) == code
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_export_of_a_directory_without_state(tmp_path, capsys):
    assert main(["coordinator", "export", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "holds no coordinator state" in capsys.readouterr().err


def test_best_prefers_the_evaluators_scores_of_the_global_adapters(finished, tmp_path, capsys):
    """Devices reported round 1 as better; the evaluator, on the operator's validation set, says round 2."""
    from rankfed.coordinator.models import ScoreRecord

    store = finished.federation.store
    for round_no, accuracy in ((1, 0.55), (2, 0.8)):
        finished.call(store.put_score, ScoreRecord(round=round_no, client_id="", source="validation",
                                                  metrics={"accuracy": accuracy, "loss": 1.0 - accuracy},
                                                  recorded_at=1.0))
    data_dir = finished.config.server.data_dir
    assert main(["coordinator", "export", "--data-dir", str(data_dir), "--round", "best", "--out",
                 str(tmp_path / "best")]) == 0
    out = capsys.readouterr().out
    assert "wrote round 2" in out and "the highest accuracy (0.8000) on the evaluator's validation set" in out
    assert main(["coordinator", "export", "--data-dir", str(data_dir), "--round", "best", "--metric", "eval_loss",
                 "--out", str(tmp_path / "best-loss")]) == 0
    assert "the lowest loss (0.2000) on the evaluator's validation set" in capsys.readouterr().out


def test_choose_round_by_device_metrics_counts_a_loss_lower_as_better():
    from rankfed.coordinator.export import choose_round
    from rankfed.coordinator.models import RoundRecord
    from rankfed.protocol import RoundPhase

    rounds = [RoundRecord(round=n, phase=RoundPhase.DONE, method="rbla", started_at=1.0, deadline=2.0, min_clients=1,
                          global_rank=8, metrics={"eval_loss": loss}) for n, loss in ((1, 0.4), (2, 0.7))]
    record, why = choose_round(rounds, "best", metric="eval_loss")
    assert record.round == 1 and why == "the lowest eval_loss (0.4000) reported by the devices"
