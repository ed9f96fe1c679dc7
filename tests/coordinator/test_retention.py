"""[storage] retention over real rounds: accepted updates of old rounds are deleted once
their round's global adapter is on disk and N rounds have passed; global adapters stay;
disk use and deletions show up in the metrics; a restart applies retention too."""

from __future__ import annotations

import urllib.request

from tests.coordinator.harness import random_adapter, status, update_files, wait_for


def _round(fleet, manifest, round_no: int) -> None:
    for i, client in enumerate(fleet):
        task = client.wait_train()
        assert task.round == round_no
        client.download(task.round)
        client.upload(task.round, random_adapter(manifest, task.assignment.lora.rank, task.assignment.lora.alpha, i))


def _rounds_with_updates(data_dir) -> list[str]:
    return sorted({path.split("/")[0] for path in update_files(data_dir)})


def test_updates_of_old_rounds_are_deleted_and_globals_kept(start, clients, tiny_manifest):
    server = start(**{"federation.rounds": 3, "federation.min_clients": 2, "federation.straggler_grace_seconds": 0.0,
                      "storage.updates_keep_rounds": 1, "server.metrics_address": "127.0.0.1:0"})
    data_dir = server.config.server.data_dir
    fleet = clients(server.address, "a", "b")
    _round(fleet, tiny_manifest, 1)
    wait_for(lambda: len(status(server.address).history) == 1, what="round 1 closed")
    assert _rounds_with_updates(data_dir) == ["round-000001"]  # kept: only 0 rounds have passed
    _round(fleet, tiny_manifest, 2)
    wait_for(lambda: _rounds_with_updates(data_dir) == ["round-000002"], what="round 1's updates deleted")
    _round(fleet, tiny_manifest, 3)
    wait_for(lambda: status(server.address).done, what="federation done")
    wait_for(lambda: _rounds_with_updates(data_dir) == ["round-000003"], what="round 2's updates deleted")
    for n in (1, 2, 3):
        assert (data_dir / "blobs" / "global" / f"round-{n:06d}" / "adapter_model.safetensors").is_file()
    with urllib.request.urlopen(f"http://127.0.0.1:{server.coordinator.metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    values = {line.rpartition(" ")[0]: float(line.rpartition(" ")[2]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values["rankfed_updates_deleted_total"] == 4
    assert values['rankfed_storage_bytes{kind="updates"}'] > 0  # round 3's two updates
    assert values['rankfed_storage_bytes{kind="global_adapters"}'] > 0
    assert values['rankfed_storage_bytes{kind="state_db"}'] > 0
    # History is unchanged: receipts stay in the database.
    assert [r.metrics["updates"] for r in status(server.address).history] == [2, 2, 2]


def test_retention_off_keeps_every_update(start, clients, tiny_manifest):
    server = start(**{"federation.rounds": 2, "federation.min_clients": 2, "federation.straggler_grace_seconds": 0.0})
    fleet = clients(server.address, "a", "b")
    _round(fleet, tiny_manifest, 1)
    _round(fleet, tiny_manifest, 2)
    wait_for(lambda: status(server.address).done, what="federation done")
    assert _rounds_with_updates(server.config.server.data_dir) == ["round-000001", "round-000002"]


def test_a_restart_applies_a_new_retention_setting(tmp_path, clients, tiny_manifest):
    from tests.coordinator.harness import CoordinatorThread, make_config

    overrides = {"federation.rounds": 2, "federation.min_clients": 2, "federation.straggler_grace_seconds": 0.0}
    server = CoordinatorThread(make_config(tmp_path / "state", **overrides))
    try:
        fleet = clients(server.address, "a", "b")
        _round(fleet, tiny_manifest, 1)
        _round(fleet, tiny_manifest, 2)
        wait_for(lambda: status(server.address).done, what="federation done")
    finally:
        server.stop()
    assert _rounds_with_updates(tmp_path / "state") == ["round-000001", "round-000002"]
    server = CoordinatorThread(make_config(tmp_path / "state", **overrides, **{"storage.updates_keep_rounds": 1}))
    try:
        assert _rounds_with_updates(tmp_path / "state") == ["round-000002"]
    finally:
        server.stop()
