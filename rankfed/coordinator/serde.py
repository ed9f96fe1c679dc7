"""protobuf <-> coordinator dataclasses. The only coordinator module that knows both."""

from __future__ import annotations

import math

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from rankfed.coordinator.errors import InvalidArgumentError
from rankfed.coordinator.models import (
    Assignment,
    Capability,
    ClientRecord,
    DoneTask,
    FederationView,
    JoinInfo,
    JoinResult,
    LoraSettings,
    ParticipantState,
    RoundPhase,
    RoundView,
    Task,
    TrainMetrics,
    TrainTask,
    TransferManifest,
    UploadHeader,
    WaitTask,
)
from rankfed.shared_serde import (
    ALPHA_RULE_TO_PROTO,
    DEVICE_CLASS_FROM_PROTO,
    DEVICE_CLASS_TO_PROTO,
    PARTICIPANT_STATE_FROM_PROTO,
    PARTICIPANT_STATE_TO_PROTO,
    capability_to_proto,
    metrics_to_proto,
)
from rankfed.v1 import admin_pb2 as ProtoAdmin
from rankfed.v1 import common_pb2 as ProtoCommon
from rankfed.v1 import edge_pb2 as ProtoEdge

_DEVICE_CLASS = DEVICE_CLASS_FROM_PROTO
_DEVICE_CLASS_TO = DEVICE_CLASS_TO_PROTO
_ALPHA_RULE_TO = ALPHA_RULE_TO_PROTO
_PARTICIPANT_STATE = PARTICIPANT_STATE_FROM_PROTO
_PARTICIPANT_STATE_TO = PARTICIPANT_STATE_TO_PROTO
_ROUND_PHASE_TO = {
    RoundPhase.WAITING_FOR_CLIENTS: ProtoCommon.ROUND_PHASE_WAITING_FOR_CLIENTS,
    RoundPhase.TRAINING: ProtoCommon.ROUND_PHASE_TRAINING,
    RoundPhase.AGGREGATING: ProtoCommon.ROUND_PHASE_AGGREGATING,
    RoundPhase.DONE: ProtoCommon.ROUND_PHASE_DONE,
    RoundPhase.FAILED: ProtoCommon.ROUND_PHASE_FAILED,
}


def timestamp(seconds: float | None) -> Timestamp | None:
    if not seconds:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def duration(seconds: float) -> Duration:
    d = Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def duration_from_proto(d: Duration) -> float:
    return d.ToNanoseconds() / 1e9


# ---------------------------------------------------------------- edge: requests


def capability_from_proto(msg: ProtoCommon.DeviceCapability) -> Capability:
    if msg.device_class not in _DEVICE_CLASS:
        raise InvalidArgumentError(
            "capability.device_class is missing or unknown; report cpu, cuda, mps or mobile"
        )
    return Capability(
        device_class=_DEVICE_CLASS[msg.device_class],
        memory_total_bytes=msg.memory_total_bytes,
        memory_free_bytes=msg.memory_free_bytes,
        cpu_cores=msg.cpu_cores,
        compute_gflops=msg.compute_gflops,
        upload_bytes_per_second=msg.upload_bytes_per_second,
        download_bytes_per_second=msg.download_bytes_per_second,
        accelerator_name=msg.accelerator_name,
        accelerator_memory_bytes=msg.accelerator_memory_bytes,
        platform=msg.platform,
    )


def join_info_from_proto(msg: ProtoEdge.JoinRequest) -> JoinInfo:
    return JoinInfo(
        device_name=msg.device_name,
        capability=capability_from_proto(msg.capability),
        base_model_sha256=msg.base_model_sha256,
        enrollment_secret=msg.enrollment_secret,
        client_version=msg.client_version,
        num_examples=msg.num_examples,
    )


def metrics_from_proto(msg: ProtoCommon.TrainMetrics) -> TrainMetrics:
    values = {"loss_first": msg.loss_first, "loss_last": msg.loss_last, "train_seconds": msg.train_seconds, **msg.eval}
    for name, value in values.items():
        if not math.isfinite(value):
            raise InvalidArgumentError(f"metrics.{name} is not a finite number ({value})")
    return TrainMetrics(
        loss_first=msg.loss_first, loss_last=msg.loss_last, steps=msg.steps,
        train_seconds=msg.train_seconds, eval=dict(msg.eval),
    )


def upload_header_from_proto(msg: ProtoEdge.UploadHeader) -> UploadHeader:
    return UploadHeader(
        round=msg.round, rank=msg.rank, num_examples=msg.num_examples, total_bytes=msg.total_bytes,
        sha256=msg.sha256, metrics=metrics_from_proto(msg.metrics),
    )


def participant_state_from_proto(value: int) -> ParticipantState | None:
    return _PARTICIPANT_STATE.get(value)


# ---------------------------------------------------------------- edge: responses


def lora_to_proto(lora: LoraSettings) -> ProtoCommon.LoraConfig:
    return ProtoCommon.LoraConfig(
        rank=lora.rank, alpha=lora.alpha, use_rslora=lora.use_rslora, alpha_rule=_ALPHA_RULE_TO[lora.alpha_rule],
        target_modules=list(lora.target_modules), dropout=lora.dropout, modules_to_save=list(lora.modules_to_save),
    )


