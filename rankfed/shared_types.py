"""The vocabulary both ends of the protocol share: device classes, alpha rules, participant
states, the device capability, training metrics and the upload header. The coordinator and the edge client never import each
other; both import these (and convert them to and from `rankfed.v1` in their own serde)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class DeviceClass(enum.StrEnum):
    CPU = "cpu"
    CUDA = "cuda"
    MPS = "mps"
    MOBILE = "mobile"


class AlphaRule(enum.StrEnum):
    CONSTANT_SCALING = "constant_scaling"
    FIXED = "fixed"
    RSLORA = "rslora"


class ParticipantState(enum.StrEnum):
    ASSIGNED = "assigned"
    DOWNLOADING = "downloading"
    TRAINING = "training"
    UPLOADING = "uploading"
    UPLOADED = "uploaded"
    LATE = "late"
    DROPPED = "dropped"


@dataclass(frozen=True)
class Capability:
    """What `rankfed edge probe` measures and Join reports; the rank policy matches on it."""

    device_class: DeviceClass = DeviceClass.CPU
    memory_total_bytes: int = 0
    memory_free_bytes: int = 0
    cpu_cores: int = 0
    compute_gflops: float = 0.0
    upload_bytes_per_second: float = 0.0  # 0: not measured yet
    download_bytes_per_second: float = 0.0
    accelerator_name: str = ""
    accelerator_memory_bytes: int = 0
    platform: str = ""


@dataclass(frozen=True)
class TrainMetrics:
    loss_first: float = 0.0
    loss_last: float = 0.0
    steps: int = 0
    train_seconds: float = 0.0
    eval: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class UploadHeader:
    """What an upload declares before its first byte: round, rank, size and digest."""

    round: int
    rank: int
    num_examples: int
    total_bytes: int
    sha256: str
    metrics: TrainMetrics = field(default_factory=TrainMetrics)
