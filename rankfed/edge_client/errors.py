"""The edge client's exception tree.

EdgeError
├── ConfigError            bad command-line or configuration input (names the option)
├── ModelError             the base model directory is missing, incomplete or unloadable
│   └── ModelMismatchError our weights are not the coordinator's (sha256 differs)
├── DataError              the local data file is malformed (names the file and line)
├── AdapterError           an adapter does not fit the model (names the key)
├── TrainingError          local training failed (non-finite loss, empty data)
├── ExportError            ONNX export or its parity check failed
│   └── ParityError        onnxruntime differs from torch by more than the tolerance
└── TransportError         talking to the coordinator failed (after retries where they apply)
    ├── UnavailableError   the coordinator cannot be reached (UNAVAILABLE, DEADLINE_EXCEEDED)
    ├── AuthError          the session token or enrollment secret was refused
    ├── StaleRoundError    the round we work on is closed (FAILED_PRECONDITION): get a new task
    ├── RejectedError      the coordinator refused the request itself (INVALID_ARGUMENT, ...)
    ├── DuplicateError     an update for this round is already there (ALREADY_EXISTS)
    └── IntegrityError     a download did not match its manifest (size or sha256)

gRPC status codes are mapped to these in one table, `transport.STATUS_TO_ERROR`; nothing
outside `transport.py` and `serde.py` sees a grpc type. Messages are written for the person
running the device: they say what was wrong and what to do.
"""

from __future__ import annotations

from rankfed.protocol import ErrorDetail


class EdgeError(Exception):
    """Base of every error the edge client raises on purpose."""


class ConfigError(EdgeError):
    pass


class ModelError(EdgeError):
    pass


class ModelMismatchError(ModelError):
    pass


class DataError(EdgeError):
    pass


class AdapterError(EdgeError):
    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class TrainingError(EdgeError):
    pass


class ExportError(EdgeError):
    pass


class ParityError(ExportError):
    def __init__(self, message: str, *, max_abs_diff: float) -> None:
        super().__init__(message)
        self.max_abs_diff = max_abs_diff


class TransportError(EdgeError):
    """A failed call; ``code`` is the gRPC status name (e.g. "UNAVAILABLE") when there is one,
    ``detail`` the coordinator's typed error detail when it sent one."""

    def __init__(self, message: str, *, code: str = "", detail: ErrorDetail | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.detail = detail


class UnavailableError(TransportError):
    pass


class AuthError(TransportError):
    pass


class StaleRoundError(TransportError):
    pass


class RejectedError(TransportError):
    pass


class DuplicateError(TransportError):
    pass


class IntegrityError(TransportError):
    pass
