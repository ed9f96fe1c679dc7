"""protobuf <-> `rankfed.protocol.types`, for both ends of the wire.

Names are paired (`capability_to_proto` / `capability_from_proto`), and every pair is
round-trip tested (tests/protocol/test_serde.py). This module, the servicers and the client
stubs are the only code that touches the generated `rankfed.v1` classes. Decoding never
trusts the sender: an unknown enum or a non-finite metric raises `DecodeError`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from google.protobuf.any_pb2 import Any as ProtoAny
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import DecodeError as ProtobufDecodeError
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2 as ProtoErrorDetails  # type: ignore[import-untyped]  # .pyi, no py.typed
from google.rpc import status_pb2 as ProtoStatus

from rankfed.v1 import admin_pb2 as ProtoAdmin
from rankfed.v1 import common_pb2 as ProtoCommon
from rankfed.v1 import edge_pb2 as ProtoEdge
from rankfed.v1 import evaluator_pb2 as ProtoEvaluator

from .errors import DecodeError
from .types import (
    ERROR_DOMAIN,
    AlphaRule,
    Assignment,
    BaseModel,
    Capability,
    Chunk,
    ClientInfo,
    ClientPage,
    DeviceClass,
    DoneTask,
    DownloadRequest,
    ErrorDetail,
    EvaluationDone,
    EvaluationDownloadRequest,
    EvaluationKind,
    EvaluationTask,
    EvaluationTaskRequest,
    EvaluationWait,
    EvaluatorTask,
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
    Task,
    TrainMetrics,
    TrainTask,
    TransferManifest,
    UploadHeader,
    UploadReceipt,
    UploadStatusRequest,
    UploadStatusResult,
    WaitTask,
)

# ------------------------------------------------------------------ enums

DEVICE_CLASS_TO_PROTO = {
    DeviceClass.CPU: ProtoCommon.DEVICE_CLASS_CPU,
    DeviceClass.CUDA: ProtoCommon.DEVICE_CLASS_CUDA,
    DeviceClass.MPS: ProtoCommon.DEVICE_CLASS_MPS,
    DeviceClass.MOBILE: ProtoCommon.DEVICE_CLASS_MOBILE,
}
DEVICE_CLASS_FROM_PROTO = {v: k for k, v in DEVICE_CLASS_TO_PROTO.items()}
ALPHA_RULE_TO_PROTO = {
    AlphaRule.CONSTANT_SCALING: ProtoCommon.ALPHA_RULE_CONSTANT_SCALING,
    AlphaRule.FIXED: ProtoCommon.ALPHA_RULE_FIXED,
    AlphaRule.RSLORA: ProtoCommon.ALPHA_RULE_RSLORA,
}
ALPHA_RULE_FROM_PROTO = {v: k for k, v in ALPHA_RULE_TO_PROTO.items()}
PARTICIPANT_STATE_TO_PROTO = {
    ParticipantState.ASSIGNED: ProtoCommon.PARTICIPANT_STATE_ASSIGNED,
    ParticipantState.DOWNLOADING: ProtoCommon.PARTICIPANT_STATE_DOWNLOADING,
    ParticipantState.TRAINING: ProtoCommon.PARTICIPANT_STATE_TRAINING,
    ParticipantState.UPLOADING: ProtoCommon.PARTICIPANT_STATE_UPLOADING,
    ParticipantState.UPLOADED: ProtoCommon.PARTICIPANT_STATE_UPLOADED,
    ParticipantState.LATE: ProtoCommon.PARTICIPANT_STATE_LATE,
    ParticipantState.DROPPED: ProtoCommon.PARTICIPANT_STATE_DROPPED,
    ParticipantState.REJECTED: ProtoCommon.PARTICIPANT_STATE_REJECTED,
}
PARTICIPANT_STATE_FROM_PROTO = {v: k for k, v in PARTICIPANT_STATE_TO_PROTO.items()}
ROUND_PHASE_TO_PROTO = {
    RoundPhase.WAITING_FOR_CLIENTS: ProtoCommon.ROUND_PHASE_WAITING_FOR_CLIENTS,
    RoundPhase.TRAINING: ProtoCommon.ROUND_PHASE_TRAINING,
    RoundPhase.AGGREGATING: ProtoCommon.ROUND_PHASE_AGGREGATING,
    RoundPhase.DONE: ProtoCommon.ROUND_PHASE_DONE,
    RoundPhase.FAILED: ProtoCommon.ROUND_PHASE_FAILED,
}
ROUND_PHASE_FROM_PROTO = {v: k for k, v in ROUND_PHASE_TO_PROTO.items()}
MODE_TO_PROTO = {
    FederationMode.RANK_HETEROGENEOUS: ProtoCommon.FEDERATION_MODE_RANK_HETEROGENEOUS,
    FederationMode.PERSONALIZED: ProtoCommon.FEDERATION_MODE_PERSONALIZED,
}
MODE_FROM_PROTO = {v: k for k, v in MODE_TO_PROTO.items()}
EVALUATION_KIND_TO_PROTO = {
    EvaluationKind.UPDATE: ProtoEvaluator.EVALUATION_KIND_UPDATE,
    EvaluationKind.GLOBAL: ProtoEvaluator.EVALUATION_KIND_GLOBAL,
}
EVALUATION_KIND_FROM_PROTO = {v: k for k, v in EVALUATION_KIND_TO_PROTO.items()}


def _enum(table: Mapping[int, object], value: int, what: str) -> object:
    try:
        return table[value]
    except KeyError:
        raise DecodeError(f"{what} is missing or unknown ({value})") from None


# ------------------------------------------------------------------ well-known types


def _split_seconds(value: float) -> tuple[int, int]:
    """(whole seconds, nanoseconds) without going through value * 1e9, which loses the last
    digits of a present-day unix time; the fraction of a double is exact."""
    whole = math.floor(value)
    nanos = round((value - whole) * 1e9)
    if nanos >= 1_000_000_000:
        whole, nanos = whole + 1, nanos - 1_000_000_000
    return whole, nanos


def timestamp_to_proto(unix_s: float) -> Timestamp | None:
    """None for 0 (unset), so the field stays absent on the wire."""
    if not unix_s:
        return None
    seconds, nanos = _split_seconds(unix_s)
    return Timestamp(seconds=seconds, nanos=nanos)


def timestamp_from_proto(ts: Timestamp) -> float:
    # One correctly rounded division of an exact integer: the float that was sent comes back.
    return (ts.seconds * 1_000_000_000 + ts.nanos) / 1_000_000_000  # int / int: correctly rounded


def duration_to_proto(seconds: float) -> Duration:
    if seconds < 0:  # a Duration's seconds and nanos share one sign; we never send negative ones
        seconds = 0.0
    whole, nanos = _split_seconds(seconds)
    return Duration(seconds=whole, nanos=nanos)


def duration_from_proto(d: Duration) -> float:
    return (d.seconds * 1_000_000_000 + d.nanos) / 1_000_000_000


def _finite(values: Mapping[str, float], prefix: str) -> None:
    for name, value in values.items():
        if not math.isfinite(value):
            raise DecodeError(f"{prefix}{name} is not a finite number ({value})")


# ------------------------------------------------------------------ building blocks


def capability_to_proto(c: Capability) -> ProtoCommon.DeviceCapability:
    return ProtoCommon.DeviceCapability(
        device_class=DEVICE_CLASS_TO_PROTO[c.device_class],
        memory_total_bytes=c.memory_total_bytes,
        memory_free_bytes=c.memory_free_bytes,
        cpu_cores=c.cpu_cores,
        compute_gflops=c.compute_gflops,
        upload_bytes_per_second=c.upload_bytes_per_second,
        download_bytes_per_second=c.download_bytes_per_second,
        accelerator_name=c.accelerator_name,
        accelerator_memory_bytes=c.accelerator_memory_bytes,
        platform=c.platform,
    )


def capability_from_proto(p: ProtoCommon.DeviceCapability) -> Capability:
    if p.device_class not in DEVICE_CLASS_FROM_PROTO:
        raise DecodeError("capability.device_class is missing or unknown; report cpu, cuda, mps or mobile")
    return Capability(
        device_class=DEVICE_CLASS_FROM_PROTO[p.device_class],
        memory_total_bytes=p.memory_total_bytes,
        memory_free_bytes=p.memory_free_bytes,
        cpu_cores=p.cpu_cores,
        compute_gflops=p.compute_gflops,
        upload_bytes_per_second=p.upload_bytes_per_second,
        download_bytes_per_second=p.download_bytes_per_second,
        accelerator_name=p.accelerator_name,
        accelerator_memory_bytes=p.accelerator_memory_bytes,
        platform=p.platform,
    )


def metrics_to_proto(m: TrainMetrics) -> ProtoCommon.TrainMetrics:
    return ProtoCommon.TrainMetrics(
        loss_first=m.loss_first, loss_last=m.loss_last, steps=m.steps, train_seconds=m.train_seconds,
        eval=dict(m.eval),
    )


def metrics_from_proto(p: ProtoCommon.TrainMetrics) -> TrainMetrics:
    _finite({"loss_first": p.loss_first, "loss_last": p.loss_last, "train_seconds": p.train_seconds}, "metrics.")
    _finite(p.eval, "metrics.eval.")
    return TrainMetrics(
        loss_first=p.loss_first, loss_last=p.loss_last, steps=p.steps, train_seconds=p.train_seconds,
        eval=dict(p.eval),
    )


def lora_to_proto(s: LoraSettings) -> ProtoCommon.LoraConfig:
    return ProtoCommon.LoraConfig(
        rank=s.rank, alpha=s.alpha, use_rslora=s.use_rslora, alpha_rule=ALPHA_RULE_TO_PROTO[s.alpha_rule],
        target_modules=list(s.target_modules), dropout=s.dropout, modules_to_save=list(s.modules_to_save),
    )


def lora_from_proto(p: ProtoCommon.LoraConfig) -> LoraSettings:
    return LoraSettings(
        rank=p.rank, alpha=p.alpha, target_modules=tuple(p.target_modules), use_rslora=p.use_rslora,
        alpha_rule=ALPHA_RULE_FROM_PROTO.get(p.alpha_rule, AlphaRule.CONSTANT_SCALING),
        dropout=p.dropout, modules_to_save=tuple(p.modules_to_save),
    )


def assignment_to_proto(a: Assignment) -> ProtoEdge.Assignment:
    return ProtoEdge.Assignment(lora=lora_to_proto(a.lora), tier=a.tier, reason=a.reason)


def assignment_from_proto(p: ProtoEdge.Assignment) -> Assignment:
    return Assignment(lora=lora_from_proto(p.lora), tier=p.tier, reason=p.reason)


def base_model_to_proto(b: BaseModel) -> ProtoCommon.BaseModel:
    return ProtoCommon.BaseModel(id=b.id, weights_sha256=b.weights_sha256, task=b.task, num_labels=b.num_labels)


def base_model_from_proto(p: ProtoCommon.BaseModel) -> BaseModel:
    return BaseModel(id=p.id, weights_sha256=p.weights_sha256, task=p.task, num_labels=p.num_labels)


# ------------------------------------------------------------------ EdgeService


def join_request_to_proto(r: JoinRequest) -> ProtoEdge.JoinRequest:
    return ProtoEdge.JoinRequest(
        device_name=r.device_name, capability=capability_to_proto(r.capability),
        base_model_sha256=r.base_model_sha256, enrollment_secret=r.enrollment_secret,
        client_version=r.client_version, num_examples=r.num_examples, device_key=r.device_key,
    )


def join_request_from_proto(p: ProtoEdge.JoinRequest) -> JoinRequest:
    return JoinRequest(
        device_name=p.device_name, capability=capability_from_proto(p.capability),
        base_model_sha256=p.base_model_sha256, num_examples=p.num_examples,
        enrollment_secret=p.enrollment_secret, client_version=p.client_version, device_key=p.device_key,
    )


def join_result_to_proto(r: JoinResult) -> ProtoEdge.JoinResponse:
    return ProtoEdge.JoinResponse(
        client_id=r.client_id, session_token=r.session_token,
        token_expires_at=timestamp_to_proto(r.token_expires_at), assignment=assignment_to_proto(r.assignment),
        base_model=base_model_to_proto(r.base_model), heartbeat_interval=duration_to_proto(r.heartbeat_interval_s),
        federation_id=r.federation_id, max_chunk_bytes=r.max_chunk_bytes, mode=MODE_TO_PROTO[r.mode],
        device_key=r.device_key,
    )


def join_result_from_proto(p: ProtoEdge.JoinResponse) -> JoinResult:
    return JoinResult(
        client_id=p.client_id, session_token=p.session_token, assignment=assignment_from_proto(p.assignment),
        base_model=base_model_from_proto(p.base_model), heartbeat_interval_s=duration_from_proto(p.heartbeat_interval),
        federation_id=p.federation_id, max_chunk_bytes=p.max_chunk_bytes,
        token_expires_at=timestamp_from_proto(p.token_expires_at),
        mode=MODE_FROM_PROTO.get(p.mode, FederationMode.RANK_HETEROGENEOUS), device_key=p.device_key,
    )


def get_task_request_to_proto(max_wait_s: float) -> ProtoEdge.GetTaskRequest:
    return ProtoEdge.GetTaskRequest(max_wait=duration_to_proto(max_wait_s))


def get_task_request_from_proto(p: ProtoEdge.GetTaskRequest) -> float:
    """The longest the device is willing to wait, in seconds."""
    return duration_from_proto(p.max_wait)


def task_to_proto(task: Task) -> ProtoEdge.Task:
    if isinstance(task, TrainTask):
        return ProtoEdge.Task(train=ProtoEdge.TrainTask(
            round=task.round, assignment=assignment_to_proto(task.assignment), local_steps=task.local_steps,
            learning_rate=task.learning_rate, batch_size=task.batch_size, deadline=timestamp_to_proto(task.deadline),
            method=task.method, adapter_bytes=task.adapter_bytes, adapter_sha256=task.adapter_sha256, seed=task.seed,
        ))
    if isinstance(task, WaitTask):
        return ProtoEdge.Task(wait=ProtoEdge.WaitTask(
            retry_after=duration_to_proto(task.retry_after_s), reason=task.reason,
        ))
    return ProtoEdge.Task(done=ProtoEdge.DoneTask(
        final_round=task.final_round, reason=task.reason, final_adapter_sha256=task.final_adapter_sha256,
    ))


def task_from_proto(p: ProtoEdge.Task) -> Task | None:
    """The task, or None when the message holds none of the kinds this client knows (a newer server)."""
    kind = p.WhichOneof("kind")
    if kind == "train":
        t = p.train
        return TrainTask(
            round=t.round, assignment=assignment_from_proto(t.assignment), local_steps=t.local_steps,
            learning_rate=t.learning_rate, batch_size=t.batch_size, deadline=timestamp_from_proto(t.deadline),
            method=t.method, adapter_bytes=t.adapter_bytes, adapter_sha256=t.adapter_sha256, seed=t.seed,
        )
    if kind == "wait":
        return WaitTask(retry_after_s=duration_from_proto(p.wait.retry_after), reason=p.wait.reason)
    if kind == "done":
        d = p.done
        return DoneTask(final_round=d.final_round, reason=d.reason, final_adapter_sha256=d.final_adapter_sha256)
    return None


def download_request_to_proto(r: DownloadRequest) -> ProtoEdge.DownloadRequest:
    return ProtoEdge.DownloadRequest(round=r.round, offset=r.offset, full=r.full)


def download_request_from_proto(p: ProtoEdge.DownloadRequest) -> DownloadRequest:
    return DownloadRequest(round=p.round, offset=p.offset, full=p.full)


def transfer_manifest_to_proto(m: TransferManifest) -> ProtoEdge.TransferManifest:
    return ProtoEdge.TransferManifest(
        round=m.round, rank=m.rank, total_bytes=m.total_bytes, sha256=m.sha256, chunk_bytes=m.chunk_bytes,
        lora=None if m.lora is None else lora_to_proto(m.lora),
    )


def transfer_manifest_from_proto(p: ProtoEdge.TransferManifest) -> TransferManifest:
    return TransferManifest(
        round=p.round, rank=p.rank, total_bytes=p.total_bytes, sha256=p.sha256, chunk_bytes=p.chunk_bytes,
        lora=lora_from_proto(p.lora) if p.HasField("lora") else None,
    )


def chunk_to_proto(c: Chunk) -> ProtoCommon.Chunk:
    return ProtoCommon.Chunk(offset=c.offset, data=c.data)


def chunk_from_proto(p: ProtoCommon.Chunk) -> Chunk:
    return Chunk(offset=p.offset, data=p.data)


def upload_header_to_proto(h: UploadHeader) -> ProtoEdge.UploadHeader:
    return ProtoEdge.UploadHeader(
        round=h.round, rank=h.rank, num_examples=h.num_examples, total_bytes=h.total_bytes, sha256=h.sha256,
        metrics=metrics_to_proto(h.metrics), resume_offset=h.resume_offset,
    )


def upload_header_from_proto(p: ProtoEdge.UploadHeader) -> UploadHeader:
    return UploadHeader(
        round=p.round, rank=p.rank, num_examples=p.num_examples, total_bytes=p.total_bytes, sha256=p.sha256,
        metrics=metrics_from_proto(p.metrics), resume_offset=p.resume_offset,
    )


def upload_status_request_to_proto(r: UploadStatusRequest) -> ProtoEdge.UploadStatusRequest:
    return ProtoEdge.UploadStatusRequest(round=r.round, total_bytes=r.total_bytes, sha256=r.sha256)


def upload_status_request_from_proto(p: ProtoEdge.UploadStatusRequest) -> UploadStatusRequest:
    return UploadStatusRequest(round=p.round, total_bytes=p.total_bytes, sha256=p.sha256)


def upload_status_result_to_proto(r: UploadStatusResult) -> ProtoEdge.UploadStatusResponse:
    return ProtoEdge.UploadStatusResponse(resume_offset=r.resume_offset, expires_at=timestamp_to_proto(r.expires_at))


def upload_status_result_from_proto(p: ProtoEdge.UploadStatusResponse) -> UploadStatusResult:
    return UploadStatusResult(resume_offset=p.resume_offset, expires_at=timestamp_from_proto(p.expires_at))


def upload_receipt_to_proto(r: UploadReceipt) -> ProtoEdge.UploadReceipt:
    return ProtoEdge.UploadReceipt(
        round=r.round, bytes_received=r.bytes_received, sha256=r.sha256,
        accepted_at=timestamp_to_proto(r.accepted_at), receipt_id=r.receipt_id,
    )


def upload_receipt_from_proto(p: ProtoEdge.UploadReceipt) -> UploadReceipt:
    return UploadReceipt(
        round=p.round, bytes_received=p.bytes_received, sha256=p.sha256, receipt_id=p.receipt_id,
        accepted_at=timestamp_from_proto(p.accepted_at),
    )


def heartbeat_request_to_proto(r: HeartbeatRequest) -> ProtoEdge.HeartbeatRequest:
    state = ProtoCommon.PARTICIPANT_STATE_UNSPECIFIED if r.state is None else PARTICIPANT_STATE_TO_PROTO[r.state]
    return ProtoEdge.HeartbeatRequest(round=r.round, state=state, progress=r.progress)


def heartbeat_request_from_proto(p: ProtoEdge.HeartbeatRequest) -> HeartbeatRequest:
    """An unknown state reads as None (a plain sign of life), never as an error."""
    progress = p.progress if math.isfinite(p.progress) else 0.0
    return HeartbeatRequest(round=p.round, state=PARTICIPANT_STATE_FROM_PROTO.get(p.state), progress=progress)


def heartbeat_result_to_proto(r: HeartbeatResult) -> ProtoEdge.HeartbeatResponse:
    return ProtoEdge.HeartbeatResponse(next_in=duration_to_proto(r.next_in_s), round_open=r.round_open)


def heartbeat_result_from_proto(p: ProtoEdge.HeartbeatResponse) -> HeartbeatResult:
    return HeartbeatResult(next_in_s=duration_from_proto(p.next_in), round_open=p.round_open)


def leave_request_to_proto(r: LeaveRequest) -> ProtoEdge.LeaveRequest:
    return ProtoEdge.LeaveRequest(reason=r.reason)


def leave_request_from_proto(p: ProtoEdge.LeaveRequest) -> LeaveRequest:
    return LeaveRequest(reason=p.reason)


# ------------------------------------------------------------------ AdminService


def participant_status_to_proto(s: ParticipantStatus) -> ProtoAdmin.ParticipantStatus:
    return ProtoAdmin.ParticipantStatus(
        client_id=s.client_id, device_name=s.device_name,
        device_class=(ProtoCommon.DEVICE_CLASS_UNSPECIFIED if s.device_class is None
                      else DEVICE_CLASS_TO_PROTO[s.device_class]),
        state=PARTICIPANT_STATE_TO_PROTO[s.state], rank=s.rank, bytes_down=s.bytes_down, bytes_up=s.bytes_up,
        num_examples=s.num_examples, metrics=None if s.metrics is None else metrics_to_proto(s.metrics),
    )


def participant_status_from_proto(p: ProtoAdmin.ParticipantStatus) -> ParticipantStatus:
    return ParticipantStatus(
        client_id=p.client_id, device_name=p.device_name, device_class=DEVICE_CLASS_FROM_PROTO.get(p.device_class),
        state=_enum(PARTICIPANT_STATE_FROM_PROTO, p.state, "participant.state"),  # type: ignore[arg-type]
        rank=p.rank, bytes_down=p.bytes_down, bytes_up=p.bytes_up, num_examples=p.num_examples,
        metrics=metrics_from_proto(p.metrics) if p.HasField("metrics") else None,
    )


def round_status_to_proto(r: RoundStatus) -> ProtoAdmin.RoundStatus:
    return ProtoAdmin.RoundStatus(
        round=r.round, phase=ROUND_PHASE_TO_PROTO[r.phase], method=r.method,
        started_at=timestamp_to_proto(r.started_at), deadline=timestamp_to_proto(r.deadline),
        finished_at=timestamp_to_proto(r.finished_at), min_clients=r.min_clients, metrics=dict(r.metrics),
        global_adapter_sha256=r.global_adapter_sha256, global_rank=r.global_rank, failure_reason=r.failure_reason,
        participants=[participant_status_to_proto(p) for p in r.participants],
        participants_omitted=r.participants_omitted,
    )


def round_status_from_proto(p: ProtoAdmin.RoundStatus) -> RoundStatus:
    return RoundStatus(
        round=p.round, phase=_enum(ROUND_PHASE_FROM_PROTO, p.phase, "round.phase"),  # type: ignore[arg-type]
        method=p.method, started_at=timestamp_from_proto(p.started_at), deadline=timestamp_from_proto(p.deadline),
        finished_at=timestamp_from_proto(p.finished_at), min_clients=p.min_clients, global_rank=p.global_rank,
        global_adapter_sha256=p.global_adapter_sha256, failure_reason=p.failure_reason, metrics=dict(p.metrics),
        participants=tuple(participant_status_from_proto(x) for x in p.participants),
        participants_omitted=p.participants_omitted,
    )


def federation_status_to_proto(s: FederationStatus) -> ProtoAdmin.FederationStatus:
    return ProtoAdmin.FederationStatus(
        federation_id=s.federation_id, total_rounds=s.total_rounds,
        current=None if s.current is None else round_status_to_proto(s.current),
        history=[round_status_to_proto(r) for r in s.history], done=s.done, clients_online=s.clients_online,
        base_model=base_model_to_proto(s.base_model), mode=MODE_TO_PROTO[s.mode],
        models=[base_model_to_proto(m) for m in s.models], next_page_token=s.next_page_token,
        paused=s.paused, banned_devices=list(s.banned_devices),
    )


def federation_status_from_proto(p: ProtoAdmin.FederationStatus) -> FederationStatus:
    return FederationStatus(
        federation_id=p.federation_id, total_rounds=p.total_rounds, base_model=base_model_from_proto(p.base_model),
        current=round_status_from_proto(p.current) if p.HasField("current") else None,
        history=tuple(round_status_from_proto(r) for r in p.history), done=p.done, clients_online=p.clients_online,
        mode=MODE_FROM_PROTO.get(p.mode, FederationMode.RANK_HETEROGENEOUS),
        models=tuple(base_model_from_proto(m) for m in p.models), next_page_token=p.next_page_token,
        paused=p.paused, banned_devices=tuple(p.banned_devices),
    )


def client_info_to_proto(c: ClientInfo) -> ProtoAdmin.ClientInfo:
    return ProtoAdmin.ClientInfo(
        client_id=c.client_id, device_name=c.device_name, capability=capability_to_proto(c.capability),
        rank=c.rank, tier=c.tier, online=c.online, joined_at=timestamp_to_proto(c.joined_at),
        last_seen_at=timestamp_to_proto(c.last_seen_at), rounds_completed=c.rounds_completed,
        deadlines_missed=c.deadlines_missed, num_examples=c.num_examples, left=c.left,
    )


def client_info_from_proto(p: ProtoAdmin.ClientInfo) -> ClientInfo:
    return ClientInfo(
        client_id=p.client_id, device_name=p.device_name, capability=capability_from_proto(p.capability),
        rank=p.rank, tier=p.tier, online=p.online, joined_at=timestamp_from_proto(p.joined_at),
        last_seen_at=timestamp_from_proto(p.last_seen_at), rounds_completed=p.rounds_completed,
        deadlines_missed=p.deadlines_missed, num_examples=p.num_examples, left=p.left,
    )


def client_page_to_proto(page: ClientPage) -> ProtoAdmin.ListClientsResponse:
    return ProtoAdmin.ListClientsResponse(
        clients=[client_info_to_proto(c) for c in page.clients], next_page_token=page.next_page_token,
    )


def client_page_from_proto(p: ProtoAdmin.ListClientsResponse) -> ClientPage:
    return ClientPage(clients=tuple(client_info_from_proto(c) for c in p.clients), next_page_token=p.next_page_token)


# ------------------------------------------------------------------ EvaluatorService


def _evaluation_kind(value: ProtoEvaluator.EvaluationKind.ValueType) -> EvaluationKind:
    if value not in EVALUATION_KIND_FROM_PROTO:
        raise DecodeError(f"kind is missing or unknown ({value}); send EVALUATION_KIND_UPDATE or EVALUATION_KIND_GLOBAL")
    return EVALUATION_KIND_FROM_PROTO[value]


def evaluation_task_request_to_proto(r: EvaluationTaskRequest) -> ProtoEvaluator.GetEvaluationTaskRequest:
    return ProtoEvaluator.GetEvaluationTaskRequest(
        max_wait=duration_to_proto(r.max_wait_s), skip_updates=not r.updates, skip_globals=not r.globals,
    )


def evaluation_task_request_from_proto(p: ProtoEvaluator.GetEvaluationTaskRequest) -> EvaluationTaskRequest:
    return EvaluationTaskRequest(
        max_wait_s=duration_from_proto(p.max_wait), updates=not p.skip_updates, globals=not p.skip_globals,
    )


def evaluator_task_to_proto(task: EvaluatorTask) -> ProtoEvaluator.EvaluationTaskResponse:
    if isinstance(task, EvaluationTask):
        return ProtoEvaluator.EvaluationTaskResponse(task=ProtoEvaluator.EvaluationTask(
            kind=EVALUATION_KIND_TO_PROTO[task.kind], round=task.round, client_id=task.client_id,
            device_name=task.device_name, rank=task.rank, adapter_sha256=task.adapter_sha256,
            adapter_bytes=task.adapter_bytes, base_round=task.base_round, base_sha256=task.base_sha256,
            base_model=None if task.base_model is None else base_model_to_proto(task.base_model), metric=task.metric,
        ))
    if isinstance(task, EvaluationWait):
        return ProtoEvaluator.EvaluationTaskResponse(wait=ProtoEvaluator.EvaluationWait(
            retry_after=duration_to_proto(task.retry_after_s), reason=task.reason,
        ))
    return ProtoEvaluator.EvaluationTaskResponse(done=ProtoEvaluator.EvaluationDone(reason=task.reason))


def evaluator_task_from_proto(p: ProtoEvaluator.EvaluationTaskResponse) -> EvaluatorTask | None:
    """The task, or None when the message holds none of the kinds this evaluator knows."""
    kind = p.WhichOneof("kind")
    if kind == "task":
        t = p.task
        return EvaluationTask(
            kind=_evaluation_kind(t.kind), round=t.round, adapter_sha256=t.adapter_sha256,
            adapter_bytes=t.adapter_bytes, client_id=t.client_id, device_name=t.device_name, rank=t.rank,
            base_round=t.base_round, base_sha256=t.base_sha256,
            base_model=base_model_from_proto(t.base_model) if t.HasField("base_model") else None, metric=t.metric,
        )
    if kind == "wait":
        return EvaluationWait(retry_after_s=duration_from_proto(p.wait.retry_after), reason=p.wait.reason)
    if kind == "done":
        return EvaluationDone(reason=p.done.reason)
    return None


def evaluation_download_request_to_proto(r: EvaluationDownloadRequest) -> ProtoEvaluator.EvaluationDownloadRequest:
    return ProtoEvaluator.EvaluationDownloadRequest(
        kind=EVALUATION_KIND_TO_PROTO[r.kind], round=r.round, client_id=r.client_id, offset=r.offset,
    )


def evaluation_download_request_from_proto(p: ProtoEvaluator.EvaluationDownloadRequest) -> EvaluationDownloadRequest:
    return EvaluationDownloadRequest(kind=_evaluation_kind(p.kind), round=p.round, client_id=p.client_id,
                                     offset=p.offset)


def score_report_to_proto(r: ScoreReport) -> ProtoEvaluator.ScoreReport:
    return ProtoEvaluator.ScoreReport(
        kind=EVALUATION_KIND_TO_PROTO[r.kind], round=r.round, client_id=r.client_id,
        adapter_sha256=r.adapter_sha256, metrics=dict(r.metrics), num_examples=r.num_examples,
    )


def score_report_from_proto(p: ProtoEvaluator.ScoreReport) -> ScoreReport:
    _finite(p.metrics, "metrics.")
    return ScoreReport(
        kind=_evaluation_kind(p.kind), round=p.round, adapter_sha256=p.adapter_sha256, metrics=dict(p.metrics),
        client_id=p.client_id, num_examples=p.num_examples,
    )


def score_receipt_to_proto(r: ScoreReceipt) -> ProtoEvaluator.ScoreReportResponse:
    return ProtoEvaluator.ScoreReportResponse(message=r.message)


def score_receipt_from_proto(p: ProtoEvaluator.ScoreReportResponse) -> ScoreReceipt:
    return ScoreReceipt(message=p.message)


# ------------------------------------------------------------------ error details

# The trailer gRPC's richer error model uses (grpc-status's `to_status` / `from_call`).
STATUS_DETAILS_KEY = "grpc-status-details-bin"


def error_detail_to_trailer(code: int, message: str, detail: ErrorDetail) -> tuple[str, bytes]:
    """The (key, value) trailing-metadata pair that carries `detail` with a status."""
    info = ProtoErrorDetails.ErrorInfo(reason=detail.reason, domain=ERROR_DOMAIN, metadata=dict(detail.metadata))
    packed = ProtoAny()
    packed.Pack(info)
    return STATUS_DETAILS_KEY, ProtoStatus.Status(code=code, message=message, details=[packed]).SerializeToString()


def error_detail_from_trailers(trailers: object) -> ErrorDetail | None:
    """The detail in a call's trailing metadata, or None (an older server, another domain,
    or a trailer that does not parse: a client never fails on a malformed detail)."""
    for key, value in trailers or ():  # type: ignore[attr-defined]
        if key != STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        try:
            status = ProtoStatus.Status.FromString(value)
        except ProtobufDecodeError:
            return None
        for packed in status.details:
            info = ProtoErrorDetails.ErrorInfo()
            if packed.Unpack(info) and info.domain == ERROR_DOMAIN:
                return ErrorDetail(reason=info.reason, metadata=dict(info.metadata))
    return None
