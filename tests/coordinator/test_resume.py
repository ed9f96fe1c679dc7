"""Resumable uploads at the coordinator, over real gRPC: a broken stream's bytes are kept
(one partial per device and round, fsynced, bounded in time), UploadStatus names them, a
resume appends to them and the final digest covers the whole file; every refusal is a
documented status with a typed detail, never INTERNAL, and exactly one update counts.
(A cut TCP link between a real edge client and the coordinator: tests/edge_client/test_bad_link.py.)"""

from __future__ import annotations

import hashlib
import threading
import time

import grpc
import pytest

from rankfed.aggregation import encode_adapter
from rankfed.protocol import ErrorReason, ParticipantState, serde
from rankfed.v1 import common_pb2 as ProtoCommon
from rankfed.v1 import edge_pb2 as ProtoEdge
from tests.coordinator.harness import (
    CoordinatorThread,
    EdgeTestClient,
    make_config,
    random_adapter,
    staged_files,
    status,
    update_files,
    wait_for,
)

PIECE = 512  # chunk size of these uploads: the tiny adapter (~3 kB) takes several


def _settings(**extra):
    return {"federation.rounds": 2, "federation.min_clients": 1, "federation.clients_per_round": 1,
            "federation.straggler_grace_seconds": 0.0, **extra}


@pytest.fixture
def ready(start, clients, tiny_manifest):
    """One round open; its one participant downloaded and holds a short, kept upload."""
    server = start(**_settings())
    (client,) = clients(server.address, "dev")
    task = client.wait_train()
    client.download(task.round)
    data = encode_adapter(random_adapter(tiny_manifest, task.assignment.lora.rank, task.assignment.lora.alpha, 1))
    assert len(data) > 4 * PIECE
    _short(client, task, data, 2 * PIECE)
    return server, client, task, data


def _short(client: EdgeTestClient, task, data: bytes, at: int) -> None:
    """A stream that ends after `at` bytes: refused as truncated, its bytes kept."""
    with pytest.raises(grpc.RpcError) as info:
        client.upload_bytes(task.round, task.assignment.lora.rank, data, chunk=PIECE, stop_at=at)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "truncated" in info.value.details()


def _kept(client, task, data: bytes, **kwargs) -> int:
    return client.upload_status(task.round, data, **kwargs).resume_offset


def _refused(call, code: grpc.StatusCode) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, info.value.details()
    return info.value


def _detail(err: grpc.RpcError):
    return serde.error_detail_from_trailers(err.trailing_metadata())


def _accepted_once(server, client, task, data: bytes) -> None:
    """Exactly one receipt, for these bytes; the update file is them; nothing left staged."""
    data_dir = server.config.server.data_dir
    receipt = server.call(server.federation.store.get_receipt, task.round, client.client_id)
    assert receipt is not None and receipt.sha256 == hashlib.sha256(data).hexdigest()
    assert receipt.nbytes == len(data)
    assert (data_dir / "blobs" / receipt.blob_path).read_bytes() == data
    assert update_files(data_dir) == [f"round-{task.round:06d}/{client.client_id}.safetensors"]
    assert staged_files(data_dir) == []
    part = {p.client_id: p for p in status(server.address).current.participants}[client.client_id]
    assert part.state == ParticipantState.UPLOADED and part.bytes_up == len(data)


def test_a_broken_upload_is_kept_and_resumed(ready):
    server, client, task, data = ready
    assert _kept(client, task, data) == 2 * PIECE
    assert sorted(staged_files(server.config.server.data_dir)) == [
        f"round-000001/{client.client_id}.json", f"round-000001/{client.client_id}.part"]
    reply = client.upload_status(task.round, data)
    assert reply.expires_at.seconds > time.time() + 3000  # server.upload_resume_ttl_seconds: 3600
    receipt = client.upload_bytes(task.round, task.assignment.lora.rank, data, chunk=PIECE, resume_offset=2 * PIECE)
    assert receipt.bytes_received == len(data)
    _accepted_once(server, client, task, data)
    # The device's retry of the same update after a lost receipt: ALREADY_EXISTS, for either call.
    for call in (lambda: client.upload_status(task.round, data),
                 lambda: client.upload_bytes(task.round, task.assignment.lora.rank, data, resume_offset=PIECE)):
        err = _refused(call, grpc.StatusCode.ALREADY_EXISTS)
        assert _detail(err).reason == ErrorReason.UPDATE_ALREADY_ACCEPTED


