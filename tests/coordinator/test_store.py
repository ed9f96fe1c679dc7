"""StateStore contract, run against MemoryStore and SqliteStore; then SQLite-only durability."""

from __future__ import annotations

import math
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from rankfed.coordinator.errors import DuplicateError, NotFoundError, StorageError
from rankfed.coordinator.models import ClientRecord, DeviceLabel, Participant, Receipt, RoundRecord, ScoreRecord
from rankfed.coordinator.store import (
    SCHEMA_VERSION,
    MemoryStore,
    SchemaVersionError,
    SqliteStore,
    StateStore,
    open_store,
)
from rankfed.protocol import (
    Capability,
    DeviceClass,
    ParticipantState,
    RoundPhase,
    TrainMetrics,
)

# --- builders ---------------------------------------------------------------------------


def client(
    cid: str = "c1", name: str = "dev-1", joined: float = 100.0, **kw: object
) -> ClientRecord:
    fields: dict[str, object] = dict(
        client_id=cid,
        device_name=name,
        capability=Capability(
            device_class=DeviceClass.CUDA,
            memory_total_bytes=17_179_869_184,
            memory_free_bytes=2**62,
            cpu_cores=16,
            compute_gflops=0.1 + 0.2,  # not exactly representable: tests bit-exact floats
            upload_bytes_per_second=1.5e9,
            download_bytes_per_second=float("inf"),
            accelerator_name="NVIDIA H100 80GB HBM3 — ü",
            accelerator_memory_bytes=85_520_809_984,
            platform="linux-x86_64",
        ),
        num_examples=1234,
        joined_at=joined,
        last_seen_at=joined + 1 / 3,
        rank=8,
        tier="gpu",
    )
    fields.update(kw)
    return ClientRecord(**fields)  # type: ignore[arg-type]


def round_(n: int = 1, **kw: object) -> RoundRecord:
    fields: dict[str, object] = dict(
        round=n,
        phase=RoundPhase.TRAINING,
        method="fedavg",
        started_at=1_700_000_000.123456789,
        deadline=1_700_000_600.5,
        min_clients=2,
        global_rank=16,
    )
    fields.update(kw)
    return RoundRecord(**fields)  # type: ignore[arg-type]


def metrics() -> TrainMetrics:
    return TrainMetrics(
        loss_first=2.718281828459045,
        loss_last=float("nan"),
        steps=50,
        train_seconds=1e-300,
        eval={"acc": 0.1 + 0.7, "ppl": float("-inf")},
    )


def participant(n: int = 1, cid: str = "c1", **kw: object) -> Participant:
    fields: dict[str, object] = dict(
        round=n, client_id=cid, rank=8, alpha=16.0, state=ParticipantState.ASSIGNED
    )
    fields.update(kw)
    return Participant(**fields)  # type: ignore[arg-type]


def receipt(n: int = 1, cid: str = "c1", at: float = 200.0, **kw: object) -> Receipt:
    fields: dict[str, object] = dict(
        round=n,
        client_id=cid,
        receipt_id=f"r-{n}-{cid}",
        rank=8,
        num_examples=1234,
        nbytes=2**40 + 7,
        sha256="ab" * 32,
        blob_path=f"updates/round-{n:06d}/{cid}.safetensors",
        accepted_at=at,
        metrics=metrics(),
    )
    fields.update(kw)
    return Receipt(**fields)  # type: ignore[arg-type]


def score(n: int = 1, cid: str = "c1", source: str = "validation", loss: float = 0.5, **kw: object) -> ScoreRecord:
    fields: dict[str, object] = dict(
        round=n, client_id=cid, source=source, metrics={"loss": loss, "accuracy": 0.1 + 0.2},
        recorded_at=300.0 + n, adapter_sha256="cd" * 32, reporter="evaluator token from ipv4:127.0.0.1:1",
    )
    fields.update(kw)
    return ScoreRecord(**fields)  # type: ignore[arg-type]


def same(a: object, b: object) -> bool:
    """Equality that treats NaN as equal to NaN (our metrics hold NaN on purpose)."""
    return repr(a) == repr(b)


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateStore]:
    s: StateStore = MemoryStore() if request.param == "memory" else SqliteStore(tmp_path / "s.db")
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def seeded(store: StateStore) -> StateStore:
    """Rounds 1-2 and clients c1-c3, so participants and receipts have something to name."""
    for n in (1, 2):
        store.put_round(round_(n))
    for i in (1, 2, 3):
        store.upsert_client(client(f"c{i}", f"dev-{i}", joined=100.0 + i))
    return store