def assignment_to_proto(a: Assignment) -> ProtoEdge.Assignment:
    return ProtoEdge.Assignment(lora=lora_to_proto(a.lora), tier=a.tier, reason=a.reason)


def base_model_to_proto(view: FederationView) -> ProtoCommon.BaseModel:
    return ProtoCommon.BaseModel(
        id=view.model_id, weights_sha256=view.weights_sha256, task=view.task, num_labels=view.num_labels
    )


_MODE_TO = {
    "rank_heterogeneous": ProtoCommon.FEDERATION_MODE_RANK_HETEROGENEOUS,
    "personalized": ProtoCommon.FEDERATION_MODE_PERSONALIZED,
}


def join_result_to_proto(r: JoinResult, base_model: ProtoCommon.BaseModel) -> ProtoEdge.JoinResponse:
    """`base_model` is the federation's; the model the device joined with (one of several in a
    personalized federation) replaces its id and digest."""
    if r.base_model_sha256 and r.base_model_sha256 != base_model.weights_sha256:
        base_model = ProtoCommon.BaseModel(
            id=r.base_model_id, weights_sha256=r.base_model_sha256, task=base_model.task,
            num_labels=base_model.num_labels,
        )
    return ProtoEdge.JoinResponse(
        client_id=r.client_id, session_token=r.session_token, token_expires_at=timestamp(r.token_expires_at),
        assignment=assignment_to_proto(r.assignment), base_model=base_model,
        heartbeat_interval=duration(r.heartbeat_interval), federation_id=r.federation_id,
        max_chunk_bytes=r.max_chunk_bytes, mode=_MODE_TO[r.mode],
    )


def task_to_proto(task: Task) -> ProtoEdge.Task:
    if isinstance(task, TrainTask):
        return ProtoEdge.Task(train=ProtoEdge.TrainTask(
            round=task.round, assignment=assignment_to_proto(task.assignment), local_steps=task.local_steps,
            learning_rate=task.learning_rate, batch_size=task.batch_size, deadline=timestamp(task.deadline),
            method=task.method, adapter_bytes=task.adapter_bytes, adapter_sha256=task.adapter_sha256, seed=task.seed,
        ))
    if isinstance(task, WaitTask):
        return ProtoEdge.Task(wait=ProtoEdge.WaitTask(retry_after=duration(task.retry_after), reason=task.reason))
    assert isinstance(task, DoneTask)
    return ProtoEdge.Task(done=ProtoEdge.DoneTask(
        final_round=task.final_round, reason=task.reason, final_adapter_sha256=task.final_adapter_sha256
    ))


def transfer_manifest_to_proto(m: TransferManifest) -> ProtoEdge.DownloadMessage:
    return ProtoEdge.DownloadMessage(manifest=ProtoEdge.TransferManifest(
        round=m.round, rank=m.rank, total_bytes=m.total_bytes, sha256=m.sha256, chunk_bytes=m.chunk_bytes,
        lora=lora_to_proto(m.lora),
    ))


# ---------------------------------------------------------------- admin


def round_to_proto(view: RoundView) -> ProtoAdmin.RoundStatus:
    r = view.record
    return ProtoAdmin.RoundStatus(
        round=r.round, phase=_ROUND_PHASE_TO[r.phase], method=r.method,
        started_at=timestamp(r.started_at), deadline=timestamp(r.deadline), finished_at=timestamp(r.finished_at),
        min_clients=r.min_clients, metrics=r.metrics, global_adapter_sha256=r.global_sha256,
        global_rank=r.global_rank, failure_reason=r.failure_reason,
        participants=[
            ProtoAdmin.ParticipantStatus(
                client_id=p.participant.client_id, device_name=p.device_name,
                device_class=_DEVICE_CLASS_TO.get(p.device_class, ProtoCommon.DEVICE_CLASS_UNSPECIFIED),
                state=_PARTICIPANT_STATE_TO[p.participant.state], rank=p.participant.rank,
                bytes_down=p.participant.bytes_down, bytes_up=p.participant.bytes_up,
                num_examples=p.participant.num_examples, metrics=None if p.participant.metrics is None else metrics_to_proto(p.participant.metrics),
            )
            for p in view.participants
        ],
    )


def federation_to_proto(view: FederationView) -> ProtoAdmin.FederationStatus:
    return ProtoAdmin.FederationStatus(
        federation_id=view.federation_id, total_rounds=view.total_rounds,
        current=round_to_proto(view.current) if view.current else None,
        history=[round_to_proto(r) for r in view.history], done=view.done,
        clients_online=view.clients_online, base_model=base_model_to_proto(view), mode=_MODE_TO[view.mode],
        models=[
            ProtoCommon.BaseModel(id=model_id, weights_sha256=sha, task=view.task, num_labels=view.num_labels)
            for model_id, sha in view.models
        ],
    )


def client_to_proto(c: ClientRecord, online: bool) -> ProtoAdmin.ClientInfo:
    return ProtoAdmin.ClientInfo(
        client_id=c.client_id, device_name=c.device_name,
        capability=capability_to_proto(c.capability),
        rank=c.rank, tier=c.tier, online=online, joined_at=timestamp(c.joined_at),
        last_seen_at=timestamp(c.last_seen_at), rounds_completed=c.rounds_completed,
        deadlines_missed=c.deadlines_missed, num_examples=c.num_examples,
    )
