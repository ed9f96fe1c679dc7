"""StatusView.round_status: what a status shows of each participant's device, read with one
`participant_devices` per round (never a `get_client` per participant, on the event loop)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from rankfed.coordinator.models import ClientRecord, DeviceLabel, Participant, RoundRecord
from rankfed.coordinator.status_view import StatusView
from rankfed.coordinator.store import MemoryStore
from rankfed.protocol import Capability, DeviceClass, ParticipantState, RoundPhase


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
