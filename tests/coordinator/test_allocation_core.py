"""Data-aware allocation driven through the Federation's core calls (no gRPC): "reported"
scores ranking the devices after warm-up under their capability caps, re-ranking every E
rounds, the hysteresis that keeps ranks from flapping, and the ranking kept across a restart."""

from __future__ import annotations

import asyncio
import hashlib

from rankfed.aggregation import encode_adapter
from rankfed.coordinator.federation import Federation
from rankfed.coordinator.store import BlobStore, MemoryStore, SqliteStore, StateStore
from rankfed.protocol import (
    Capability,
    Chunk,
    DeviceClass,
    DownloadRequest,
    JoinRequest,
    RoundPhase,
    TrainMetrics,
    TrainTask,
    UploadHeader,
)
from tests.coordinator.harness import make_config, manifest, random_adapter

GB = 10**9
DEVICES = {  # name -> capability: cuda-large tier (rank 16), cpu tier (4), mobile tier (2)
    "gpu": Capability(device_class=DeviceClass.CUDA, accelerator_memory_bytes=24 * GB, memory_total_bytes=64 * GB),
    "laptop": Capability(device_class=DeviceClass.CPU, memory_total_bytes=8 * GB, compute_gflops=20.0, cpu_cores=4),
    "phone": Capability(device_class=DeviceClass.MOBILE, memory_total_bytes=4 * GB),
}


async def _federation(tmp_path, store: StateStore | None = None, **overrides) -> Federation:
    config = make_config(tmp_path / "data", **{
        "federation.rounds": 5, "federation.min_clients": 2, "federation.straggler_grace_seconds": 0.0,
        "federation.wait_for_clients_seconds": 0.5, "rank_policy.allocation": "reported",
        "rank_policy.high_rank_fraction": 0.5, "rank_policy.low_rank": 2, "rank_policy.warmup_rounds": 1,
        "rank_policy.score_hysteresis": 0.0, **overrides,
    })
    fed = Federation(config, store or MemoryStore(), BlobStore(tmp_path / "data" / "blobs"), manifest())
    await fed.start()
    return fed


_KEYS: dict[str, str] = {}  # device name -> the key its first Join issued (a later Join must show it)


def _join(fed: Federation, names) -> dict[str, str]:
    clients = {}
    for name in names:
        joined = fed.join(JoinRequest(device_name=name, capability=DEVICES[name], num_examples=10,
                                      base_model_sha256=fed.manifest.weights_sha256, device_key=_KEYS.get(name, "")))
        _KEYS[name] = joined.device_key or _KEYS.get(name, "")
        clients[name] = joined.client_id
    return clients


async def _chunks(data: bytes):
    yield Chunk(offset=0, data=data)


async def _play_round(fed: Federation, clients: dict[str, str], losses: dict[str, float]) -> dict[str, TrainTask]:
    """Every device takes its task, downloads, and uploads an update whose metrics.eval
    reports `losses[name]`; returns the tasks (rank and reason) once the round is closed."""
    tasks: dict[str, TrainTask] = {}
    for name, cid in clients.items():
        task = await fed.get_task(cid, 10.0)
        assert isinstance(task, TrainTask), (name, task)
        tasks[name] = task
    for name, cid in clients.items():
        task = tasks[name]
        _, chunks = await fed.open_download(cid, DownloadRequest(round=task.round))
        async for _ in chunks:
            pass
        lora = task.assignment.lora
        data = encode_adapter(random_adapter(fed.manifest, lora.rank, lora.alpha, seed=task.round))
        header = UploadHeader(
            round=task.round, rank=lora.rank, num_examples=10, total_bytes=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            metrics=TrainMetrics(loss_first=1.0, loss_last=0.5, steps=1, eval={"loss": losses[name], "accuracy": 0.5}),
        )
        await fed.upload(cid, header, _chunks(data))
    round_no = next(iter(tasks.values())).round
    for _ in range(500):
        record = fed.store.get_round(round_no)
        if record is not None and record.phase in (RoundPhase.DONE, RoundPhase.FAILED):
            break
        await asyncio.sleep(0.02)
    assert fed.store.get_round(round_no).phase is RoundPhase.DONE
    return tasks


def _ranks(tasks: dict[str, TrainTask]) -> dict[str, int]:
    return {name: task.assignment.lora.rank for name, task in tasks.items()}