# --- the contract -------------------------------------------------------------------------


class TestStateStoreContract:
    def test_reset_run_keeps_clients_and_coordinator_meta(self, seeded: StateStore, tmp_path: Path) -> None:
        seeded.put_participant(participant(1, "c1"))
        seeded.add_receipt(receipt(1, "c1"))
        seeded.upsert_client(replace(seeded.get_client("c2"), rounds_completed=4, deadlines_missed=2))
        seeded.set_meta("federation_id", "fed-old")
        seeded.set_meta("token_key", "k")
        seeded.set_meta("operator.paused", "1")
        archived = seeded.snapshot(tmp_path / "archive" / "state.sqlite3")
        seeded.reset_run()
        assert seeded.list_rounds() == [] and seeded.latest_round() is None
        assert seeded.list_participants(1) == [] and seeded.list_receipts(1) == []
        assert [c.client_id for c in seeded.list_clients()] == ["c1", "c2", "c3"]
        assert (seeded.get_client("c2").rounds_completed, seeded.get_client("c2").deadlines_missed) == (0, 0)
        assert seeded.get_meta("federation_id") is None and seeded.get_meta("operator.paused") is None
        assert seeded.get_meta("token_key") == "k"
        if archived:  # the archive is the whole old run, openable as a store
            old = SqliteStore(tmp_path / "archive" / "state.sqlite3")
            try:
                assert [r.round for r in old.list_rounds()] == [1, 2] and old.get_receipt(1, "c1") is not None
                assert old.get_meta("federation_id") == "fed-old"
            finally:
                old.close()
        else:
            assert isinstance(seeded, MemoryStore)

    def test_meta_roundtrip_and_replace(self, store: StateStore) -> None:
        assert store.get_meta("federation_id") is None
        store.set_meta("federation_id", "fed-1")
        store.set_meta("token_secret", "s3cr3t\x00ü")
        store.set_meta("federation_id", "fed-2")
        assert store.get_meta("federation_id") == "fed-2"
        assert store.get_meta("token_secret") == "s3cr3t\x00ü"

    def test_schema_version_is_reserved(self, store: StateStore) -> None:
        assert store.get_meta("schema_version") == str(SCHEMA_VERSION)
        with pytest.raises(ValueError, match="reserved"):
            store.set_meta("schema_version", "99")
        with pytest.raises(ValueError):
            store.set_meta("", "x")

    def test_client_roundtrip_is_exact(self, store: StateStore) -> None:
        c = client(online=False, left=True, rounds_completed=3, deadlines_missed=2)
        store.upsert_client(c)
        got = store.get_client("c1")
        assert got == c
        assert got is not None and type(got.capability.device_class) is DeviceClass
        assert got.capability.compute_gflops.hex() == (0.1 + 0.2).hex()
        assert store.get_client("nope") is None

    def test_upsert_replaces_and_keeps_position(self, store: StateStore) -> None:
        store.upsert_client(client("a", "dev-a", joined=5.0))
        store.upsert_client(client("b", "dev-b", joined=5.0))
        store.upsert_client(client("a", "dev-a", joined=5.0, rank=4, last_seen_at=9.0))
        assert [c.client_id for c in store.list_clients()] == ["a", "b"]
        got = store.get_client("a")
        assert got is not None and got.rank == 4 and got.last_seen_at == 9.0

    def test_list_clients_ordered_by_joined_at(self, store: StateStore) -> None:
        for cid, t in [("x", 30.0), ("y", 10.0), ("z", 20.0), ("w", 10.0)]:
            store.upsert_client(client(cid, f"dev-{cid}", joined=t))
        assert [c.client_id for c in store.list_clients()] == ["y", "w", "z", "x"]

    def test_client_names(self, store: StateStore) -> None:
        assert store.client_names() == {}
        store.upsert_client(client("a", "phone"))
        store.upsert_client(client("b", "laptop", left=True))
        store.upsert_client(client("a", "phone-renamed"))
        assert store.client_names() == {"a": "phone-renamed", "b": "laptop"}

    def test_count_clients(self, store: StateStore) -> None:
        assert store.count_clients() == (0, 0)
        for cid in ("a", "b", "c"):
            store.upsert_client(client(cid, f"dev-{cid}"))
        store.upsert_client(client("b", "dev-b", left=True))
        assert store.count_clients() == (3, 1)

    def test_find_client_by_name(self, store: StateStore) -> None:
        store.upsert_client(client("old", "phone", joined=1.0))
        store.upsert_client(client("other", "laptop", joined=2.0))
        store.upsert_client(client("new", "phone", joined=3.0))
        found = store.find_client_by_name("phone")
        assert found is not None and found.client_id == "new"
        assert store.find_client_by_name("toaster") is None

    def test_rounds(self, store: StateStore) -> None:
        assert store.latest_round() is None and store.list_rounds() == []
        for n in (3, 1, 2):
            store.put_round(round_(n))
        done = round_(
            2,
            phase=RoundPhase.DONE,
            finished_at=1_700_000_599.25,
            global_sha256="cd" * 32,
            metrics={"loss": 0.1 + 0.2, "big": 1e308, "nan": float("nan")},
            failure_reason="",
        )
        store.put_round(done)
        assert same(store.get_round(2), done)
        got = store.get_round(2)
        assert got is not None and type(got.phase) is RoundPhase
        assert store.get_round(9) is None
        latest = store.latest_round()
        assert latest is not None and latest.round == 3
        assert [r.round for r in store.list_rounds()] == [1, 2, 3]
        assert [r.round for r in store.list_rounds(limit=2)] == [2, 3]
        assert [r.round for r in store.list_rounds(limit=10)] == [1, 2, 3]
        with pytest.raises(ValueError):
            store.list_rounds(limit=-1)

    def test_participants(self, seeded: StateStore) -> None:
        s = seeded
        s.put_participant(participant(1, "c2"))
        s.put_participant(participant(1, "c1", metrics=metrics()))
        s.put_participant(participant(2, "c1"))
        updated = participant(
            1, "c2", state=ParticipantState.UPLOADED, bytes_up=2**33, bytes_down=7
        )
        s.put_participant(updated)
        assert s.get_participant(1, "c2") == updated
        got = s.get_participant(1, "c1")
        assert same(got, participant(1, "c1", metrics=metrics()))
        assert got is not None and type(got.state) is ParticipantState
        assert s.get_participant(1, "c3") is None
        assert [p.client_id for p in s.list_participants(1)] == ["c2", "c1"]
        assert [p.client_id for p in s.list_participants(2)] == ["c1"]
        assert s.list_participants(7) == []
        assert s.count_participants(1) == {ParticipantState.ASSIGNED: 1, ParticipantState.UPLOADED: 1}
        assert s.count_participants(7) == {}

    def test_participant_devices(self, seeded: StateStore) -> None:
        s = seeded
        s.upsert_client(client("c2", "dev-2", joined=102.0, capability=Capability()))  # the default class
        s.upsert_client(client("c4", "phone-ü", joined=104.0,
                               capability=Capability(device_class=DeviceClass.MOBILE, cpu_cores=8)))
        for n, cid in [(1, "c3"), (1, "c1"), (2, "c2"), (1, "c4"), (2, "c1")]:
            s.put_participant(participant(n, cid))
        s.put_participant(participant(1, "c3", state=ParticipantState.UPLOADED))  # replaced: keeps its place
        got = s.participant_devices(1)
        assert list(got) == ["c3", "c1", "c4"]  # list_participants' order; round 2's are not included
        assert got == {
            "c3": DeviceLabel("dev-3", DeviceClass.CUDA),
            "c1": DeviceLabel("dev-1", DeviceClass.CUDA),
            "c4": DeviceLabel("phone-ü", DeviceClass.MOBILE),
        }
        assert all(type(d.device_class) is DeviceClass for d in got.values())
        assert s.participant_devices(2) == {"c2": DeviceLabel("dev-2", DeviceClass.CPU),
                                            "c1": DeviceLabel("dev-1", DeviceClass.CUDA)}
        for n in (1, 2):  # what get_client says, field for field
            for cid, d in s.participant_devices(n).items():
                rec = s.get_client(cid)
                assert rec is not None and d == DeviceLabel(rec.device_name, rec.capability.device_class)
        s.upsert_client(client("c1", "renamed", joined=101.0, capability=Capability(device_class=DeviceClass.MPS)))
        assert s.participant_devices(1)["c1"] == DeviceLabel("renamed", DeviceClass.MPS)  # the client as now stored
        assert s.participant_devices(7) == {}

    def test_participant_needs_round_and_client(self, seeded: StateStore) -> None:
        with pytest.raises(NotFoundError, match="round 9"):
            seeded.put_participant(participant(9, "c1"))
        with pytest.raises(NotFoundError, match="ghost"):
            seeded.put_participant(participant(1, "ghost"))
        assert seeded.list_participants(1) == []

    def test_receipts(self, seeded: StateStore) -> None:
        s = seeded
        s.add_receipt(receipt(1, "c2", at=300.0))
        s.add_receipt(receipt(1, "c3", at=100.0))
        s.add_receipt(receipt(1, "c1", at=300.0))
        s.add_receipt(receipt(2, "c1", at=50.0))
        assert same(s.get_receipt(1, "c2"), receipt(1, "c2", at=300.0))
        assert s.get_receipt(2, "c2") is None
        assert [r.client_id for r in s.list_receipts(1)] == ["c3", "c2", "c1"]
        assert [r.client_id for r in s.list_receipts(2)] == ["c1"]
        assert s.list_receipts(3) == []

    def test_default_metrics_receipt(self, seeded: StateStore) -> None:
        r = receipt(metrics=TrainMetrics())
        seeded.add_receipt(r)
        assert seeded.get_receipt(1, "c1") == r

    def test_duplicate_receipt(self, seeded: StateStore) -> None:
        first = receipt(1, "c1", at=1.0)
        seeded.add_receipt(first)
        with pytest.raises(DuplicateError, match="round 1"):
            seeded.add_receipt(receipt(1, "c1", at=2.0, receipt_id="other"))
        with pytest.raises(DuplicateError, match="receipt id"):
            seeded.add_receipt(receipt(1, "c2", receipt_id=first.receipt_id))
        assert [r.accepted_at for r in seeded.list_receipts(1)] == [1.0]
        assert seeded.get_receipt(1, "c2") is None

    def test_receipt_needs_round_and_client(self, seeded: StateStore) -> None:
        with pytest.raises(NotFoundError):
            seeded.add_receipt(receipt(5, "c1"))
        with pytest.raises(NotFoundError):
            seeded.add_receipt(receipt(1, "ghost"))

    def test_latest_receipts_one_per_client_newest_round_first(self, seeded: StateStore) -> None:
        seeded.add_receipt(receipt(1, "c1", at=201.0))
        seeded.add_receipt(receipt(1, "c2", at=200.0))
        seeded.add_receipt(receipt(2, "c1", at=300.0))
        seeded.add_receipt(receipt(1, "c3", at=200.0))
        assert [(r.round, r.client_id) for r in seeded.latest_receipts()] == [(2, "c1"), (1, "c2"), (1, "c3")]
        assert same(seeded.latest_receipts()[0], receipt(2, "c1", at=300.0))

    def test_scores_roundtrip_replace_and_latest(self, seeded: StateStore) -> None:
        seeded.put_score(score(1, "c1", loss=0.7))
        seeded.put_score(score(2, "c1", loss=0.4))
        seeded.put_score(score(1, "c2", loss=0.1 + 0.2))
        seeded.put_score(score(2, "c2", source="reported", loss=9.0))
        seeded.put_score(score(2, "", loss=0.3))  # round 2's global adapter
        assert seeded.get_score(1, "c2", "validation") == score(1, "c2", loss=0.1 + 0.2)
        assert seeded.get_score(1, "c3", "validation") is None
        latest = seeded.latest_scores("validation")
        assert sorted(latest) == ["c1", "c2"]  # the global adapter's score is not a device's
        assert latest["c1"] == score(2, "c1", loss=0.4) and latest["c2"].round == 1
        assert seeded.latest_scores("reported") == {"c2": score(2, "c2", source="reported", loss=9.0)}
        seeded.put_score(score(2, "c1", loss=0.2, reporter="again"))  # a second report replaces the first
        assert seeded.get_score(2, "c1", "validation") == score(2, "c1", loss=0.2, reporter="again")
        assert seeded.list_scores("validation") == [score(2, "", loss=0.3)]
        assert [s.round for s in seeded.list_scores("validation", "c1")] == [1, 2]
        seeded.latest_scores("validation")["c1"].metrics["loss"] = 99.0  # copies out
        assert seeded.get_score(2, "c1", "validation").metrics["loss"] == 0.2

    def test_score_needs_round_and_client(self, seeded: StateStore) -> None:
        with pytest.raises(NotFoundError, match="round 9"):
            seeded.put_score(score(9, "c1"))
        with pytest.raises(NotFoundError, match="nobody"):
            seeded.put_score(score(1, "nobody"))
        seeded.put_score(score(1, ""))  # a global adapter's score names no client

    def test_reset_run_clears_scores_and_the_ranking(self, seeded: StateStore) -> None:
        seeded.put_score(score(1, "c1"))
        seeded.set_meta("allocation.ranking", "{}")
        seeded.reset_run()
        assert seeded.latest_scores("validation") == {} and seeded.get_meta("allocation.ranking") is None

    def test_transaction_commits_together(self, seeded: StateStore) -> None:
        with seeded.transaction():
            seeded.add_receipt(receipt(1, "c1"))
            seeded.put_participant(participant(1, "c1", state=ParticipantState.UPLOADED))
        assert seeded.get_receipt(1, "c1") is not None
        assert seeded.get_participant(1, "c1") is not None

    def test_transaction_rollback_leaves_no_trace(self, seeded: StateStore) -> None:
        before_clients = seeded.list_clients()
        before_round = seeded.get_round(1)
        seeded.put_participant(participant(1, "c1"))
        with pytest.raises(RuntimeError, match="boom"):
            with seeded.transaction():
                seeded.set_meta("k", "v")
                seeded.upsert_client(client("c9", "dev-9", joined=1.0))
                seeded.upsert_client(client("c1", "renamed", joined=999.0))
                seeded.put_round(round_(1, phase=RoundPhase.FAILED))
                seeded.put_round(round_(3))
                seeded.put_participant(participant(1, "c1", state=ParticipantState.DROPPED))
                seeded.put_participant(participant(1, "c9"))
                seeded.add_receipt(receipt(1, "c1"))
                raise RuntimeError("boom")
        assert seeded.get_meta("k") is None
        assert seeded.list_clients() == before_clients
        assert seeded.get_round(1) == before_round
        assert seeded.get_round(3) is None
        assert seeded.list_participants(1) == [participant(1, "c1")]
        assert seeded.list_receipts(1) == []
        seeded.add_receipt(receipt(1, "c1"))  # the receipt id is free again
        assert seeded.get_receipt(1, "c1") is not None

    def test_nested_transaction_is_a_savepoint(self, seeded: StateStore) -> None:
        with seeded.transaction():
            seeded.set_meta("outer", "1")
            with seeded.transaction():
                seeded.set_meta("inner-ok", "1")
            with pytest.raises(KeyError):
                with seeded.transaction():
                    seeded.set_meta("inner-bad", "1")
                    raise KeyError("x")
            # a failing write inside a caller's transaction changes nothing and the caller goes on
            seeded.add_receipt(receipt(1, "c1"))
            with pytest.raises(DuplicateError):
                seeded.add_receipt(receipt(1, "c1", receipt_id="again"))
        assert seeded.get_meta("outer") == "1"
        assert seeded.get_meta("inner-ok") == "1"
        assert seeded.get_meta("inner-bad") is None
        assert len(seeded.list_receipts(1)) == 1

    def test_nested_rollback_propagating_undoes_all(self, seeded: StateStore) -> None:
        with pytest.raises(ValueError):
            with seeded.transaction():
                seeded.set_meta("outer", "1")
                with seeded.transaction():
                    seeded.set_meta("inner", "1")
                    raise ValueError
        assert seeded.get_meta("outer") is None and seeded.get_meta("inner") is None
        seeded.set_meta("after", "1")  # the store is usable afterwards
        assert seeded.get_meta("after") == "1"

    def test_returned_records_are_copies(self, seeded: StateStore) -> None:
        seeded.put_round(round_(1, metrics={"loss": 1.0}))
        got = seeded.get_round(1)
        assert got is not None
        got.metrics["loss"] = 99.0
        again = seeded.get_round(1)
        assert again is not None and again.metrics == {"loss": 1.0}
        mine = round_(2, metrics={"a": 1.0})
        seeded.put_round(mine)
        mine.metrics["a"] = 5.0
        stored = seeded.get_round(2)
        assert stored is not None and stored.metrics == {"a": 1.0}

    def test_nan_scalars_are_refused(self, seeded: StateStore) -> None:
        with pytest.raises(ValueError, match="deadline"):
            seeded.put_round(round_(4, deadline=float("nan")))
        with pytest.raises(ValueError, match="alpha"):
            seeded.put_participant(participant(alpha=math.nan))
        assert seeded.get_round(4) is None

    def test_infinite_deadline_roundtrips(self, store: StateStore) -> None:
        store.put_round(round_(1, deadline=float("inf")))
        got = store.get_round(1)
        assert got is not None and got.deadline == float("inf")

    def test_threads_do_not_interleave_transactions(self, seeded: StateStore) -> None:
        errors: list[BaseException] = []

        def work(i: int) -> None:
            try:
                for j in range(20):
                    with seeded.transaction():
                        seeded.set_meta(f"t{i}", str(j))
                        seeded.set_meta(f"u{i}", str(j))
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert all(seeded.get_meta(f"t{i}") == "19" for i in range(4))

    def test_closed_store_raises_storage_error(self, store: StateStore) -> None:
        store.close()
        store.close()  # idempotent
        with pytest.raises(StorageError, match="closed"):
            store.get_meta("x")
        with pytest.raises(StorageError, match="closed"):
            store.set_meta("x", "y")


