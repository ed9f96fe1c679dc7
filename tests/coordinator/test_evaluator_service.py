"""EvaluatorService over real gRPC on loopback, with a scripted evaluator (no torch): which
updates need a score, their bytes, score reports that decide the next round's ranks under
validation allocation, global adapters scored for export, and every bad input answered
with the right status (never INTERNAL)."""

from __future__ import annotations

import hashlib
import math

import grpc
import pytest

from rankfed.v1 import admin_pb2 as ProtoAdmin
from rankfed.v1 import admin_pb2_grpc, evaluator_pb2_grpc
from rankfed.v1 import evaluator_pb2 as ProtoEvaluator
from tests.coordinator.harness import (
    CoordinatorThread,
    EdgeTestClient,
    make_config,
    manifest,
    random_adapter,
    wait_for,
)

EVALUATOR_TOKEN = "evaluator-secret-token"
ADMIN_TOKEN = "admin-secret-token"
UPDATE, GLOBAL = ProtoEvaluator.EVALUATION_KIND_UPDATE, ProtoEvaluator.EVALUATION_KIND_GLOBAL


class Evaluator:
    """Speaks EvaluatorService directly, with a given bearer token (None: no credential)."""

    def __init__(self, address: str, token: str | None = EVALUATOR_TOKEN) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = evaluator_pb2_grpc.EvaluatorServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token is not None else ()

    def close(self) -> None:
        self.channel.close()

    def task(self, max_wait: float = 0.0, **fields) -> ProtoEvaluator.EvaluationTaskResponse:
        request = ProtoEvaluator.GetEvaluationTaskRequest(**fields)
        request.max_wait.FromNanoseconds(int(max_wait * 1e9))
        return self.stub.GetEvaluationTask(request, metadata=self.metadata, timeout=max_wait + 10)

    def download(self, kind: int, round_no: int, client_id: str = "", offset: int = 0) -> tuple[object, bytes]:
        messages = list(self.stub.DownloadEvaluationAdapter(
            ProtoEvaluator.EvaluationDownloadRequest(kind=kind, round=round_no, client_id=client_id, offset=offset),
            metadata=self.metadata, timeout=10,
        ))
        return messages[0].manifest, b"".join(m.chunk.data for m in messages[1:])

    def report(self, kind: int, round_no: int, client_id: str = "", sha256: str = "", metrics=None,
               num_examples: int = 50) -> ProtoEvaluator.ScoreReportResponse:
        request = ProtoEvaluator.ScoreReport(kind=kind, round=round_no, client_id=client_id, adapter_sha256=sha256,
                                             num_examples=num_examples)
        for key, value in (metrics or {}).items():
            request.metrics[key] = value
        return self.stub.ReportScores(request, metadata=self.metadata, timeout=10)


def _config(tmp_path, **overrides):
    return make_config(tmp_path / "data", **{
        "server.loopback_operators": False, "server.admin_token": ADMIN_TOKEN,
        "server.evaluator_token": EVALUATOR_TOKEN, "federation.min_clients": 2, "federation.rounds": 2,
        "federation.straggler_grace_seconds": 0.0, "federation.wait_for_clients_seconds": 1.0,
        "rank_policy.allocation": "validation", "rank_policy.high_rank_fraction": 0.5,
        "rank_policy.evaluator_wait_seconds": 30.0, **overrides,
    })


def _train_and_upload(client: EdgeTestClient, seed: int) -> tuple[int, bytes]:
    task = client.wait_train()
    client.download(task.round)
    lora = task.assignment.lora
    from rankfed.aggregation import encode_adapter

    data = encode_adapter(random_adapter(manifest(), lora.rank, lora.alpha, seed))
    client.upload_bytes(task.round, lora.rank, data)
    return lora.rank, data


@pytest.fixture
def federation(tmp_path):
    server = CoordinatorThread(_config(tmp_path))
    clients = {name: EdgeTestClient(server.address, name, "cuda", memory_gb=24.0) for name in ("gpu-a", "gpu-b")}
    for client in clients.values():
        client.join(manifest().weights_sha256)
    evaluator = Evaluator(server.address)
    yield server, clients, evaluator
    evaluator.close()
    for client in clients.values():
        client.close()
    server.stop()