def test_after_warmup_the_lower_reported_loss_gets_the_high_rank_capped_by_capability(tmp_path):
    async def scenario():
        fed = await _federation(tmp_path, **{"federation.rounds": 4})
        clients = _join(fed, ["gpu", "laptop"])
        first = await _play_round(fed, clients, {"gpu": 0.9, "laptop": 0.2})
        assert _ranks(first) == {"gpu": 16, "laptop": 4}  # warm-up: capability ranks
        assert "warm-up round 1 of 1: capability rank (reported scores decide from round 2)" in (
            first["gpu"].assignment.reason)
        second = await _play_round(fed, clients, {"gpu": 0.9, "laptop": 0.2})
        # laptop reported the lower loss: the high rank, capped at its capability rank 4;
        # the gpu box could train at 16 but scored worse: the low rank
        assert _ranks(second) == {"gpu": 2, "laptop": 4}
        assert second["laptop"].assignment.reason.startswith(
            "reported score rank 1/2 (loss 0.2; top 50%: 1 high): high rank 16 capped at capability rank 4; tier cpu")
        assert second["gpu"].assignment.reason.startswith(
            "reported score rank 2/2 (loss 0.9; top 50%: 1 high): low rank 2 (capability cap 16); tier cuda-large")
        third = await _play_round(fed, clients, {"gpu": 0.1, "laptop": 0.2})
        assert _ranks(third) == {"gpu": 2, "laptop": 4}  # ranked by round 2's scores
        fourth = await _play_round(fed, clients, {"gpu": 0.1, "laptop": 0.2})
        assert _ranks(fourth) == {"gpu": 16, "laptop": 2}  # re-ranked every round: the gpu box now scores best
        await fed.stop()

    asyncio.run(scenario())


def test_devices_without_a_score_get_the_low_rank(tmp_path):
    async def scenario():
        fed = await _federation(tmp_path, **{"federation.rounds": 2, "rank_policy.warmup_rounds": 0})
        clients = _join(fed, ["gpu", "phone"])
        first = await _play_round(fed, clients, {"gpu": 0.5, "phone": 0.5})
        assert _ranks(first) == {"gpu": 2, "phone": 2}
        assert first["gpu"].assignment.reason.startswith(
            "no reported loss at the ranking of round 1 (its updates carried no metrics.eval.loss: run the device "
            "with --holdout or --eval-data): low rank 2 (capability cap 16)")
        await fed.stop()

    asyncio.run(scenario())


def test_reranking_every_e_rounds_keeps_statuses_in_between(tmp_path):
    async def scenario():
        fed = await _federation(tmp_path, **{"federation.rounds": 5, "rank_policy.reevaluate_every": 2})
        clients = _join(fed, ["gpu", "laptop"])
        ranks = []
        for losses in ({"gpu": 0.1, "laptop": 0.9},   # round 1: warm-up
                       {"gpu": 0.9, "laptop": 0.1},   # round 2: ranked by round 1's scores: gpu high
                       {"gpu": 0.9, "laptop": 0.1},   # round 3: kept (no re-ranking), although laptop scores best
                       {"gpu": 0.9, "laptop": 0.1}):  # round 4: re-ranked: laptop high
            ranks.append(_ranks(await _play_round(fed, clients, losses)))
        assert ranks == [{"gpu": 16, "laptop": 4}, {"gpu": 16, "laptop": 2}, {"gpu": 16, "laptop": 2},
                         {"gpu": 2, "laptop": 4}]
        await fed.stop()

    asyncio.run(scenario())


def test_score_hysteresis_keeps_ranks_from_flapping(tmp_path):
    async def scenario():
        fed = await _federation(tmp_path, **{"federation.rounds": 5, "rank_policy.score_hysteresis": 0.1})
        clients = _join(fed, ["gpu", "laptop"])
        seen = []
        # The two devices' losses swap by 2% every round: within the margin, the holder stays.
        for r in range(5):
            losses = {"gpu": 0.50, "laptop": 0.49} if r % 2 else {"gpu": 0.49, "laptop": 0.50}
            seen.append(_ranks(await _play_round(fed, clients, losses)))
        assert seen[1:] == [{"gpu": 16, "laptop": 2}] * 4
        await fed.stop()

    asyncio.run(scenario())


def test_the_ranking_survives_a_restart(tmp_path):
    async def scenario():
        store = SqliteStore(tmp_path / "state.sqlite3")
        fed = await _federation(tmp_path, store, **{"federation.rounds": 5, "rank_policy.reevaluate_every": 3})
        clients = _join(fed, ["gpu", "laptop"])
        await _play_round(fed, clients, {"gpu": 0.1, "laptop": 0.9})
        second = await _play_round(fed, clients, {"gpu": 0.9, "laptop": 0.1})  # ranked at round 2: gpu high
        assert _ranks(second) == {"gpu": 16, "laptop": 2}
        await fed.stop()
        store.close()
        store = SqliteStore(tmp_path / "state.sqlite3")  # a restarted coordinator, same data directory
        fed = await _federation(tmp_path, store, **{"federation.rounds": 5, "rank_policy.reevaluate_every": 3})
        clients = _join(fed, ["gpu", "laptop"])
        third = await _play_round(fed, clients, {"gpu": 0.9, "laptop": 0.1})
        assert _ranks(third) == {"gpu": 16, "laptop": 2}  # round 3 keeps round 2's ranking
        assert store.latest_scores("reported")[clients["laptop"]].metrics["loss"] == 0.1
        await fed.stop()
        store.close()

    asyncio.run(scenario())


