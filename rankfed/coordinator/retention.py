"""Retention of accepted updates ([storage] updates_keep_rounds) and disk use.

Every accepted update is fsynced to `blobs/updates/round-NNNNNN/` before it is
acknowledged, so that a crashed coordinator can rebuild the open round. Once a round has
closed, its updates are needed only for audits: a round that aggregated has its global
adapter written (and fsynced) before the round is recorded as done, and a failed round's
updates were never used. With `updates_keep_rounds = N` (N > 0), the update directory of
round r is deleted once round r + N has closed, if round r is done with its global adapter
on disk, or failed. Global adapters (`blobs/global/`) are never deleted. The receipts stay
in the state database (digest, size, metrics), so history and status are unchanged.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from rankfed.coordinator.models import RoundRecord
from rankfed.coordinator.store import BlobStore, StateStore
from rankfed.coordinator.store.blobs import round_dir
from rankfed.protocol import RoundPhase

log = logging.getLogger("rankfed.coordinator")


def _tree_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass  # deleted while we walked
    return total


def disk_usage(data_dir: Path, blobs: BlobStore) -> dict[str, int]:
    """Bytes on disk by kind: accepted updates, global adapters, bytes of broken uploads
    kept for a resume, and the state database (with its WAL). Walks the directories: cheap next to a scrape interval at the sizes a
    coordinator holds (thousands of files)."""
    state = sum(p.stat().st_size for p in data_dir.glob("state.sqlite3*") if p.is_file())
    return {
        "updates": _tree_bytes(blobs.root / "updates"),
        "global_adapters": _tree_bytes(blobs.root / "global"),
        "staged_uploads": _tree_bytes(blobs.root / "staging"),
        "state_db": state,
    }


class UpdateRetention:
    """Deletes closed rounds' update directories per `updates_keep_rounds` (0: keep all)."""

    def __init__(self, keep_rounds: int, store: StateStore, blobs: BlobStore,
                 global_exists: Callable[[int], bool], on_deleted: Callable[[int], None] | None = None) -> None:
        self._keep = keep_rounds
        self._store = store
        self._blobs = blobs
        self._global_exists = global_exists
        self._on_deleted = on_deleted

    def round_closed(self, record: RoundRecord) -> int:
        """Apply retention after `record` closed; returns how many update files it deleted."""
        return self.sweep(record.round)

    def sweep(self, last_closed: int | None = None) -> int:
        """Delete what retention allows, given the last closed round (None: read it)."""
        if self._keep <= 0:
            return 0
        rounds = {r.round: r for r in self._store.list_rounds()}
        if last_closed is None:
            closed = [n for n, r in rounds.items() if r.phase in (RoundPhase.DONE, RoundPhase.FAILED)]
            if not closed:
                return 0
            last_closed = max(closed)
        updates = self._blobs.root / "updates"
        if not updates.is_dir():
            return 0
        deleted = 0
        for entry in sorted(updates.iterdir()):
            if not entry.name.startswith("round-") or not entry.name[6:].isdigit():
                continue
            n = int(entry.name[6:])
            record = rounds.get(n)
            if record is None or n > last_closed - self._keep or entry.name != round_dir(n):
                continue
            durable = record.phase is RoundPhase.FAILED or (
                record.phase is RoundPhase.DONE and self._global_exists(n))
            if not durable:
                continue
            files = sum(1 for _ in entry.glob("*.safetensors"))
            shutil.rmtree(entry, ignore_errors=True)
            deleted += files
            log.info("retention: deleted accepted updates", extra={"round": n, "files": files,
                                                                     "last_closed_round": last_closed})
        if deleted and self._on_deleted is not None:
            self._on_deleted(deleted)
        return deleted