def test_the_evaluators_scores_decide_the_next_rounds_ranks(federation):
    server, clients, evaluator = federation
    uploaded = {name: _train_and_upload(client, seed) for seed, (name, client) in enumerate(clients.items())}
    assert {name: rank for name, (rank, _) in uploaded.items()} == {"gpu-a": 16, "gpu-b": 16}  # warm-up
    by_id = {c.client_id: name for name, c in clients.items()}
    scored = set()
    while len(scored) < 2:  # each device's update of round 1, newest first
        reply = evaluator.task(max_wait=5.0, skip_globals=True)
        assert reply.WhichOneof("kind") == "task", reply
        task = reply.task
        assert task.kind == UPDATE and task.round == 1 and task.metric == "loss"
        assert task.base_round == 0 and task.base_model.weights_sha256 == manifest().weights_sha256
        transfer, data = evaluator.download(UPDATE, 1, task.client_id)
        name = by_id[task.client_id]
        assert data == uploaded[name][1] and hashlib.sha256(data).hexdigest() == task.adapter_sha256
        assert transfer.lora.rank == 16 and transfer.total_bytes == len(data) == task.adapter_bytes
        loss = 0.8 if name == "gpu-a" else 0.3
        reply = evaluator.report(UPDATE, 1, task.client_id, task.adapter_sha256, {"loss": loss, "accuracy": 0.6})
        assert "recorded the scores of round 1" in reply.message
        scored.add(name)
    second = {name: client.wait_train() for name, client in clients.items()}
    assert second["gpu-b"].assignment.lora.rank == 16 and second["gpu-a"].assignment.lora.rank == 2
    assert second["gpu-b"].assignment.reason.startswith(
        "validation score rank 1/2 (loss 0.3; top 50%: 1 high): high rank 16 (capability cap 16)")
    # Round 1's global adapter is scored too (export --round best), after the updates.
    reply = evaluator.task(max_wait=5.0, skip_updates=True)
    assert reply.task.kind == GLOBAL and reply.task.round == 1 and reply.task.rank == 16
    _, data = evaluator.download(GLOBAL, 1)
    assert hashlib.sha256(data).hexdigest() == reply.task.adapter_sha256
    evaluator.report(GLOBAL, 1, sha256=reply.task.adapter_sha256, metrics={"accuracy": 0.7, "loss": 0.5})
    assert server.call(lambda: server.federation.store.list_scores("validation"))[0].metrics["accuracy"] == 0.7


def test_a_task_is_leased_and_nothing_left_is_a_wait(federation):
    _, clients, evaluator = federation
    for seed, client in enumerate(clients.values()):
        _train_and_upload(client, seed)
    first = evaluator.task(max_wait=5.0, skip_globals=True).task
    second = evaluator.task(max_wait=5.0, skip_globals=True).task
    assert {first.client_id, second.client_id} == {c.client_id for c in clients.values()}
    reply = evaluator.task(max_wait=0.0, skip_globals=True)  # both leased: nothing to hand out
    assert reply.WhichOneof("kind") == "wait" and "being scored by another evaluator" in reply.wait.reason


@pytest.mark.parametrize(("token", "code"), [
    (None, grpc.StatusCode.UNAUTHENTICATED),
    ("wrong-token", grpc.StatusCode.UNAUTHENTICATED),
    ("device", grpc.StatusCode.PERMISSION_DENIED),
])
def test_credentials(federation, token, code):
    server, clients, _ = federation
    if token == "device":
        token = clients["gpu-a"].token
    evaluator = Evaluator(server.address, token)
    try:
        for call in (lambda: evaluator.task(), lambda: evaluator.download(GLOBAL, 1),
                     lambda: evaluator.report(GLOBAL, 1, sha256="ab" * 32, metrics={"loss": 1.0})):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == code, err.value.details()
    finally:
        evaluator.close()


