"""The coordinator's exception tree.

CoordinatorError
├── AuthError              the caller is not who it claims (bad, forged, expired token)   -> UNAUTHENTICATED
├── PermissionDeniedError  the caller may not do this (wrong enrollment secret)             -> PERMISSION_DENIED
├── NotFoundError          unknown round, client or blob                                   -> NOT_FOUND
├── PreconditionError      right request, wrong time (stale round, upload before download) -> FAILED_PRECONDITION
├── InvalidArgumentError   the request or update itself is wrong (rank, shapes, digest)    -> INVALID_ARGUMENT
├── TooLargeError          over a configured size cap                                      -> RESOURCE_EXHAUSTED
├── DuplicateError         a second upload for the same round                              -> ALREADY_EXISTS
├── StorageError           the disk refused (full, I/O error)                              -> UNAVAILABLE
├── RetryLaterError        a moment too early (a previous upload is still being stored)   -> UNAVAILABLE
├── StreamTimeoutError     a client stream went idle or ran too long                      -> DEADLINE_EXCEEDED
└── ConfigError            bad configuration (raised at start-up, never over the wire)

The servicer maps these to gRPC status codes in one table (servicer_errors.py). Messages are
written for a person: they say what was wrong and what to do; what code must compare travels
as a typed `detail` (rankfed.protocol.ErrorDetail).
"""

from __future__ import annotations

from rankfed.protocol import ErrorDetail


class CoordinatorError(Exception):
    """Base of every error the coordinator core raises on purpose. `detail`, when set, travels
    with the status as a typed google.rpc.ErrorInfo, for clients to compare fields, not text."""

    def __init__(self, message: str = "", *, detail: ErrorDetail | None = None) -> None:
        super().__init__(message)
        self.detail = detail


class AuthError(CoordinatorError):
    pass


class PermissionDeniedError(CoordinatorError):
    pass


class NotFoundError(CoordinatorError):
    pass


class PreconditionError(CoordinatorError):
    pass


class InvalidArgumentError(CoordinatorError):
    pass


class TooLargeError(CoordinatorError):
    pass


class DuplicateError(CoordinatorError):
    pass


class StorageError(CoordinatorError):
    pass


class RetryLaterError(CoordinatorError):
    pass


class ConfigError(CoordinatorError):
    pass


class StreamTimeoutError(CoordinatorError):
    """A client stream went silent, or ran longer than allowed (server.upload_*_timeout_seconds).

    Raised by the servicer, not the core: the core never sees a stream. -> DEADLINE_EXCEEDED
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.metrics_reason = reason
