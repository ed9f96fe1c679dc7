"""The Federation core driven directly (no gRPC): the failure paths that are hard to time
over a socket — a call cancelled after its last chunk, an aggregation that fails, a round
loop that dies."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import threading
import time

import pytest

from rankfed.aggregation import AggregationError, encode_adapter
from rankfed.coordinator.errors import DuplicateError, PreconditionError, RetryLaterError, StorageError
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


async def _chunks(data: bytes, size: int = 1 << 20):
    for offset in range(0, len(data), size):
        yield Chunk(offset=offset, data=data[offset : offset + size])


async def _wait(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError
        await asyncio.sleep(0.02)


def test_cancelled_call_after_last_chunk_still_records_and_folds(tmp_path, monkeypatch):
    commit = UploadSession.commit
    committing = threading.Event()

    def slow_commit(session):
        committing.set()
        time.sleep(0.3)  # the client gives up while the update is being fsynced
        return commit(session)

    monkeypatch.setattr(UploadSession, "commit", slow_commit)

    async def scenario():
        fed = await _federation(tmp_path, **{"federation.rounds": 1})
        client_id, task = await _joined_participant(fed)
        header, data = _update(fed, task)
        call = asyncio.ensure_future(fed.upload(client_id, header, _chunks(data)))
        await _wait(committing.is_set)
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


def test_the_receipt_does_not_wait_for_the_fold_but_the_round_close_does(tmp_path):
    """An upload is answered once its receipt is recorded (the file fsynced); the fold into
    the running aggregate goes on after it, and the round closes only once the fold ended."""

    async def scenario():
        fed = await _federation(tmp_path, **{"federation.rounds": 1})
        method = fed.ctx.method
        folding, release = threading.Event(), threading.Event()

        def slow_accumulator(*args, **kwargs):
            acc = method.make_accumulator(*args, **kwargs)
            fold = acc.fold

            def held_fold(adapter, weight):
                folding.set()
                assert release.wait(10)
                return fold(adapter, weight)

            acc.fold = held_fold
            return acc

        fed.ctx.method = dataclasses.replace(method, make_accumulator=slow_accumulator)  # the registry seam
        phases: list[str] = []
        fed.ingest.on_phase = lambda name, seconds: phases.append(name) if seconds >= 0 else None
        client_id, task = await _joined_participant(fed)
        header, data = _update(fed, task)
        receipt = await fed.upload(client_id, header, _chunks(data))
        assert receipt.sha256 == header.sha256 and fed.store.get_receipt(1, client_id) is not None
        await _wait(folding.is_set)
        assert phases == ["begin", "receive", "drain", "verify", "sync", "commit", "receipt_sync"]  # answered before the fold
        await asyncio.sleep(0.3)  # every update is in and the grace is 0: only the fold holds the close
        assert fed.store.get_round(1).phase is RoundPhase.TRAINING
        # The round loop must hear that the last upload ended (not find it at its next 1 s
        # timeout): a notify comes while the round is still open with no upload in flight.
        woken: list[bool] = []
        notify = fed.ctx.changes.notify

        def spy() -> None:
            state = fed.ctx.state
            woken.append(not state.uploading and state.open is not None and state.open.phase is RoundPhase.TRAINING)
            notify()

        fed.ctx.changes.notify = spy  # type: ignore[method-assign]
        release.set()
        await _wait(lambda: fed.done)
        record = fed.store.get_round(1)
        assert record.phase is RoundPhase.DONE and record.metrics["updates"] == 1
        assert phases[-1] == "fold"
        assert any(woken), "the end of the last upload did not wake the round loop"
        await fed.stop()

    asyncio.run(scenario())


class _SlowSyncStore(MemoryStore):
    """A store whose power-loss sync waits for the test (or fails)."""

    def __init__(self) -> None:
        super().__init__()
        self.syncing, self.release = threading.Event(), threading.Event()
        self.fail = False

    def sync(self) -> None:
        self.syncing.set()
        assert self.release.wait(10)
        if self.fail:
            raise StorageError("state.sqlite3-wal: could not sync the coordinator's state to disk: EIO")
        super().sync()


@pytest.mark.parametrize("fail", [False, True])
def test_the_receipt_is_answered_only_after_the_state_store_synced_it(tmp_path, fail):
    async def scenario():
        config = make_config(tmp_path / "data", **{
            "federation.rounds": 1, "federation.min_clients": 1, "federation.clients_per_round": 1,
            "federation.straggler_grace_seconds": 0.0,
        })
        store = _SlowSyncStore()
        store.fail = fail
        fed = Federation(config, store, BlobStore(tmp_path / "data" / "blobs"), manifest())
        await fed.start()
        client_id, task = await _joined_participant(fed)
        header, data = _update(fed, task)
        call = asyncio.ensure_future(fed.upload(client_id, header, _chunks(data)))
        await _wait(store.syncing.is_set)
        await asyncio.sleep(0.2)
        assert not call.done() and store.get_receipt(1, client_id) is not None  # committed, not yet answered
        store.release.set()
        if fail:
            with pytest.raises(StorageError, match="could not sync"):
                await call
            # The row is there: the device's retry learns that its update counted.
            with pytest.raises(DuplicateError):
                await fed.upload(client_id, header, _chunks(data))
        else:
            assert (await call).sha256 == header.sha256
        await _wait(lambda: fed.done)
        assert fed.store.get_round(1).metrics["updates"] == 1
        await fed.stop()

    asyncio.run(scenario())


class _SyncCountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.syncs = 0

    def sync(self) -> None:
        self.syncs += 1
        super().sync()


def test_every_operator_action_that_changes_state_syncs_the_store_before_it_answers(tmp_path):
    async def scenario():
        config = make_config(tmp_path / "data", **{"federation.rounds": 2, "federation.min_clients": 1})
        store = _SyncCountingStore()
        fed = Federation(config, store, BlobStore(tmp_path / "data" / "blobs"), manifest())
        await fed.start()
        fed.join(JoinRequest(device_name="dev", capability=Capability(device_class=DeviceClass.CPU),
                             base_model_sha256=fed.manifest.weights_sha256, num_examples=5))
        for action in (lambda: fed.pause("op"), lambda: fed.resume("op"),
                       lambda: fed.remove_device("op", "dev", ban=True), lambda: fed.allow_device("op", "dev"),
                       lambda: fed.stop_federation("op")):
            before = store.syncs
            action()
            assert store.syncs == before + 1
        before = store.syncs
        await fed.new_run("op")
        assert store.syncs >= before + 1
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
        monkeypatch.setattr(fed.store, "count_participants", broken)
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


async def _gated_chunks(data: bytes, gate: asyncio.Event, *, after: int, size: int = 64):
    """Chunks of `size` bytes; waits for `gate` once `after` bytes have gone."""
    for offset in range(0, len(data), size):
        if offset == after:
            await gate.wait()
        yield Chunk(offset=offset, data=data[offset : offset + size])


def test_retry_replaces_a_stream_that_is_still_sending(tmp_path):
    async def scenario():
        fed = await _federation(tmp_path, **{"federation.rounds": 1})
        client_id, task = await _joined_participant(fed)
        header, data = _update(fed, task)
        uploading = fed.ctx.state.uploading
        gate = asyncio.Event()
        first = asyncio.ensure_future(fed.upload(client_id, header, _gated_chunks(data, gate, after=128)))
        await _wait(lambda: client_id in uploading and uploading[client_id].received == 128)
        receipt = await fed.upload(client_id, header, _chunks(data))  # the retry
        gate.set()
        with pytest.raises(PreconditionError, match="replaced by a newer one"):
            await first
        assert fed.store.get_receipt(task.round, client_id).receipt_id == receipt.receipt_id
        await _wait(lambda: fed.done)
        assert fed.store.get_round(1).metrics["updates"] == 1
        assert len(update_files(tmp_path / "data")) == 1
        await fed.stop()

    asyncio.run(scenario())


def test_retry_while_the_first_stream_is_being_stored_is_told_to_retry(tmp_path, monkeypatch):
    verify = UploadSession.verify
    verifying, release = threading.Event(), threading.Event()

    def slow_verify(session, *args, **kwargs):
        verifying.set()
        release.wait(10)
        return verify(session, *args, **kwargs)

    monkeypatch.setattr(UploadSession, "verify", slow_verify)

    async def scenario():
        fed = await _federation(tmp_path, **{"federation.rounds": 1})
        client_id, task = await _joined_participant(fed)
        header, data = _update(fed, task)
        first = asyncio.ensure_future(fed.upload(client_id, header, _chunks(data, 64)))
        await _wait(verifying.is_set)  # every byte is in: the first stream is sealed
        with pytest.raises(RetryLaterError, match="retry in a moment"):
            await fed.upload(client_id, header, _chunks(data))
        release.set()
        receipt = await first
        with pytest.raises(DuplicateError, match=header.sha256):  # the retry's retry learns it counted
            await fed.upload(client_id, header, _chunks(data))
        assert fed.store.get_receipt(task.round, client_id).receipt_id == receipt.receipt_id
        await _wait(lambda: fed.done)
        assert fed.store.get_round(1).metrics["updates"] == 1
        assert len(update_files(tmp_path / "data")) == 1
        await fed.stop()

    asyncio.run(scenario())


@pytest.mark.parametrize("seed", range(12))
def test_retry_racing_the_end_of_the_first_stream_counts_once(tmp_path, seed):
    """Whatever the interleaving, each stream ends with a documented outcome (a receipt,
    FAILED_PRECONDITION, UNAVAILABLE or ALREADY_EXISTS) and exactly one update counts."""
    import random

    documented = (PreconditionError, RetryLaterError, DuplicateError)

    async def scenario():
        fed = await _federation(tmp_path, **{"federation.rounds": 1})
        client_id, task = await _joined_participant(fed)
        header, data = _update(fed, task)
        rng = random.Random(seed)

        async def jittered():
            for offset in range(0, len(data), 64):
                if rng.random() < 0.3:
                    await asyncio.sleep(0.001)
                yield Chunk(offset=offset, data=data[offset : offset + 64])

        async def attempt(delay: float):
            await asyncio.sleep(delay)
            try:
                return await fed.upload(client_id, header, jittered())
            except documented as exc:
                return exc

        outcomes = await asyncio.gather(attempt(0.0), attempt(rng.uniform(0.0, 0.05)))
        receipts = [o for o in outcomes if not isinstance(o, Exception)]
        stored = fed.store.get_receipt(task.round, client_id)
        assert stored is not None and [r.receipt_id for r in receipts] == [stored.receipt_id]
        await _wait(lambda: fed.done)
        assert fed.store.get_round(1).metrics["updates"] == 1
        assert len(update_files(tmp_path / "data")) == 1
        await fed.stop()

    asyncio.run(scenario())


def test_a_close_drops_the_page_cache_of_the_round_updates_and_of_the_global_it_replaced(tmp_path):
    async def scenario():
        fed = await _federation(tmp_path)
        blobs = fed.ctx.blobs
        dropped: list[tuple[str, list[str]]] = []
        drop = blobs.drop_cached

        def spy(prefix: str) -> int:
            dropped.append((prefix, blobs.list_blobs(prefix)))
            return drop(prefix)

        blobs.drop_cached = spy  # type: ignore[method-assign]
        client_id, task = await _joined_participant(fed)
        header, data = _update(fed, task)
        await fed.upload(client_id, header, _chunks(data))
        await _wait(lambda: fed.store.get_round(1).phase is RoundPhase.DONE)
        await _wait(lambda: len(dropped) == 2)
        (updates, their_files), (replaced, its_files) = dropped
        assert updates == "updates/round-000001" and their_files == [f"updates/round-000001/{client_id}.safetensors"]
        assert replaced == "global/round-000000" and "global/round-000000/adapter_model.safetensors" in its_files
        assert any("/rank-" in f for f in its_files)  # the rank files the round's devices downloaded
        assert blobs.exists(their_files[0]) and all(blobs.exists(f) for f in its_files)  # cold, not gone
        await fed.stop()

    asyncio.run(scenario())
