"""SQLite schema: version 1, and what version 2 adds (the scores of data-aware rank
allocation). A new file gets SCHEMA_V1 then every migration; a file at version n gets the
migrations from n on (MIGRATIONS[n] takes it to n + 1).

Why the explicit `seq INTEGER PRIMARY KEY` columns: the contract orders ties by insertion,
and only an INTEGER PRIMARY KEY is a rowid that VACUUM promises to keep. Upserts use
`ON CONFLICT DO UPDATE` (never `INSERT OR REPLACE`), so a replaced row keeps its seq and
foreign keys pointing at it stay valid. Nested dataclasses are JSON text (see _codec);
enums are stored by value.
"""

from __future__ import annotations

SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS clients (
    seq              INTEGER PRIMARY KEY,
    client_id        TEXT NOT NULL UNIQUE,
    device_name      TEXT NOT NULL,
    capability       TEXT NOT NULL,          -- JSON of models.Capability
    num_examples     INTEGER NOT NULL,
    joined_at        REAL NOT NULL,
    last_seen_at     REAL NOT NULL,
    rank             INTEGER NOT NULL,
    tier             TEXT NOT NULL,
    online           INTEGER NOT NULL,
    rounds_completed INTEGER NOT NULL,
    deadlines_missed INTEGER NOT NULL,
    has_left         INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS clients_by_joined ON clients (joined_at, seq);
CREATE INDEX IF NOT EXISTS clients_by_name ON clients (device_name, joined_at, seq);
CREATE TABLE IF NOT EXISTS rounds (
    round          INTEGER PRIMARY KEY,
    phase          TEXT NOT NULL,
    method         TEXT NOT NULL,
    started_at     REAL NOT NULL,
    deadline       REAL NOT NULL,
    min_clients    INTEGER NOT NULL,
    global_rank    INTEGER NOT NULL,
    finished_at    REAL,
    global_sha256  TEXT NOT NULL,
    metrics        TEXT NOT NULL,            -- JSON object of floats
    failure_reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS participants (
    seq          INTEGER PRIMARY KEY,
    round        INTEGER NOT NULL REFERENCES rounds (round),
    client_id    TEXT NOT NULL REFERENCES clients (client_id),
    rank         INTEGER NOT NULL,
    alpha        REAL NOT NULL,
    state        TEXT NOT NULL,
    bytes_down   INTEGER NOT NULL,
    bytes_up     INTEGER NOT NULL,
    num_examples INTEGER NOT NULL,
    metrics      TEXT,                       -- JSON of models.TrainMetrics, or NULL
    UNIQUE (round, client_id)
);
CREATE TABLE IF NOT EXISTS receipts (
    seq          INTEGER PRIMARY KEY,
    round        INTEGER NOT NULL REFERENCES rounds (round),
    client_id    TEXT NOT NULL REFERENCES clients (client_id),
    receipt_id   TEXT NOT NULL UNIQUE,
    rank         INTEGER NOT NULL,
    num_examples INTEGER NOT NULL,
    nbytes       INTEGER NOT NULL,
    sha256       TEXT NOT NULL,
    blob_path    TEXT NOT NULL,
    accepted_at  REAL NOT NULL,
    metrics      TEXT NOT NULL,              -- JSON of models.TrainMetrics
    UNIQUE (round, client_id)
);
CREATE INDEX IF NOT EXISTS receipts_by_time ON receipts (round, accepted_at, seq);
CREATE INDEX IF NOT EXISTS participants_by_client ON participants (client_id);
CREATE INDEX IF NOT EXISTS receipts_by_client ON receipts (client_id);
"""

# Version 2: scores of updates and global adapters (rank_policy.allocation, export --round best).
# client_id '' is a round's global adapter, so it cannot reference clients; put_score checks it.
SCORES_V2 = """
CREATE TABLE IF NOT EXISTS scores (
    seq            INTEGER PRIMARY KEY,
    round          INTEGER NOT NULL REFERENCES rounds (round),
    client_id      TEXT NOT NULL,            -- '' : the round's global adapter
    source         TEXT NOT NULL,            -- 'reported' or 'validation'
    metrics        TEXT NOT NULL,            -- JSON object of floats
    recorded_at    REAL NOT NULL,
    adapter_sha256 TEXT NOT NULL,
    reporter       TEXT NOT NULL,
    UNIQUE (round, client_id, source)
);
CREATE INDEX IF NOT EXISTS scores_by_client ON scores (source, client_id, round);
"""

MIGRATIONS: dict[int, str] = {1: SCORES_V2}
"""version -> the statements that take a file from that version to the next."""
