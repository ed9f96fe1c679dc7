"""Every RPC rejects bad input with the right status and a message a person can act on,
and a rejected upload leaves no trace in the round or on disk."""

from __future__ import annotations

import hashlib
import json
import struct
import time

import grpc
import numpy as np
import pytest

from rankfed.aggregation import Adapter, LoraModule, encode_adapter
from rankfed.protocol import ParticipantState
from rankfed.v1 import admin_pb2 as ProtoAdmin
from rankfed.v1 import common_pb2 as ProtoCommon
from tests.coordinator.harness import (
    EdgeTestClient,
    admin_stub,
    random_adapter,
    status,
    update_files,
    wait_for,
)

MAX_UPLOAD = 256 * 1024


@pytest.fixture
def ready(start, clients, tiny_manifest):
    """A coordinator with one round open and one client that has downloaded its adapter."""
    server = start(**{
        "federation.rounds": 2, "federation.min_clients": 1, "federation.clients_per_round": 1,
        "server.max_upload_bytes": MAX_UPLOAD, "federation.straggler_grace_seconds": 0.0,
    })
    (client,) = clients(server.address, "dev")
    task = client.wait_train()
    client.download(task.round)
    return server, client, task


def _good(tiny_manifest, task, seed=0) -> Adapter:
    return random_adapter(tiny_manifest, task.assignment.lora.rank, task.assignment.lora.alpha, seed)


def _rejected(call, code: grpc.StatusCode, *fragments: str) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, info.value.details()
    for fragment in fragments:
        assert fragment in info.value.details(), info.value.details()
    return info.value.details()


def _assert_no_trace(server, client, task) -> None:
    data_dir = server.config.server.data_dir
    assert update_files(data_dir) == []
    parts = {p.client_id: p for p in status(server.address).current.participants}
    assert parts[client.client_id].state != ParticipantState.UPLOADED
    assert parts[client.client_id].bytes_up == 0
    assert server.call(server.federation.store.get_receipt, task.round, client.client_id) is None


@pytest.fixture
def rejected_then_accepted(ready, tiny_manifest):
    """After the test's rejected upload: no trace, and a good upload still goes through."""
    server, client, task = ready
    yield ready
    _assert_no_trace(server, client, task)
    receipt = client.upload(task.round, _good(tiny_manifest, task))
    assert receipt.bytes_received > 0
    assert len(update_files(server.config.server.data_dir)) == 1


# ---------------------------------------------------------------- credentials


def test_missing_token_is_unauthenticated(ready):
    server, client, _ = ready
    client.token = ""
    _rejected(client.get_task, grpc.StatusCode.UNAUTHENTICATED, "missing session token")


def test_forged_token_is_unauthenticated(ready):
    server, client, _ = ready
    body, _, signature = client.token.partition(".")
    client.token = f"{body}.{'A' * len(signature)}"
    _rejected(client.get_task, grpc.StatusCode.UNAUTHENTICATED, "signature is invalid")


def test_token_for_unknown_client_is_unauthenticated(ready):
    server, client, _ = ready
    forged, _ = server.federation.registry.signer.issue("c-nobody", audience="edge", ttl_seconds=60)
    client.token = forged
    _rejected(client.get_task, grpc.StatusCode.UNAUTHENTICATED, "unknown client")


def test_expired_token_is_unauthenticated(ready):
    server, client, _ = ready
    expired, _ = server.federation.registry.signer.issue(client.client_id, audience="edge", ttl_seconds=-1)
    client.token = expired
    _rejected(client.get_task, grpc.StatusCode.UNAUTHENTICATED, "expired")


def test_admin_token_is_required_when_configured(start, clients):
    server = start(**{"server.admin_token": "s3cret-admin"})
    (client,) = clients(server.address, "dev")
    channel, stub = admin_stub(server.address)
    with channel:
        _rejected(lambda: stub.GetRoundStatus(ProtoAdmin.GetRoundStatusRequest(), timeout=5),
                  grpc.StatusCode.UNAUTHENTICATED, "admin token")
        # A device's session token is not an operator credential.
        _rejected(lambda: stub.ListClients(ProtoAdmin.ListClientsRequest(), metadata=client.metadata, timeout=5),
                  grpc.StatusCode.UNAUTHENTICATED)
        good = (("authorization", "Bearer s3cret-admin"),)
        assert stub.GetRoundStatus(ProtoAdmin.GetRoundStatusRequest(), metadata=good, timeout=5).federation_id