def test_a_resume_can_start_before_the_end_of_the_kept_bytes(ready):
    server, client, task, data = ready
    client.upload_bytes(task.round, task.assignment.lora.rank, data, chunk=PIECE, resume_offset=PIECE + 7)
    _accepted_once(server, client, task, data)


def test_resuming_twice(ready):
    """A resumed stream that breaks again keeps its bytes too (the prefix hashed again)."""
    server, client, task, data = ready
    with pytest.raises(grpc.RpcError):
        client.upload_bytes(task.round, task.assignment.lora.rank, data, chunk=PIECE, resume_offset=2 * PIECE,
                            stop_at=4 * PIECE)
    assert _kept(client, task, data) == 4 * PIECE
    client.upload_bytes(task.round, task.assignment.lora.rank, data, chunk=PIECE, resume_offset=4 * PIECE)
    _accepted_once(server, client, task, data)


def test_a_resume_of_another_upload_is_refused_and_nothing_counts_twice(ready, tiny_manifest):
    server, client, task, data = ready
    other = encode_adapter(random_adapter(tiny_manifest, task.assignment.lora.rank, task.assignment.lora.alpha, 2))
    assert _kept(client, task, other) == 0  # another digest: none of *its* bytes are kept
    err = _refused(lambda: client.upload_bytes(task.round, task.assignment.lora.rank, other, chunk=PIECE,
                                               resume_offset=2 * PIECE), grpc.StatusCode.FAILED_PRECONDITION)
    assert "another upload" in err.details()
    detail = _detail(err)
    assert detail.reason == ErrorReason.UPLOAD_NOT_RESUMABLE and detail.metadata["resume_offset"] == "0"
    # Same digest, another size: not the same upload either.
    _refused(lambda: client.upload_bytes(task.round, task.assignment.lora.rank, data, chunk=PIECE,
                                         total_bytes=len(data) + 1, resume_offset=PIECE),
             grpc.StatusCode.FAILED_PRECONDITION)
    # Bytes of a different upload appended to the kept ones: the digest at the end refuses them.
    forged = data[: 2 * PIECE] + other[2 * PIECE :]
    assert len(forged) == len(data) or pytest.skip("adapters of one rank have one size")
    err = _refused(lambda: client.upload_bytes(task.round, task.assignment.lora.rank, forged, chunk=PIECE,
                                               sha256=hashlib.sha256(data).hexdigest(), resume_offset=2 * PIECE),
                   grpc.StatusCode.INVALID_ARGUMENT)
    assert "sha256" in err.details()
    # Nothing of the refused streams counted, nothing is left of them; the first upload is
    # gone with the forged resume (its content was refused), so it is sent again whole.
    assert server.call(server.federation.store.get_receipt, task.round, client.client_id) is None
    assert _kept(client, task, data) == 0
    client.upload_bytes(task.round, task.assignment.lora.rank, data, chunk=PIECE)
    _accepted_once(server, client, task, data)
    wait_for(lambda: status(server.address).history, what="round closed")
    assert status(server.address).history[0].metrics["updates"] == 1


