"""JSON for the nested dataclasses the SQLite store keeps in TEXT columns.

Why JSON rather than more columns: Capability and TrainMetrics grow fields as the protocol
grows; a JSON column takes a new field without a schema migration, and unknown keys (written
by a newer minor version) are ignored on read instead of failing. Python's json writes the
shortest repr of a float, which reads back bit-for-bit, and keeps NaN and infinities.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from rankfed.protocol import Capability, DeviceClass, TrainMetrics


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in data.items() if k in names}


def dumps(obj: Any) -> str:
    """Dataclass or dict -> compact JSON; enums are StrEnums so they serialise as values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    return json.dumps(obj, separators=(",", ":"))  # key order kept: dicts roundtrip as given


def capability_from_json(text: str) -> Capability:
    data = _known(Capability, json.loads(text))
    if "device_class" in data:
        data["device_class"] = DeviceClass(data["device_class"])
    return Capability(**data)


_DEFAULT_DEVICE_CLASS = Capability().device_class


def device_class_from_json(value: str | None) -> DeviceClass:
    """A Capability's device_class read alone (SQLite's json_extract gives NULL where the key
    is missing): decoded as capability_from_json does, the Capability default if absent."""
    return _DEFAULT_DEVICE_CLASS if value is None else DeviceClass(value)


def metrics_from_json(text: str) -> TrainMetrics:
    data = _known(TrainMetrics, json.loads(text))
    data["eval"] = {str(k): v for k, v in data.get("eval", {}).items()}
    return TrainMetrics(**data)


def float_dict_from_json(text: str) -> dict[str, float]:
    return {str(k): v for k, v in json.loads(text).items()}
