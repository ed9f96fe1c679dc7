"""Plain dataclasses for what the client and the coordinator exchange (no grpc, no protobuf).

`serde.py` converts them to and from the rankfed.v1 messages; everything else in the edge
client works with these only.
"""

from __future__ import annotations

from dataclasses import dataclass

from rankfed.shared_types import (  # noqa: F401 - re-exported
    AlphaRule,
    Capability,
    DeviceClass,
    ParticipantState,
    TrainMetrics,
    UploadHeader,
)


@dataclass(frozen=True)
class LoraSettings:
    """The LoRA configuration to train with; maps one-to-one onto peft's LoraConfig."""

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
    reason: str = ""


@dataclass(frozen=True)
class BaseModelInfo:
    id: str
    weights_sha256: str
    task: str  # "sequence-classification" or "causal-lm"
    num_labels: int = 0


@dataclass(frozen=True)
class JoinRequest:
    device_name: str
    capability: Capability
    base_model_sha256: str
    num_examples: int
    enrollment_secret: str = ""
    client_version: str = ""


@dataclass(frozen=True)
class JoinResult:
    client_id: str
    session_token: str
    assignment: Assignment
    base_model: BaseModelInfo
    heartbeat_interval_s: float
    federation_id: str
    max_chunk_bytes: int
    token_expires_at: float = 0.0  # unix seconds, 0: unknown
    # "rank_heterogeneous" or "personalized" (pFedLoRA: only the shared adapter is exchanged).
    mode: str = "rank_heterogeneous"


@dataclass(frozen=True)
class TrainTask:
    round: int
    assignment: Assignment
    local_steps: int
    learning_rate: float
    batch_size: int
    deadline: float  # unix seconds, 0: none
    method: str = ""
    adapter_bytes: int = 0
    adapter_sha256: str = ""
    seed: int = 0


@dataclass(frozen=True)
class WaitTask:
    retry_after_s: float
    reason: str = ""


@dataclass(frozen=True)
class DoneTask:
    final_round: int
    reason: str = ""
    final_adapter_sha256: str = ""


Task = TrainTask | WaitTask | DoneTask


@dataclass(frozen=True)
class TransferManifest:
    round: int
    rank: int
    total_bytes: int
    sha256: str
    chunk_bytes: int = 0
    lora: LoraSettings | None = None


@dataclass(frozen=True)
class UploadReceipt:
    round: int
    bytes_received: int
    sha256: str
    receipt_id: str = ""
    accepted_at: float = 0.0
    # True when the coordinator already held this very update (a retried upload).
    duplicate: bool = False


@dataclass(frozen=True)
class HeartbeatResult:
    next_in_s: float
    round_open: bool
