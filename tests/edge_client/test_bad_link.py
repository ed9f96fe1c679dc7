"""The edge transport over a bad link to a real coordinator: a TCP relay (tests/faultlink.py)
cuts the connection mid-transfer, takes the link down and up, or lets it go silent. A
broken upload resumes from the bytes the coordinator kept, a broken download from the
bytes received; the sha256 at the end covers every byte, and one update counts."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import pytest

from rankfed.aggregation import encode_adapter
from rankfed.edge_client.transport import EdgeTransport, RetryPolicy
from rankfed.protocol import Capability, DeviceClass, JoinRequest, TrainTask, UploadHeader
from rankfed.protocol.manifest import load_manifest
from tests.coordinator.harness import (
    CoordinatorThread,
    make_config,
    random_adapter,
    staged_files,
    update_files,
    wait_for,
)
from tests.faultlink import FaultyLink

WEIGHTS = "5e" * 32
FAST = RetryPolicy(initial_backoff_s=0.05, max_backoff_s=0.5, max_elapsed_s=60.0)


def write_manifest(path: Path, modules: int = 16, dim: int = 2048) -> Path:
    """A manifest whose rank-r update is r * 16 KiB per module (r = 4: 1 MiB in all)."""
    path.write_text(json.dumps({
        "format": "rankfed-model-manifest/1", "model_id": "bad-link", "weights_sha256": WEIGHTS,
        "task": "causal-lm", "target_modules": ["q_proj"], "modules_to_save": [],
        "modules": {f"model.layers.{i}.self_attn.q_proj": [dim, dim] for i in range(modules)}, "dense": {},
    }))
    return path


@pytest.fixture
def wired(tmp_path):
    """A coordinator with one round open, a relay in front of it, and a device that joined
    through the relay and holds its TRAIN task."""
    manifest_path = write_manifest(tmp_path / "manifest.json")
    server = CoordinatorThread(make_config(tmp_path / "data", **{
        "model.manifest": str(manifest_path), "federation.rounds": 1, "federation.min_clients": 1,
        "federation.clients_per_round": 1, "federation.straggler_grace_seconds": 0.0,
        "server.upload_idle_timeout_seconds": 1.5, "server.max_upload_bytes": 64 * 1024 * 1024,
    }))
    link = FaultyLink(server.address).start()
    # Slower than loopback, as a device's link is: the coordinator keeps up with the wire, so
    # what it kept is close to where the link broke. (On bare loopback gRPC takes in far more
    # than the handler has written when the connection drops, and drops it with the call.)
    link.throttle(4 * 1024 * 1024)
    transport = EdgeTransport(link.address, retry=FAST, seed=0)
    transport.join(JoinRequest(device_name="dev", capability=Capability(
        device_class=DeviceClass.CPU, memory_total_bytes=8 * 10**9, cpu_cores=4, compute_gflops=20.0),
        base_model_sha256=WEIGHTS, num_examples=10))
    deadline = time.monotonic() + 30
    while not isinstance(task := transport.get_task(2.0), TrainTask):
        assert time.monotonic() < deadline, "no TRAIN task"
    yield server, link, transport, task, load_manifest(manifest_path)
    transport.close()
    link.close()
    server.stop()


def _update(manifest, task: TrainTask) -> tuple[UploadHeader, bytes]:
    lora = task.assignment.lora
    data = encode_adapter(random_adapter(manifest, lora.rank, lora.alpha, seed=1))
    assert len(data) >= 512 * 1024
    return UploadHeader(round=task.round, rank=lora.rank, num_examples=10, total_bytes=len(data),
                        sha256=hashlib.sha256(data).hexdigest()), data


def _counted_once(server, transport: EdgeTransport, task: TrainTask, data: bytes) -> None:
    store = server.federation.store
    receipt = server.call(store.get_receipt, task.round, _client_id(server))
    assert receipt is not None and receipt.sha256 == hashlib.sha256(data).hexdigest()
    data_dir = server.config.server.data_dir
    assert (data_dir / "blobs" / receipt.blob_path).read_bytes() == data
    assert len(update_files(data_dir)) == 1 and staged_files(data_dir) == []


def _client_id(server) -> str:
    (client,) = server.call(server.federation.list_clients)
    return client.client_id


@pytest.mark.parametrize("resume", [True, False], ids=["resume", "restart"])
def test_an_upload_cut_midway_resumes(wired, resume):
    server, link, transport, task, manifest = wired
    transport.download(task.round)
    header, data = _update(manifest, task)
    transport.resume_uploads = resume
    link.cut_after(up=[len(data) // 2])
    receipt = transport.upload(header, data)
    assert receipt.sha256 == header.sha256 and not receipt.duplicate
    stats = transport.last_upload
    assert link.cuts == 1 and stats.attempts == 2
    if resume:
        assert len(stats.resumed_from) == 1 and 0 < stats.resumed_from[0] <= len(data) // 2
        assert link.bytes_up < 1.15 * len(data)  # the cut half was not sent again
    else:
        assert stats.resumed_from == [] and link.bytes_up > 1.45 * len(data)
    _counted_once(server, transport, task, data)


def test_an_upload_resumes_after_the_link_goes_down_and_up(wired):
    """Down: connections reset and new ones refused for a while (UploadStatus retries too)."""
    server, link, transport, task, manifest = wired
    transport.download(task.round)
    header, data = _update(manifest, task)
    link.fail_after("up", len(data) // 3, "down")

    def come_back() -> None:
        wait_for(lambda: link.cuts == 1, what="link down", timeout=30)
        time.sleep(1.5)
        link.up()

    thread = threading.Thread(target=come_back)
    thread.start()
    try:
        receipt = transport.upload(header, data)
    finally:
        thread.join(60)
    assert receipt.sha256 == header.sha256
    stats = transport.last_upload
    assert stats.attempts >= 2 and stats.resumed_from and stats.resumed_from[-1] > 0
    assert link.bytes_up < 1.2 * len(data)
    _counted_once(server, transport, task, data)


def test_an_upload_resumes_after_the_link_goes_silent(wired):
    """A black hole (no reset): the coordinator notices first (upload_idle_timeout_seconds)
    and keeps the bytes; when the link comes back the device learns its stream ended, and
    resumes."""
    server, link, transport, task, manifest = wired
    transport.download(task.round)
    header, data = _update(manifest, task)
    link.fail_after("up", len(data) // 3, "stall")

    def come_back() -> None:
        wait_for(lambda: link.stalls == 1, what="link silent", timeout=30)
        wait_for(lambda: any(f.endswith(".json") for f in staged_files(server.config.server.data_dir)),
                 what="the coordinator kept the stalled stream", timeout=30)
        link.up()

    thread = threading.Thread(target=come_back)
    thread.start()
    try:
        receipt = transport.upload(header, data)
    finally:
        thread.join(60)
    assert receipt.sha256 == header.sha256
    stats = transport.last_upload
    assert stats.attempts == 2 and stats.resumed_from and stats.resumed_from[0] > 0
    _counted_once(server, transport, task, data)


def test_a_download_cut_midway_resumes_from_the_bytes_received(wired):
    server, link, transport, task, manifest = wired
    link.cut_after(down=[300_000, 700_000])
    result, blob = transport.download(task.round, expected_sha256=task.adapter_sha256)
    assert hashlib.sha256(blob).hexdigest() == result.sha256 == task.adapter_sha256
    stats = transport.last_download
    assert link.cuts == 2 and stats.attempts == 3
    assert len(stats.resumed_from) == 2 and 0 < stats.resumed_from[0] < stats.resumed_from[1] < len(blob)
    assert stats.payload_bytes == len(blob)  # not a byte taken twice
    assert link.bytes_down < 1.3 * len(blob)  # (what the cuts caught in flight is on the wire twice)
