"""The evaluator role (`rankfed edge evaluate`): a process the operator starts with torch, the
federation's base model and a held-out validation set, that scores the adapters the
coordinator asks about and reports the scores. The coordinator stays torch-free: it ranks
devices by these scores (rank_policy.allocation = "validation") and picks the best global
adapter by them (`rankfed coordinator export --round best`).

    scores = score_adapter(base_model, blob, dataset)       # {"loss": ..., "accuracy": ...}
    Evaluator(transport, EvaluatorConfig(model_dir, data_path)).run()

`score_adapter` is plain: the uploaded adapter (a device's update holds the global adapter it
started from, redistributed to its rank, plus its training) put into a fresh peft model over
the frozen base, evaluated with the training code's own `evaluate`. `Evaluator` is the loop
over a transport (`evaluator_transport.EvaluatorTransport` over gRPC; an in-process one can
drive the Federation's evaluation calls the same way).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from rankfed.aggregation import AdapterFormatError, AdapterValidationError, decode_adapter
from rankfed.protocol import (
    BaseModel,
    EvaluationDone,
    EvaluationTask,
    EvaluationTaskRequest,
    EvaluationWait,
    EvaluatorTask,
    ScoreReceipt,
    ScoreReport,
    TransferManifest,
)

from .data import TextDataset, load_dataset, model_label_names
from .errors import AdapterError, ModelMismatchError, TransportError
from .model import peft_model_for_adapter, weights_sha256
from .provider import DiskModelProvider, ModelProvider
from .strategies import EventFn
from .train import evaluate

log = logging.getLogger(__name__)


def score_adapter(base_model: Any, adapter_blob: bytes, dataset: TextDataset, *, batch_size: int = 32) -> dict[str, float]:
    """Validation loss (and, for classification, accuracy) of the base model with the
    adapter in `adapter_blob` (safetensors, as uploaded or as saved by the coordinator).
    `base_model` is not modified (the peft model wraps a copy). AdapterError when the
    adapter is malformed or does not fit the model."""
    from .export import settings_for_adapter

    try:
        adapter = decode_adapter(adapter_blob)
    except (AdapterFormatError, AdapterValidationError) as err:
        raise AdapterError(f"the adapter to score is malformed: {err}") from err
    model = peft_model_for_adapter(base_model, adapter, settings_for_adapter(adapter), dataset.task)
    try:
        return evaluate(model, dataset, batch_size=batch_size)
    finally:
        del model


class EvaluatorTransportLike(Protocol):
    def get_task(self, request: EvaluationTaskRequest) -> EvaluatorTask | None: ...
    def download(self, task: EvaluationTask) -> tuple[TransferManifest, bytes]: ...
    def report(self, report: ScoreReport) -> ScoreReceipt: ...


@dataclass(frozen=True)
class EvaluatorConfig:
    model_dir: Path
    data_path: Path  # the validation set: JSONL or CSV, like the devices' training data
    label_names: tuple[str, ...] | None = None
    max_length: int = 128
    batch_size: int = 32
    max_wait_s: float = 30.0
    updates: bool = True  # score devices' updates (validation allocation)
    globals: bool = True  # score each round's global adapter (export --round best)
    max_tasks: int | None = None  # stop after this many scores (None: until the federation is done)


@dataclass
class EvaluatorSummary:
    scored: list[dict[str, Any]] = field(default_factory=list)
    failed: int = 0
    reason: str = ""


class Evaluator:
    """Long-polls for adapters to score, scores each on the validation set, reports back;
    returns when the coordinator says DONE (or after `max_tasks`)."""

    def __init__(
        self,
        transport: EvaluatorTransportLike,
        config: EvaluatorConfig,
        *,
        on_event: EventFn | None = None,
        models: ModelProvider | None = None,
    ) -> None:
        self.transport = transport
        self.config = config
        self.models: ModelProvider = models or DiskModelProvider(config.model_dir)
        self._emit = on_event or (lambda name, fields: None)
        self._sha256 = ""
        self._prepared: tuple[str, int] | None = None
        self._base: Any = None
        self._dataset: TextDataset | None = None
        self._failed: set[tuple[str, int, str]] = set()

    def run(self) -> EvaluatorSummary:
        summary = EvaluatorSummary()
        request = EvaluationTaskRequest(max_wait_s=self.config.max_wait_s, updates=self.config.updates,
                                        globals=self.config.globals)
        while True:
            task = self.transport.get_task(request)
            if task is None:  # a kind this evaluator does not know (a newer coordinator)
                time.sleep(1.0)
            elif isinstance(task, EvaluationDone):
                summary.reason = task.reason
                self._emit("done", {"reason": task.reason, "scored": len(summary.scored)})
                return summary
            elif isinstance(task, EvaluationWait):
                self._emit("wait", {"reason": task.reason})
                time.sleep(min(max(task.retry_after_s, 0.0), self.config.max_wait_s))
            else:
                record = self.score(task)
                if record is None:
                    summary.failed += 1
                    continue
                summary.scored.append(record)
                if self.config.max_tasks is not None and len(summary.scored) >= self.config.max_tasks:
                    summary.reason = f"stopped after {len(summary.scored)} scores (--max-tasks)"
                    return summary

    def score(self, task: EvaluationTask) -> dict[str, Any] | None:
        """Download, score and report one adapter; None when it could not be scored (logged;
        the coordinator hands the task out again after its lease)."""
        key = (task.kind.value, task.round, task.client_id)
        if key in self._failed:
            return None
        self._prepare(task.base_model)
        assert self._dataset is not None
        fields = {"kind": task.kind.value, "round": task.round, "client_id": task.client_id,
                  "device_name": task.device_name, "rank": task.rank}
        self._emit("task", fields)
        started = time.perf_counter()
        try:
            _, blob = self.transport.download(task)
            scores = score_adapter(self._base, blob, self._dataset, batch_size=self.config.batch_size)
        except (AdapterError, TransportError) as err:
            log.error("could not score the %s of round %d (%s): %s", task.kind.value, task.round,
                      task.device_name or "global", err)
            self._emit("failed", {**fields, "error": str(err)})
            if isinstance(err, AdapterError):
                self._failed.add(key)  # the same bytes will not load next time either
            return None
        receipt = self.transport.report(ScoreReport(
            kind=task.kind, round=task.round, adapter_sha256=task.adapter_sha256, metrics=scores,
            client_id=task.client_id, num_examples=len(self._dataset),
        ))
        record = {**fields, **scores, "seconds": round(time.perf_counter() - started, 3), "message": receipt.message}
        self._emit("scored", record)
        return record

    def _prepare(self, info: BaseModel | None) -> None:
        """Load the base model and the validation set once; check our model is the federation's."""
        if info is None:
            raise ModelMismatchError("the coordinator named no base model for the task; is it a RankFed coordinator?")
        if not self._sha256:
            self._sha256 = weights_sha256(self.config.model_dir)
        if info.weights_sha256 and info.weights_sha256 != self._sha256:
            raise ModelMismatchError(
                f"the federation trains base model {info.id!r} with weights sha256 {info.weights_sha256}, but "
                f"{self.config.model_dir} has {self._sha256}; point --model at the federation's model"
            )
        if self._prepared == (info.task, info.num_labels):
            return
        self._base = self.models.base_model(info.task, info.num_labels)
        names = self.config.label_names or model_label_names(self._base.config)
        self._dataset = load_dataset(
            self.config.data_path, self.models.tokenizer(), task=info.task, num_labels=info.num_labels,
            label_names=names, max_length=self.config.max_length,
        )
        self._prepared = (info.task, info.num_labels)
        self._emit("data", {"examples": len(self._dataset), "path": str(self.config.data_path)})
