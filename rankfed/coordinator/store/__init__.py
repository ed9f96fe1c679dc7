"""The coordinator's persistence: a StateStore for records and a BlobStore for files.

`open_store(data_dir)` is what the daemon calls at start-up; tests of the core use
`MemoryStore` plus a `BlobStore` on a temporary directory.

    data_dir/state.sqlite3   (+ -wal, -shm)   clients, rounds, participants, receipts, meta
    data_dir/blobs/                           see blobs.py for the layout

The order that makes an acknowledged upload durable: stream into a `BlobWriter`, validate,
`commit()` (file fsynced and renamed), then `add_receipt` (row fsynced), then answer the
client. A crash between the two leaves a committed blob without a receipt, which recovery
can find with `BlobStore.list_blobs("updates/...")` and delete; a crash before commit leaves
only a temporary file, which `open_store` sweeps.
"""

from __future__ import annotations

import logging
from pathlib import Path

from rankfed.coordinator.errors import StorageError
from rankfed.coordinator.store.base import (
    SCHEMA_VERSION,
    SchemaVersionError,
    StateStore,
)
from rankfed.coordinator.store.blobs import (
    BlobStore,
    BlobWriter,
    global_config_relpath,
    update_relpath,
)
from rankfed.coordinator.store.memory import MemoryStore
from rankfed.coordinator.store.sqlite import SqliteStore

__all__ = [
    "SCHEMA_VERSION",
    "BlobStore",
    "BlobWriter",
    "MemoryStore",
    "SchemaVersionError",
    "SqliteStore",
    "StateStore",
    "global_config_relpath",
    "open_store",
    "update_relpath",
]

log = logging.getLogger(__name__)

STATE_FILE = "state.sqlite3"
BLOB_DIR = "blobs"


def open_store(data_dir: Path | str) -> tuple[SqliteStore, BlobStore]:
    """Open (creating if needed) the durable state under `data_dir`.

    Sweeps temporary files left by a crash mid-upload, so they never linger. The caller
    owns the SqliteStore and must `close()` it.
    """
    data_dir = Path(data_dir)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        # Owner-only: the state database holds the token-signing key and every device's
        # update; nobody else on the host may read them.
        data_dir.chmod(0o700)
    except OSError as e:
        raise StorageError(f"cannot create data directory {data_dir}: {e}") from e
    blobs = BlobStore(data_dir / BLOB_DIR)
    swept = blobs.sweep_temporaries()
    if swept:
        log.info("removed %d partial blob(s) left by an interrupted upload", swept)
    store = SqliteStore(data_dir / STATE_FILE)
    for path in data_dir.glob(f"{STATE_FILE}*"):  # the database and its WAL and shared-memory files
        path.chmod(0o600)
    return store, blobs
