"""What operators see: the federation's status (current round, participants, history) and a
stream of it that follows every change."""

from __future__ import annotations

from collections.abc import AsyncIterator

from rankfed.coordinator.context import FederationContext
from rankfed.coordinator.models import RoundRecord
from rankfed.coordinator.registry import ClientRegistry
from rankfed.protocol import (
    BaseModel,
    FederationMode,
    FederationStatus,
    ParticipantStatus,
    RoundPhase,
    RoundStatus,
)


class StatusView:
    def __init__(self, ctx: FederationContext, registry: ClientRegistry) -> None:
        self._ctx = ctx
        self._registry = registry

    def status(self, history_limit: int = 0) -> FederationStatus:
        """The current (or last) round and up to `history_limit` finished rounds (0: all)."""
        ctx = self._ctx
        rounds = ctx.store.list_rounds()
        finished = [r for r in rounds if r.phase in (RoundPhase.DONE, RoundPhase.FAILED)]
        if history_limit:
            finished = finished[-history_limit:]
        current = rounds[-1] if rounds else None
        m = ctx.manifest
        return FederationStatus(
            federation_id=self._registry.federation_id,
            total_rounds=ctx.config.federation.rounds,
            base_model=BaseModel(id=m.model_id, weights_sha256=m.weights_sha256, task=m.task, num_labels=m.num_labels),
            current=self.round_status(current) if current else None,
            history=tuple(self.round_status(r) for r in finished),
            done=ctx.state.done,
            clients_online=self._registry.online_count(),
            mode=FederationMode(ctx.config.federation.mode),
            models=tuple(
                BaseModel(id=e.model_id, weights_sha256=e.weights_sha256, task=m.task, num_labels=m.num_labels)
                for e in m.allowed_models()
            ),
        )

    def round_status(self, record: RoundRecord) -> RoundStatus:
        store = self._ctx.store
        participants = []
        for part in store.list_participants(record.round):
            client = store.get_client(part.client_id)
            participants.append(ParticipantStatus(
                client_id=part.client_id,
                device_name=client.device_name if client else "",
                device_class=client.capability.device_class if client else None,
                state=part.state, rank=part.rank, bytes_down=part.bytes_down, bytes_up=part.bytes_up,
                num_examples=part.num_examples, metrics=part.metrics,
            ))
        r = record
        return RoundStatus(
            round=r.round, phase=r.phase, method=r.method, started_at=r.started_at, deadline=r.deadline,
            finished_at=r.finished_at or 0.0, min_clients=r.min_clients, global_rank=r.global_rank,
            global_adapter_sha256=r.global_sha256, failure_reason=r.failure_reason, metrics=dict(r.metrics),
            participants=tuple(participants),
        )

    async def watch(self, history_limit: int = 0) -> AsyncIterator[FederationStatus]:
        """The status now, then again after every change (coalesced), until the federation is done."""
        changes = self._ctx.changes
        while True:
            version, event = changes.version, changes.event
            yield self.status(history_limit)
            if self._ctx.state.done:
                return
            if version == changes.version:
                await event.wait()
