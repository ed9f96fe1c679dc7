"""Faults a coordinator meets in the field, over real gRPC: a client process killed
mid-upload, a client stalling past the deadline, slow-loris streams, a full disk.
(Repeated kill -9 of the coordinator itself: bench/soak_kill9.py.)"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time

import grpc
import pytest

from rankfed.aggregation import encode_adapter
from rankfed.protocol import ParticipantState, RoundPhase
from rankfed.v1 import common_pb2 as ProtoCommon
from rankfed.v1 import edge_pb2 as ProtoEdge
from tests.coordinator.harness import MANIFEST, random_adapter, staged_files, status, update_files, wait_for

UPLOAD_THEN_HANG = textwrap.dedent("""
    import hashlib, sys, time, grpc
    from rankfed.v1 import common_pb2 as C, edge_pb2 as E, edge_pb2_grpc
    address, token, round_no, rank, path = sys.argv[1:6]
    data = open(path, "rb").read()
    def messages():
        yield E.UploadMessage(header=E.UploadHeader(round=int(round_no), rank=int(rank), num_examples=5,
                              total_bytes=len(data), sha256=hashlib.sha256(data).hexdigest()))
        yield E.UploadMessage(chunk=C.Chunk(offset=0, data=data[:min(1024, len(data) // 2)]))
        print("HALF", flush=True)
        time.sleep(600)
    stub = edge_pb2_grpc.EdgeServiceStub(grpc.insecure_channel(address))
    stub.UploadUpdate(messages(), metadata=(("authorization", "Bearer " + token),))
""")


def _update(manifest, task, seed: int):
    return random_adapter(manifest, task.assignment.lora.rank, task.assignment.lora.alpha, seed)


def _header(task, data: bytes) -> ProtoEdge.UploadMessage:
    return ProtoEdge.UploadMessage(header=ProtoEdge.UploadHeader(
        round=task.round, rank=task.assignment.lora.rank, num_examples=5, total_bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest()))


def _participant_state(server, client) -> int:
    return {p.client_id: p.state for p in status(server.address).current.participants}[client.client_id]


def test_client_killed_mid_upload_round_completes_on_quorum(start, clients, tiny_manifest, tmp_path):
    server = start(**{"federation.min_clients": 2, "federation.clients_per_round": 3,
                      "federation.straggler_grace_seconds": 2.0, "federation.rounds": 1,
                      "server.max_chunk_bytes": 1024})
    a, b, victim = clients(server.address, "a", "b", "victim")  # three participants, quorum two
    tasks = [c.wait_train() for c in (a, b, victim)]
    for c, t in zip((a, b, victim), tasks):
        c.download(t.round)
    blob = tmp_path / "update.safetensors"
    blob.write_bytes(encode_adapter(_update(tiny_manifest, tasks[2], 9)))
    proc = subprocess.Popen(
        [sys.executable, "-c", UPLOAD_THEN_HANG, server.address, victim.token, str(tasks[2].round),
         str(tasks[2].assignment.lora.rank), str(blob)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "HALF", proc.stderr.read()
        data_dir = server.config.server.data_dir
        part = f"round-000001/{victim.client_id}.part"
        wait_for(lambda: part in staged_files(data_dir), what="partial file")
        assert _participant_state(server, victim) == ParticipantState.UPLOADING
    finally:
        proc.kill()  # SIGKILL: no goodbye on the wire, the kernel resets the connection
        proc.communicate(timeout=10)
    # The broken stream's bytes are kept for a resume (described by a .json), never as an update.
    wait_for(lambda: f"round-000001/{victim.client_id}.json" in staged_files(data_dir), what="partial kept",
             timeout=15)
    assert update_files(data_dir) == []
    wait_for(lambda: _participant_state(server, victim) == ParticipantState.TRAINING,
             what="victim back to training")
    for i, (c, t) in enumerate(zip((a, b), tasks)):
        c.upload(t.round, _update(tiny_manifest, t, i), chunk=1024)
    # Quorum (2) is in: straggler_grace_seconds later the round closes without the victim.
    wait_for(lambda: status(server.address).done, what="round done on quorum", timeout=30)
    done = status(server.address).history[-1]
    assert done.phase == RoundPhase.DONE and done.metrics["updates"] == 2
    assert {p.device_name: p.state for p in done.participants}["victim"] == ParticipantState.LATE
    assert sorted(update_files(data_dir)) == sorted(f"round-000001/{c.client_id}.safetensors" for c in (a, b))
    assert staged_files(data_dir) == []  # the closed round took the victim's kept bytes with it


def test_client_stalling_mid_upload_past_the_deadline(start, clients, tiny_manifest):
    server = start(**{
        "federation.min_clients": 2, "federation.rounds": 1, "federation.round_deadline_seconds": 4.0,
        "federation.straggler_grace_seconds": 60.0, "server.upload_idle_timeout_seconds": 6.0,
        "federation.clients_per_round": 3,
    })
    a, b, slow = clients(server.address, "a", "b", "slow")
    tasks = [c.wait_train() for c in (a, b, slow)]
    for c, t in zip((a, b, slow), tasks):
        c.download(t.round)
    for i, (c, t) in enumerate(zip((a, b), tasks)):
        c.upload(t.round, _update(tiny_manifest, t, i))
    data = encode_adapter(_update(tiny_manifest, tasks[2], 7))

    def stalled():
        yield _header(tasks[2], data)
        yield ProtoEdge.UploadMessage(chunk=ProtoCommon.Chunk(offset=0, data=data[:100]))
        time.sleep(12)  # past the round deadline and past the idle timeout

    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        slow.stub.UploadUpdate(stalled(), metadata=slow.metadata, timeout=30)
    # The round did not wait for the stalled stream: it closed at its deadline with the quorum.
    history = status(server.address).history
    assert history and history[-1].phase == RoundPhase.DONE and history[-1].metrics["updates"] == 2
    states = {p.device_name: p.state for p in history[-1].participants}
    assert states["slow"] == ParticipantState.LATE
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, info.value.details()
    assert "upload_idle_timeout_seconds" in info.value.details()
    assert time.monotonic() - started < 11
    assert len(update_files(server.config.server.data_dir)) == 2  # no partial file of the staller
    # A late upload afterwards gets a clear precondition failure.
    with pytest.raises(grpc.RpcError) as late:
        slow.upload(tasks[2].round, _update(tiny_manifest, tasks[2], 7))
    assert late.value.code() == grpc.StatusCode.FAILED_PRECONDITION


@pytest.fixture
def one_open(start, clients, tiny_manifest):
    server = start(**{"federation.min_clients": 1, "federation.clients_per_round": 1, "federation.rounds": 1,
                      "server.upload_idle_timeout_seconds": 1.0, "server.upload_total_timeout_seconds": 2.5,
                      "federation.straggler_grace_seconds": 0.0})
    (client,) = clients(server.address, "dev")
    task = client.wait_train()
    client.download(task.round)
    return server, client, task


def _slow_loris(client, messages, timeout=20) -> grpc.RpcError:
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        client.stub.UploadUpdate(messages, metadata=client.metadata, timeout=timeout)
    assert time.monotonic() - started < 8
    return info.value


def test_slow_loris_streams_are_cut(one_open, tiny_manifest):
    server, client, task = one_open
    data = encode_adapter(_update(tiny_manifest, task, 0))

    def silent():  # opens the stream, sends nothing
        time.sleep(10)
        yield from ()

    def header_only():
        yield _header(task, data)
        time.sleep(10)

    def trickle():  # never idle for 1 s, but slower than the 2.5 s total allows
        yield _header(task, data)
        for offset in range(0, len(data), 10):
            time.sleep(0.5)
            yield ProtoEdge.UploadMessage(chunk=ProtoCommon.Chunk(offset=offset, data=data[offset:offset + 10]))

    for messages, fragment in ((silent(), "idle"), (header_only(), "idle"), (trickle(), "total")):
        error = _slow_loris(client, messages)
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error.details()
        assert f"upload_{fragment}_timeout_seconds" in error.details()
        wait_for(lambda: update_files(server.config.server.data_dir) == [], what="no partial file", timeout=5)
    assert _participant_state(server, client) == ParticipantState.TRAINING
    metrics = server.coordinator.metrics
    wait_for(lambda: metrics.sample("rankfed_uploads_rejected_total", code="DEADLINE_EXCEEDED", reason="idle_timeout") == 2
             and metrics.sample("rankfed_uploads_rejected_total", code="DEADLINE_EXCEEDED", reason="total_timeout") == 1,
             what="timeouts counted", timeout=5)
    assert client.upload(task.round, _update(tiny_manifest, task, 0)).bytes_received == len(data)


def test_message_over_the_receive_limit_is_refused(one_open, tiny_manifest):
    server, client, task = one_open
    huge = b"\0" * (server.config.server.max_receive_message_bytes + 1)
    error = _slow_loris(client, iter([_header(task, huge), ProtoEdge.UploadMessage(
        chunk=ProtoCommon.Chunk(offset=0, data=huge))]))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    wait_for(lambda: update_files(server.config.server.data_dir) == [], what="no partial file", timeout=5)
    assert client.upload(task.round, _update(tiny_manifest, task, 0)).bytes_received > 0


# ---------------------------------------------------------------- full disk


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs (root only); skipped where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_during_upload_is_a_clear_error_and_the_round_goes_on(small_disk, tmp_path, start, clients):
    # 16 modules of 512x512 at rank 4: a 256 KiB update, a 256 KiB global adapter.
    manifest_path = tmp_path / "manifest.json"
    manifest_path.write_text(json.dumps({
        "format": "rankfed-model-manifest/1", "model_id": "disk-test", "weights_sha256": "ab" * 32,
        "task": "causal-lm", "target_modules": ["q_proj"], "modules_to_save": [],
        "modules": {f"model.layers.{i}.self_attn.q_proj": [512, 512] for i in range(16)}, "dense": {},
    }))
    from rankfed.protocol.manifest import load_manifest

    manifest = load_manifest(manifest_path)
    server = start(**{
        "server.data_dir": str(small_disk / "data"), "model.manifest": str(manifest_path), "lora.max_rank": 4,
        "federation.min_clients": 1, "federation.clients_per_round": 1, "federation.rounds": 1,
        "federation.straggler_grace_seconds": 0.0, "server.max_chunk_bytes": 65536,
    })
    (client,) = clients(server.address, "dev", weights_sha256=manifest.weights_sha256)
    task = client.wait_train()
    client.download(task.round)
    data = encode_adapter(_update(manifest, task, 0))
    assert len(data) > 200_000
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    ballast = small_disk / "ballast"
    ballast.write_bytes(b"\0" * (free - 96 * 1024))  # room for SQLite, not for the update

    with pytest.raises(grpc.RpcError) as info:
        client.upload(task.round, _update(manifest, task, 0))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
    assert "disk" in info.value.details().lower() or "space" in info.value.details().lower()
    assert update_files(small_disk / "data") == []
    # The status reaches the client a moment before the servicer's bookkeeping finishes.
    wait_for(lambda: server.coordinator.metrics.sample(
        "rankfed_uploads_rejected_total", code="UNAVAILABLE", reason="disk_full") == 1,
             what="disk_full counted", timeout=5)
    assert _participant_state(server, client) == ParticipantState.TRAINING

    ballast.unlink()  # the operator frees space; the device retries
    assert client.upload(task.round, _update(manifest, task, 0)).bytes_received == len(data)
    wait_for(lambda: status(server.address).done, what="round done")
    assert status(server.address).history[-1].phase == RoundPhase.DONE


def _big_manifest(tmp_path, modules: int = 64, width: int = 8192) -> str:
    """The tiny manifest with `modules` width x width modules: an adapter of
    modules * 2 * width * 4 bytes per rank (16 MiB at rank 4), more than HTTP/2 flow
    control lets through to a client that stops reading (about 6 MiB here)."""
    data = json.loads(MANIFEST.read_text())
    data["modules"] = {f"bert.encoder.layer.{i // 2}.attention.self.{'query' if i % 2 == 0 else 'value'}":
                       [width, width] for i in range(modules)}
    data["dense"] = {"classifier.weight": [3, width], "classifier.bias": [3]}
    path = tmp_path / "big-manifest.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize("idle, total, setting", [
    (1.0, 60.0, "server.download_idle_timeout_seconds"),
    (30.0, 1.5, "server.download_total_timeout_seconds"),
])
def test_a_download_the_client_stops_reading_is_cut(start, clients, tmp_path, idle, total, setting):
    """A client that reads the manifest and then nothing holds its download stream only
    until the idle or total limit: the handler ends (DEADLINE_EXCEEDED in the metrics),
    the client gets DEADLINE_EXCEEDED naming the setting once it reads on, and the
    coordinator keeps serving (the same device then downloads its adapter in full)."""
    server = start(**{
        "model.manifest": _big_manifest(tmp_path), "federation.min_clients": 1,
        "federation.clients_per_round": 1, "federation.rounds": 1,
        "server.download_idle_timeout_seconds": idle, "server.download_total_timeout_seconds": total,
    })
    (client,) = clients(server.address, "dev")
    task = client.wait_train()
    stalled = client.stub.DownloadAdapter(ProtoEdge.DownloadRequest(round=task.round), metadata=client.metadata,
                                          timeout=60)
    first = next(stalled)
    assert first.WhichOneof("kind") == "manifest" and first.manifest.total_bytes > 16 * 10**6
    cut = server.coordinator.metrics.rpcs.labels(method="DownloadAdapter", code="DEADLINE_EXCEEDED")
    # The limit, plus servicer_errors.STATUS_SEND_SECONDS that the handler waits for the
    # status to go out before it leaves it queued and ends.
    wait_for(lambda: cut._value.get() == 1, timeout=min(idle, total) + 15, what="the stalled download cut")
    received = 0
    with pytest.raises(grpc.RpcError) as info:
        for message in stalled:  # what flow control let through, then the status
            received += len(message.chunk.data)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, info.value.details()
    assert setting in info.value.details() and "offset" in info.value.details()
    assert 0 < received < first.manifest.total_bytes
    # Still serving: the same device downloads its adapter in full.
    download = client.download(task.round)
    assert hashlib.sha256(download.data).hexdigest() == download.manifest.sha256
