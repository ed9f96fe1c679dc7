"""Full rounds over real gRPC against a real coordinator on 127.0.0.1:0, with clients of
mixed device classes (and so mixed ranks)."""

from __future__ import annotations

import hashlib

import grpc
import numpy as np
import pytest

from rankfed.aggregation import get_method, truncate
from rankfed.coordinator.admin_client import AdminClient
from rankfed.coordinator.export import global_adapter_dir
from rankfed.protocol import ParticipantState, RoundPhase
from rankfed.protocol.artifact import ADAPTER_FILE
from rankfed.v1 import admin_pb2 as ProtoAdmin
from rankfed.v1 import common_pb2 as ProtoCommon
from tests.coordinator.harness import (
    admin_stub,
    decode,
    random_adapter,
    status,
    wait_for,
)

MIXED = [("phone", "mobile"), ("laptop", "cpu"), ("gpu-box", "cuda")]


def _train_round(clients, manifest, round_no, seed=0):
    """Each client: task -> download -> upload a random update at its rank. Returns the updates."""
    updates = []
    for i, client in enumerate(clients):
        task = client.wait_train()
        assert task.round == round_no
        got = client.download(task.round)
        assert hashlib.sha256(got.data).hexdigest() == got.manifest.sha256 == task.adapter_sha256
        assert got.manifest.rank == task.assignment.lora.rank
        start_adapter = decode(got.data)
        assert start_adapter.max_rank == task.assignment.lora.rank
        for name, module in start_adapter.modules.items():  # no component is born dead (A = B = 0)
            trainable = np.any(module.a != 0, axis=1) | np.any(module.b != 0, axis=0)
            assert trainable.all(), f"{name}: components {np.flatnonzero(~trainable)} can never train"
        update = random_adapter(manifest, task.assignment.lora.rank, task.assignment.lora.alpha, seed=seed + i)
        receipt = client.upload(task.round, update, num_examples=10 * (i + 1))
        assert receipt.round == round_no and receipt.bytes_received > 0
        updates.append((update, 10.0 * (i + 1)))
    return updates


def test_two_rounds_with_mixed_ranks(start, clients, tiny_manifest):
    server = start(**{"federation.rounds": 2, "federation.method": "rbla"})
    fleet = clients(server.address, *MIXED)
    ranks = {c.name: c.wait_train().assignment.lora.rank for c in fleet}
    assert ranks == {"phone": 2, "laptop": 4, "gpu-box": 8}

    updates = _train_round(fleet, tiny_manifest, round_no=1)
    wait_for(lambda: status(server.address).history, what="round 1 to finish")
    st = status(server.address)
    first = st.history[0]
    assert first.phase == RoundPhase.DONE
    assert first.metrics["updates"] == 3
    assert {p.rank for p in first.participants} == {2, 4, 8}
    assert all(p.state == ParticipantState.UPLOADED for p in first.participants)
    assert all(p.bytes_up > 0 and p.bytes_down > 0 for p in first.participants)

    # The streamed aggregate equals the batch rule over the same updates.
    global_path = global_adapter_dir(server.config.server.data_dir, 1) / ADAPTER_FILE
    streamed = decode(global_path.read_bytes())
    batch = get_method("rbla").aggregate(
        [u for u, _ in updates], [w for _, w in updates], global_rank=16, previous=_initial(server)
    )
    for name, module in batch.modules.items():
        np.testing.assert_allclose(streamed.modules[name].delta(False), module.delta(False), rtol=1e-5, atol=1e-6)
    assert hashlib.sha256(global_path.read_bytes()).hexdigest() == first.global_adapter_sha256

    _train_round(fleet, tiny_manifest, round_no=2, seed=10)
    wait_for(lambda: status(server.address).done, what="federation done")
    for client in fleet:
        task = client.get_task(1.0)
        assert task.WhichOneof("kind") == "done"
        assert task.done.final_round == 2
        final = client.download(0, full=True)  # what a device merges and exports
        assert hashlib.sha256(final.data).hexdigest() == task.done.final_adapter_sha256
        assert final.data == _global_path(server, 2).read_bytes() and final.manifest.rank == 16
        mine = client.download(0)  # the same, redistributed to this device's rank
        assert decode(mine.data).max_rank == ranks[client.name]
    final = status(server.address)
    assert [r.round for r in final.history] == [1, 2]


def _initial(server):
    path = global_adapter_dir(server.config.server.data_dir, 0) / ADAPTER_FILE
    return decode(path.read_bytes())


