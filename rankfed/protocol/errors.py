"""Errors of the protocol layer.

ProtocolError
├── DecodeError     a wire message does not make a valid vocabulary value (unknown enum,
│                   non-finite metric, missing required part)             -> INVALID_ARGUMENT
└── ManifestError   a model manifest is malformed (names the file and the field or module)

Both ends map these in their own exception tables: the coordinator answers a DecodeError
with INVALID_ARGUMENT and refuses to start on a ManifestError (exit 2); the edge client
reports either as a configuration problem.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Base of the protocol layer's errors."""


class DecodeError(ProtocolError, ValueError):
    pass


class ManifestError(ProtocolError, ValueError):
    pass