def test_capability_mode_is_unchanged_and_records_no_scores(tmp_path):
    async def scenario():
        fed = await _federation(tmp_path, **{"federation.rounds": 2, "rank_policy.allocation": "capability"})
        clients = _join(fed, ["gpu", "laptop"])
        await _play_round(fed, clients, {"gpu": 0.9, "laptop": 0.2})
        second = await _play_round(fed, clients, {"gpu": 0.9, "laptop": 0.2})
        assert _ranks(second) == {"gpu": 16, "laptop": 4}
        assert second["gpu"].assignment.reason.startswith("tier cuda-large: cuda, accelerator 24.0 GB")
        assert fed.store.latest_scores("reported") == {}
        await fed.stop()

    asyncio.run(scenario())


def test_the_round_budget_still_applies_after_allocation(tmp_path):
    from rankfed.coordinator.rank_policy import update_bytes

    budget = update_bytes(8, manifest()) + update_bytes(2, manifest())

    async def scenario():
        fed = await _federation(tmp_path, **{"federation.rounds": 2, "rank_policy.round_budget_bytes": budget})
        clients = _join(fed, ["gpu", "laptop"])
        await _play_round(fed, clients, {"gpu": 0.1, "laptop": 0.9})
        second = await _play_round(fed, clients, {"gpu": 0.1, "laptop": 0.9})
        assert _ranks(second) == {"gpu": 8, "laptop": 2}  # high rank 16, halved to fit the budget
        assert second["gpu"].assignment.reason.endswith(f"lowered 16 -> 8 to fit the round budget of {budget} bytes")
        await fed.stop()

    asyncio.run(scenario())


def test_validation_scores_through_the_federations_evaluation_calls(tmp_path):
    """The evaluator role driven in-process through the same core calls the gRPC servicer uses."""
    from rankfed.protocol import (
        EvaluationDownloadRequest,
        EvaluationKind,
        EvaluationTask,
        EvaluationTaskRequest,
        ScoreReport,
    )

    async def scenario():
        fed = await _federation(tmp_path, **{"federation.rounds": 2, "rank_policy.allocation": "validation",
                                             "rank_policy.evaluator_wait_seconds": 30.0})
        clients = _join(fed, ["gpu", "laptop"])
        names = {cid: name for name, cid in clients.items()}

        async def evaluator():
            for _ in range(2):
                task = await fed.evaluation_task(EvaluationTaskRequest(max_wait_s=10.0, globals=False))
                assert isinstance(task, EvaluationTask) and task.kind is EvaluationKind.UPDATE
                manifest_, chunks = await fed.open_evaluation_download(
                    EvaluationDownloadRequest(kind=task.kind, round=task.round, client_id=task.client_id))
                data = b"".join([piece async for piece in chunks])
                assert hashlib.sha256(data).hexdigest() == task.adapter_sha256 == manifest_.sha256
                loss = {"gpu": 0.2, "laptop": 0.6}[names[task.client_id]]  # the server-side score, not the device's
                fed.report_scores(ScoreReport(kind=task.kind, round=task.round, client_id=task.client_id,
                                              adapter_sha256=task.adapter_sha256, metrics={"loss": loss}), "test")

        scoring = asyncio.ensure_future(evaluator())
        first = await _play_round(fed, clients, {"gpu": 0.9, "laptop": 0.1})  # devices' own losses: ignored
        await scoring
        second = await _play_round(fed, clients, {"gpu": 0.9, "laptop": 0.1})
        assert _ranks(first) == {"gpu": 16, "laptop": 4} and _ranks(second) == {"gpu": 16, "laptop": 2}
        assert second["gpu"].assignment.reason.startswith("validation score rank 1/2 (loss 0.2")
        await fed.stop()

    asyncio.run(scenario())


def test_without_an_evaluator_the_round_waits_then_ranks_everyone_low(tmp_path):
    async def scenario():
        fed = await _federation(tmp_path, **{"federation.rounds": 2, "rank_policy.allocation": "validation",
                                             "rank_policy.evaluator_wait_seconds": 0.3})
        clients = _join(fed, ["gpu", "laptop"])
        await _play_round(fed, clients, {"gpu": 0.9, "laptop": 0.1})
        second = await _play_round(fed, clients, {"gpu": 0.9, "laptop": 0.1})
        assert _ranks(second) == {"gpu": 2, "laptop": 2}
        assert second["gpu"].assignment.reason.startswith(
            "no validation score at the ranking of round 2 (no evaluator had scored an update of this device): "
            "low rank 2 (capability cap 16)")
        await fed.stop()

    asyncio.run(scenario())
