"""In-memory StateStore: the reference implementation for fast core tests and simulations.

It keeps exactly the contract of `base.StateStore` (referential integrity, duplicate
receipts, ordering, atomic transactions) so that a core test passing here means the same
on SQLite. Records are deep-copied on the way in and out because the frozen dataclasses
still hold mutable dicts (metrics); sharing them would let a caller edit stored state
behind the store's back, which SQLite cannot do.
"""

from __future__ import annotations

import copy
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from rankfed.coordinator.errors import DuplicateError, NotFoundError, StorageError
from rankfed.coordinator.models import ClientRecord, DeviceLabel, Participant, Receipt, RoundRecord, ScoreRecord
from rankfed.coordinator.store.base import (
    SCHEMA_VERSION,
    SCHEMA_VERSION_KEY,
    StateStore,
    check_finite,
    check_limit,
    check_meta_key,
)
from rankfed.protocol import ParticipantState

T = TypeVar("T")
K = TypeVar("K")
V = TypeVar("V")

_MISSING: Any = object()


def _copy(obj: T) -> T:
    return copy.deepcopy(obj)


class MemoryStore(StateStore):
    """Dicts plus an undo log.

    Why an undo log rather than a snapshot: every write is its own small transaction, and
    copying all tables per write would cost O(state) per heartbeat. Each mutation records
    the value it replaced; a rollback replays those in reverse. Stored records are private
    copies that are only ever replaced, never mutated. Dicts keep insertion order, which is
    the tie-break order the contract promises (like SQLite's rowid); restoring a replaced
    key keeps its position, and removing an inserted key restores the old order.
    """

    def __init__(self) -> None:
        self._meta: dict[str, str] = {SCHEMA_VERSION_KEY: str(SCHEMA_VERSION)}
        self._clients: dict[str, ClientRecord] = {}
        self._rounds: dict[int, RoundRecord] = {}
        self._participants: dict[int, dict[str, Participant]] = {}
        self._receipts: dict[int, dict[str, Receipt]] = {}
        self._receipt_ids: dict[str, tuple[int, str]] = {}
        self._scores: dict[tuple[int, str, str], ScoreRecord] = {}  # by (round, client_id, source)
        self._lock = threading.RLock()
        self._depth = 0
        self._undo: list[tuple[dict[Any, Any], Any, Any]] = []
        self._closed = False

    # --- plumbing ----------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self._lock:
            self._check_open()
            mark = len(self._undo)  # a nested block is a savepoint at this mark
            self._depth += 1
            try:
                yield
            except BaseException:
                self._rollback_to(mark)
                raise
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self._undo.clear()

    def _rollback_to(self, mark: int) -> None:
        while len(self._undo) > mark:
            table, key, old = self._undo.pop()
            if old is _MISSING:
                table.pop(key, None)
            else:
                table[key] = old

    def _set(self, table: dict[K, V], key: K, value: V) -> None:
        """The only way state changes: remembers the old value for a rollback."""
        self._undo.append((table, key, table.get(key, _MISSING)))
        table[key] = value

    def _bucket(self, table: dict[int, dict[str, V]], round: int) -> dict[str, V]:
        if round not in table:
            self._set(table, round, {})
        return table[round]

    def snapshot(self, path: Path) -> bool:
        self._check_open()
        return False  # nothing persisted: an in-memory run leaves no archive

    def reset_run(self) -> None:
        with self.transaction():
            self._clear(self._scores)
            self._clear(self._receipts)
            self._clear(self._participants)
            self._clear(self._rounds)
            self._clear(self._receipt_ids)
            for client_id, rec in list(self._clients.items()):
                self._set(self._clients, client_id, replace(rec, rounds_completed=0, deadlines_missed=0))
            for key in self.RUN_META_KEYS:
                if key in self._meta:
                    self._undo.append((self._meta, key, self._meta[key]))
                    del self._meta[key]

    def _clear(self, table: dict[Any, Any]) -> None:
        """Empty a table, each removal remembered for a rollback."""
        for key in list(table):
            self._undo.append((table, key, table[key]))
            del table[key]

    def sync(self) -> None:
        self._check_open()  # nothing outlives the process anyway

    def close(self) -> None:
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError("the state store is closed")

    def _require_refs(self, what: str, round: int, client_id: str) -> None:
        if round not in self._rounds:
            raise NotFoundError(f"{what} names round {round}, which is not stored; put_round first")
        if client_id not in self._clients:
            raise NotFoundError(
                f"{what} names client {client_id!r}, which is not stored; upsert_client first"
            )

    # --- meta --------------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        with self._lock:
            self._check_open()
            return self._meta.get(key)

    def set_meta(self, key: str, value: str) -> None:
        check_meta_key(key)
        with self.transaction():
            self._set(self._meta, key, str(value))

    # --- clients -----------------------------------------------------------------------

    def upsert_client(self, rec: ClientRecord) -> None:
        check_finite("client", joined_at=rec.joined_at, last_seen_at=rec.last_seen_at)
        with self.transaction():
            self._set(self._clients, rec.client_id, _copy(rec))

    def get_client(self, client_id: str) -> ClientRecord | None:
        with self._lock:
            self._check_open()
            return _copy(self._clients.get(client_id))

    def find_client_by_name(self, device_name: str) -> ClientRecord | None:
        with self._lock:
            self._check_open()
            found = [c for c in self._ordered_clients() if c.device_name == device_name]
            return _copy(found[-1]) if found else None

    def list_clients(self) -> list[ClientRecord]:
        with self._lock:
            self._check_open()
            return _copy(self._ordered_clients())

    def client_names(self) -> dict[str, str]:
        with self._lock:
            self._check_open()
            return {cid: c.device_name for cid, c in self._clients.items()}

    def count_clients(self) -> tuple[int, int]:
        with self._lock:
            self._check_open()
            return len(self._clients), sum(1 for c in self._clients.values() if c.left)

    def _ordered_clients(self) -> list[ClientRecord]:
        return sorted(self._clients.values(), key=lambda c: c.joined_at)  # stable sort

    # --- rounds ------------------------------------------------------------------------

    def put_round(self, rec: RoundRecord) -> None:
        check_finite(
            "round", started_at=rec.started_at, deadline=rec.deadline, finished_at=rec.finished_at
        )
        with self.transaction():
            self._set(self._rounds, rec.round, _copy(rec))

    def get_round(self, n: int) -> RoundRecord | None:
        with self._lock:
            self._check_open()
            return _copy(self._rounds.get(n))

    def latest_round(self) -> RoundRecord | None:
        with self._lock:
            self._check_open()
            if not self._rounds:
                return None
            return _copy(self._rounds[max(self._rounds)])

    def list_rounds(self, limit: int = 0) -> list[RoundRecord]:
        check_limit(limit)
        with self._lock:
            self._check_open()
            ordered = [self._rounds[n] for n in sorted(self._rounds)]
            return _copy(ordered[-limit:] if limit else ordered)

    # --- participants ------------------------------------------------------------------

    def put_participant(self, p: Participant) -> None:
        check_finite("participant", alpha=p.alpha)
        with self.transaction():
            self._require_refs("participant", p.round, p.client_id)
            self._set(self._bucket(self._participants, p.round), p.client_id, _copy(p))

    def get_participant(self, round: int, client_id: str) -> Participant | None:
        with self._lock:
            self._check_open()
            return _copy(self._participants.get(round, {}).get(client_id))

    def list_participants(self, round: int) -> list[Participant]:
        with self._lock:
            self._check_open()
            return _copy(list(self._participants.get(round, {}).values()))

    def count_participants(self, round: int) -> dict[ParticipantState, int]:
        with self._lock:
            self._check_open()
            return dict(Counter(p.state for p in self._participants.get(round, {}).values()))

    def participant_devices(self, round: int) -> dict[str, DeviceLabel]:
        with self._lock:
            self._check_open()
            clients = self._clients
            # Fresh labels of immutable fields: nothing to deep-copy.
            return {
                cid: DeviceLabel(c.device_name, c.capability.device_class)
                for cid in self._participants.get(round, {})
                if (c := clients.get(cid)) is not None
            }

    # --- receipts ----------------------------------------------------------------------

    def add_receipt(self, r: Receipt) -> None:
        check_finite("receipt", accepted_at=r.accepted_at)
        with self.transaction():
            self._require_refs("receipt", r.round, r.client_id)
            if r.client_id in self._receipts.get(r.round, {}):
                raise DuplicateError(
                    f"client {r.client_id!r} already has an accepted update for round {r.round}"
                )
            if r.receipt_id in self._receipt_ids:
                raise DuplicateError(f"receipt id {r.receipt_id!r} is already used")
            self._set(self._receipt_ids, r.receipt_id, (r.round, r.client_id))
            self._set(self._bucket(self._receipts, r.round), r.client_id, _copy(r))

    def get_receipt(self, round: int, client_id: str) -> Receipt | None:
        with self._lock:
            self._check_open()
            return _copy(self._receipts.get(round, {}).get(client_id))

    def list_receipts(self, round: int) -> list[Receipt]:
        with self._lock:
            self._check_open()
            mine = self._receipts.get(round, {}).values()
            return _copy(sorted(mine, key=lambda x: x.accepted_at))  # stable sort

    def latest_receipts(self) -> list[Receipt]:
        with self._lock:
            self._check_open()
            latest: dict[str, Receipt] = {}
            for round_no in sorted(self._receipts):
                for receipt in sorted(self._receipts[round_no].values(), key=lambda x: x.accepted_at):
                    latest[receipt.client_id] = receipt
            ordered = sorted(latest.values(), key=lambda x: x.accepted_at)  # stable: ties keep insertion order
            return _copy(sorted(ordered, key=lambda x: -x.round))

    # --- scores ------------------------------------------------------------------------

    def put_score(self, s: ScoreRecord) -> None:
        check_finite("score", recorded_at=s.recorded_at)
        with self.transaction():
            if s.round not in self._rounds:
                raise NotFoundError(f"score names round {s.round}, which is not stored; put_round first")
            if s.client_id and s.client_id not in self._clients:
                raise NotFoundError(f"score names client {s.client_id!r}, which is not stored; upsert_client first")
            self._set(self._scores, (s.round, s.client_id, s.source), _copy(s))

    def get_score(self, round: int, client_id: str, source: str) -> ScoreRecord | None:
        with self._lock:
            self._check_open()
            return _copy(self._scores.get((round, client_id, source)))

    def latest_scores(self, source: str) -> dict[str, ScoreRecord]:
        with self._lock:
            self._check_open()
            latest: dict[str, ScoreRecord] = {}
            for (round_no, client_id, kind), score in self._scores.items():
                if kind == source and client_id and (client_id not in latest or latest[client_id].round < round_no):
                    latest[client_id] = score
            return _copy(latest)

    def list_scores(self, source: str, client_id: str = "") -> list[ScoreRecord]:
        with self._lock:
            self._check_open()
            mine = [s for (_, cid, kind), s in self._scores.items() if kind == source and cid == client_id]
            return _copy(sorted(mine, key=lambda x: x.round))
