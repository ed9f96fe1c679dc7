"""protobuf <-> `rankfed.shared_types`: the conversions both ends of the protocol need.

Each side's own serde module (coordinator/serde.py, edge_client/serde.py) imports these for
the shared vocabulary and converts its own dataclasses itself."""

from __future__ import annotations

from rankfed.shared_types import AlphaRule, Capability, DeviceClass, ParticipantState, TrainMetrics
from rankfed.v1 import common_pb2 as ProtoCommon

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
}
PARTICIPANT_STATE_FROM_PROTO = {v: k for k, v in PARTICIPANT_STATE_TO_PROTO.items()}


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


def metrics_to_proto(m: TrainMetrics) -> ProtoCommon.TrainMetrics:
    return ProtoCommon.TrainMetrics(
        loss_first=m.loss_first, loss_last=m.loss_last, steps=m.steps, train_seconds=m.train_seconds, eval=dict(m.eval)
    )
