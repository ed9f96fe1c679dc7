"""Conversions between the rankfed.v1 protobuf messages and the edge client's dataclasses.

Names are paired: `capability_to_proto` / `capability_from_proto`. This module and
`transport.py` are the only ones in the edge client that import generated code.
"""

from __future__ import annotations

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from rankfed.shared_serde import (
    ALPHA_RULE_FROM_PROTO,
    ALPHA_RULE_TO_PROTO,
    PARTICIPANT_STATE_TO_PROTO,
    capability_to_proto,
    metrics_to_proto,
)
from rankfed.v1 import common_pb2 as ProtoCommon
from rankfed.v1 import edge_pb2 as ProtoEdge

from .protocol import (
    AlphaRule,
    Assignment,
    BaseModelInfo,
    DoneTask,
    HeartbeatResult,
    JoinRequest,
    JoinResult,
    LoraSettings,
    ParticipantState,
    Task,
    TrainTask,
    TransferManifest,
    UploadHeader,
    UploadReceipt,
    WaitTask,
)

_ALPHA_RULE = ALPHA_RULE_TO_PROTO
_ALPHA_RULE_BACK = ALPHA_RULE_FROM_PROTO
_STATE = PARTICIPANT_STATE_TO_PROTO


def _seconds(d: Duration) -> float:
    return d.seconds + d.nanos / 1e9


def _duration(seconds: float) -> Duration:
    d = Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def _unix(ts: Timestamp) -> float:
    return ts.seconds + ts.nanos / 1e9


def lora_settings_from_proto(p: ProtoCommon.LoraConfig) -> LoraSettings:
    return LoraSettings(
        rank=p.rank,
        alpha=p.alpha,
        target_modules=tuple(p.target_modules),
        use_rslora=p.use_rslora,
        alpha_rule=_ALPHA_RULE_BACK.get(p.alpha_rule, AlphaRule.CONSTANT_SCALING),
        dropout=p.dropout,
        modules_to_save=tuple(p.modules_to_save),
    )


def lora_settings_to_proto(s: LoraSettings) -> ProtoCommon.LoraConfig:
    return ProtoCommon.LoraConfig(
        rank=s.rank,
        alpha=s.alpha,
        use_rslora=s.use_rslora,
        alpha_rule=_ALPHA_RULE[s.alpha_rule],
        target_modules=list(s.target_modules),
        dropout=s.dropout,
        modules_to_save=list(s.modules_to_save),
    )


def assignment_from_proto(p: ProtoEdge.Assignment) -> Assignment:
    return Assignment(lora=lora_settings_from_proto(p.lora), tier=p.tier, reason=p.reason)


def join_request_to_proto(r: JoinRequest) -> ProtoEdge.JoinRequest:
    return ProtoEdge.JoinRequest(
        device_name=r.device_name,
        capability=capability_to_proto(r.capability),
        base_model_sha256=r.base_model_sha256,
        enrollment_secret=r.enrollment_secret,
        client_version=r.client_version,
        num_examples=r.num_examples,
    )


def join_result_from_proto(p: ProtoEdge.JoinResponse) -> JoinResult:
    return JoinResult(
        client_id=p.client_id,
        session_token=p.session_token,
        assignment=assignment_from_proto(p.assignment),
        base_model=BaseModelInfo(
            id=p.base_model.id,
            weights_sha256=p.base_model.weights_sha256,
            task=p.base_model.task,
            num_labels=p.base_model.num_labels,
        ),
        heartbeat_interval_s=_seconds(p.heartbeat_interval),
        federation_id=p.federation_id,
        max_chunk_bytes=p.max_chunk_bytes,
        token_expires_at=_unix(p.token_expires_at) if p.HasField("token_expires_at") else 0.0,
        mode="personalized" if p.mode == ProtoCommon.FEDERATION_MODE_PERSONALIZED else "rank_heterogeneous",
    )


def get_task_request_to_proto(max_wait_s: float) -> ProtoEdge.GetTaskRequest:
    return ProtoEdge.GetTaskRequest(max_wait=_duration(max_wait_s))


def task_from_proto(p: ProtoEdge.Task) -> Task | None:
    """The task, or None when the message holds none of the known kinds (a newer server)."""
    kind = p.WhichOneof("kind")
    if kind == "train":
        t = p.train
        return TrainTask(
            round=t.round,
            assignment=assignment_from_proto(t.assignment),
            local_steps=t.local_steps,
            learning_rate=t.learning_rate,
            batch_size=t.batch_size,
            deadline=_unix(t.deadline) if t.HasField("deadline") else 0.0,
            method=t.method,
            adapter_bytes=t.adapter_bytes,
            adapter_sha256=t.adapter_sha256,
            seed=t.seed,
        )
    if kind == "wait":
        return WaitTask(retry_after_s=_seconds(p.wait.retry_after), reason=p.wait.reason)
    if kind == "done":
        return DoneTask(
            final_round=p.done.final_round,
            reason=p.done.reason,
            final_adapter_sha256=p.done.final_adapter_sha256,
        )
    return None


def download_request_to_proto(round: int, offset: int, *, full: bool = False) -> ProtoEdge.DownloadRequest:
    return ProtoEdge.DownloadRequest(round=round, offset=offset, full=full)


def manifest_from_proto(p: ProtoEdge.TransferManifest) -> TransferManifest:
    return TransferManifest(
        round=p.round,
        rank=p.rank,
        total_bytes=p.total_bytes,
        sha256=p.sha256,
        chunk_bytes=p.chunk_bytes,
        lora=lora_settings_from_proto(p.lora) if p.HasField("lora") else None,
    )


def upload_header_to_proto(h: UploadHeader) -> ProtoEdge.UploadMessage:
    return ProtoEdge.UploadMessage(
        header=ProtoEdge.UploadHeader(
            round=h.round,
            rank=h.rank,
            num_examples=h.num_examples,
            total_bytes=h.total_bytes,
            sha256=h.sha256,
            metrics=metrics_to_proto(h.metrics),
        )
    )


def upload_chunk_to_proto(offset: int, data: bytes) -> ProtoEdge.UploadMessage:
    return ProtoEdge.UploadMessage(chunk=ProtoCommon.Chunk(offset=offset, data=data))


def receipt_from_proto(p: ProtoEdge.UploadReceipt) -> UploadReceipt:
    return UploadReceipt(
        round=p.round,
        bytes_received=p.bytes_received,
        sha256=p.sha256,
        receipt_id=p.receipt_id,
        accepted_at=_unix(p.accepted_at) if p.HasField("accepted_at") else 0.0,
    )


def heartbeat_request_to_proto(
    round: int, state: ParticipantState, progress: float
) -> ProtoEdge.HeartbeatRequest:
    return ProtoEdge.HeartbeatRequest(round=round, state=_STATE[state], progress=progress)


def heartbeat_result_from_proto(p: ProtoEdge.HeartbeatResponse) -> HeartbeatResult:
    return HeartbeatResult(next_in_s=_seconds(p.next_in), round_open=p.round_open)


def leave_request_to_proto(reason: str) -> ProtoEdge.LeaveRequest:
    return ProtoEdge.LeaveRequest(reason=reason)