def test_wrong_enrollment_secret_is_permission_denied(start, tiny_manifest):
    server = start(**{"server.enrollment_secret": "let-me-in"})
    client = EdgeTestClient(server.address, "dev")
    try:
        _rejected(lambda: client.join(tiny_manifest.weights_sha256, enrollment_secret="wrong"),
                  grpc.StatusCode.PERMISSION_DENIED, "enrollment secret")
        assert client.join(tiny_manifest.weights_sha256, enrollment_secret="let-me-in").client_id
    finally:
        client.close()


def test_wrong_base_model_is_failed_precondition(start):
    server = start()
    client = EdgeTestClient(server.address, "dev")
    try:
        _rejected(lambda: client.join("f" * 64), grpc.StatusCode.FAILED_PRECONDITION, "tiny-bert", "install that model")
    finally:
        client.close()


def test_join_without_device_class_is_invalid(start, tiny_manifest):
    server = start()
    client = EdgeTestClient(server.address, "dev")
    try:
        request_fields = {"capability": ProtoCommon.DeviceCapability(cpu_cores=2)}
        from rankfed.v1 import edge_pb2 as ProtoEdge

        request = ProtoEdge.JoinRequest(device_name="dev", base_model_sha256=tiny_manifest.weights_sha256, **request_fields)
        _rejected(lambda: client.stub.Join(request, timeout=5), grpc.StatusCode.INVALID_ARGUMENT, "device_class")
    finally:
        client.close()


# ---------------------------------------------------------------- round ids and order


def test_future_round_is_failed_precondition(rejected_then_accepted, tiny_manifest):
    server, client, task = rejected_then_accepted
    _rejected(lambda: client.upload(task.round + 1, _good(tiny_manifest, task)),
              grpc.StatusCode.FAILED_PRECONDITION, "future round")


def test_stale_round_is_failed_precondition(start, clients, tiny_manifest):
    server = start(**{
        "federation.min_clients": 1, "federation.clients_per_round": 2, "federation.straggler_grace_seconds": 0.0,
    })
    slow, fast = clients(server.address, "slow", "fast")
    slow_task, fast_task = slow.wait_train(), fast.wait_train()
    slow.download(slow_task.round)
    fast.download(fast_task.round)
    fast.upload(fast_task.round, _good(tiny_manifest, fast_task))  # quorum of 1: round 1 closes
    wait_for(lambda: status(server.address).current.round == 2, what="round 2")
    _rejected(lambda: slow.upload(slow_task.round, _good(tiny_manifest, slow_task)),
              grpc.StatusCode.FAILED_PRECONDITION, "stale round 1")
    assert len(update_files(server.config.server.data_dir)) == 1


def test_upload_before_download_is_failed_precondition(start, clients, tiny_manifest):
    server = start(**{"federation.min_clients": 1, "federation.clients_per_round": 1})
    (client,) = clients(server.address, "dev")
    task = client.wait_train()
    _rejected(lambda: client.upload(task.round, _good(tiny_manifest, task)),
              grpc.StatusCode.FAILED_PRECONDITION, "upload before download")
    assert update_files(server.config.server.data_dir) == []


def test_download_of_wrong_round_is_failed_precondition(ready):
    server, client, task = ready
    _rejected(lambda: client.download(task.round + 5), grpc.StatusCode.FAILED_PRECONDITION, "future round")


# ---------------------------------------------------------------- content


def test_rank_above_assignment_is_invalid(rejected_then_accepted, tiny_manifest):
    server, client, task = rejected_then_accepted
    too_big = random_adapter(tiny_manifest, task.assignment.lora.rank * 2, task.assignment.lora.alpha, 0)
    _rejected(lambda: client.upload(task.round, too_big), grpc.StatusCode.INVALID_ARGUMENT,
              f"assigned rank {task.assignment.lora.rank}")


def test_rank_in_file_above_assignment_is_invalid(rejected_then_accepted, tiny_manifest):
    """The header claims the assigned rank but the file holds a bigger one."""
    server, client, task = rejected_then_accepted
    too_big = random_adapter(tiny_manifest, task.assignment.lora.rank * 2, task.assignment.lora.alpha, 0)
    details = _rejected(lambda: client.upload_bytes(task.round, task.assignment.lora.rank, encode_adapter(too_big)),
                        grpc.StatusCode.INVALID_ARGUMENT)
    assert "rank" in details


