"""The wire vocabulary: every message the coordinator and a device (or an operator) exchange,
as plain frozen dataclasses. No grpc, no protobuf: `serde.py` converts these to and from the
generated `rankfed.v1` messages, and nothing else in RankFed needs to know those exist.

Units are in the names: `*_s` are seconds, `*_at` / `deadline` are unix seconds (0: unset),
`*_bytes` are bytes.
"""

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
    REJECTED = "rejected"  # its stored update could not be aggregated; the round went on without it


class RoundPhase(enum.StrEnum):
    WAITING_FOR_CLIENTS = "waiting_for_clients"
    TRAINING = "training"
    AGGREGATING = "aggregating"
    DONE = "done"
    FAILED = "failed"


class FederationMode(enum.StrEnum):
    """RANK_HETEROGENEOUS: one global adapter, each device at its own rank.
    PERSONALIZED: pFedLoRA, only a small shared adapter is exchanged (docs/personalized.md)."""

    RANK_HETEROGENEOUS = "rank_heterogeneous"
    PERSONALIZED = "personalized"


# ------------------------------------------------------------------ building blocks


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
class LoraSettings:
    """The LoRA configuration a device trains with; maps one-to-one onto peft's LoraConfig."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    use_rslora: bool = False
    alpha_rule: AlphaRule = AlphaRule.CONSTANT_SCALING
    dropout: float = 0.0
    modules_to_save: tuple[str, ...] = ()


@dataclass(frozen=True)
class Assignment:
    lora: LoraSettings
    tier: str = ""
    reason: str = ""  # why this rank, for a person


@dataclass(frozen=True)
class BaseModel:
    id: str
    weights_sha256: str
    task: str = ""  # "sequence-classification" or "causal-lm"
    num_labels: int = 0


# ------------------------------------------------------------------ EdgeService


@dataclass(frozen=True)
class JoinRequest:
    device_name: str
    capability: Capability
    base_model_sha256: str
    num_examples: int = 0
    enrollment_secret: str = ""
    client_version: str = ""
    device_key: str = ""  # issued at first enrollment; proves the name on later joins


@dataclass(frozen=True)
class JoinResult:
    client_id: str
    session_token: str
    assignment: Assignment
    base_model: BaseModel  # the model this device joined with (one of several when personalized)
    heartbeat_interval_s: float
    federation_id: str
    max_chunk_bytes: int
    token_expires_at: float = 0.0
    mode: FederationMode = FederationMode.RANK_HETEROGENEOUS
    device_key: str = ""  # set when the coordinator (re)binds the name: keep it for later joins


@dataclass(frozen=True)
class TrainTask:
    round: int
    assignment: Assignment
    local_steps: int
    learning_rate: float
    batch_size: int
    deadline: float = 0.0
    method: str = ""
    adapter_bytes: int = 0
    adapter_sha256: str = ""  # of the global adapter redistributed to this device's rank
    seed: int = 0


@dataclass(frozen=True)
class WaitTask:
    retry_after_s: float = 0.0
    reason: str = ""


@dataclass(frozen=True)
class DoneTask:
    final_round: int
    reason: str = ""
    final_adapter_sha256: str = ""


Task = TrainTask | WaitTask | DoneTask


@dataclass(frozen=True)
class DownloadRequest:
    """round 0: the latest global adapter (at the device's rank, or `full`: itself)."""

    round: int
    offset: int = 0
    full: bool = False


@dataclass(frozen=True)
class TransferManifest:
    round: int
    rank: int
    total_bytes: int
    sha256: str
    chunk_bytes: int = 0
    lora: LoraSettings | None = None


@dataclass(frozen=True)
class Chunk:
    offset: int
    data: bytes


@dataclass(frozen=True)
class UploadHeader:
    """What an upload declares before its first byte: round, rank, size and digest."""

    round: int
    rank: int
    num_examples: int
    total_bytes: int
    sha256: str
    metrics: TrainMetrics = field(default_factory=TrainMetrics)
    # 0: a new upload. Else the byte a broken upload of the same round, size and digest
    # resumes from (at most what UploadStatus reported): its first chunk's offset.
    resume_offset: int = 0


@dataclass(frozen=True)
class UploadStatusRequest:
    """Which upload a device asks about: what its header declares."""

    round: int
    total_bytes: int
    sha256: str


@dataclass(frozen=True)
class UploadStatusResult:
    """Bytes of that upload the coordinator kept from a broken stream (0: none), and when
    it drops them unless the upload resumes (0 when none are kept)."""

    resume_offset: int
    expires_at: float = 0.0


@dataclass(frozen=True)
class UploadReceipt:
    round: int
    bytes_received: int
    sha256: str
    receipt_id: str = ""
    accepted_at: float = 0.0
    # Set by the client, never sent: the coordinator already held this very update (a retry).
    duplicate: bool = False


@dataclass(frozen=True)
class HeartbeatRequest:
    round: int
    state: ParticipantState | None = None
    progress: float = 0.0


@dataclass(frozen=True)
class HeartbeatResult:
    next_in_s: float
    round_open: bool


@dataclass(frozen=True)
class LeaveRequest:
    reason: str = ""


# ------------------------------------------------------------------ errors

ERROR_DOMAIN = "rankfed.v1"


class ErrorReason(enum.StrEnum):
    """Why a call failed, for code to compare (the status message is for people)."""

    # ALREADY_EXISTS: the coordinator holds an update of this device for the round;
    # metadata: round, sha256 (of the update it holds), receipt_id.
    UPDATE_ALREADY_ACCEPTED = "UPDATE_ALREADY_ACCEPTED"
    # FAILED_PRECONDITION: an upload asked to resume from bytes the coordinator does not
    # hold (none kept, another digest or size, expired, or fewer than asked);
    # metadata: resume_offset (what it holds of this upload; "0": send from the start).
    UPLOAD_NOT_RESUMABLE = "UPLOAD_NOT_RESUMABLE"


@dataclass(frozen=True)
class ErrorDetail:
    """The typed detail of a failed call; on the wire a google.rpc.ErrorInfo inside the
    google.rpc.Status of the `grpc-status-details-bin` trailer (gRPC's richer error model)."""

    reason: str
    metadata: dict[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------ AdminService


@dataclass(frozen=True)
class ParticipantStatus:
    client_id: str
    device_name: str
    device_class: DeviceClass | None
    state: ParticipantState
    rank: int
    bytes_down: int = 0
    bytes_up: int = 0
    num_examples: int = 0
    metrics: TrainMetrics | None = None


@dataclass(frozen=True)
class RoundStatus:
    round: int
    phase: RoundPhase
    method: str
    started_at: float = 0.0
    deadline: float = 0.0
    finished_at: float = 0.0
    min_clients: int = 0
    global_rank: int = 0
    global_adapter_sha256: str = ""
    failure_reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    participants: tuple[ParticipantStatus, ...] = ()
    participants_omitted: int = 0  # left out to keep a reply bounded (all of them in history)


@dataclass(frozen=True)
class FederationStatus:
    federation_id: str
    total_rounds: int
    base_model: BaseModel
    current: RoundStatus | None = None
    history: tuple[RoundStatus, ...] = ()
    done: bool = False
    clients_online: int = 0
    mode: FederationMode = FederationMode.RANK_HETEROGENEOUS
    models: tuple[BaseModel, ...] = ()  # every admitted base model
    next_page_token: str = ""  # older history: pass it back as page_token ("": none left)
    paused: bool = False  # an operator paused it: no new round starts
    banned_devices: tuple[str, ...] = ()


@dataclass(frozen=True)
class ClientInfo:
    client_id: str
    device_name: str
    capability: Capability
    rank: int
    tier: str
    online: bool
    joined_at: float = 0.0
    last_seen_at: float = 0.0
    rounds_completed: int = 0
    deadlines_missed: int = 0
    num_examples: int = 0
    left: bool = False


@dataclass(frozen=True)
class ClientPage:
    """One page of ListClients; pass `next_page_token` back for the next ("": the last page)."""

    clients: tuple[ClientInfo, ...] = ()
    next_page_token: str = ""


# ------------------------------------------------------------------ EvaluatorService


class EvaluationKind(enum.StrEnum):
    UPDATE = "update"  # a device's update of a round, as uploaded
    GLOBAL = "global"  # a round's global adapter


@dataclass(frozen=True)
class EvaluationTaskRequest:
    max_wait_s: float = 0.0
    updates: bool = True  # devices' updates (rank_policy.allocation = "validation")
    globals: bool = True  # rounds' global adapters (export --round best)


@dataclass(frozen=True)
class EvaluationTask:
    """Score one adapter on the evaluator's validation set: a device's update of `round`
    (`client_id` set) or round `round`'s global adapter."""

    kind: EvaluationKind
    round: int
    adapter_sha256: str
    adapter_bytes: int
    client_id: str = ""
    device_name: str = ""
    rank: int = 0
    base_round: int = 0  # UPDATE: the global adapter the device trained from
    base_sha256: str = ""
    base_model: BaseModel | None = None
    metric: str = ""  # the score the coordinator ranks by: an UPDATE's report must hold it


@dataclass(frozen=True)
class EvaluationWait:
    retry_after_s: float = 0.0
    reason: str = ""


@dataclass(frozen=True)
class EvaluationDone:
    reason: str = ""


EvaluatorTask = EvaluationTask | EvaluationWait | EvaluationDone


@dataclass(frozen=True)
class EvaluationDownloadRequest:
    kind: EvaluationKind
    round: int
    client_id: str = ""
    offset: int = 0


@dataclass(frozen=True)
class ScoreReport:
    kind: EvaluationKind
    round: int
    adapter_sha256: str
    metrics: dict[str, float]
    client_id: str = ""
    num_examples: int = 0  # examples in the validation set


@dataclass(frozen=True)
class ScoreReceipt:
    message: str = ""  # what the coordinator did with the scores, for a person
