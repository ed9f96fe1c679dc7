"""Where an `EdgeRunner` gets its frozen base model and tokenizer: the `ModelProvider` seam.

The default, `DiskModelProvider`, loads both from the model directory on first use and lets
the runner keep its peft model between rounds (rebuilt only when the adapter's shape
changes). The simulation hands one provider to all its virtual devices, so they share one
frozen base model, and sets ``keep_model=False`` so that each device drops its peft model
after its round (100 devices would not fit in memory with one each).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Protocol

from .model import load_base_model, load_tokenizer


class ModelProvider(Protocol):
    """The base model and tokenizer of a device, and how long its peft model lives.

    ``base_model`` is never modified by the runner (peft wraps a deep copy), so one object
    may serve several runners; implementations that do so must be thread-safe."""

    @property
    def keep_model(self) -> bool:
        """True: keep the peft model between rounds; False: drop it after each round."""
        ...

    def base_model(self, task: str, num_labels: int) -> Any: ...

    def tokenizer(self) -> Any: ...


class DiskModelProvider:
    """Loads from ``model_dir`` once per (task, num_labels), thread-safe, and caches."""

    def __init__(self, model_dir: Path, *, keep_model: bool = True) -> None:
        self.model_dir = Path(model_dir)
        self._keep_model = keep_model
        self._lock = threading.Lock()
        self._base: dict[tuple[str, int], Any] = {}
        self._tokenizer: Any = None

    @property
    def keep_model(self) -> bool:
        return self._keep_model

    def base_model(self, task: str, num_labels: int) -> Any:
        with self._lock:
            key = (task, num_labels)
            if key not in self._base:
                self._base[key] = load_base_model(self.model_dir, task, num_labels=num_labels)
            return self._base[key]

    def tokenizer(self) -> Any:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = load_tokenizer(self.model_dir)
            return self._tokenizer
