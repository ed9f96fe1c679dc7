"""Operator controls over real gRPC: pause and resume, close the open round now, stop the
federation, remove and ban a device (its tokens stop working), all with operator
credentials only, each answered with what was done; and the `rankfed admin` command."""

from __future__ import annotations

import time

import grpc
import pytest

from rankfed.cli import main
from rankfed.coordinator.admin_client import AdminClient, AdminError
from rankfed.protocol import RoundPhase
from tests.coordinator.harness import EdgeTestClient, random_adapter, status, wait_for


def _train(client, tiny_manifest, round_no=None):
    task = client.wait_train()
    assert round_no is None or task.round == round_no
    client.download(task.round)
    client.upload(task.round, random_adapter(tiny_manifest, task.assignment.lora.rank, task.assignment.lora.alpha, 0))
    return task


def test_pause_holds_the_next_round_and_resume_starts_it(start, clients, tiny_manifest):
    server = start(**{"federation.rounds": 2, "federation.min_clients": 1, "federation.straggler_grace_seconds": 0.0})
    (client,) = clients(server.address, "solo")
    with AdminClient(server.address) as admin:
        _train(client, tiny_manifest, 1)
        assert "paused" in admin.pause("maintenance")
        wait_for(lambda: status(server.address).history, what="round 1 to close")
        task = client.get_task(1.0)
        assert task.WhichOneof("kind") == "wait" and "paused" in task.wait.reason
        st = status(server.address)
        assert st.paused and st.current.round == 1  # no round 2 while paused
        assert admin.resume() == "resumed"
        _train(client, tiny_manifest, 2)
        wait_for(lambda: status(server.address).done, what="federation done")


def test_close_round_aggregates_now_and_stop_ends_the_federation(start, clients, tiny_manifest):
    server = start(**{"federation.rounds": 5, "federation.min_clients": 1, "federation.clients_per_round": 2,
                      "federation.straggler_grace_seconds": 600.0, "federation.round_deadline_seconds": 600.0})
    fast, slow = clients(server.address, "fast", "slow")
    with AdminClient(server.address) as admin:
        _train(fast, tiny_manifest, 1)  # slow never uploads: without the operator, 600 s to wait
        started = time.monotonic()
        assert admin.close_round("enough") == "round 1 closes now"
        wait_for(lambda: status(server.address).history, what="round 1 to close", timeout=30)
        assert time.monotonic() - started < 30
        assert status(server.address).history[0].phase is RoundPhase.DONE
        slow.wait_train()  # round 2 is open
        assert "stopping" in admin.stop("done for today")
        wait_for(lambda: status(server.address).done, what="the stop", timeout=30)
        assert fast.get_task(1.0).WhichOneof("kind") == "done"
        with pytest.raises(AdminError) as err:
            admin.close_round()
        assert err.value.code == "FAILED_PRECONDITION"


def test_remove_and_ban_a_device(start, clients, tiny_manifest):
    server = start(**{"federation.min_clients": 1})
    (client,) = clients(server.address, "rogue")
    with AdminClient(server.address) as admin:
        assert "removed rogue and banned it" in admin.remove_device("rogue", ban=True, reason="misbehaves")
        with pytest.raises(grpc.RpcError) as err:
            client.get_task(0.1)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            client.join(tiny_manifest.weights_sha256)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "banned" in err.value.details()
        assert status(server.address).banned_devices == ("rogue",)
        assert admin.allow_device("rogue") == "rogue may join again"
        client.join(tiny_manifest.weights_sha256)
        assert client.get_task(0.1).WhichOneof("kind") in ("wait", "train")
        with pytest.raises(AdminError) as nobody:
            admin.remove_device("nobody")
        assert nobody.value.code == "NOT_FOUND"


def test_a_rejoin_revokes_the_previous_token(start, tiny_manifest):
    server = start()
    first = EdgeTestClient(server.address, "dev")
    try:
        first.join(tiny_manifest.weights_sha256)
        old = first.metadata
        first.join(tiny_manifest.weights_sha256)  # the same device joins again
        first.get_task(0.1)  # the new token works
        with pytest.raises(grpc.RpcError) as err:
            first.stub.Heartbeat(_heartbeat(), metadata=old, timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "revoked" in err.value.details()
    finally:
        first.close()


def _heartbeat():
    from rankfed.v1 import edge_pb2 as ProtoEdge

    return ProtoEdge.HeartbeatRequest(round=1)


def test_controls_need_operator_credentials(start, tiny_manifest):
    server = start(**{"server.admin_token": "adm1n"})
    device = EdgeTestClient(server.address, "dev")
    try:
        device.join(tiny_manifest.weights_sha256)
        with AdminClient(server.address, admin_token=device.token) as admin:
            for action in (admin.pause, admin.resume, admin.stop):
                with pytest.raises(AdminError) as err:
                    action()
                assert err.value.code == "UNAUTHENTICATED"
        with AdminClient(server.address, admin_token="adm1n") as admin:
            assert "paused" in admin.pause()
    finally:
        device.close()


def test_rankfed_admin_command(start, capsys):
    server = start()
    assert main(["admin", "pause", "--address", server.address, "--reason", "test"]) == 0
    assert "paused" in capsys.readouterr().out
    assert main(["admin", "remove-device", "--address", server.address]) == 2
    assert "name the device" in capsys.readouterr().err
    assert main(["admin", "remove-device", "ghost", "--address", server.address]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err


def test_a_new_run_starts_on_the_same_daemon_and_archives_the_old_one(start, clients, tiny_manifest, tmp_path):
    server = start(**{"federation.rounds": 1, "federation.min_clients": 1, "federation.straggler_grace_seconds": 0.0})
    (client,) = clients(server.address, "solo")
    _train(client, tiny_manifest, 1)
    wait_for(lambda: status(server.address).done, what="the first federation")
    first = status(server.address)
    with AdminClient(server.address) as admin:
        message = admin.new_run("next experiment")
    assert first.federation_id in message and "archived" in message
    second = status(server.address)
    assert second.federation_id != first.federation_id and not second.done and second.history == ()
    _train(client, tiny_manifest, 1)  # the same device, the same token: round 1 of the new run
    wait_for(lambda: status(server.address).done, what="the second federation")
    archive = server.config.server.data_dir / "runs" / first.federation_id
    assert (archive / "state.sqlite3").is_file() and (archive / "blobs" / "global" / "round-000001").is_dir()
    assert main(["coordinator", "export", "--data-dir", str(archive), "--round", "last", "--out", str(tmp_path / "o")]) == 0
