"""StatusView.round_status: what a status shows of each participant's device, read with one
`participant_devices` per round (never a `get_client` per participant, on the event loop);
an open round's participants counted without decoding them; and watch(): the streams woken
by one change share one status, computed once."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

from rankfed.coordinator.federation import Federation
from rankfed.coordinator.models import ClientRecord, DeviceLabel, Participant, RoundRecord
from rankfed.coordinator.status_view import StatusView
from rankfed.coordinator.store import MemoryStore
from rankfed.coordinator.store.blobs import BlobStore
from rankfed.protocol import Capability, DeviceClass, FederationStatus, ParticipantState, RoundPhase
from tests.coordinator.harness import make_config, manifest


class _CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.device_reads = 0
        self.hide: set[str] = set()  # clients participant_devices leaves out, as if not stored

    def get_client(self, client_id: str) -> ClientRecord | None:
        raise AssertionError("round_status must not read a whole ClientRecord per participant")

    def participant_devices(self, round: int) -> dict[str, DeviceLabel]:
        self.device_reads += 1
        return {cid: d for cid, d in super().participant_devices(round).items() if cid not in self.hide}


def _view(store: MemoryStore) -> StatusView:
    ctx: Any = SimpleNamespace(store=store)  # round_status reads the store alone
    return StatusView(ctx, registry=None)  # type: ignore[arg-type]


def test_round_status_shows_each_participants_device() -> None:
    store = _CountingStore()
    record = RoundRecord(round=1, phase=RoundPhase.TRAINING, method="fedavg", started_at=1.0, deadline=2.0,
                         min_clients=1, global_rank=8)
    store.put_round(record)
    for i, cap in enumerate([Capability(device_class=DeviceClass.CUDA), Capability(),
                             Capability(device_class=DeviceClass.MOBILE)]):
        store.upsert_client(ClientRecord(client_id=f"c{i}", device_name=f"dev-{i}", capability=cap, num_examples=1,
                                         joined_at=float(i), last_seen_at=float(i), rank=8, tier="t"))
        store.put_participant(Participant(round=1, client_id=f"c{i}", rank=8, alpha=16.0,
                                          state=ParticipantState.TRAINING))
    view = _view(store)

    status = view.round_status(record)
    assert [(p.client_id, p.device_name, p.device_class) for p in status.participants] == [
        ("c0", "dev-0", DeviceClass.CUDA), ("c1", "dev-1", DeviceClass.CPU), ("c2", "dev-2", DeviceClass.MOBILE),
    ]
    assert store.device_reads == 1

    store.hide = {"c1"}  # a participant whose client is somehow missing: shown without a device
    status = view.round_status(record, participants=2)
    assert [(p.client_id, p.device_name, p.device_class) for p in status.participants] == [
        ("c0", "dev-0", DeviceClass.CUDA), ("c1", "", None),
    ]
    assert status.participants_omitted == 1 and store.device_reads == 2


def _open_round(store: MemoryStore, participants: int = 3) -> RoundRecord:
    record = RoundRecord(round=1, phase=RoundPhase.TRAINING, method="fedavg", started_at=1.0, deadline=2.0,
                         min_clients=1, global_rank=8)
    store.put_round(record)
    for i in range(participants):
        store.upsert_client(ClientRecord(client_id=f"c{i}", device_name=f"dev-{i}", capability=Capability(),
                                         num_examples=1, joined_at=0.0, last_seen_at=0.0, rank=8, tier="t"))
        store.put_participant(Participant(round=1, client_id=f"c{i}", rank=8, alpha=16.0,
                                          state=ParticipantState.TRAINING))
    return record


def test_an_open_round_past_the_participant_budget_is_counted_without_decoding_its_participants() -> None:
    class _NoListing(MemoryStore):
        def list_participants(self, round: int) -> list[Participant]:
            raise AssertionError("counting must not decode every participant")

    store = _NoListing()
    record = _open_round(store)
    assert _view(store).round_status(record, participants=0).participants_omitted == 3


def _counted(fed: Federation) -> list[int]:
    """Counts StatusView.status computations (GetRoundStatus's and the watchers')."""
    calls = [0]
    status = fed.view.status

    def counting(*args: Any, **kwargs: Any) -> FederationStatus:
        calls[0] += 1
        return status(*args, **kwargs)

    fed.view.status = counting  # type: ignore[method-assign]
    return calls


def test_watchers_woken_by_one_change_share_one_status(tmp_path) -> None:
    async def scenario() -> None:
        config = make_config(tmp_path / "data")
        store = MemoryStore()
        fed = Federation(config, store, BlobStore(tmp_path / "data" / "blobs"), manifest())
        fed.registry.start()  # the federation's id; no round loop: the test makes each change
        _open_round(store)
        calls = _counted(fed)
        a, b, other = fed.watch(), fed.watch(), fed.watch(history_limit=1)

        first = await anext(a)
        assert await anext(b) is first and calls[0] == 1  # computed once for both
        assert await anext(other) is not first and calls[0] == 2  # another history_limit: its own

        part = store.get_participant(1, "c0")
        assert part is not None
        store.put_participant(replace(part, state=ParticipantState.UPLOADED))
        fed.ctx.changes.notify()
        after = await anext(a)
        assert after is not first and calls[0] == 3
        assert after.current is not None and after.current.participants[0].state is ParticipantState.UPLOADED
        assert await anext(b) is after and calls[0] == 3
        late = fed.watch()  # a stream opened at the same version gets it too
        assert await anext(late) is after and calls[0] == 3

        # A watcher never misses a change: two changes while it was busy, one status after
        # both (coalesced), computed after the last.
        part = store.get_participant(1, "c1")
        assert part is not None
        store.put_participant(replace(part, state=ParticipantState.UPLOADING))
        fed.ctx.changes.notify()
        store.put_participant(replace(part, state=ParticipantState.UPLOADED))
        fed.ctx.changes.notify()
        latest = await anext(a)
        assert latest.current is not None and latest.current.participants[1].state is ParticipantState.UPLOADED
        assert await anext(b) is latest and calls[0] == 4

        # A watcher with nothing new waits for the next change.
        waiting = asyncio.ensure_future(anext(a))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        fed.ctx.changes.notify()
        assert await asyncio.wait_for(waiting, 5.0) is not latest

        # GetRoundStatus computes afresh every call.
        assert fed.status() is not fed.status()
        for stream in (a, b, other, late):
            await stream.aclose()

    asyncio.run(scenario())