# --- SQLite only --------------------------------------------------------------------------


def _populate(s: StateStore) -> None:
    s.set_meta("federation_id", "fed-xyz")
    s.upsert_client(client("c1", "dev-1", joined=1.0))
    s.upsert_client(client("c2", "dev-2", joined=2.0, capability=Capability()))
    s.put_round(round_(1, phase=RoundPhase.DONE, metrics={"loss": 0.25}))
    s.put_round(round_(2))
    s.put_participant(participant(2, "c1", metrics=metrics()))
    s.put_participant(participant(2, "c2"))
    s.add_receipt(receipt(2, "c1"))


class TestSqliteStore:
    def test_reopen_persists_everything(self, tmp_path: Path) -> None:
        mem = MemoryStore()
        _populate(mem)
        with SqliteStore(tmp_path / "s.db") as s:
            _populate(s)
        with SqliteStore(tmp_path / "s.db") as s:
            assert s.get_meta("federation_id") == "fed-xyz"
            assert s.list_clients() == mem.list_clients()
            assert s.list_rounds() == mem.list_rounds()
            assert same(s.list_participants(2), mem.list_participants(2))
            assert same(s.list_receipts(2), mem.list_receipts(2))
        mem.close()

    def test_participant_devices_reads_capabilities_as_get_client_does(self, tmp_path: Path) -> None:
        # Capability JSON not as this version writes it (an older or newer RankFed): a missing
        # device_class is the Capability default, unknown keys are ignored; and Python's NaN and
        # Infinity, which SQLite's own JSON functions (3.40) refuse.
        with SqliteStore(tmp_path / "s.db") as s:
            s.put_round(round_(1))
            for cid in ("old", "newer", "inf"):
                s.upsert_client(client(cid, f"dev-{cid}"))
                s.put_participant(participant(1, cid))
            conn = s._conn
            assert conn is not None
            for cid, text in [("old", '{"cpu_cores":4}'), ("newer", '{"npu_tops":40,"device_class":"mobile"}'),
                              ("inf", '{"device_class":"mps","compute_gflops":NaN,"upload_bytes_per_second":Infinity}')]:
                conn.execute("UPDATE clients SET capability = ? WHERE client_id = ?", (text, cid))
            assert s.participant_devices(1) == {"old": DeviceLabel("dev-old", DeviceClass.CPU),
                                                "newer": DeviceLabel("dev-newer", DeviceClass.MOBILE),
                                                "inf": DeviceLabel("dev-inf", DeviceClass.MPS)}
            for cid, d in s.participant_devices(1).items():
                rec = s.get_client(cid)
                assert rec is not None and rec.capability.device_class == d.device_class

    def test_pragmas(self, tmp_path: Path) -> None:
        with SqliteStore(tmp_path / "s.db") as s:
            conn = s._conn
            assert conn is not None
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL: sync() where a promise is made
            assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1

    def test_sync_fsyncs_the_wal_that_holds_the_commits(self, tmp_path: Path, monkeypatch) -> None:
        import os

        synced: list[str] = []
        fsync = os.fsync

        def spy(fd: int) -> None:
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
            fsync(fd)

        with SqliteStore(tmp_path / "s.db") as s:
            s.set_meta("k", "v")
            wal = tmp_path / "s.db-wal"
            assert wal.stat().st_size > 0  # the commit is in the WAL (a crash keeps it), not yet synced
            monkeypatch.setattr(os, "fsync", spy)
            s.sync()
        assert synced == [str(wal)]
        with pytest.raises(StorageError, match="closed"):
            s.sync()

    def test_newer_schema_is_refused_clearly(self, tmp_path: Path) -> None:
        path = tmp_path / "s.db"
        SqliteStore(path).close()
        conn = sqlite3.connect(path)
        with conn:
            conn.execute(
                "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),)
            )
        conn.close()
        with pytest.raises(SchemaVersionError, match="newer RankFed.*Upgrade") as e:
            SqliteStore(path)
        assert isinstance(e.value, StorageError)

    def test_version_1_file_is_migrated_keeping_its_state(self, tmp_path: Path) -> None:
        from rankfed.coordinator.store._schema import SCHEMA_V1

        path = tmp_path / "s.db"
        conn = sqlite3.connect(path)
        with conn:  # a state file as RankFed with schema version 1 wrote it
            conn.executescript(SCHEMA_V1)
            conn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', '1')")
            conn.execute("INSERT INTO meta (key, value) VALUES ('federation_id', 'fed-v1')")
        conn.close()
        with SqliteStore(path) as s:
            assert s.get_meta("schema_version") == str(SCHEMA_VERSION) and s.get_meta("federation_id") == "fed-v1"
            s.put_round(round_(1))
            s.put_score(score(1, ""))
        with SqliteStore(path) as s:
            assert s.list_scores("validation") == [score(1, "")]

    def test_not_a_database(self, tmp_path: Path) -> None:
        path = tmp_path / "s.db"
        path.write_bytes(b"this is not sqlite" * 100)
        with pytest.raises(StorageError, match="s.db"):
            SqliteStore(path)

    def test_open_store_layout(self, tmp_path: Path) -> None:
        data = tmp_path / "data"
        (data / "blobs" / "updates").mkdir(parents=True)
        (data / "blobs" / "updates" / ".x.safetensors.ab.rankfed-partial").write_bytes(b"junk")
        s, b = open_store(data)
        try:
            assert (data / "state.sqlite3").is_file()
            assert b.root == (data / "blobs").absolute()
            assert list((data / "blobs").rglob("*.rankfed-partial")) == []
        finally:
            s.close()

    def test_receipt_survives_sigkill_right_after_commit(self, tmp_path: Path) -> None:
        path = tmp_path / "s.db"
        with SqliteStore(path) as s:
            s.put_round(round_(1))
            s.upsert_client(client("c1"))
        child = textwrap.dedent(
            f"""
            import os, signal, sys
            sys.path[:0] = {sys.path!r}
            from rankfed.coordinator.store import SqliteStore
            from tests.coordinator.test_store import receipt
            s = SqliteStore({str(path)!r})
            s.add_receipt(receipt(1, "c1"))
            os.kill(os.getpid(), signal.SIGKILL)  # no close(), no atexit, no checkpoint
            """
        )
        proc = subprocess.run(
            [sys.executable, "-c", child],
            capture_output=True,
            timeout=60,
            cwd=Path(__file__).parents[2],
        )
        assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
        assert Path(
            str(path) + "-wal"
        ).exists()  # the commit lives in the WAL, not yet checkpointed
        with SqliteStore(path) as s:
            assert same(s.get_receipt(1, "c1"), receipt(1, "c1"))