def test_wrong_module_name_is_invalid(rejected_then_accepted, tiny_manifest):
    server, client, task = rejected_then_accepted
    good = _good(tiny_manifest, task)
    modules = dict(good.modules)
    modules["bert.encoder.layer.9.attention.self.query"] = modules.pop("bert.encoder.layer.0.attention.self.query")
    bad = Adapter(modules=modules, dense=good.dense)
    _rejected(lambda: client.upload(task.round, bad), grpc.StatusCode.INVALID_ARGUMENT, "layer.0.attention.self.query")


def test_wrong_shape_is_invalid(rejected_then_accepted, tiny_manifest):
    server, client, task = rejected_then_accepted
    good = _good(tiny_manifest, task)
    name = "bert.encoder.layer.1.attention.self.value"
    module = good.modules[name]
    modules = {**good.modules, name: LoraModule(a=np.ones((module.rank, 5), np.float32), b=module.b, alpha=module.alpha)}
    _rejected(lambda: client.upload(task.round, Adapter(modules=modules, dense=good.dense)),
              grpc.StatusCode.INVALID_ARGUMENT, name)


def _poison(data: bytes, key: str) -> bytes:
    """Overwrite the first float of tensor `key` with NaN, leaving the file well-formed
    (the codec refuses to encode NaN, so the bytes are edited after encoding)."""
    header_len = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + header_len])
    start = 8 + header_len + header[key]["data_offsets"][0]
    assert header[key]["dtype"] == "F32"
    return data[:start] + struct.pack("<f", float("nan")) + data[start + 4:]


def test_non_finite_values_are_invalid(rejected_then_accepted, tiny_manifest):
    server, client, task = rejected_then_accepted
    name = "bert.encoder.layer.0.attention.self.value"
    data = _poison(encode_adapter(_good(tiny_manifest, task)), f"base_model.model.{name}.lora_B.weight")
    _rejected(lambda: client.upload_bytes(task.round, task.assignment.lora.rank, data),
              grpc.StatusCode.INVALID_ARGUMENT, name, "non-finite")


def test_truncated_safetensors_is_invalid(rejected_then_accepted, tiny_manifest):
    server, client, task = rejected_then_accepted
    data = encode_adapter(_good(tiny_manifest, task))[:-7]  # digest and size describe the truncated file
    _rejected(lambda: client.upload_bytes(task.round, task.assignment.lora.rank, data),
              grpc.StatusCode.INVALID_ARGUMENT, "update rejected")


def test_corrupt_safetensors_is_invalid(rejected_then_accepted):
    server, client, task = rejected_then_accepted
    garbage = np.random.default_rng(0).bytes(4096)
    _rejected(lambda: client.upload_bytes(task.round, task.assignment.lora.rank, garbage),
              grpc.StatusCode.INVALID_ARGUMENT, "update rejected")


def test_digest_mismatch_is_invalid(rejected_then_accepted, tiny_manifest):
    server, client, task = rejected_then_accepted
    data = encode_adapter(_good(tiny_manifest, task))
    _rejected(lambda: client.upload_bytes(task.round, task.assignment.lora.rank, data, sha256="0" * 64),
              grpc.StatusCode.INVALID_ARGUMENT, "sha256 of the received bytes")


def test_stream_shorter_than_declared_is_invalid(rejected_then_accepted, tiny_manifest):
    server, client, task = rejected_then_accepted
    data = encode_adapter(_good(tiny_manifest, task))
    _rejected(lambda: client.upload_bytes(task.round, task.assignment.lora.rank, data[:100],
                                          total_bytes=len(data), sha256=hashlib.sha256(data).hexdigest()),
              grpc.StatusCode.INVALID_ARGUMENT, "truncated")


def test_out_of_order_chunks_are_invalid(rejected_then_accepted, tiny_manifest):
    server, client, task = rejected_then_accepted
    data = encode_adapter(_good(tiny_manifest, task))
    chunks = [(100, data[100:]), (0, data[:100])]
    _rejected(lambda: client.upload_bytes(task.round, task.assignment.lora.rank, data, chunks=chunks),
              grpc.StatusCode.INVALID_ARGUMENT, "does not follow")


