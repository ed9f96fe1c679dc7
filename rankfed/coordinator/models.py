"""What the coordinator alone stores: clients, participants, rounds and receipts (frozen
dataclasses; no grpc, no protobuf). The messages it exchanges with devices and operators are
the shared vocabulary of `rankfed.protocol`; the state store persists these.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rankfed.protocol import Capability, DeviceClass, ParticipantState, RoundPhase, TrainMetrics


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


@dataclass(frozen=True, slots=True)
class DeviceLabel:
    """How a status shows a participant's device: the two fields of its ClientRecord that
    operators see, read without building (and JSON-decoding) the whole record."""

    device_name: str
    device_class: DeviceClass


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


@dataclass(frozen=True)
class ScoreRecord:
    """A score of one adapter on held-out data: a device's update of a round (client_id set)
    or a round's global adapter (client_id "").

    source "reported": the device's own held-out split, sent with its update (metrics.eval);
    source "validation": an evaluator's held-out set (EvaluatorService.ReportScores)."""

    round: int
    client_id: str  # "": the round's global adapter
    source: str
    metrics: dict[str, float]
    recorded_at: float
    adapter_sha256: str = ""  # the adapter scored
    reporter: str = ""  # who reported it, for the log and status
