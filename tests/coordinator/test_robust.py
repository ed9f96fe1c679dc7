"""No single device can fail a round or dominate it: an update far larger than the round's
median is scaled to the bound, an update that cannot be folded is left out (REJECTED) and the
round closes with the rest when the quorum holds. Driven through the Federation's own calls."""

from __future__ import annotations

import asyncio
import hashlib
import time

import numpy as np
import pytest

from rankfed.aggregation import Adapter, LoraModule, encode_adapter
from rankfed.aggregation.robust import clip_bound, update_norm
from rankfed.coordinator.federation import Federation
from rankfed.coordinator.store import MemoryStore
from rankfed.coordinator.store.blobs import BlobStore
from rankfed.protocol import (
    Capability,
    Chunk,
    DeviceClass,
    DownloadRequest,
    JoinRequest,
    ParticipantState,
    RoundPhase,
    TrainTask,
    UploadHeader,
)
from tests.coordinator.harness import make_config, manifest, random_adapter

NAMES = ("a", "b", "c", "d")


async def _round_of_four(tmp_path, updates, **overrides) -> Federation:
    """Four devices join, download and upload `updates(name, task) -> Adapter`; returns the
    federation once round 1 has closed."""
    config = make_config(tmp_path / "data", **{
        "federation.rounds": 1, "federation.min_clients": 3, "federation.method": "zero_pad",
        "federation.straggler_grace_seconds": 30.0, **overrides,
    })
    fed = Federation(config, MemoryStore(), BlobStore(tmp_path / "data" / "blobs"), manifest())
    await fed.start()
    ids = {}
    for name in NAMES:
        joined = fed.join(JoinRequest(device_name=name, capability=Capability(device_class=DeviceClass.CPU),
                                      base_model_sha256=fed.manifest.weights_sha256, num_examples=5))
        ids[name] = joined.client_id
    for name in NAMES:
        task = await fed.get_task(ids[name], 10.0)
        assert isinstance(task, TrainTask)
        _, chunks = await fed.open_download(ids[name], DownloadRequest(round=task.round))
        async for _ in chunks:
            pass
        data = encode_adapter(updates(name, task))
        header = UploadHeader(round=task.round, rank=task.assignment.lora.rank, num_examples=5,
                              total_bytes=len(data), sha256=hashlib.sha256(data).hexdigest())

        async def one(data=data):
            yield Chunk(offset=0, data=data)

        await fed.upload(ids[name], header, one())
    deadline = time.monotonic() + 20
    while not fed.done:
        assert time.monotonic() < deadline, "round 1 did not close"
        await asyncio.sleep(0.02)
    return fed


def _scaled(adapter: Adapter, factor: float) -> Adapter:
    return Adapter(modules={k: LoraModule(a=m.a, b=m.b * np.float32(factor), alpha=m.alpha)
                            for k, m in adapter.modules.items()},
                   dense={k: v * np.float32(factor) for k, v in adapter.dense.items()})


def _honest(name: str, task: TrainTask) -> Adapter:
    lora = task.assignment.lora
    return random_adapter(manifest(), lora.rank, lora.alpha, NAMES.index(name))


def test_an_update_far_above_the_median_is_clipped_not_obeyed(tmp_path):
    def updates(name, task):
        adapter = _honest(name, task)
        return _scaled(adapter, 1e4) if name == "d" else adapter

    async def scenario():
        fed = await _round_of_four(tmp_path, updates)
        record = fed.store.get_round(1)
        assert record.phase is RoundPhase.DONE and record.metrics["clipped_updates"] == 1
        honest = max(update_norm(_honest(n, fed_task)) for n, fed_task in ((n, _task(fed)) for n in "abc"))
        global_norm = update_norm(fed.ctx.state.current_global())
        assert global_norm < 3 * honest  # unclipped, d alone would make it ~2,500x
        await fed.stop()

    asyncio.run(scenario())


def test_clipping_off_lets_the_outlier_through(tmp_path):
    def updates(name, task):
        adapter = _honest(name, task)
        return _scaled(adapter, 1e4) if name == "d" else adapter

    async def scenario():
        fed = await _round_of_four(tmp_path, updates, **{"federation.robust_clip_factor": 0.0})
        record = fed.store.get_round(1)
        assert record.phase is RoundPhase.DONE and "clipped_updates" not in record.metrics
        assert update_norm(fed.ctx.state.current_global()) > 100 * update_norm(_honest("a", _task(fed)))
        await fed.stop()

    asyncio.run(scenario())


def test_an_update_that_overflows_the_aggregate_is_rejected_and_the_round_goes_on(tmp_path):
    def updates(name, task):
        adapter = _honest(name, task)
        if name != "d":
            return adapter
        # Finite in float32, but any weighted sum of it overflows.
        return Adapter(modules={k: LoraModule(a=np.full_like(m.a, 3e38), b=np.full_like(m.b, 3e38), alpha=m.alpha)
                                for k, m in adapter.modules.items()}, dense=dict(adapter.dense))

    async def scenario():
        fed = await _round_of_four(tmp_path, updates, **{"federation.robust_clip_factor": 0.0})
        record = fed.store.get_round(1)
        assert record.phase is RoundPhase.DONE, record.failure_reason
        assert record.metrics["rejected_updates"] == 1
        states = {fed.client(p.client_id).device_name: p.state for p in fed.store.list_participants(1)}
        assert states == {"a": ParticipantState.UPLOADED, "b": ParticipantState.UPLOADED,
                          "c": ParticipantState.UPLOADED, "d": ParticipantState.REJECTED}
        assert np.isfinite(update_norm(fed.ctx.state.current_global()))
        await fed.stop()

    asyncio.run(scenario())


def _task(fed: Federation) -> TrainTask:
    """A task shape for rebuilding the honest updates (rank and alpha of the assignment)."""
    part = fed.store.list_participants(1)[0]
    lora = fed.ctx.lora_for_rank(part.rank, alpha=part.alpha)
    from rankfed.protocol import Assignment

    return TrainTask(round=1, assignment=Assignment(lora=lora), local_steps=1, learning_rate=0.1, batch_size=1)


@pytest.mark.parametrize(("norms", "factor", "bound"), [
    ([1.0, 2.0, 3.0], 5.0, 10.0),
    ([1.0, 2.0], 5.0, None),  # too few to tell an outlier
    ([1.0, 2.0, 3.0], 0.0, None),  # off
    ([1.0, float("inf"), 2.0, 3.0], 2.0, 4.0),  # non-finite norms do not move the median
])
def test_clip_bound(norms, factor, bound):
    assert clip_bound(norms, factor) == bound
