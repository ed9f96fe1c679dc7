"""Experiment tracking over real rounds: TensorBoard event files (read back record by
record) and an MLflow file store (read back with MlflowClient) hold each round's metrics
and each device's, one run per federation; a restarted coordinator continues its run."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from tests.coordinator.harness import CoordinatorThread, EdgeTestClient, make_config, random_adapter, status, wait_for

pytest.importorskip("tensorboardX", reason="the tracking extra (scripts/install.sh installs it)")
pytest.importorskip("mlflow", reason="the tracking extra (scripts/install.sh installs it)")


def read_scalars(directory: Path) -> dict[tuple[str, int], float]:
    """(tag, step) -> value from every TFRecord event file under `directory`."""
    from tensorboardX.proto import event_pb2

    out = {}
    for path in directory.rglob("events.out.tfevents.*"):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack_from("<Q", data, offset)
            record = data[offset + 12: offset + 12 + length]  # length, its crc, data, data crc
            offset += 12 + length + 4
            event = event_pb2.Event.FromString(record)
            for value in event.summary.value:
                out[(value.tag, event.step)] = value.simple_value
    return out


def _federate(server, manifest, rounds: int) -> None:
    fleet = [EdgeTestClient(server.address, name) for name in ("a", "b")]
    try:
        for client in fleet:
            client.join(manifest.weights_sha256)
        for round_no in range(1, rounds + 1):
            for i, client in enumerate(fleet):
                task = client.wait_train()
                assert task.round == round_no
                client.download(task.round)
                client.upload(task.round, random_adapter(manifest, task.assignment.lora.rank,
                                                         task.assignment.lora.alpha, i))
            wait_for(lambda: len(status(server.address).history) == round_no, what=f"round {round_no} closed")
    finally:
        for client in fleet:
            client.close()


def test_rounds_and_devices_are_tracked_in_tensorboard_and_mlflow(tmp_path, tiny_manifest):
    from mlflow.tracking import MlflowClient

    tb, mlruns = tmp_path / "tb", tmp_path / "mlruns"
    config = make_config(tmp_path / "state", **{
        "federation.rounds": 2, "federation.min_clients": 2, "federation.straggler_grace_seconds": 0.0,
        "tracking.tensorboard_dir": str(tb), "tracking.mlflow_uri": str(mlruns),
    })
    server = CoordinatorThread(config)
    federation_id = server.federation.federation_id
    try:
        _federate(server, tiny_manifest, rounds=2)
    finally:
        server.stop()  # flushes the writers

    scalars = read_scalars(tb / federation_id)
    for step in (1, 2):
        assert scalars[("round/updates", step)] == 2
        assert scalars[("round/failed", step)] == 0
        assert scalars[("device/a/uploaded", step)] == 1
        assert scalars[("device/b/rank", step)] == 4  # the default tier "cpu"
        assert ("device/a/loss_last", step) in scalars and ("device/b/eval_accuracy", step) in scalars

    client = MlflowClient(tracking_uri=mlruns.as_uri())
    experiment = client.get_experiment_by_name("rankfed")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == federation_id and run.info.status == "FINISHED"
    assert run.data.params["method"] == "zero_pad" and run.data.params["rounds"] == "2"
    history = client.get_metric_history(run.info.run_id, "round/loss_last")
    assert [m.step for m in history] == [1, 2]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "device/a/uploaded")] == [1, 1]


def test_tracking_without_the_extra_is_a_config_error(tmp_path, monkeypatch):
    import sys

    from rankfed.coordinator.errors import ConfigError

    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"tensorboardX is missing: install the tracking extra"):
        CoordinatorThread(make_config(tmp_path / "state", **{"tracking.tensorboard_dir": str(tmp_path / "tb")}))


def test_demo_passes_its_flags_to_the_coordinator_config(tmp_path):
    from rankfed.coordinator.config import load_config
    from rankfed.demo.run import DemoOptions, write_coordinator_config

    opts = DemoOptions(out=tmp_path, tensorboard_dir=tmp_path / "tb", mlflow_uri="http://mlflow:5000")
    path = write_coordinator_config(opts, tmp_path / "c.toml", manifest=tmp_path / "m.json", data_dir=tmp_path / "d")
    config = load_config(path)
    assert config.tracking.tensorboard_dir == str(tmp_path / "tb")
    assert config.tracking.mlflow_uri == "http://mlflow:5000"
