"""The bytes of broken uploads, kept so that a device resumes instead of sending them again.

Layout under the blob root, next to updates/ and global/:

    staging/round-000001/<client_id>.part   the bytes an upload stream wrote, in order
    staging/round-000001/<client_id>.json   what they are: sha256 and total_bytes the header
                                            declared, staged_bytes on disk, parked_at

Every upload streams into its .part file from its first byte (the file is its BlobWriter's
staging file): accepted, the file is renamed into updates/; rejected for its content, it
is deleted. When its stream breaks instead (a cut link, a dead connection, a cancelled
call, an idle timeout, a newer stream of the same device) the ingest *parks* it: the
file is fsynced and closed, then the .json is written atomically, so the `staged_bytes`
it names are on disk before anyone is told about them (UploadStatus). A resume reopens
the file at that length or less, hashes the prefix again and appends; the sha256 check
at the end covers the whole file.

Bounds. The paths are keyed by round and device: at most one kept upload per device and
round, never longer than the size its header declared (≤ server.max_upload_bytes, the
cap an accepted update has: it is the same file). A new upload (resume_offset 0) of the
device replaces it. It is dropped when the round closes (every round directory but the
open round's goes, then and at start-up) and `server.upload_resume_ttl_seconds` after its
stream broke (checked when asked for, and by a periodic sweep).

Crashes. A .json names only fsynced bytes; the file may be longer (a resumed stream that
never parked) or, after a power loss, hold garbage past what was fsynced: a resume trusts
min(file size, staged_bytes). A .part without a .json (a stream that never parked) and a
.json without a .part are dropped at start-up.

Plain Python, no grpc; the ingest (rankfed.coordinator.ingest) drives it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from rankfed.coordinator.store import BlobStore
from rankfed.coordinator.store.blobs import round_dir
from rankfed.protocol.files import write_atomic

log = logging.getLogger("rankfed.coordinator")

STAGING_DIR = "staging"
_ROUND_DIR = re.compile(r"round-(\d{6,})")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class StagedUpload:
    """Kept bytes of one device's broken upload for one round."""

    round: int
    client_id: str
    sha256: str
    total_bytes: int
    staged_bytes: int
    parked_at: float

    def matches(self, sha256: str, total_bytes: int) -> bool:
        """Whether these are bytes of the upload a header with this digest and size declares."""
        return self.sha256 == sha256 and self.total_bytes == total_bytes


def part_relpath(round: int, client_id: str) -> str:
    return f"{STAGING_DIR}/{round_dir(round)}/{client_id}.part"


def _meta_relpath(round: int, client_id: str) -> str:
    return f"{STAGING_DIR}/{round_dir(round)}/{client_id}.json"


class Staging:
    """The staging area of one blob store; `ttl_s` 0 means nothing is ever kept."""

    def __init__(self, blobs: BlobStore, *, ttl_s: float, clock: Callable[[], float]) -> None:
        self._blobs = blobs
        self.ttl_s = ttl_s
        self._clock = clock

    @property
    def root(self) -> Path:
        return self._blobs.root / STAGING_DIR

    @property
    def enabled(self) -> bool:
        return self.ttl_s > 0

    def expires_at(self, staged: StagedUpload) -> float:
        return staged.parked_at + self.ttl_s

    # ------------------------------------------------------------------ one device's upload

    def get(self, round: int, client_id: str) -> StagedUpload | None:
        """The kept upload of this device for this round, or None (none, unreadable or
        expired: those are dropped). Reads two small files: cheap enough for the loop."""
        meta, part = self._blobs.path(_meta_relpath(round, client_id)), self._blobs.path(part_relpath(round, client_id))
        try:
            raw = meta.read_bytes()
            size = part.stat().st_size
        except FileNotFoundError:
            return None
        staged = _parse(raw, round, client_id)
        if staged is None or self._clock() >= self.expires_at(staged) or size == 0:
            self.drop(round, client_id)
            return None
        return _trusted(staged, size)

    def record(self, staged: StagedUpload) -> None:
        """Name the kept bytes (after the file was fsynced): a blocking write, call it off the loop."""
        path = self._blobs.path(_meta_relpath(staged.round, staged.client_id))
        write_atomic(path, json.dumps(asdict(staged)).encode())

    def forget(self, round: int, client_id: str) -> None:
        """Drop the description only (the .part is gone or being reused)."""
        self._blobs.path(_meta_relpath(round, client_id)).unlink(missing_ok=True)

    def drop(self, round: int, client_id: str) -> None:
        """Drop the kept bytes and their description. Idempotent."""
        self.forget(round, client_id)
        self._blobs.path(part_relpath(round, client_id)).unlink(missing_ok=True)

    # ------------------------------------------------------------------ sweeps

    def drop_rounds(self, keep: int | None = None) -> int:
        """Delete every round's staging directory but `keep`'s (the open round); returns how many."""
        removed = 0
        for number, path in self._round_dirs():
            if number != keep:
                shutil.rmtree(path, ignore_errors=True)
                removed += 1
        return removed

    def expired(self, round: int) -> list[str]:
        """Client ids whose kept upload of `round` is past its time (or unreadable): a
        directory walk, call it off the loop."""
        now, found = self._clock(), []
        directory = self.root / round_dir(round)
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return []
        for name in names:
            if not name.endswith(".json"):
                continue
            client_id = name[: -len(".json")]
            try:
                staged = _parse((directory / name).read_bytes(), round, client_id)
            except OSError:
                continue
            if staged is None or now >= self.expires_at(staged):
                found.append(client_id)
        return found

    def recover(self, open_round: int | None) -> int:
        """At start-up, before serving: keep only the open round's kept uploads that have
        both files; returns how many files went."""
        removed = self.drop_rounds(keep=open_round)
        if open_round is None:
            return removed
        directory = self.root / round_dir(open_round)
        try:
            names = set(os.listdir(directory))
        except FileNotFoundError:
            return removed
        for name in names:
            stem, dot, ext = name.rpartition(".")
            other = f"{stem}.json" if ext == "part" else f"{stem}.part" if ext == "json" else None
            if not dot or other is None or other not in names:
                (directory / name).unlink(missing_ok=True)
                removed += 1
        return removed

    def _round_dirs(self) -> list[tuple[int, Path]]:
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return []
        found = []
        for entry in entries:
            match = _ROUND_DIR.fullmatch(entry.name)
            if match is not None and entry.is_dir(follow_symlinks=False):
                found.append((int(match.group(1)), Path(entry.path)))
        return found


def _parse(raw: bytes, round: int, client_id: str) -> StagedUpload | None:
    """The description in a .json, or None when it is not one we wrote for this round and device."""
    try:
        data = json.loads(raw)
        staged = StagedUpload(
            round=int(data["round"]), client_id=str(data["client_id"]), sha256=str(data["sha256"]),
            total_bytes=int(data["total_bytes"]), staged_bytes=int(data["staged_bytes"]),
            parked_at=float(data["parked_at"]),
        )
    except (ValueError, TypeError, KeyError):
        return None
    ok = (
        staged.round == round and staged.client_id == client_id and _SHA256_HEX.fullmatch(staged.sha256) is not None
        and 0 < staged.staged_bytes <= staged.total_bytes
    )
    return staged if ok else None


def _trusted(staged: StagedUpload, size: int) -> StagedUpload:
    """Only bytes both fsynced (the description) and present (the file) count."""
    if size >= staged.staged_bytes:
        return staged
    return StagedUpload(**{**asdict(staged), "staged_bytes": size})
