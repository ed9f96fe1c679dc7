"""The state-store contract: what the coordinator core may rely on, whatever holds the state.

Why an interface: the core (rounds, receipts, recovery) is tested against the fast
`MemoryStore` and runs on the durable `SqliteStore`; a server database can replace SQLite
later without touching the core. One contract test class (tests/coordinator/test_store.py)
runs against every implementation, so they cannot drift apart.

Rules every implementation keeps:

- Methods are synchronous and fast (a few indexed rows); they are called from the asyncio
  event-loop thread. They are also safe to call from other threads (one lock).
- Never `await` inside `transaction()`: the lock is re-entrant per thread, so another
  coroutine on the event loop would silently join the open transaction. Keep the block
  synchronous (compute first, then write).
- A durable store pays one fsync per outermost commit; group related writes in one
  `transaction()` to pay it once.
- Records go in and come out as the frozen dataclasses of `coordinator.models`. What comes
  out is equal to what went in (floats and ints bit-for-bit, enums as enums) and is a fresh
  object: mutating a returned record's `metrics` dict never changes the stored state.
- Referential integrity: a participant or receipt names a round and a client that exist,
  otherwise `NotFoundError` (put the round and the client first).
- A second receipt for the same (round, client_id), or a reused receipt_id, raises
  `DuplicateError` and changes nothing.
- A score names a stored round and, unless it scores the round's global adapter
  (client_id ""), a stored client, otherwise `NotFoundError`; a second score of the same
  (round, client_id, source) replaces the first.
- Every write outside `transaction()` is atomic and, for a durable store, durable when the
  method returns. Inside `transaction()` nothing is visible to a later reopen until the
  outermost block exits normally; an exception undoes every write of the block.
- The disk refusing (full, I/O error, unreadable file) raises `StorageError`.
- The meta key `schema_version` is the store's own; `set_meta` refuses it.
"""

from __future__ import annotations

import abc
import math
from contextlib import AbstractContextManager
from pathlib import Path
from types import TracebackType
from typing import Self

from rankfed.coordinator.errors import StorageError
from rankfed.coordinator.models import ClientRecord, DeviceLabel, Participant, Receipt, RoundRecord, ScoreRecord
from rankfed.protocol import ParticipantState

SCHEMA_VERSION = 2
"""Bumped on every incompatible change of the persisted layout."""

SCHEMA_VERSION_KEY = "schema_version"
RESERVED_META_KEYS = frozenset({SCHEMA_VERSION_KEY})


class SchemaVersionError(StorageError):
    """The state on disk was written by a newer RankFed than this one."""


