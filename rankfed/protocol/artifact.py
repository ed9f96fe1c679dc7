"""What a global adapter says about itself, so that a device can export it with nothing but
the adapter directory and the base model: the task, the label names, the target modules, and
where it came from (base model, round, method). It travels inside the safetensors file's
``__metadata__`` (strings only, so lists are JSON), which the download streams byte for byte.

    card = AdapterCard.from_metadata(read_adapter_metadata(blob))
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rankfed.aggregation import Adapter, decode_adapter, peft_adapter_config, read_adapter_metadata

from .errors import DecodeError
from .files import write_atomic

ADAPTER_FILE = "adapter_model.safetensors"
PEFT_CONFIG_FILE = "adapter_config.json"
_KEY = "rankfed."  # prefix of our metadata keys, beside the codec's own


@dataclass(frozen=True)
class AdapterCard:
    task: str  # "sequence-classification" or "causal-lm"
    target_modules: tuple[str, ...]
    labels: tuple[str, ...] = ()  # class names in label-id order; () when unknown
    num_labels: int = 0
    modules_to_save: tuple[str, ...] = ()
    base_model_id: str = ""
    base_model_sha256: str = ""
    round: int = 0
    method: str = ""

    def to_metadata(self) -> dict[str, str]:
        return {
            f"{_KEY}task": self.task,
            f"{_KEY}target_modules": json.dumps(list(self.target_modules)),
            f"{_KEY}labels": json.dumps(list(self.labels)),
            f"{_KEY}num_labels": str(self.num_labels),
            f"{_KEY}modules_to_save": json.dumps(list(self.modules_to_save)),
            f"{_KEY}base_model_id": self.base_model_id,
            f"{_KEY}base_model_sha256": self.base_model_sha256,
            f"{_KEY}round": str(self.round),
            f"{_KEY}method": self.method,
        }

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> AdapterCard | None:
        """The card in an adapter's metadata; None for an adapter written without one (an
        older coordinator, or a device's own update). DecodeError when a field is malformed."""
        if f"{_KEY}task" not in metadata:
            return None
        try:
            return cls(
                task=metadata[f"{_KEY}task"],
                target_modules=_strings(metadata, "target_modules"),
                labels=_strings(metadata, "labels"),
                num_labels=int(metadata.get(f"{_KEY}num_labels", "0")),
                modules_to_save=_strings(metadata, "modules_to_save"),
                base_model_id=metadata.get(f"{_KEY}base_model_id", ""),
                base_model_sha256=metadata.get(f"{_KEY}base_model_sha256", ""),
                round=int(metadata.get(f"{_KEY}round", "0")),
                method=metadata.get(f"{_KEY}method", ""),
            )
        except ValueError as exc:
            raise DecodeError(f"adapter metadata: {exc}") from None


def _strings(metadata: Mapping[str, str], name: str) -> tuple[str, ...]:
    raw = metadata.get(f"{_KEY}{name}", "[]")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        raise DecodeError(f"adapter metadata {_KEY}{name} is not JSON: {raw[:80]!r}") from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DecodeError(f"adapter metadata {_KEY}{name} is not a list of strings")
    return tuple(value)


def peft_config(adapter: Adapter, card: AdapterCard) -> dict[str, Any]:
    """The adapter's `adapter_config.json` (peft LoraConfig), from the adapter's own ranks and
    alphas and the card's target modules, task and base model."""
    return peft_adapter_config(
        adapter,
        base_model_name_or_path=card.base_model_id,
        target_modules=list(card.target_modules),
        task_type="SEQ_CLS" if card.task == "sequence-classification" else "CAUSAL_LM",
        modules_to_save=list(card.modules_to_save) or None,
    )


def write_adapter_dir(out: Path | str, blob: bytes) -> AdapterCard | None:
    """Write a downloaded global adapter as a directory PeftModel.from_pretrained loads:
    the safetensors bytes as they came, and (when the adapter carries a card) its
    adapter_config.json. Returns the card."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    card = AdapterCard.from_metadata(read_adapter_metadata(blob))
    write_atomic(out / ADAPTER_FILE, blob)
    if card is not None:
        config = peft_config(decode_adapter(blob), card)
        write_atomic(out / PEFT_CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode())
    return card


def read_card(adapter_dir: Path | str) -> AdapterCard | None:
    """The card of the adapter in a directory (or of a .safetensors file), None without one."""
    path = Path(adapter_dir)
    if path.is_dir():
        path = path / ADAPTER_FILE
    with open(path, "rb") as fh:
        head = fh.read(8)
        size = int.from_bytes(head, "little") if len(head) == 8 else 0
        blob = head + fh.read(min(size, 100 * 1024 * 1024))  # the header only: metadata lives there
    return AdapterCard.from_metadata(read_adapter_metadata(blob))
