"""Bounds on everything a device controls. A device's values are stored and shown to
operators, so each one is bounded here, once, for both ends: the coordinator refuses a
message past a bound (INVALID_ARGUMENT, naming the bound) and a well-behaved client never
sends one. Numbers that land in SQLite fit its signed 64-bit integers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from .errors import DecodeError

MAX_DEVICE_NAME_CHARS = 128
# Letters, digits and . _ - @ : + — no spaces, slashes, control or look-alike characters, so a
# name is safe in a log line, a file name, a certificate SAN and a terminal.
DEVICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:+-]*")
MAX_TEXT_CHARS = 256  # free-text capability fields (platform, accelerator name), client version
MAX_REASON_CHARS = 1024  # Leave's reason
MAX_SECRET_BYTES = 1024
MAX_METRICS = 32  # entries of an update's evaluation map
MAX_METRIC_NAME_CHARS = 64
METRIC_NAME = re.compile(r"[A-Za-z0-9_.:/-]+")
MAX_INT = 2**63 - 1  # SQLite's INTEGER
MAX_NUM_EXAMPLES = 10**9  # an aggregation weight beyond this is a mistake or an attack


class LimitError(DecodeError):
    """A value past one of the documented bounds (INVALID_ARGUMENT)."""


def check_device_name(name: str) -> str:
    """The name, stripped; LimitError unless it is 1..128 characters of the allowed set."""
    name = name.strip()
    if not name:
        raise LimitError("device_name is empty; use a stable name per device (or a certificate's CN)")
    if len(name) > MAX_DEVICE_NAME_CHARS:
        raise LimitError(f"device_name has {len(name)} characters; the limit is {MAX_DEVICE_NAME_CHARS}")
    if not DEVICE_NAME.fullmatch(name):
        raise LimitError(
            "device_name may hold only letters, digits and . _ - @ : + (starting with a letter or digit); "
            f"got {ascii(name[:40])}"
        )
    return name


def check_text(value: str, field: str, limit: int = MAX_TEXT_CHARS) -> None:
    if len(value) > limit:
        raise LimitError(f"{field} has {len(value)} characters; the limit is {limit}")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise LimitError(f"{field} holds control characters")


def check_int(value: int, field: str, limit: int = MAX_INT) -> None:
    if value < 0 or value > limit:
        raise LimitError(f"{field} = {value} is outside 0..{limit}")


def check_secret(secret: str) -> bytes:
    """The secret as bytes for a constant-time comparison (any unicode compares safely)."""
    raw = secret.encode("utf-8", errors="surrogatepass")
    if len(raw) > MAX_SECRET_BYTES:
        raise LimitError(f"enrollment_secret has {len(raw)} bytes; the limit is {MAX_SECRET_BYTES}")
    return raw


def check_metrics(values: Mapping[str, float], field: str = "metrics.eval") -> None:
    if len(values) > MAX_METRICS:
        raise LimitError(f"{field} has {len(values)} entries; the limit is {MAX_METRICS}")
    for name, value in values.items():
        if len(name) > MAX_METRIC_NAME_CHARS or not METRIC_NAME.fullmatch(name):
            raise LimitError(
                f"{field} name {ascii(name[:40])} must be 1..{MAX_METRIC_NAME_CHARS} characters of letters, "
                "digits and _ . : / -"
            )
        if not math.isfinite(value):
            raise LimitError(f"{field}.{name} is not a finite number ({value})")