class StateStore(abc.ABC):
    """Clients, rounds, participants, receipts, scores and a small key/value `meta` table."""

    # --- meta --------------------------------------------------------------------------

    @abc.abstractmethod
    def get_meta(self, key: str) -> str | None:
        """Value stored under `key` (federation id, token-signing secret, ...), or None."""

    @abc.abstractmethod
    def set_meta(self, key: str, value: str) -> None:
        """Insert or replace `key`. ValueError for a reserved key such as schema_version."""

    # --- clients -----------------------------------------------------------------------

    @abc.abstractmethod
    def upsert_client(self, rec: ClientRecord) -> None:
        """Insert `rec`, or replace the record with the same client_id."""

    @abc.abstractmethod
    def get_client(self, client_id: str) -> ClientRecord | None: ...

    @abc.abstractmethod
    def find_client_by_name(self, device_name: str) -> ClientRecord | None:
        """The client with this device name; the most recently joined one if several."""

    @abc.abstractmethod
    def list_clients(self) -> list[ClientRecord]:
        """All clients ordered by joined_at (ties: first inserted first)."""

    @abc.abstractmethod
    def client_names(self) -> dict[str, str]:
        """Every client's device name, by client id (one read: what sampling a round needs)."""

    @abc.abstractmethod
    def count_clients(self) -> tuple[int, int]:
        """(registered clients, those of them that left): what a metrics scrape needs,
        without building a record per client."""

    # --- rounds ------------------------------------------------------------------------

    @abc.abstractmethod
    def put_round(self, rec: RoundRecord) -> None:
        """Insert `rec`, or replace the record of the same round number."""

    @abc.abstractmethod
    def get_round(self, n: int) -> RoundRecord | None: ...

    @abc.abstractmethod
    def latest_round(self) -> RoundRecord | None:
        """The round with the highest number, or None before the first round."""

    @abc.abstractmethod
    def list_rounds(self, limit: int = 0) -> list[RoundRecord]:
        """Rounds oldest first; `limit` > 0 keeps only the newest `limit` of them."""

    # --- participants ------------------------------------------------------------------

    @abc.abstractmethod
    def put_participant(self, p: Participant) -> None:
        """Insert or replace by (round, client_id). NotFoundError for an unknown round/client."""

    @abc.abstractmethod
    def get_participant(self, round: int, client_id: str) -> Participant | None: ...

    @abc.abstractmethod
    def list_participants(self, round: int) -> list[Participant]:
        """Participants of `round` in the order they were first put."""

    @abc.abstractmethod
    def count_participants(self, round: int) -> dict[ParticipantState, int]:
        """How many participants of `round` are in each state (states with none left out):
        what the round loop polls, without building a record per participant."""

    @abc.abstractmethod
    def participant_devices(self, round: int) -> dict[str, DeviceLabel]:
        """client id -> device name and class of each participant of `round`, in the order of
        `list_participants`: what a status shows of each, in one read instead of a
        `get_client` (a whole ClientRecord) per participant. A participant whose client is
        not stored is left out."""

    # --- receipts ----------------------------------------------------------------------

    @abc.abstractmethod
    def add_receipt(self, r: Receipt) -> None:
        """Record an accepted update. DuplicateError if (round, client_id) already has one
        or receipt_id is taken; NotFoundError for an unknown round or client."""

    @abc.abstractmethod
    def get_receipt(self, round: int, client_id: str) -> Receipt | None: ...

    @abc.abstractmethod
    def list_receipts(self, round: int) -> list[Receipt]:
        """Receipts of `round` ordered by accepted_at (ties: first added first)."""

    @abc.abstractmethod
    def latest_receipts(self) -> list[Receipt]:
        """Each client's receipt of its highest round, newest round first (ties: by
        accepted_at, then first added first)."""

    # --- scores ------------------------------------------------------------------------

    @abc.abstractmethod
    def put_score(self, s: ScoreRecord) -> None:
        """Insert, or replace the score of the same (round, client_id, source). NotFoundError
        for an unknown round, or an unknown client when client_id is not ""."""

    @abc.abstractmethod
    def get_score(self, round: int, client_id: str, source: str) -> ScoreRecord | None: ...

    @abc.abstractmethod
    def latest_scores(self, source: str) -> dict[str, ScoreRecord]:
        """client id -> its score of `source` from its highest round (global scores, client_id
        "", are not included)."""

    @abc.abstractmethod
    def list_scores(self, source: str, client_id: str = "") -> list[ScoreRecord]:
        """The scores of `source` of one client ("": the global adapters), oldest round first."""

    # --- runs --------------------------------------------------------------------------

    # Meta keys a new run starts without (the rest — token key, model, token generations,
    # bans — belong to the coordinator and its devices, not to one run).
    RUN_META_KEYS = ("federation_id", "operator.paused", "operator.stopped", "allocation.ranking")

    @abc.abstractmethod
    def snapshot(self, path: Path) -> bool:
        """Write a consistent copy of the whole state to `path` (a store file the coordinator
        and `rankfed coordinator export` can open); False when this store keeps nothing."""

    @abc.abstractmethod
    def reset_run(self) -> None:
        """Start a new run: rounds, participants, receipts and scores are cleared, the run's meta keys
        removed, and every client's per-run counters (rounds completed, deadlines missed)
        reset; clients, their tokens and the rest of meta stay."""

    # --- lifecycle ---------------------------------------------------------------------

    @abc.abstractmethod
    def transaction(self) -> AbstractContextManager[None]:
        """Everything inside commits atomically or not at all.

        Re-entrant: a nested block is a savepoint. It commits nothing itself; an exception
        escaping it undoes that block's writes only, and the outer block decides about the
        rest (it rolls back everything if the exception escapes it too). Every write method
        runs in such a block, so a write that fails changes nothing even inside a caller's
        transaction.
        """

    @abc.abstractmethod
    def sync(self) -> None:
        """Make every commit so far survive power loss (blocking; call it off the event loop
        where that matters). Commits always survive a crash of the process; what answers a
        device or an operator with a promise (a receipt, a ban) is synced before the answer.
        A store that is durable at commit, or keeps nothing, has nothing to do."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release resources. Idempotent; any other call afterwards raises StorageError."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def check_meta_key(key: str) -> None:
    """Refuse keys the store keeps for itself (both implementations call this)."""
    if not key:
        raise ValueError("meta key must be a non-empty string")
    if key in RESERVED_META_KEYS:
        raise ValueError(f"meta key {key!r} is reserved for the state store itself")


def check_limit(limit: int) -> None:
    if limit < 0:
        raise ValueError(f"limit must be >= 0 (0 means all rounds), got {limit}")


def check_finite(what: str, **values: float | None) -> None:
    """Refuse NaN in plain float columns: SQLite would silently store NaN as NULL.

    Nested metrics (JSON) keep NaN and infinities faithfully; only the scalar columns
    (timestamps, deadlines, alpha) go through here, where NaN is always a bug upstream.
    """
    for name, v in values.items():
        if v is not None and isinstance(v, float) and math.isnan(v):
            raise ValueError(f"{what}.{name} is NaN; the state store refuses NaN in this field")