def test_a_resume_past_the_kept_bytes_is_refused(ready):
    server, client, task, data = ready
    err = _refused(lambda: client.upload_bytes(task.round, task.assignment.lora.rank, data, chunk=PIECE,
                                               resume_offset=2 * PIECE + 1), grpc.StatusCode.FAILED_PRECONDITION)
    detail = _detail(err)
    assert detail.reason == ErrorReason.UPLOAD_NOT_RESUMABLE and detail.metadata["resume_offset"] == str(2 * PIECE)
    assert "only 1024 bytes of this upload are kept" in err.details()
    err = _refused(lambda: client.upload_bytes(task.round, task.assignment.lora.rank, data,
                                               resume_offset=len(data) + 1, chunks=[]),
                   grpc.StatusCode.INVALID_ARGUMENT)
    assert "past the" in err.details()
    # A chunk that does not start at resume_offset is out of order, as any gap is.
    _refused(lambda: client.upload_bytes(task.round, task.assignment.lora.rank, data, resume_offset=PIECE,
                                         chunks=[(0, data[:PIECE])]), grpc.StatusCode.INVALID_ARGUMENT)
    assert _kept(client, task, data) == PIECE  # that stream broke at its first chunk, at byte PIECE
    client.upload_bytes(task.round, task.assignment.lora.rank, data, chunk=PIECE, resume_offset=PIECE)
    _accepted_once(server, client, task, data)


def test_a_new_upload_replaces_the_kept_bytes(ready):
    server, client, task, data = ready
    client.upload_bytes(task.round, task.assignment.lora.rank, data, chunk=PIECE)  # resume_offset 0
    _accepted_once(server, client, task, data)


def test_upload_status_checks_its_input(ready):
    server, client, task, data = ready
    cases = [
        ({"sha256": "XYZ"}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"sha256": "a" * 5000}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"total_bytes": 0}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"total_bytes": 2**64 - 1}, grpc.StatusCode.RESOURCE_EXHAUSTED),
    ]
    for kwargs, code in cases:
        _refused(lambda: client.upload_status(task.round, data, **kwargs), code)
    for round_no in (task.round + 1, 2**63, 2**64 - 1):
        _refused(lambda: client.upload_status(round_no, data), grpc.StatusCode.FAILED_PRECONDITION)
    anonymous = ProtoEdge.UploadStatusRequest(round=task.round, total_bytes=len(data), sha256="0" * 64)
    _refused(lambda: client.stub.UploadStatus(anonymous, timeout=10), grpc.StatusCode.UNAUTHENTICATED)
    assert _kept(client, task, data) == 2 * PIECE  # none of that touched the kept bytes


