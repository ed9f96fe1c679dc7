"""Plain dataclasses the coordinator core works with (no grpc, no protobuf).

serde.py converts them to and from the rankfed.v1 messages; the state store persists them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from rankfed.shared_types import (  # noqa: F401 - re-exported
    AlphaRule,
    Capability,
    DeviceClass,
    ParticipantState,
    TrainMetrics,
    UploadHeader,
)


class RoundPhase(enum.StrEnum):
    WAITING_FOR_CLIENTS = "waiting_for_clients"
    TRAINING = "training"
    AGGREGATING = "aggregating"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class LoraSettings:
    """What a client trains with; maps one-to-one onto peft's LoraConfig."""

    rank: int
    alpha: float
    use_rslora: bool
    alpha_rule: AlphaRule
    target_modules: tuple[str, ...]
    dropout: float = 0.0
    modules_to_save: tuple[str, ...] = ()


@dataclass(frozen=True)
class Assignment:
    lora: LoraSettings
    tier: str
    reason: str


@dataclass(frozen=True)
class ClientRecord:
    client_id: str
    device_name: str
    capability: Capability
    num_examples: int
    joined_at: float  # unix seconds
    last_seen_at: float
    rank: int
    tier: str
    online: bool = True
    rounds_completed: int = 0
    deadlines_missed: int = 0  # consecutive; reset by an accepted update
    left: bool = False


@dataclass(frozen=True)
class Participant:
    """One client's part in one round."""

    round: int
    client_id: str
    rank: int
    alpha: float
    state: ParticipantState
    bytes_down: int = 0
    bytes_up: int = 0
    num_examples: int = 0
    metrics: TrainMetrics | None = None


@dataclass(frozen=True)
class Receipt:
    """An accepted update: its blob is on disk (fsynced) before this is recorded."""

    round: int
    client_id: str
    receipt_id: str
    rank: int
    num_examples: int
    nbytes: int
    sha256: str
    blob_path: str  # relative to the blob root
    accepted_at: float
    metrics: TrainMetrics = field(default_factory=TrainMetrics)


@dataclass(frozen=True)
class RoundRecord:
    round: int
    phase: RoundPhase
    method: str
    started_at: float
    deadline: float
    min_clients: int
    global_rank: int
    finished_at: float | None = None
    global_sha256: str = ""  # of the global adapter this round produced
    metrics: dict[str, float] = field(default_factory=dict)
    failure_reason: str = ""


# --- Requests and answers of the core API (the servicers convert these to protobuf) ---


@dataclass(frozen=True)
class JoinInfo:
    device_name: str
    capability: Capability
    base_model_sha256: str
    enrollment_secret: str = ""
    client_version: str = ""
    num_examples: int = 0


@dataclass(frozen=True)
class JoinResult:
    client_id: str
    session_token: str
    token_expires_at: float
    assignment: Assignment
    heartbeat_interval: float
    federation_id: str
    max_chunk_bytes: int
    mode: str = "rank_heterogeneous"
    # The admitted base model this device joined with ("": the manifest's own).
    base_model_id: str = ""
    base_model_sha256: str = ""


@dataclass(frozen=True)
class TrainTask:
    round: int
    assignment: Assignment
    local_steps: int
    learning_rate: float
    batch_size: int
    deadline: float
    method: str
    adapter_bytes: int
    adapter_sha256: str
    seed: int


@dataclass(frozen=True)
class WaitTask:
    retry_after: float
    reason: str


@dataclass(frozen=True)
class DoneTask:
    final_round: int
    reason: str
    final_adapter_sha256: str


Task = TrainTask | WaitTask | DoneTask


@dataclass(frozen=True)
class TransferManifest:
    round: int
    rank: int
    total_bytes: int
    sha256: str
    chunk_bytes: int
    lora: LoraSettings


@dataclass(frozen=True)
class HeartbeatResult:
    next_in: float
    round_open: bool


@dataclass(frozen=True)
class ParticipantView:
    participant: Participant
    device_name: str
    device_class: DeviceClass


@dataclass(frozen=True)
class RoundView:
    record: RoundRecord
    participants: tuple[ParticipantView, ...]


@dataclass(frozen=True)
class FederationView:
    federation_id: str
    total_rounds: int
    current: RoundView | None
    history: tuple[RoundView, ...]
    done: bool
    clients_online: int
    model_id: str
    weights_sha256: str
    task: str
    num_labels: int
    mode: str = "rank_heterogeneous"
    models: tuple[tuple[str, str], ...] = ()  # (model_id, weights_sha256) of each admitted model