def test_quorum_deadline_late_and_dropped(start, clients, tiny_manifest):
    server = start(**{
        "federation.rounds": 1, "federation.min_clients": 2, "federation.clients_per_round": 3,
        "federation.round_deadline_seconds": 3.0, "federation.straggler_grace_seconds": 0.5,
    })
    a, b, c = clients(server.address, "a", "b", "c")
    tasks = [client.wait_train() for client in (a, b, c)]  # c takes its task but never downloads
    for client, task in zip((a, b), tasks):
        client.download(task.round)
        client.upload(task.round, random_adapter(tiny_manifest, task.assignment.lora.rank, task.assignment.lora.alpha, 1))
    wait_for(lambda: status(server.address).done, what="round to close")
    record = status(server.address).history[0]
    states = {p.device_name: p.state for p in record.participants}
    assert record.phase == RoundPhase.DONE
    assert states == {"a": ParticipantState.UPLOADED, "b": ParticipantState.UPLOADED,
                      "c": ParticipantState.LATE}
    channel, stub = admin_stub(server.address)
    with channel:
        listed = {x.device_name: x for x in stub.ListClients(ProtoAdmin.ListClientsRequest(), timeout=5).clients}
    assert listed["c"].deadlines_missed == 1 and listed["a"].rounds_completed == 1


def test_round_fails_without_quorum_and_keeps_global(start, clients, tiny_manifest):
    server = start(**{
        "federation.rounds": 1, "federation.min_clients": 2, "federation.clients_per_round": 2,
        "federation.round_deadline_seconds": 2.0,
    })
    a, b = clients(server.address, "a", "b")
    task = a.wait_train()
    a.download(task.round)
    a.upload(task.round, random_adapter(tiny_manifest, task.assignment.lora.rank, task.assignment.lora.alpha, 1))
    b.leave()  # b is gone: its participation is dropped
    wait_for(lambda: status(server.address).done, what="round to close")
    record = status(server.address).history[0]
    assert record.phase == RoundPhase.FAILED
    assert "quorum not reached: 1 of 2" in record.failure_reason
    assert {p.device_name: p.state for p in record.participants}["b"] == ParticipantState.DROPPED
    assert a.get_task(1.0).done.final_round == 0  # the initial adapter is still the global one


def test_silent_client_is_dropped_by_heartbeat_timeout(start, clients):
    server = start(**{
        "federation.rounds": 1, "federation.min_clients": 2, "federation.clients_per_round": 2,
        "federation.heartbeat_timeout_seconds": 1.5,
        "federation.heartbeat_interval_seconds": 0.5, "federation.round_deadline_seconds": 60.0,
    })
    a, b = clients(server.address, "a", "b")
    task = a.wait_train()
    b.wait_train()

    def b_dropped():
        a.heartbeat(task.round)
        parts = status(server.address).current.participants
        return {p.device_name: p.state for p in parts}.get("b") == ParticipantState.DROPPED

    wait_for(b_dropped, timeout=15, interval=0.3, what="b to be dropped")


def test_rank_follows_policy_and_budget(start, clients, tiny_manifest):
    from rankfed.coordinator.rank_policy import update_bytes

    budget = update_bytes(2, tiny_manifest) * 3
    server = start(**{"federation.rounds": 1, "rank_policy.round_budget_bytes": budget})
    fleet = clients(server.address, *MIXED)
    ranks = sorted(c.wait_train().assignment.lora.rank for c in fleet)
    assert sum(update_bytes(r, tiny_manifest) for r in ranks) <= budget
    assert ranks == [2, 2, 2]
    reasons = [c.wait_train().assignment.reason for c in fleet]
    assert any("round budget" in r for r in reasons)


def test_watch_streams_changes_and_health_is_serving(start, clients, tiny_manifest):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    server = start(**{"federation.rounds": 1, "federation.min_clients": 1})
    channel, stub = admin_stub(server.address)
    with channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "rankfed.v1.EdgeService", "rankfed.v1.AdminService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        admin = AdminClient(server.address, timeout_s=60)
        stream = admin.watch()
        first = next(stream)
        assert not first.done
        (client,) = clients(server.address, "solo")
        task = client.wait_train()
        client.download(task.round)
        client.upload(task.round, random_adapter(tiny_manifest, task.assignment.lora.rank, task.assignment.lora.alpha, 3))
        phases = []
        for update in stream:
            phases.append(update.current.phase)
            if update.done:
                break
        admin.close()
        assert RoundPhase.TRAINING in phases and phases[-1] == RoundPhase.DONE


def test_reflection_lists_services(start):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    server = start()
    with grpc.insecure_channel(server.address) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"rankfed.v1.EdgeService", "rankfed.v1.AdminService", "grpc.health.v1.Health"} <= services


def test_rejoin_keeps_client_id(start, clients, tiny_manifest):
    server = start()
    (a,) = clients(server.address, "same-device")
    first_id = a.client_id
    again = a.join(tiny_manifest.weights_sha256)
    assert again.client_id == first_id


