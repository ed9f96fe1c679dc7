"""kill -9 of the real coordinator process in the middle of a round, restart on the same
data directory: the round goes on with every acknowledged update, clients keep their
session tokens, and a half-received upload leaves no trace."""

from __future__ import annotations

import hashlib
import threading
import time

import grpc
import numpy as np

from rankfed.aggregation import encode_adapter, get_method
from rankfed.coordinator.export import global_adapter_dir
from rankfed.protocol import ParticipantState, RoundPhase
from rankfed.protocol.artifact import ADAPTER_FILE
from rankfed.v1 import common_pb2 as ProtoCommon
from rankfed.v1 import edge_pb2 as ProtoEdge
from tests.coordinator.harness import (
    MANIFEST,
    CoordinatorProcess,
    EdgeTestClient,
    decode,
    random_adapter,
    staged_files,
    status,
    update_files,
    wait_for,
)

CONFIG = f"""
[server]
loopback_operators = true
max_chunk_bytes = 4096
long_poll_seconds = 2.0
[model]
manifest = "{MANIFEST}"
[federation]
rounds = 1
method = "rbla"
min_clients = 3
round_deadline_seconds = 120.0
straggler_grace_seconds = 60.0
heartbeat_interval_seconds = 1.0
heartbeat_timeout_seconds = 30.0
"""


def test_kill9_mid_round_then_resume(tmp_path, tiny_manifest):
    config = tmp_path / "coordinator.toml"
    config.write_text(CONFIG)
    data_dir = tmp_path / "data"
    proc = CoordinatorProcess(config, data_dir, tmp_path / "coordinator.log")
    address = proc.start()
    fleet = [EdgeTestClient(address, name, device) for name, device in (("a", "mobile"), ("b", "cpu"), ("c", "cuda"))]
    try:
        for client in fleet:
            client.join(tiny_manifest.weights_sha256)
        tasks = [client.wait_train() for client in fleet]
        starts = [decode(client.download(task.round).data) for client, task in zip(fleet, tasks)]
        updates = [
            random_adapter(tiny_manifest, t.assignment.lora.rank, t.assignment.lora.alpha, seed=i)
            for i, t in enumerate(tasks)
        ]
        receipts = [fleet[i].upload(1, updates[i], num_examples=10 * (i + 1)) for i in (0, 1)]

        # c is halfway through its upload when the coordinator dies.
        data = encode_adapter(updates[2])
        half_sent = threading.Event()

        def slow_upload():
            def messages():
                yield ProtoEdge.UploadMessage(header=ProtoEdge.UploadHeader(
                    round=1, rank=tasks[2].assignment.lora.rank, num_examples=30, total_bytes=len(data),
                    sha256=hashlib.sha256(data).hexdigest()))
                yield ProtoEdge.UploadMessage(chunk=ProtoCommon.Chunk(offset=0, data=data[:4096]))
                half_sent.set()
                time.sleep(30)

            try:
                fleet[2].stub.UploadUpdate(messages(), metadata=fleet[2].metadata, timeout=20)
            except grpc.RpcError:
                pass

        uploader = threading.Thread(target=slow_upload, daemon=True)
        uploader.start()
        half_sent.wait(10)
        wait_for(lambda: any(p.endswith(".part") for p in staged_files(data_dir)), what="partial file")
        proc.kill9()

        address = proc.start(address=address)  # same port: devices need not be told anything
        assert sorted(update_files(data_dir)) == sorted(f"round-000001/{c.client_id}.safetensors" for c in fleet[:2])
        assert staged_files(data_dir) == []  # a stream that never parked left bytes nobody can name
        st = status(address)
        assert st.current.round == 1 and st.current.phase == RoundPhase.TRAINING
        states = {p.device_name: p.state for p in st.current.participants}
        assert states["a"] == states["b"] == ParticipantState.UPLOADED

        # Old session tokens still work; the retry of an acknowledged update is recognised.
        for client in fleet:
            client.channel.close()
            client.channel = grpc.insecure_channel(address)
            client.stub = type(client.stub)(client.channel)
        try:
            fleet[0].upload(1, updates[0], num_examples=10)
            raise AssertionError("re-upload of an acknowledged update was accepted twice")
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.ALREADY_EXISTS and receipts[0].sha256 in exc.details()
        task = fleet[2].wait_train()
        assert task.round == 1
        fleet[2].upload(1, updates[2], num_examples=30)

        wait_for(lambda: status(address).done, what="federation done", timeout=60)
        record = status(address).history[0]
        assert record.phase == RoundPhase.DONE and record.metrics["updates"] == 3

        # The global adapter is exactly the rule applied to the three acknowledged updates.
        initial = decode((global_adapter_dir(data_dir, 0) / ADAPTER_FILE).read_bytes())
        expected = get_method("rbla").aggregate(updates, [10.0, 20.0, 30.0], global_rank=16, previous=initial)
        got = decode((global_adapter_dir(data_dir, 1) / ADAPTER_FILE).read_bytes())
        for name, module in expected.modules.items():
            np.testing.assert_allclose(got.modules[name].delta(False), module.delta(False), rtol=1e-5, atol=1e-6)
        assert len(starts) == 3
    finally:
        for client in fleet:
            client.close()
        assert proc.terminate() == 0, (tmp_path / "coordinator.log").read_text()[-3000:]
