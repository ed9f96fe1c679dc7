"""The Federation core driven directly (no gRPC): the failure paths that are hard to time
over a socket — a call cancelled after its last chunk, an aggregation that fails, a round
loop that dies."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import time

import pytest

from rankfed.aggregation import AggregationError, encode_adapter
from rankfed.coordinator.federation import Federation
from rankfed.coordinator.store import MemoryStore
from rankfed.coordinator.store.blobs import BlobStore
from rankfed.coordinator.uploads import UploadSession
from rankfed.protocol import (
    Capability,
    Chunk,
    DeviceClass,
    DownloadRequest,
    JoinRequest,
    RoundPhase,
    TrainTask,
    UploadHeader,
)
from tests.coordinator.harness import (
    make_config,
    manifest,
    random_adapter,
    update_files,
)


async def _federation(tmp_path, **overrides) -> Federation:
    config = make_config(tmp_path / "data", **{
        "federation.rounds": 2, "federation.min_clients": 1, "federation.clients_per_round": 1,
        "federation.straggler_grace_seconds": 0.0, **overrides,
    })
    fed = Federation(config, MemoryStore(), BlobStore(tmp_path / "data" / "blobs"), manifest())
    await fed.start()
    return fed


async def _joined_participant(fed: Federation) -> tuple[str, TrainTask]:
    joined = fed.join(JoinRequest(device_name="dev", capability=Capability(device_class=DeviceClass.CPU),
                               base_model_sha256=fed.manifest.weights_sha256, num_examples=5))
    task = await fed.get_task(joined.client_id, 5.0)
    assert isinstance(task, TrainTask)
    _, chunks = await fed.open_download(joined.client_id, DownloadRequest(round=task.round))
    async for _ in chunks:
        pass
    return joined.client_id, task


def _update(fed: Federation, task: TrainTask) -> tuple[UploadHeader, bytes]:
    data = encode_adapter(random_adapter(fed.manifest, task.assignment.lora.rank, task.assignment.lora.alpha, 0))
    header = UploadHeader(round=task.round, rank=task.assignment.lora.rank, num_examples=5,
                          total_bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    return header, data


async def _chunks(data: bytes):
    yield Chunk(offset=0, data=data)


async def _wait(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError
        await asyncio.sleep(0.02)


def test_cancelled_call_after_last_chunk_still_records_and_folds(tmp_path, monkeypatch):
    commit = UploadSession.commit

    def slow_commit(session):
        time.sleep(0.3)  # the client gives up while the update is being fsynced
        return commit(session)

    monkeypatch.setattr(UploadSession, "commit", slow_commit)

    async def scenario():
        fed = await _federation(tmp_path, **{"federation.rounds": 1})
        client_id, task = await _joined_participant(fed)
        header, data = _update(fed, task)
        call = asyncio.ensure_future(fed.upload(client_id, header, _chunks(data)))
        await _wait(lambda: getattr(fed.ctx.state.uploading.get(client_id), "accepting", False))
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await _wait(lambda: fed.done)
        record = fed.store.get_round(1)
        assert record.phase is RoundPhase.DONE and record.metrics["updates"] == 1
        assert fed.store.get_receipt(1, client_id) is not None
        assert len(update_files(tmp_path / "data")) == 1
        await fed.stop()

    asyncio.run(scenario())


def test_failed_aggregation_fails_the_round_and_the_federation_goes_on(tmp_path):
    async def scenario():
        fed = await _federation(tmp_path)
        method = fed.ctx.method

        def failing_accumulator(*args, **kwargs):
            acc = method.make_accumulator(*args, **kwargs)
            if fed.ctx.state.open is None or fed.ctx.state.open.round == 1:
                def overflow():
                    raise AggregationError("bert.encoder.layer.0.attention.self.query: the aggregate is not finite")
                acc.result = overflow
            return acc

        # The method registry entry is the seam: a rule whose round-1 aggregate overflows.
        fed.ctx.method = dataclasses.replace(method, make_accumulator=failing_accumulator)
        client_id, task = await _joined_participant(fed)
        header, data = _update(fed, task)
        await fed.upload(client_id, header, _chunks(data))
        await _wait(lambda: fed.store.get_round(2) is not None)
        first = fed.store.get_round(1)
        assert first.phase is RoundPhase.FAILED
        assert "not finite" in first.failure_reason and "kept the previous global adapter" in first.failure_reason
        assert fed.fatal is None
        second = await fed.get_task(client_id, 5.0)
        assert isinstance(second, TrainTask) and second.round == 2
        await fed.stop()

    asyncio.run(scenario())


def test_a_dying_round_loop_is_reported(tmp_path, monkeypatch):
    async def scenario():
        fed = await _federation(tmp_path)
        await _joined_participant(fed)

        def broken(round_no):
            raise RuntimeError("disk vanished")

        # The state store is the seam: it fails under the round loop, which watches the round.
        monkeypatch.setattr(fed.store, "list_participants", broken)
        error = await asyncio.wait_for(fed.wait_fatal(), 10)
        assert isinstance(error, RuntimeError) and "disk vanished" in str(error)
        await fed.stop()  # does not raise the loop's error again

    asyncio.run(scenario())


def test_fedit_budget_lowers_everyone_alike(tmp_path):
    from rankfed.coordinator.rank_policy import update_bytes

    async def scenario():
        budget = update_bytes(4, manifest())
        fed = await _federation(tmp_path, **{"federation.method": "fedit", "rank_policy.round_budget_bytes": budget})
        _, task = await _joined_participant(fed)
        assert task.assignment.lora.rank == 4 and "round budget" in task.assignment.reason
        await fed.stop()

    asyncio.run(scenario())


@pytest.mark.timeout(20)
def test_stop_is_prompt_while_a_round_is_open(tmp_path):
    """On Python 3.11 asyncio.wait_for could lose stop()'s cancellation, and stop() then
    waited for the round's deadline (600 s here); pytest-timeout fails this test if it does."""

    async def scenario():
        fed = await _federation(tmp_path, **{"federation.round_deadline_seconds": 600.0})
        await _joined_participant(fed)
        started = time.monotonic()
        await fed.stop()
        return time.monotonic() - started

    assert asyncio.run(scenario()) < 20


def test_ci_runs_on_the_python_the_deploy_files_use():
    """The Dockerfiles and the systemd unit name one Python; CI must test that one."""
    import re
    import sys
    from pathlib import Path

    deploy = Path(__file__).resolve().parents[2] / "deploy"
    versions = set()
    for path in (deploy / "Dockerfile.coordinator", deploy / "Dockerfile.edge", deploy / "rankfed-coordinator.service"):
        versions |= set(re.findall(r"python:?(3\.\d+)", path.read_text()))
    assert len(versions) == 1, f"deploy files disagree on the Python version: {sorted(versions)}"
    if os.environ.get("CI"):
        assert f"{sys.version_info[0]}.{sys.version_info[1]}" in versions