@pytest.mark.parametrize("method", ["fedit", "zero_pad", "hetlora", "replication", "flexlora", "flora"])
def test_every_method_completes_a_round(start, clients, tiny_manifest, method):
    server = start(**{"federation.rounds": 1, "federation.method": method, "federation.min_clients": 2})
    fleet = clients(server.address, ("laptop", "cpu"), ("gpu-box", "cuda"))
    updates = _train_round(fleet, tiny_manifest, round_no=1)
    wait_for(lambda: status(server.address).done, what=f"{method} round")
    assert status(server.address).history[0].phase == RoundPhase.DONE
    streamed = decode(_global_path(server, 1).read_bytes())
    batch = get_method(method).aggregate(
        [u for u, _ in updates], [w for _, w in updates], global_rank=16, previous=_initial(server)
    )
    for name, module in batch.modules.items():
        np.testing.assert_allclose(streamed.modules[name].delta(False), module.delta(False), rtol=1e-4, atol=1e-5)
    for name, value in batch.dense.items():
        np.testing.assert_allclose(streamed.dense[name], value, rtol=1e-5, atol=1e-6)


def _global_path(server, round_no):
    return global_adapter_dir(server.config.server.data_dir, round_no) / ADAPTER_FILE


def test_retry_replaces_a_broken_upload_still_registered(start, clients, tiny_manifest):
    """The client's first stream died without the server noticing yet; its retry must not
    be refused as 'already in progress' (the edge client would give up the round)."""
    import threading

    from rankfed.aggregation import encode_adapter
    from rankfed.v1 import edge_pb2 as ProtoEdge
    from tests.coordinator.harness import update_files

    server = start(**{"federation.rounds": 1, "federation.min_clients": 1, "federation.clients_per_round": 1})
    (client,) = clients(server.address, "dev")
    task = client.wait_train()
    client.download(task.round)
    data = encode_adapter(random_adapter(tiny_manifest, task.assignment.lora.rank, task.assignment.lora.alpha, 0))
    release = threading.Event()

    def stalled():
        yield ProtoEdge.UploadMessage(header=ProtoEdge.UploadHeader(
            round=task.round, rank=task.assignment.lora.rank, num_examples=3, total_bytes=len(data),
            sha256=hashlib.sha256(data).hexdigest()))
        yield ProtoEdge.UploadMessage(chunk=ProtoCommon.Chunk(offset=0, data=data[:64]))
        release.wait(20)
        yield ProtoEdge.UploadMessage(chunk=ProtoCommon.Chunk(offset=64, data=data[64:]))

    first = client.stub.UploadUpdate.future(stalled(), metadata=client.metadata, timeout=30)
    wait_for(lambda: server.call(lambda: client.client_id in server.federation.ctx.state.uploading), what="first stream")
    receipt = client.upload_bytes(task.round, task.assignment.lora.rank, data)
    assert receipt.sha256 == hashlib.sha256(data).hexdigest()
    release.set()
    with pytest.raises(grpc.RpcError) as info:
        first.result(timeout=30)
    assert info.value.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.CANCELLED,
                                 grpc.StatusCode.ALREADY_EXISTS)
    wait_for(lambda: len(update_files(server.config.server.data_dir)) == 1, what="only the accepted file")


def test_hetlora_self_pruned_rank_sticks(start, clients, tiny_manifest):
    server = start(**{"federation.rounds": 2, "federation.method": "hetlora", "federation.min_clients": 1,
                      "federation.clients_per_round": 1})
    (client,) = clients(server.address, "laptop")
    task = client.wait_train()
    assigned = task.assignment.lora.rank
    client.download(task.round)
    # What the edge client uploads after self-pruning: the first components, scaling kept.
    pruned = truncate(random_adapter(tiny_manifest, assigned, task.assignment.lora.alpha, 0), assigned // 2)
    client.upload(task.round, pruned)
    second = client.wait_train()
    assert second.round == 2 and second.assignment.lora.rank == assigned // 2
    assert "self-pruned" in second.assignment.reason


def test_a_long_poll_keeps_a_client_online(start, clients):
    server = start(**{"federation.min_clients": 2, "federation.heartbeat_interval_seconds": 0.5,
                      "federation.heartbeat_timeout_seconds": 1.5, "server.long_poll_seconds": 3.0})
    (client,) = clients(server.address, "alone")
    assert client.get_task(3.0).WhichOneof("kind") == "wait"  # 3 s without any other call
    assert status(server.address).clients_online == 1


def test_a_rejoin_with_a_wobbling_speed_keeps_its_tier(start, tiny_manifest):
    """Over real gRPC: the hysteresis band (rank_policy.hysteresis, default 0.1) holds a
    device re-measured at 47 GFLOP/s in cpu-fast (threshold 50); 44 is past the band."""
    from tests.coordinator.harness import EdgeTestClient

    server = start()
    tiers, key = [], ""
    for gflops in (51.0, 47.0, 44.0):
        client = EdgeTestClient(server.address, "laptop", gflops=gflops, memory_gb=16.0)
        client.device_key = key  # the same device, re-measured: it kept its key
        try:
            tiers.append(client.join(tiny_manifest.weights_sha256).assignment.tier)
            key = client.device_key
        finally:
            client.close()
    assert tiers == ["cpu-fast", "cpu-fast", "cpu"]
