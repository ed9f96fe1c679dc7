"""The one vocabulary both ends of RankFed speak: message dataclasses (`types`), their
protobuf conversions (`serde`), the model-manifest schema (`manifest`) and decode errors.

It sits below the coordinator and the edge client, which never import each other; only
`serde` touches generated code, so `from rankfed.protocol import JoinRequest` is cheap.
"""

from .errors import DecodeError, ManifestError, ProtocolError
from .types import (
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
    ErrorReason,
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

__all__ = [
    "AlphaRule", "Assignment", "BaseModel", "Capability", "Chunk", "ClientInfo", "ClientPage", "DecodeError", "DeviceClass",
    "DoneTask", "DownloadRequest", "ErrorDetail", "ErrorReason", "EvaluationDone", "EvaluationDownloadRequest",
    "EvaluationKind", "EvaluationTask", "EvaluationTaskRequest", "EvaluationWait", "EvaluatorTask", "FederationMode", "FederationStatus", "HeartbeatRequest", "HeartbeatResult",
    "JoinRequest", "JoinResult", "LeaveRequest", "LoraSettings", "ManifestError", "ParticipantState",
    "ParticipantStatus", "ProtocolError", "RoundPhase", "RoundStatus", "ScoreReceipt", "ScoreReport", "Task", "TrainMetrics", "TrainTask",
    "TransferManifest", "UploadHeader", "UploadReceipt", "UploadStatusRequest", "UploadStatusResult", "WaitTask",
]
