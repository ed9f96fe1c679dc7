"""What operators see: the federation's status (current round, participants, history) and a
stream of it that follows every change."""

from __future__ import annotations

from collections.abc import AsyncGenerator

from rankfed.coordinator.context import FederationContext
from rankfed.coordinator.errors import InvalidArgumentError
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

MAX_HISTORY_PAGE = 100  # finished rounds per status reply
MAX_PARTICIPANTS_SHOWN = 2000  # participant entries per status reply (~150 bytes each)


def _token(page_token: str) -> int:
    try:
        return int(page_token)
    except ValueError:
        raise InvalidArgumentError(
            f"page_token {page_token[:40]!r} is not one this coordinator issued; pass next_page_token back as it is"
        ) from None


class StatusView:
    def __init__(self, ctx: FederationContext, registry: ClientRegistry) -> None:
        self._ctx = ctx
        self._registry = registry
        # watch()'s statuses at one change version, by history_limit: every stream woken by
        # the same change gets the same status, computed once (not once per open stream).
        self._shared_version = -1
        self._shared: dict[int, FederationStatus] = {}

    def status(self, history_limit: int = 0, *, page_size: int = 0, page_token: str = "") -> FederationStatus:
        """The current (or last) round and a page of finished rounds, newest page first: up
        to `page_size` (at most MAX_HISTORY_PAGE) of the last `history_limit` (0: all),
        older than `page_token`. Replies stay bounded whatever the federation's age."""
        ctx = self._ctx
        rounds = ctx.store.list_rounds()
        finished = [r for r in rounds if r.phase in (RoundPhase.DONE, RoundPhase.FAILED)]
        if history_limit:
            finished = finished[-history_limit:]
        if page_token:
            before = _token(page_token)
            finished = [r for r in finished if r.round < before]
        size = min(page_size or MAX_HISTORY_PAGE, MAX_HISTORY_PAGE)
        page, older = finished[-size:], finished[:-size]
        current = rounds[-1] if rounds else None
        # One budget of participant entries per reply: the current round first, then history
        # from the newest; rounds past the budget list none (participants_omitted counts them).
        budget = MAX_PARTICIPANTS_SHOWN
        current_status = None
        if current is not None:
            current_status = self.round_status(current, participants=budget)
            budget -= len(current_status.participants)
        history: list[RoundStatus] = []
        for record in reversed(page):
            if current_status is not None and record.round == current_status.round:
                history.append(current_status)  # already counted
                continue
            entry = self.round_status(record, participants=budget)
            budget -= len(entry.participants)
            history.append(entry)
        history.reverse()
        m = ctx.manifest
        return FederationStatus(
            federation_id=self._registry.federation_id,
            total_rounds=ctx.config.federation.rounds,
            base_model=BaseModel(id=m.model_id, weights_sha256=m.weights_sha256, task=m.task, num_labels=m.num_labels),
            current=current_status,
            history=tuple(history),
            done=ctx.state.done,
            clients_online=self._registry.online_count(),
            mode=FederationMode(ctx.config.federation.mode),
            models=tuple(
                BaseModel(id=e.model_id, weights_sha256=e.weights_sha256, task=m.task, num_labels=m.num_labels)
                for e in m.allowed_models()
            ),
            next_page_token=str(page[0].round) if older and page else "",
            paused=ctx.state.paused,
            banned_devices=tuple(self._registry.banned()),
        )

    def round_status(self, record: RoundRecord, *, participants: int = MAX_PARTICIPANTS_SHOWN) -> RoundStatus:
        """A round with up to `participants` of its participants (the rest are counted)."""
        store = self._ctx.store
        parts = store.list_participants(record.round) if participants else []
        # One read of every participant's device (not a get_client each): this runs on the
        # event loop, and rounds have thousands of participants.
        devices = store.participant_devices(record.round) if parts else {}
        shown = []
        for part in parts[:participants]:
            device = devices.get(part.client_id)
            shown.append(ParticipantStatus(
                client_id=part.client_id,
                device_name=device.device_name if device else "",
                device_class=device.device_class if device else None,
                state=part.state, rank=part.rank, bytes_down=part.bytes_down, bytes_up=part.bytes_up,
                num_examples=part.num_examples, metrics=part.metrics,
            ))
        r = record
        return RoundStatus(
            round=r.round, phase=r.phase, method=r.method, started_at=r.started_at, deadline=r.deadline,
            finished_at=r.finished_at or 0.0, min_clients=r.min_clients, global_rank=r.global_rank,
            global_adapter_sha256=r.global_sha256, failure_reason=r.failure_reason, metrics=dict(r.metrics),
            participants=tuple(shown),
            participants_omitted=(len(parts) - len(shown)) if participants else self._count(record),
        )

    def _count(self, record: RoundRecord) -> int:
        # Finished rounds record their participant count; an open one is counted.
        if "participants" in record.metrics:
            return int(record.metrics["participants"])
        return sum(self._ctx.store.count_participants(record.round).values())

    def _shared_status(self, history_limit: int = 0) -> FederationStatus:
        """`status(history_limit)` as of the latest change: computed at most once per change
        version and history_limit, and the same object for every caller until the next
        change. It is computed after that change's notify, so it shows the change (every
        write a status shows notifies). Callers must not modify it: the dataclasses are
        frozen, but RoundStatus.metrics and TrainMetrics.eval are plain dicts."""
        version = self._ctx.changes.version
        if version != self._shared_version:
            self._shared_version, self._shared = version, {}
        status = self._shared.get(history_limit)
        if status is None:
            status = self._shared[history_limit] = self.status(history_limit)
        return status

    async def watch(self, history_limit: int = 0) -> AsyncGenerator[FederationStatus, None]:
        """The status now, then again after every change (coalesced), until the federation
        is done. Streams woken by the same change share one status (`_shared_status`): with
        thousands of participants a status is milliseconds of the event loop, and devices
        change it many times a round."""
        changes = self._ctx.changes
        while True:
            version, event = changes.version, changes.event
            yield self._shared_status(history_limit)
            if self._ctx.state.done:
                return
            if version == changes.version:
                await event.wait()