def test_the_admin_token_opens_it_and_the_evaluator_token_opens_nothing_else(federation):
    server, _, _ = federation
    admin = Evaluator(server.address, ADMIN_TOKEN)
    try:
        assert admin.task().WhichOneof("kind") == "wait"
    finally:
        admin.close()
    with grpc.insecure_channel(server.address) as channel:
        with pytest.raises(grpc.RpcError) as err:
            admin_pb2_grpc.AdminServiceStub(channel).GetRoundStatus(
                ProtoAdmin.GetRoundStatusRequest(), metadata=(("authorization", f"Bearer {EVALUATOR_TOKEN}"),),
                timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def _bad_inputs(client_id: str, sha: str):
    ok = {"loss": 0.5}
    many = {f"m{i}": 0.1 for i in range(33)}
    return [
        # (what, call, status)
        ("unknown round", lambda e: e.download(UPDATE, 99, client_id), grpc.StatusCode.NOT_FOUND),
        ("unknown client", lambda e: e.download(UPDATE, 1, "c-000000000000"), grpc.StatusCode.NOT_FOUND),
        ("no client", lambda e: e.download(UPDATE, 1, ""), grpc.StatusCode.INVALID_ARGUMENT),
        ("unfinished round's global", lambda e: e.download(GLOBAL, 1), grpc.StatusCode.NOT_FOUND),
        ("kind unset", lambda e: e.download(0, 1, client_id), grpc.StatusCode.INVALID_ARGUMENT),
        ("round past SQLite", lambda e: e.download(UPDATE, 2**64 - 1, client_id), grpc.StatusCode.INVALID_ARGUMENT),
        ("huge client id", lambda e: e.download(UPDATE, 1, "c" * 5000), grpc.StatusCode.INVALID_ARGUMENT),
        ("offset past the end", lambda e: e.download(UPDATE, 1, client_id, offset=10**9),
         grpc.StatusCode.INVALID_ARGUMENT),
        ("report for an unknown round", lambda e: e.report(UPDATE, 99, client_id, sha, ok), grpc.StatusCode.NOT_FOUND),
        ("report for an unknown client", lambda e: e.report(UPDATE, 1, "c-000000000000", sha, ok),
         grpc.StatusCode.NOT_FOUND),
        ("NaN score", lambda e: e.report(UPDATE, 1, client_id, sha, {"loss": math.nan}),
         grpc.StatusCode.INVALID_ARGUMENT),
        ("infinite score", lambda e: e.report(UPDATE, 1, client_id, sha, {"loss": -math.inf}),
         grpc.StatusCode.INVALID_ARGUMENT),
        ("33 scores", lambda e: e.report(UPDATE, 1, client_id, sha, {"loss": 0.5, **many}),
         grpc.StatusCode.INVALID_ARGUMENT),
        ("a score name with spaces", lambda e: e.report(UPDATE, 1, client_id, sha, {"loss": 0.5, "a b": 1.0}),
         grpc.StatusCode.INVALID_ARGUMENT),
        ("no scores", lambda e: e.report(UPDATE, 1, client_id, sha, {}), grpc.StatusCode.INVALID_ARGUMENT),
        ("no ranking score", lambda e: e.report(UPDATE, 1, client_id, sha, {"accuracy": 0.5}),
         grpc.StatusCode.INVALID_ARGUMENT),
        ("another adapter's digest", lambda e: e.report(UPDATE, 1, client_id, "0" * 64, ok),
         grpc.StatusCode.INVALID_ARGUMENT),
        ("not a digest", lambda e: e.report(UPDATE, 1, client_id, "xyz", ok), grpc.StatusCode.INVALID_ARGUMENT),
        ("examples past SQLite", lambda e: e.report(UPDATE, 1, client_id, sha, ok, num_examples=2**64 - 1),
         grpc.StatusCode.INVALID_ARGUMENT),
        ("kind unset in a report", lambda e: e.report(0, 1, client_id, sha, ok), grpc.StatusCode.INVALID_ARGUMENT),
    ]


def test_bad_input_gets_the_right_status_never_internal(federation):
    server, clients, evaluator = federation
    client = clients["gpu-a"]
    _, data = _train_and_upload(client, 0)
    sha = hashlib.sha256(data).hexdigest()
    for what, call, code in _bad_inputs(client.client_id, sha):
        with pytest.raises(grpc.RpcError) as err:
            call(evaluator)
        assert err.value.code() == code, f"{what}: {err.value.code()}: {err.value.details()}"
    assert server.call(lambda: server.federation.store.latest_scores("validation")) == {}  # nothing was recorded
    evaluator.report(UPDATE, 1, client.client_id, sha, {"loss": 0.5})  # and the well-formed report is taken
    wait_for(lambda: server.call(lambda: server.federation.store.latest_scores("validation")), what="the score")


def test_capability_allocation_hands_out_no_update_tasks(tmp_path):
    server = CoordinatorThread(_config(tmp_path, **{"rank_policy.allocation": "capability", "federation.rounds": 1}))
    clients = [EdgeTestClient(server.address, name, "cpu") for name in ("a", "b")]
    evaluator = Evaluator(server.address)
    try:
        for client in clients:
            client.join(manifest().weights_sha256)
        for seed, client in enumerate(clients):
            _train_and_upload(client, seed)
        reply = evaluator.task(max_wait=10.0)  # only the global adapter, once round 1 is done
        assert reply.task.kind == GLOBAL and reply.task.round == 1
        sha = reply.task.adapter_sha256
        evaluator.report(GLOBAL, 1, sha256=sha, metrics={"accuracy": 0.9})
        done = evaluator.task(max_wait=5.0)
        assert done.WhichOneof("kind") == "done", done
    finally:
        evaluator.close()
        for client in clients:
            client.close()
        server.stop()


def test_participants_keep_training_state_while_scored(federation):
    """Scoring reads the stored update; it never changes the round (participants stay UPLOADED)."""
    server, clients, evaluator = federation
    client = clients["gpu-a"]
    _train_and_upload(client, 0)
    task = evaluator.task(max_wait=5.0, skip_globals=True).task
    evaluator.download(UPDATE, task.round, task.client_id)
    part = server.call(lambda: server.federation.store.get_participant(1, client.client_id))
    assert part.state.value == "uploaded"