def test_upload_status_ends_a_stream_still_open_and_keeps_its_bytes(start, clients, tiny_manifest):
    """The device's stream died but the coordinator has not noticed (a dead link, no RST): the
    status call parks it at once and answers what it kept."""
    server = start(**_settings(**{"server.upload_idle_timeout_seconds": 20.0}))
    (client,) = clients(server.address, "dev")
    task = client.wait_train()
    client.download(task.round)
    data = encode_adapter(random_adapter(tiny_manifest, task.assignment.lora.rank, task.assignment.lora.alpha, 3))
    header = ProtoEdge.UploadHeader(round=task.round, rank=task.assignment.lora.rank, num_examples=5,
                                    total_bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    sent, release = threading.Event(), threading.Event()

    def half_then_hang():
        yield ProtoEdge.UploadMessage(header=header)
        yield ProtoEdge.UploadMessage(chunk=ProtoCommon.Chunk(offset=0, data=data[:1000]))
        sent.set()
        release.wait(20)

    outcome: list[grpc.RpcError] = []

    def stream():
        try:
            client.stub.UploadUpdate(half_then_hang(), metadata=client.metadata, timeout=30)
        except grpc.RpcError as err:
            outcome.append(err)

    thread = threading.Thread(target=stream)
    thread.start()
    try:
        assert sent.wait(10)
        wait_for(lambda: any(f.endswith(".part") for f in staged_files(server.config.server.data_dir)),
                 what="stream open")
        time.sleep(0.2)  # the chunk reaches the coordinator
        started = time.monotonic()
        assert _kept(client, task, data) == 1000
        assert time.monotonic() - started < 5  # not after the idle timeout
    finally:
        release.set()
        thread.join(30)
    assert outcome and outcome[0].code() == grpc.StatusCode.FAILED_PRECONDITION, outcome
    assert "replaced" in outcome[0].details()
    client.upload_bytes(task.round, task.assignment.lora.rank, data, chunk=PIECE, resume_offset=1000)
    _accepted_once(server, client, task, data)


def test_kept_bytes_go_when_the_round_closes(ready):
    server, client, task, data = ready
    server.call(server.federation.close_round, "test", "closing early")
    wait_for(lambda: status(server.address).history, what="round closed")
    wait_for(lambda: staged_files(server.config.server.data_dir) == [], what="staging emptied")
    _refused(lambda: client.upload_status(task.round, data), grpc.StatusCode.FAILED_PRECONDITION)


def test_kept_bytes_expire(start, clients, tiny_manifest):
    server = start(**_settings(**{"server.upload_resume_ttl_seconds": 1.0}))
    (client,) = clients(server.address, "dev")
    task = client.wait_train()
    client.download(task.round)
    data = encode_adapter(random_adapter(tiny_manifest, task.assignment.lora.rank, task.assignment.lora.alpha, 4))
    _short(client, task, data, PIECE)
    assert _kept(client, task, data) == PIECE
    # The periodic sweep (every max(ttl / 4, 1 s)) removes them without anyone asking.
    wait_for(lambda: staged_files(server.config.server.data_dir) == [], what="kept bytes expired", timeout=10)
    assert _kept(client, task, data) == 0
    _refused(lambda: client.upload_bytes(task.round, task.assignment.lora.rank, data, resume_offset=PIECE),
             grpc.StatusCode.FAILED_PRECONDITION)


def test_with_resuming_off_a_broken_upload_leaves_nothing(start, clients, tiny_manifest):
    server = start(**_settings(**{"server.upload_resume_ttl_seconds": 0.0}))
    (client,) = clients(server.address, "dev")
    task = client.wait_train()
    client.download(task.round)
    data = encode_adapter(random_adapter(tiny_manifest, task.assignment.lora.rank, task.assignment.lora.alpha, 5))
    _short(client, task, data, 2 * PIECE)
    data_dir = server.config.server.data_dir
    wait_for(lambda: staged_files(data_dir) == [] and update_files(data_dir) == [], what="nothing left", timeout=5)
    assert _kept(client, task, data) == 0
    err = _refused(lambda: client.upload_bytes(task.round, task.assignment.lora.rank, data, resume_offset=PIECE),
                   grpc.StatusCode.FAILED_PRECONDITION)
    assert "upload_resume_ttl_seconds = 0" in err.details()
    client.upload_bytes(task.round, task.assignment.lora.rank, data, chunk=PIECE)
    _accepted_once(server, client, task, data)


def test_resume_after_a_coordinator_restart(tmp_path, tiny_manifest):
    """Kept bytes are on disk with their description: a restarted coordinator resumes them."""
    config = make_config(tmp_path / "data", **_settings())
    server = CoordinatorThread(config)
    client = EdgeTestClient(server.address, "dev")
    try:
        client.join(tiny_manifest.weights_sha256)
        task = client.wait_train()
        client.download(task.round)
        data = encode_adapter(random_adapter(tiny_manifest, task.assignment.lora.rank, task.assignment.lora.alpha, 6))
        _short(client, task, data, 3 * PIECE)
        server.stop()
        server = CoordinatorThread(config)
        client.close()
        token, client_id = client.token, client.client_id
        client = EdgeTestClient(server.address, "dev")
        client.token, client.client_id = token, client_id  # session tokens survive restarts
        assert _kept(client, task, data) == 3 * PIECE
        client.upload_bytes(task.round, task.assignment.lora.rank, data, chunk=PIECE, resume_offset=3 * PIECE)
        _accepted_once(server, client, task, data)
    finally:
        client.close()
        server.stop()
