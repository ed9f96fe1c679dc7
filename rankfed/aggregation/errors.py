"""Exceptions of ``rankfed.aggregation``: one tree, documented here.

::

    Exception
    ├── AdapterError                 an adapter (object or bytes) is unusable
    │   ├── AdapterFormatError       the bytes are not a valid RankFed adapter:
    │   │                            truncated, corrupt, bad JSON, oversize header,
    │   │                            unsupported dtype, missing metadata, non-finite
    │   │                            values, a lora_A without its lora_B, ...
    │   └── AdapterValidationError   a well-formed adapter does not fit what is
    │                                expected: missing/extra modules, shape or rank
    │                                mismatch, rank 0 or above ``max_rank``, non-finite
    └── AggregationError             the aggregation API was misused: nothing folded,
                                     ranks that a rule does not accept, weights that
                                     are negative or sum to zero, incompatible adapters

``AdapterError`` carries ``.key``: the safetensors key or module name at fault, or
``None`` when the problem is not tied to one key (e.g. a truncated header). A servicer
maps ``AdapterError`` to INVALID_ARGUMENT (the client sent bad bytes) and
``AggregationError`` to INTERNAL or FAILED_PRECONDITION (the server misused the library).
Plain ``ValueError``/``TypeError`` are raised for programming errors in arguments that are
not adapters (an unknown method name, a bad option value).
"""

from __future__ import annotations

__all__ = ["AdapterError", "AdapterFormatError", "AdapterValidationError", "AggregationError"]


class AdapterError(Exception):
    """An adapter, as an object or as bytes, cannot be used. ``key`` names the culprit."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class AdapterFormatError(AdapterError):
    """The bytes are not a valid ``rankfed-adapter/1`` safetensors file."""


class AdapterValidationError(AdapterError):
    """The adapter is well formed but does not match the expected spec or limits."""


class AggregationError(Exception):
    """The aggregation API was misused (nothing folded, unsupported ranks, bad weights)."""
