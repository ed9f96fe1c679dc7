"""Every protocol message survives `x_to_proto` then `x_from_proto` unchanged, for values
hypothesis draws across each field's wire range; and hostile wire values decode to a
DecodeError, never to another exception."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rankfed.protocol import (
    AlphaRule,
    Assignment,
    BaseModel,
    Capability,
    Chunk,
    ClientInfo,
    ClientPage,
    DecodeError,
    DeviceClass,
    DoneTask,
    DownloadRequest,
    ErrorDetail,
    ErrorReason,
    EvaluationDone,
    EvaluationDownloadRequest,
    EvaluationKind,
    EvaluationTask,
    EvaluationTaskRequest,
    EvaluationWait,
    FederationMode,
    FederationStatus,
    HeartbeatRequest,
    HeartbeatResult,
    JoinRequest,
    JoinResult,
    LeaveRequest,
    LoraSettings,
    ParticipantState,
    ParticipantStatus,
    RoundPhase,
    RoundStatus,
    ScoreReceipt,
    ScoreReport,
    TrainMetrics,
    TrainTask,
    TransferManifest,
    UploadHeader,
    UploadReceipt,
    UploadStatusRequest,
    UploadStatusResult,
    WaitTask,
    serde,
)
from rankfed.v1 import common_pb2 as ProtoCommon
from rankfed.v1 import edge_pb2 as ProtoEdge

U32 = st.integers(0, 2**32 - 1)
U64 = st.integers(0, 2**64 - 1)
TEXT = st.text(max_size=40)
FINITE = st.floats(allow_nan=False, allow_infinity=False)
# Times travel as nanosecond Timestamps/Durations: draw whole microseconds so float seconds
# survive the nanosecond round trip exactly, and 0 stands for "unset".
SECONDS = st.integers(0, 4_000_000_000 * 10**6).map(lambda us: us / 10**6)
DURATION = st.integers(0, 10**6 * 10**6).map(lambda us: us / 10**6)

capabilities = st.builds(
    Capability, device_class=st.sampled_from(DeviceClass), memory_total_bytes=U64, memory_free_bytes=U64,
    cpu_cores=U32, compute_gflops=FINITE, upload_bytes_per_second=FINITE, download_bytes_per_second=FINITE,
    accelerator_name=TEXT, accelerator_memory_bytes=U64, platform=TEXT,
)
metrics = st.builds(
    TrainMetrics, loss_first=FINITE, loss_last=FINITE, steps=U32, train_seconds=FINITE,
    eval=st.dictionaries(TEXT, FINITE, max_size=4),
)
lora = st.builds(
    LoraSettings, rank=U32, alpha=FINITE, target_modules=st.lists(TEXT, max_size=3).map(tuple),
    use_rslora=st.booleans(), alpha_rule=st.sampled_from(AlphaRule), dropout=FINITE,
    modules_to_save=st.lists(TEXT, max_size=2).map(tuple),
)
assignments = st.builds(Assignment, lora=lora, tier=TEXT, reason=TEXT)
base_models = st.builds(BaseModel, id=TEXT, weights_sha256=TEXT, task=TEXT, num_labels=U32)
participants = st.builds(
    ParticipantStatus, client_id=TEXT, device_name=TEXT, device_class=st.none() | st.sampled_from(DeviceClass),
    state=st.sampled_from(ParticipantState), rank=U32, bytes_down=U64, bytes_up=U64, num_examples=U64,
    metrics=st.none() | metrics,
)
rounds = st.builds(
    RoundStatus, round=U64, phase=st.sampled_from(RoundPhase), method=TEXT, started_at=SECONDS,
    deadline=SECONDS, finished_at=SECONDS, min_clients=U32, global_rank=U32, global_adapter_sha256=TEXT,
    failure_reason=TEXT, metrics=st.dictionaries(TEXT, FINITE, max_size=4),
    participants=st.lists(participants, max_size=3).map(tuple), participants_omitted=U32,
)

# (strategy, to_proto, from_proto) for every message of the vocabulary.
PAIRS: dict[str, tuple[st.SearchStrategy[Any], Callable[[Any], Any], Callable[[Any], Any]]] = {
    "capability": (capabilities, serde.capability_to_proto, serde.capability_from_proto),
    "metrics": (metrics, serde.metrics_to_proto, serde.metrics_from_proto),
    "lora": (lora, serde.lora_to_proto, serde.lora_from_proto),
    "assignment": (assignments, serde.assignment_to_proto, serde.assignment_from_proto),
    "base_model": (base_models, serde.base_model_to_proto, serde.base_model_from_proto),
    "join_request": (
        st.builds(JoinRequest, device_name=TEXT, capability=capabilities, base_model_sha256=TEXT, num_examples=U64,
                  enrollment_secret=TEXT, client_version=TEXT, device_key=TEXT),
        serde.join_request_to_proto, serde.join_request_from_proto,
    ),
    "join_result": (
        st.builds(JoinResult, client_id=TEXT, session_token=TEXT, assignment=assignments, base_model=base_models,
                  heartbeat_interval_s=DURATION, federation_id=TEXT, max_chunk_bytes=U32, token_expires_at=SECONDS,
                  mode=st.sampled_from(FederationMode), device_key=TEXT),
        serde.join_result_to_proto, serde.join_result_from_proto,
    ),
    "task": (
        st.one_of(
            st.builds(TrainTask, round=U64, assignment=assignments, local_steps=U32, learning_rate=FINITE,
                      batch_size=U32, deadline=SECONDS, method=TEXT, adapter_bytes=U64, adapter_sha256=TEXT, seed=U64),
            st.builds(WaitTask, retry_after_s=DURATION, reason=TEXT),
            st.builds(DoneTask, final_round=U64, reason=TEXT, final_adapter_sha256=TEXT),
        ),
        serde.task_to_proto, serde.task_from_proto,
    ),
    "download_request": (
        st.builds(DownloadRequest, round=U64, offset=U64, full=st.booleans()),
        serde.download_request_to_proto, serde.download_request_from_proto,
    ),
    "transfer_manifest": (
        st.builds(TransferManifest, round=U64, rank=U32, total_bytes=U64, sha256=TEXT, chunk_bytes=U32,
                  lora=st.none() | lora),
        serde.transfer_manifest_to_proto, serde.transfer_manifest_from_proto,
    ),
    "chunk": (st.builds(Chunk, offset=U64, data=st.binary(max_size=64)), serde.chunk_to_proto, serde.chunk_from_proto),
    "upload_header": (
        st.builds(UploadHeader, round=U64, rank=U32, num_examples=U64, total_bytes=U64, sha256=TEXT, metrics=metrics,
                  resume_offset=U64),
        serde.upload_header_to_proto, serde.upload_header_from_proto,
    ),
    "upload_status_request": (
        st.builds(UploadStatusRequest, round=U64, total_bytes=U64, sha256=TEXT),
        serde.upload_status_request_to_proto, serde.upload_status_request_from_proto,
    ),
    "upload_status_result": (
        st.builds(UploadStatusResult, resume_offset=U64, expires_at=SECONDS),
        serde.upload_status_result_to_proto, serde.upload_status_result_from_proto,
    ),
    "upload_receipt": (
        st.builds(UploadReceipt, round=U64, bytes_received=U64, sha256=TEXT, receipt_id=TEXT, accepted_at=SECONDS),
        serde.upload_receipt_to_proto, serde.upload_receipt_from_proto,
    ),
    "heartbeat_request": (
        st.builds(HeartbeatRequest, round=U64, state=st.none() | st.sampled_from(ParticipantState), progress=FINITE),
        serde.heartbeat_request_to_proto, serde.heartbeat_request_from_proto,
    ),
    "heartbeat_result": (
        st.builds(HeartbeatResult, next_in_s=DURATION, round_open=st.booleans()),
        serde.heartbeat_result_to_proto, serde.heartbeat_result_from_proto,
    ),
    "leave_request": (st.builds(LeaveRequest, reason=TEXT), serde.leave_request_to_proto, serde.leave_request_from_proto),
    "participant_status": (participants, serde.participant_status_to_proto, serde.participant_status_from_proto),
    "round_status": (rounds, serde.round_status_to_proto, serde.round_status_from_proto),
    "federation_status": (
        st.builds(FederationStatus, federation_id=TEXT, total_rounds=U64, base_model=base_models,
                  current=st.none() | rounds, history=st.lists(rounds, max_size=2).map(tuple), done=st.booleans(),
                  clients_online=U32, mode=st.sampled_from(FederationMode),
                  models=st.lists(base_models, max_size=2).map(tuple), next_page_token=TEXT,
                  paused=st.booleans(), banned_devices=st.lists(TEXT, max_size=3).map(tuple)),
        serde.federation_status_to_proto, serde.federation_status_from_proto,
    ),
    "client_info": (
        st.builds(ClientInfo, client_id=TEXT, device_name=TEXT, capability=capabilities, rank=U32, tier=TEXT,
                  online=st.booleans(), joined_at=SECONDS, last_seen_at=SECONDS, rounds_completed=U32,
                  deadlines_missed=U32, num_examples=U64, left=st.booleans()),
        serde.client_info_to_proto, serde.client_info_from_proto,
    ),
    "client_page": (
        st.builds(ClientPage, clients=st.lists(st.builds(
            ClientInfo, client_id=TEXT, device_name=TEXT, capability=capabilities, rank=U32, tier=TEXT,
            online=st.booleans()), max_size=3).map(tuple), next_page_token=TEXT),
        serde.client_page_to_proto, serde.client_page_from_proto,
    ),
    "evaluation_task_request": (
        st.builds(EvaluationTaskRequest, max_wait_s=DURATION, updates=st.booleans(), globals=st.booleans()),
        serde.evaluation_task_request_to_proto, serde.evaluation_task_request_from_proto,
    ),
    "evaluator_task": (
        st.one_of(
            st.builds(EvaluationTask, kind=st.sampled_from(EvaluationKind), round=U64, adapter_sha256=TEXT,
                      adapter_bytes=U64, client_id=TEXT, device_name=TEXT, rank=U32, base_round=U64,
                      base_sha256=TEXT, base_model=st.none() | base_models, metric=TEXT),
            st.builds(EvaluationWait, retry_after_s=DURATION, reason=TEXT),
            st.builds(EvaluationDone, reason=TEXT),
        ),
        serde.evaluator_task_to_proto, serde.evaluator_task_from_proto,
    ),
    "evaluation_download_request": (
        st.builds(EvaluationDownloadRequest, kind=st.sampled_from(EvaluationKind), round=U64, client_id=TEXT,
                  offset=U64),
        serde.evaluation_download_request_to_proto, serde.evaluation_download_request_from_proto,
    ),
    "score_report": (
        st.builds(ScoreReport, kind=st.sampled_from(EvaluationKind), round=U64, adapter_sha256=TEXT,
                  metrics=st.dictionaries(TEXT, FINITE, max_size=4), client_id=TEXT, num_examples=U64),
        serde.score_report_to_proto, serde.score_report_from_proto,
    ),
    "score_receipt": (st.builds(ScoreReceipt, message=TEXT), serde.score_receipt_to_proto,
                      serde.score_receipt_from_proto),
}


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_round_trip(name: str) -> None:
    strategy, to_proto, from_proto = PAIRS[name]

    @settings(max_examples=60, deadline=None)
    @given(strategy)
    def check(value: Any) -> None:
        wire = to_proto(value)
        # Through bytes too: what a peer parses is what the other end serialized.
        parsed = type(wire).FromString(wire.SerializeToString())
        assert from_proto(parsed) == value

    check()


def test_every_message_type_has_a_tested_pair() -> None:
    """A new message in types.py needs its serde pair here (task kinds share `task_*`)."""
    import re

    import rankfed.protocol.types as types

    messages = {n for n, v in vars(types).items() if isinstance(v, type) and hasattr(v, "__dataclass_fields__")}
    snake = {re.sub(r"(?<!^)([A-Z])", r"_\1", n).lower() for n in messages}
    aliases = {"train_metrics": "metrics", "lora_settings": "lora", "train_task": "task", "wait_task": "task",
               "done_task": "task", "evaluation_task": "evaluator_task", "evaluation_wait": "evaluator_task",
               "evaluation_done": "evaluator_task"}
    for name in snake - {"error_detail"}:  # carried in a trailer: test_error_detail_round_trip
        key = aliases.get(name, name)
        assert key in PAIRS, f"{name} has no round-trip test"
        assert hasattr(serde, f"{key}_to_proto") and hasattr(serde, f"{key}_from_proto")


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(ErrorReason), st.dictionaries(TEXT, TEXT, max_size=4))
def test_error_detail_round_trip(reason: ErrorReason, metadata: dict[str, str]) -> None:
    detail = ErrorDetail(reason, metadata)
    trailer = serde.error_detail_to_trailer(6, "already there", detail)
    assert serde.error_detail_from_trailers([("other", "x"), trailer]) == detail


@pytest.mark.parametrize("trailers", [None, [], [("grpc-status-details-bin", b"\xff\x00garbage")],
                                      [("grpc-status-details-bin", "not bytes")]])
def test_a_missing_or_malformed_detail_reads_as_none(trailers: Any) -> None:
    assert serde.error_detail_from_trailers(trailers) is None


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_metrics_are_a_decode_error(value: float) -> None:
    wire = ProtoCommon.TrainMetrics(loss_last=value)
    with pytest.raises(DecodeError, match="metrics.loss_last is not a finite number"):
        serde.metrics_from_proto(wire)
    with pytest.raises(DecodeError, match="metrics.eval.acc"):
        serde.metrics_from_proto(ProtoCommon.TrainMetrics(eval={"acc": value}))


def test_unknown_device_class_is_a_decode_error() -> None:
    for raw in (ProtoCommon.DEVICE_CLASS_UNSPECIFIED, 99):
        with pytest.raises(DecodeError, match="device_class"):
            serde.capability_from_proto(ProtoCommon.DeviceCapability(device_class=raw))


def test_a_task_of_an_unknown_kind_reads_as_none() -> None:
    assert serde.task_from_proto(ProtoEdge.Task()) is None


def test_an_unknown_heartbeat_state_is_a_plain_sign_of_life() -> None:
    request = serde.heartbeat_request_from_proto(ProtoEdge.HeartbeatRequest(round=3, state=42, progress=math.nan))
    assert request == HeartbeatRequest(round=3, state=None, progress=0.0)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_scores_are_a_decode_error(value: float) -> None:
    from rankfed.v1 import evaluator_pb2 as ProtoEvaluator

    report = ProtoEvaluator.ScoreReport(kind=ProtoEvaluator.EVALUATION_KIND_UPDATE, metrics={"loss": value})
    with pytest.raises(DecodeError, match="metrics.loss is not a finite number"):
        serde.score_report_from_proto(report)


def test_an_evaluation_kind_left_unset_is_a_decode_error() -> None:
    from rankfed.v1 import evaluator_pb2 as ProtoEvaluator

    with pytest.raises(DecodeError, match="kind is missing or unknown"):
        serde.score_report_from_proto(ProtoEvaluator.ScoreReport(round=1))
    with pytest.raises(DecodeError, match="kind is missing or unknown"):
        serde.evaluation_download_request_from_proto(ProtoEvaluator.EvaluationDownloadRequest(kind=7))