def test_chunks_must_follow_a_header(rejected_then_accepted):
    server, client, task = rejected_then_accepted
    from rankfed.v1 import edge_pb2 as ProtoEdge

    only_chunk = iter([ProtoEdge.UploadMessage(chunk=ProtoCommon.Chunk(offset=0, data=b"x"))])
    _rejected(lambda: client.stub.UploadUpdate(only_chunk, metadata=client.metadata, timeout=5),
              grpc.StatusCode.INVALID_ARGUMENT, "must start with an UploadHeader")


# ---------------------------------------------------------------- sizes and duplicates


def test_declared_size_over_cap_is_resource_exhausted(rejected_then_accepted, tiny_manifest):
    server, client, task = rejected_then_accepted
    data = encode_adapter(_good(tiny_manifest, task))
    _rejected(lambda: client.upload_bytes(task.round, task.assignment.lora.rank, data, total_bytes=MAX_UPLOAD + 1),
              grpc.StatusCode.RESOURCE_EXHAUSTED, "server.max_upload_bytes")


def test_oversized_chunk_is_resource_exhausted(rejected_then_accepted, tiny_manifest):
    server, client, task = rejected_then_accepted
    big = np.zeros(server.config.server.max_chunk_bytes + 1, np.uint8).tobytes()
    _rejected(lambda: client.upload_bytes(task.round, task.assignment.lora.rank, big, chunk=len(big)),
              grpc.StatusCode.RESOURCE_EXHAUSTED, "max_chunk_bytes")


def test_second_upload_is_already_exists(ready, tiny_manifest):
    server, client, task = ready
    first = client.upload(task.round, _good(tiny_manifest, task))
    _rejected(lambda: client.upload(task.round, _good(tiny_manifest, task, seed=1)),
              grpc.StatusCode.ALREADY_EXISTS, "already accepted")
    files = update_files(server.config.server.data_dir)
    assert len(files) == 1
    stored = (server.config.server.data_dir / "blobs" / "updates" / files[0]).read_bytes()
    assert hashlib.sha256(stored).hexdigest() == first.sha256


def test_client_cancelling_mid_upload_leaves_no_trace(rejected_then_accepted, tiny_manifest):
    server, client, task = rejected_then_accepted
    data = encode_adapter(_good(tiny_manifest, task))
    from rankfed.v1 import edge_pb2 as ProtoEdge

    def stalled():
        yield ProtoEdge.UploadMessage(header=ProtoEdge.UploadHeader(
            round=task.round, rank=task.assignment.lora.rank, num_examples=1, total_bytes=len(data),
            sha256=hashlib.sha256(data).hexdigest()))
        yield ProtoEdge.UploadMessage(chunk=ProtoCommon.Chunk(offset=0, data=data[:50]))
        time.sleep(3)  # the call's deadline passes here

    _rejected(lambda: client.stub.UploadUpdate(stalled(), metadata=client.metadata, timeout=1.0),
              grpc.StatusCode.DEADLINE_EXCEEDED)
    wait_for(lambda: update_files(server.config.server.data_dir) == [], timeout=10, what="partial upload cleanup")


def test_lower_rank_under_fedit_is_invalid(start, clients, tiny_manifest):
    """FedIT averages A and B as they are: one update below the assigned rank would make
    every later one unfoldable, so it is refused before anything is stored."""
    server = start(**{"federation.method": "fedit", "federation.min_clients": 1, "federation.clients_per_round": 1})
    (client,) = clients(server.address, "dev")
    task = client.wait_train()
    client.download(task.round)
    lower = random_adapter(tiny_manifest, task.assignment.lora.rank // 2, task.assignment.lora.alpha, 0)
    _rejected(lambda: client.upload(task.round, lower), grpc.StatusCode.INVALID_ARGUMENT, "one rank")
    assert update_files(server.config.server.data_dir) == []
    assert client.upload(task.round, _good(tiny_manifest, task)).bytes_received > 0


def test_absurd_num_examples_is_invalid(rejected_then_accepted, tiny_manifest):
    server, client, task = rejected_then_accepted
    _rejected(lambda: client.upload(task.round, _good(tiny_manifest, task), num_examples=10**12),
              grpc.StatusCode.INVALID_ARGUMENT, "num_examples")
