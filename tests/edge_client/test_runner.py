"""The client loop against a scripted fake transport (no grpc): rounds, rank changes,
heartbeats, stale rounds, HetLoRA pruning, model identity."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from rankfed.aggregation import (
    Adapter,
    AdapterSpec,
    LoraModule,
    decode_adapter,
    encode_adapter,
)
from rankfed.edge_client.errors import (
    ModelMismatchError,
    RejectedError,
    StaleRoundError,
)
from rankfed.edge_client.manifest import build_manifest
from rankfed.edge_client.model import weights_sha256
from rankfed.edge_client.runner import EdgeRunner, RunnerConfig
from rankfed.protocol import (
    Assignment,
    BaseModel,
    Capability,
    DoneTask,
    HeartbeatResult,
    JoinResult,
    LoraSettings,
    TrainTask,
    TransferManifest,
    UploadReceipt,
    WaitTask,
)


def _lora(rank: int) -> LoraSettings:
    return LoraSettings(rank=rank, alpha=2.0 * rank, target_modules=("query", "value"), modules_to_save=("classifier",))


class FakeTransport:
    def __init__(self, spec: AdapterSpec, sha: str, tasks: list, *, round_open: bool = True) -> None:
        self.spec, self.sha, self.tasks = spec, sha, list(tasks)
        self.round_open = round_open
        self.uploads: list[tuple] = []
        self.heartbeats: list[tuple] = []
        self.joins: list = []
        self.left = ""
        self.upload_bytes_per_second = 0.0
        self.download_bytes_per_second = 0.0
        self.stale_upload_rounds: set[int] = set()
        self.rejected_upload_rounds: set[int] = set()
        self._blobs: dict[int, bytes] = {}
        self.nonzero_b = False

    def join(self, request):
        self.joins.append(request)
        return JoinResult(
            client_id="c-7", session_token="t", assignment=Assignment(_lora(4)),
            base_model=BaseModel(id="tiny", weights_sha256=self.sha, task="sequence-classification", num_labels=3),
            heartbeat_interval_s=0.05, federation_id="f", max_chunk_bytes=1 << 20,
        )

    def get_task(self, max_wait_s):
        return self.tasks.pop(0)

    def download(self, round, *, expected_sha256="", progress=None, full=False):
        if round == 0:
            blob = self._blobs[max(self._blobs)]
            return TransferManifest(round=0, rank=4, total_bytes=len(blob), sha256=""), blob
        task = next(t for t in self._all if t.round == round)
        rank = task.assignment.lora.rank
        adapter = self.spec.init_adapter(rank=rank, alpha=2.0 * rank, seed=round)
        if self.nonzero_b:  # a later round's global: B != 0, so the HetLoRA tail score is > 0
            rng = np.random.default_rng(round)
            adapter = Adapter(
                {n: LoraModule(m.a, rng.normal(0, 0.1, m.b.shape), m.alpha) for n, m in adapter.modules.items()},
                adapter.dense,
            )
        blob = encode_adapter(adapter)
        self._blobs[round] = blob
        if progress:
            progress(len(blob), len(blob))
        return TransferManifest(round=round, rank=rank, total_bytes=len(blob), sha256=hashlib.sha256(blob).hexdigest()), blob

    def upload(self, header, blob, *, progress=None):
        if header.round in self.stale_upload_rounds:
            raise StaleRoundError("round closed", code="FAILED_PRECONDITION")
        if header.round in self.rejected_upload_rounds:
            raise RejectedError("update rejected: missing LoRA module 'x'", code="INVALID_ARGUMENT")
        self.uploads.append((header, blob))
        self.upload_bytes_per_second = 1e6
        return UploadReceipt(round=header.round, bytes_received=len(blob), sha256=header.sha256)

    def heartbeat(self, round, state, progress):
        self.heartbeats.append((round, state, progress))
        return HeartbeatResult(next_in_s=0.05, round_open=self.round_open)

    def leave(self, reason):
        self.left = reason


def _train(round: int, rank: int, steps: int = 4) -> TrainTask:
    return TrainTask(round=round, assignment=Assignment(_lora(rank)), local_steps=steps, learning_rate=0.01,
                     batch_size=8, deadline=0.0, seed=5)


@pytest.fixture(scope="module")
def spec_and_sha(bert_dir):
    m = build_manifest(bert_dir, task="sequence-classification", num_labels=3, target_modules=("query", "value"))
    return AdapterSpec(modules=m["modules"], dense=m["dense"]), weights_sha256(bert_dir)


def _runner(bert_dir, cls_data, transport, tmp_path=None, **overrides):
    config = RunnerConfig(model_dir=bert_dir, data_path=cls_data, device_name="dev", out_dir=tmp_path, **overrides)
    events: list[tuple[str, dict]] = []
    runner = EdgeRunner(transport, config, on_event=lambda n, f: events.append((n, f)), capability=Capability(cpu_cores=2))
    return runner, events


def test_rounds_follow_the_assigned_rank(bert_dir, cls_data, spec_and_sha, tmp_path):
    spec, sha = spec_and_sha
    tasks = [WaitTask(retry_after_s=0.0), _train(1, 4), _train(2, 2), _train(3, 2), DoneTask(final_round=3)]
    transport = FakeTransport(spec, sha, tasks)
    transport._all = [t for t in tasks if isinstance(t, TrainTask)]
    runner, events = _runner(bert_dir, cls_data, transport, tmp_path)
    summary = runner.run()
    assert [r["round"] for r in summary.rounds] == [1, 2, 3]
    ranks = [decode_adapter(blob).ranks for _, blob in transport.uploads]
    assert [set(r.values()) for r in ranks] == [{4}, {2}, {2}]
    for header, blob in transport.uploads:
        assert header.sha256 == hashlib.sha256(blob).hexdigest() and header.total_bytes == len(blob)
        assert header.num_examples == 60 and header.metrics.steps == 4
        update = decode_adapter(blob, spec=spec)
        assert all(abs(m.b).sum() > 0 for m in update.modules.values())  # it trained
    rebuilt = [f for n, f in events if n == "model"]
    assert len(rebuilt) == 2  # rank 4, then rank 2 once (round 3 reuses the model)
    assert transport.heartbeats and transport.left == "federation done"
    assert summary.final_adapter_path and (tmp_path / "adapter_model.safetensors").exists()
    assert [n for n, _ in events].count("rejoin") == 1  # bandwidth measured by the first upload
    assert transport.joins[-1].capability.upload_bytes_per_second == 1e6


def test_a_refused_update_skips_the_round_not_the_federation(bert_dir, cls_data, spec_and_sha):
    spec, sha = spec_and_sha
    tasks = [_train(1, 4), _train(2, 4), DoneTask(final_round=2)]
    transport = FakeTransport(spec, sha, tasks)
    transport._all = [t for t in tasks if isinstance(t, TrainTask)]
    transport.rejected_upload_rounds = {1}
    runner, events = _runner(bert_dir, cls_data, transport)
    summary = runner.run()
    assert [r["round"] for r in summary.rounds] == [2]
    rejected = [f for n, f in events if n == "rejected"]
    assert rejected == [{"round": 1, "code": "INVALID_ARGUMENT", "detail": "update rejected: missing LoRA module 'x'"}]


def test_closed_round_abandons_training(bert_dir, cls_data, spec_and_sha):
    spec, sha = spec_and_sha
    tasks = [_train(1, 4, steps=400), DoneTask(final_round=1)]
    transport = FakeTransport(spec, sha, tasks, round_open=False)
    transport._all = tasks[:1]
    runner, events = _runner(bert_dir, cls_data, transport)
    summary = runner.run()
    assert summary.rounds == [] and transport.uploads == []
    assert any(n == "abandoned" for n, _ in events)


def test_stale_upload_goes_back_to_get_task(bert_dir, cls_data, spec_and_sha):
    spec, sha = spec_and_sha
    tasks = [_train(1, 4), _train(2, 4), DoneTask(final_round=2)]
    transport = FakeTransport(spec, sha, tasks)
    transport._all = tasks[:2]
    transport.stale_upload_rounds = {1}
    runner, events = _runner(bert_dir, cls_data, transport)
    summary = runner.run()
    assert [r["round"] for r in summary.rounds] == [2]
    assert ("stale", ) == tuple(n for n, _ in events if n == "stale")


def test_hetlora_self_pruning_uploads_a_lower_rank(bert_dir, cls_data, spec_and_sha):
    spec, sha = spec_and_sha
    tasks = [_train(1, 4, steps=10), DoneTask(final_round=1)]
    transport = FakeTransport(spec, sha, tasks)
    transport._all = tasks[:1]
    transport.nonzero_b = True
    runner, events = _runner(bert_dir, cls_data, transport, hetlora_lambda=1.0, hetlora_gamma=0.5)
    runner.run()
    header, blob = transport.uploads[0]
    assert header.rank == 2 and set(decode_adapter(blob).ranks.values()) == {2}
    assert ("pruned", {"round": 1, "from_rank": 4, "to_rank": 2}) in events


def test_max_rounds_leaves_early(bert_dir, cls_data, spec_and_sha):
    spec, sha = spec_and_sha
    tasks = [_train(1, 4), _train(2, 4)]
    transport = FakeTransport(spec, sha, tasks)
    transport._all = tasks
    runner, _ = _runner(bert_dir, cls_data, transport, max_rounds=1)
    assert len(runner.run().rounds) == 1 and transport.left == "max rounds reached"


def test_other_base_model_is_refused(bert_dir, cls_data, spec_and_sha):
    spec, _ = spec_and_sha
    transport = FakeTransport(spec, "cd" * 32, [])
    runner, _ = _runner(bert_dir, cls_data, transport)
    with pytest.raises(ModelMismatchError, match="weights sha256 cdcd.*point --model"):
        runner.run()


def test_frozen_layer_cache_trains_and_uploads_the_top_layer_only(bert_dir, cls_data):
    m = build_manifest(bert_dir, task="sequence-classification", num_labels=3, target_modules=("query", "value"),
                       freeze_below_layer=1)
    assert m["modules"] and all(".layer.1." in name for name in m["modules"])
    transport = FakeTransport(AdapterSpec(modules=m["modules"], dense=m["dense"]), weights_sha256(bert_dir),
                              [_train(1, 4), _train(2, 4), DoneTask(final_round=2)])
    transport._all = [t for t in transport.tasks if isinstance(t, TrainTask)]
    runner, events = _runner(bert_dir, cls_data, transport, freeze_below_layer=1)
    summary = runner.run()
    assert [r["round"] for r in summary.rounds] == [1, 2]
    caches = [f for n, f in events if n == "prefix_cache"]
    assert len(caches) == 1 and caches[0]["layer"] == 1 and caches[0]["examples"] == 60  # built once, both rounds
    for header, blob in transport.uploads:
        assert sorted(decode_adapter(blob).modules) == sorted(m["modules"])
        assert np.isfinite(header.metrics.loss_last)
