"""The client loop: probe -> join -> long-poll -> download -> train -> upload -> repeat.

Plain Python over a transport object (`transport.EdgeTransport`, or a fake in tests): no
grpc here. Every step reports an event through `on_event(name, fields)`; the CLI prints
them for people or as JSON lines (`--json`).

- One round method for every federation mode; what differs (the model built from the
  downloaded adapter, the step schedule, the update uploaded, what the device keeps) is a
  `strategies.RoundStrategy`, chosen from the mode the coordinator answers at Join.
- The base model and tokenizer come from a `provider.ModelProvider` (default: the model
  directory); the simulation passes one shared by all its devices.
- Heartbeats go out from a background thread while a round is worked on; when the
  coordinator says the round closed, training stops and the client returns to GetTask.
- The rank (and alpha) of each round come with the task and the downloaded adapter; the
  peft model is rebuilt from the pristine base whenever they change.
- UNAVAILABLE is retried inside the transport; a stale round (FAILED_PRECONDITION) or a
  duplicate that is not ours sends the client back to GetTask; an expired session
  (UNAUTHENTICATED) re-joins once.
- Upload bandwidth is measured on the real link by each upload; when it changes by more
  than 2x, the client re-joins before the next task so the rank policy sees it.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Self

from rankfed import __version__
from rankfed.aggregation import (
    Adapter,
    AdapterFormatError,
    AdapterValidationError,
    decode_adapter,
    encode_adapter,
)
from rankfed.protocol import (
    Capability,
    DeviceClass,
    DoneTask,
    HeartbeatResult,
    JoinRequest,
    JoinResult,
    ParticipantState,
    Task,
    TrainMetrics,
    TrainTask,
    TransferManifest,
    UploadHeader,
    UploadReceipt,
    WaitTask,
)
from rankfed.protocol.artifact import ADAPTER_FILE, write_adapter_dir

from .data import (
    TextDataset,
    load_dataset,
    model_label_names,
    read_records,
    split_holdout,
)
from .errors import (
    AdapterError,
    AuthError,
    DuplicateError,
    ModelMismatchError,
    RejectedError,
    StaleRoundError,
    TransportError,
)
from .layer_cache import PrefixCache, cache_key
from .model import weights_sha256
from .personal import PrivateSettings
from .probe import probe, with_bandwidth
from .provider import DiskModelProvider, ModelProvider
from .strategies import EventFn, PersonalSchedule, RoundContext, RoundPlan, RoundStrategy, strategy_for
from .train import StepInfo, TrainConfig, TrainResult, evaluate, train_local

log = logging.getLogger(__name__)


class Transport(Protocol):
    upload_bytes_per_second: float
    download_bytes_per_second: float

    def join(self, request: JoinRequest) -> JoinResult: ...
    def get_task(self, max_wait_s: float) -> Task | None: ...
    def download(
        self,
        round: int,
        *,
        expected_sha256: str = "",
        progress: Callable[[int, int], None] | None = None,
        full: bool = False,
    ) -> tuple[TransferManifest, bytes]: ...
    def upload(
        self, header: UploadHeader, blob: bytes, *, progress: Callable[[int, int], None] | None = None
    ) -> UploadReceipt: ...
    def heartbeat(self, round: int, state: ParticipantState, progress: float) -> HeartbeatResult: ...
    def leave(self, reason: str) -> None: ...


@dataclass(frozen=True)
class RunnerConfig:
    model_dir: Path
    data_path: Path
    device_name: str
    enrollment_secret: str = ""
    declared_class: DeviceClass | None = None
    label_names: tuple[str, ...] | None = None
    max_length: int = 128
    # Local training: the task's steps, lr and batch size unless overridden here.
    epochs: int | None = None
    steps: int | None = None
    batch_size: int | None = None
    learning_rate: float | None = None
    seed: int | None = None
    # HetLoRA rank self-pruning: tail penalty strength (0: off) and decay gamma.
    hetlora_lambda: float = 0.0
    hetlora_gamma: float = 0.99
    hetlora_min_rank: int = 1
    max_wait_s: float = 30.0
    max_rounds: int | None = None  # leave after this many trained rounds (None: until done)
    out_dir: Path | None = None  # where the final global adapter is written
    upload_dtype: str = "float32"
    rejoin_on_bandwidth_change: bool = True
    # Held-out evaluation, reported in the update's metrics.eval: a separate file, or a
    # deterministic fraction of the data (personalized mode: 0.2 unless set; else none).
    eval_path: Path | None = None
    holdout_fraction: float | None = None
    # Personalized mode (pFedLoRA, docs/personalized.md): where the private part lives
    # between rounds (None: in memory only, lost when the client stops), the steps of each
    # phase (None: the task's local_steps split in half, private first), the private LoRA.
    personal_dir: Path | None = None
    private_steps: int | None = None
    shared_steps: int | None = None
    private: PrivateSettings = field(default_factory=PrivateSettings)
    # "alternating" (pFedLoRA) or "joint" (both parts in one phase of private + shared steps).
    personal_schedule: PersonalSchedule = "alternating"
    # LoRA on encoder layers >= k only (the manifest written with --freeze-below-layer k):
    # the states entering layer k are computed once per dataset and every step trains
    # from them (layer_cache.py). None: every layer.
    freeze_below_layer: int | None = None
    # Where the frozen-layer states of each dataset are kept between runs (None: in memory
    # only): keyed by the base model, k and the tokenized examples, so a reused dataset never
    # runs its frozen prefix twice (the simulation's studies rerun the same partition).
    prefix_cache_dir: Path | None = None


@dataclass
class RunSummary:
    client_id: str = ""
    rounds: list[dict[str, Any]] = field(default_factory=list)
    final_round: int = 0
    final_adapter_path: str = ""
    reason: str = ""


class Heartbeater:
    """Sends heartbeats every ``interval_s`` from a daemon thread while a round is worked on."""

    def __init__(self, transport: Transport, round: int, interval_s: float) -> None:
        self._transport = transport
        self._round = round
        self._interval = max(0.05, interval_s)
        self._stop = threading.Event()
        self.round_closed = threading.Event()
        self.state = ParticipantState.DOWNLOADING
        self.progress = 0.0
        self.sent = 0
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-r{round}", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        wait = 0.0
        while not self._stop.wait(wait):
            wait = self._interval
            try:
                result = self._transport.heartbeat(self._round, self.state, self.progress)
                self.sent += 1
            except StaleRoundError:
                self.round_closed.set()
                continue
            except TransportError as err:  # the next beat is the retry
                log.debug("heartbeat failed: %s", err)
                continue
            if not result.round_open:
                self.round_closed.set()
            if result.next_in_s > 0:
                wait = result.next_in_s


class EdgeRunner:
    """One device taking part in one federation."""

    def __init__(
        self,
        transport: Transport,
        config: RunnerConfig,
        *,
        on_event: EventFn | None = None,
        on_step: Callable[[StepInfo], None] | None = None,
        capability: Capability | None = None,
        models: ModelProvider | None = None,
        strategy: RoundStrategy | None = None,
    ) -> None:
        """``models``: where the base model and tokenizer come from (default: loaded from
        ``config.model_dir``, peft model kept between rounds). ``strategy``: the round's
        mode-specific parts (default: chosen from the mode the coordinator answers at Join)."""
        self.transport = transport
        self.config = config
        self.models: ModelProvider = models or DiskModelProvider(config.model_dir)
        self.strategy = strategy
        self._emit = on_event or (lambda name, fields: None)
        self._on_step = on_step
        self._capability = capability
        self.base_sha256 = ""
        self.join_result: JoinResult | None = None
        self._base: Any = None
        self._dataset: TextDataset | None = None
        self._eval_dataset: TextDataset | None = None
        self._split_done = False
        self._num_records = 0
        self._prefix_cache: PrefixCache | None = None
        self._eval_prefix_cache: PrefixCache | None = None

    # -- set-up --------------------------------------------------------------------------

    def _join(self) -> JoinResult:
        if self._capability is None:
            self._capability = probe(declared_class=self.config.declared_class)
            self._emit("probe", {"capability": _capability_fields(self._capability)})
        request = JoinRequest(
            device_name=self.config.device_name,
            capability=self._capability,
            base_model_sha256=self.base_sha256,
            num_examples=self._num_records,
            enrollment_secret=self.config.enrollment_secret,
            client_version=__version__,
        )
        try:
            result = self.transport.join(request)
        except StaleRoundError as err:  # FAILED_PRECONDITION at Join: not the federation's model
            raise ModelMismatchError(
                f"the coordinator refused this device's base model: {err}; point --model at the "
                "model the federation uses"
            ) from err
        want = result.base_model.weights_sha256
        if want and want != self.base_sha256:
            raise ModelMismatchError(
                f"the coordinator trains base model {result.base_model.id!r} with weights sha256 "
                f"{want}, but {self.config.model_dir} has {self.base_sha256}; point --model at "
                "the same model the federation uses"
            )
        self.join_result = result
        self._emit(
            "joined",
            {
                "client_id": result.client_id,
                "rank": result.assignment.lora.rank,
                "alpha": result.assignment.lora.alpha,
                "tier": result.assignment.tier,
                "base_model": result.base_model.id,
                "task": result.base_model.task,
            },
        )
        return result

    def _prepare(self, joined: JoinResult) -> None:
        """Load base model, tokenizer and data once (after Join: it tells task, labels, mode)."""
        if self.strategy is None:
            c = self.config
            self.strategy = strategy_for(
                joined.mode, hetlora_lambda=c.hetlora_lambda, hetlora_gamma=c.hetlora_gamma,
                hetlora_min_rank=c.hetlora_min_rank, private=c.private, personal_dir=c.personal_dir,
                private_steps=c.private_steps, shared_steps=c.shared_steps,
                freeze_below_layer=c.freeze_below_layer, personal_schedule=c.personal_schedule,
            )
        if self._base is not None:
            return
        info = joined.base_model
        self._base = self.models.base_model(info.task, info.num_labels)
        tokenizer = self.models.tokenizer()
        names = self.config.label_names or model_label_names(self._base.config)
        self._dataset = load_dataset(
            self.config.data_path,
            tokenizer,
            task=info.task,
            num_labels=info.num_labels,
            label_names=names,
            max_length=self.config.max_length,
        )
        self._emit("data", {"examples": len(self._dataset), "path": str(self.config.data_path)})
        if self.config.eval_path is not None:
            self._eval_dataset = load_dataset(
                self.config.eval_path, tokenizer, task=info.task, num_labels=info.num_labels,
                label_names=names, max_length=self.config.max_length,
            )

    def _ensure_eval_split(self) -> None:
        """Hold out part of the data for evaluation once, unless an eval file was given."""
        if self._split_done:
            return
        self._split_done = True
        assert self._dataset is not None and self.strategy is not None
        fraction = self.config.holdout_fraction
        if fraction is None:
            fraction = self.strategy.default_holdout
        if self._eval_dataset is None and fraction:
            self._dataset, self._eval_dataset = split_holdout(self._dataset, fraction, seed=0)
            self._emit("holdout", {"train": len(self._dataset), "eval": len(self._eval_dataset)})

    def _evaluate(self, model: Any) -> dict[str, float]:
        if self._eval_dataset is None:
            return {}
        k = self.config.freeze_below_layer
        cache = None
        if k is not None:
            if self._eval_prefix_cache is None:
                self._eval_prefix_cache = self._build_cache(model, self._eval_dataset, k, "eval")
            cache = self._eval_prefix_cache
        return evaluate(model, self._eval_dataset, batch_size=max(self.config.batch_size or 16, 16),
                        prefix_cache=cache)

    # -- the loop ------------------------------------------------------------------------

    def adopt(self, joined: JoinResult, base_sha256: str) -> None:
        """Take a Join answered elsewhere (the simulation's driver joins for its virtual
        devices and runs their rounds on a worker): load model, tokenizer and data once."""
        self.base_sha256 = base_sha256
        self.join_result = joined
        self._prepare(joined)

    def train_round(self, task: TrainTask) -> dict[str, Any] | None:
        """One round of `task` over this runner's transport, exactly as `run` does it."""
        return self._round(task)

    def run(self) -> RunSummary:
        self.base_sha256 = weights_sha256(self.config.model_dir)
        self._num_records = len(read_records(self.config.data_path))
        summary = RunSummary()
        try:  # once joined, an interrupt (SIGTERM while the model loads too) leaves the federation
            joined = self._join()
            summary.client_id = joined.client_id
            self._prepare(joined)
            return self._loop(summary)
        except KeyboardInterrupt:
            # Interrupted inside the Join call itself there is no session to leave yet (the
            # coordinator drops the device once its heartbeats stop).
            if self.join_result is not None:
                self._leave("interrupted")
            raise

    def _loop(self, summary: RunSummary) -> RunSummary:
        rejoined_for_auth = False
        while True:
            try:
                task = self.transport.get_task(self.config.max_wait_s)
                rejoined_for_auth = False
            except AuthError:
                if rejoined_for_auth:
                    raise
                self._emit("rejoin", {"reason": "session expired"})
                self._join()
                rejoined_for_auth = True
                continue
            if task is None:
                time.sleep(1.0)
            elif isinstance(task, WaitTask):
                self._emit("wait", {"retry_after_s": task.retry_after_s, "reason": task.reason})
                time.sleep(min(max(task.retry_after_s, 0.0), self.config.max_wait_s))
            elif isinstance(task, DoneTask):
                summary.final_round = task.final_round
                summary.reason = task.reason
                summary.final_adapter_path = self._save_final(task)
                self._emit("done", {"final_round": task.final_round, "reason": task.reason})
                self._leave("federation done")
                return summary
            else:
                record = self._round(task)
                if record is not None:
                    summary.rounds.append(record)
                    if self.config.max_rounds is not None and len(summary.rounds) >= self.config.max_rounds:
                        summary.reason = f"stopped after {len(summary.rounds)} rounds (--max-rounds)"
                        self._leave("max rounds reached")
                        return summary
                    self._maybe_rejoin()

    def _leave(self, reason: str) -> None:
        try:
            self.transport.leave(reason)
        except TransportError as err:
            log.info("Leave failed (ignored): %s", err)

    def _maybe_rejoin(self) -> None:
        """Re-join when the measured upload bandwidth differs from the reported one by >2x."""
        if not self.config.rejoin_on_bandwidth_change or self._capability is None:
            return
        measured = self.transport.upload_bytes_per_second
        reported = self._capability.upload_bytes_per_second
        if measured <= 0 or (reported > 0 and 0.5 <= measured / reported <= 2.0):
            return
        self._capability = with_bandwidth(
            self._capability, measured, self.transport.download_bytes_per_second
        )
        self._emit("rejoin", {"reason": "bandwidth measured", "upload_bytes_per_second": measured})
        self._join()

    def _round(self, task: TrainTask) -> dict[str, Any] | None:
        """One round in any mode: download the adapter, build the model, train the strategy's
        phases under heartbeats, evaluate, upload; the record of the round, or None when it
        did not count (stale, abandoned, refused)."""
        assert self.join_result is not None and self.strategy is not None
        self._ensure_eval_split()
        try:
            return self._work(task, self.strategy)
        finally:
            if not self.models.keep_model:
                self.strategy.release()

    def _work(self, task: TrainTask, strategy: RoundStrategy) -> dict[str, Any] | None:
        assert self.join_result is not None and self._dataset is not None
        ctx = RoundContext(task, self.join_result, self.base_sha256, self._emit)
        lora = task.assignment.lora
        plan = strategy.plan(task, self._train_config(task))
        self._emit("task", {"round": task.round, "rank": lora.rank, "alpha": lora.alpha, **plan.fields})
        with Heartbeater(self.transport, task.round, self.join_result.heartbeat_interval_s or 5.0) as beat:
            fetched = self._download(task, strategy.adapter_kind)
            if fetched is None:
                return None
            manifest, adapter = fetched
            model = strategy.model_for(self._base, adapter, ctx)
            beat.state = ParticipantState.TRAINING
            results = self._train(model, plan, strategy, beat)
            strategy.end_training()
            if results[-1].stopped_early:
                self._emit("abandoned", {"round": task.round, "steps": sum(r.steps for r in results),
                                         "reason": "the coordinator closed the round"})
                return None
            update = strategy.update(model, ctx)
            scores = self._evaluate(model)
            strategy.after_round(scores, ctx)
            blob = encode_adapter(update.adapter, dtype=self.config.upload_dtype, metadata=dict(update.metadata))
            digest = hashlib.sha256(blob).hexdigest()
            metrics = TrainMetrics(
                loss_first=results[0].loss_first,
                loss_last=results[-1].loss_last,
                steps=sum(r.steps for r in results),
                train_seconds=sum(r.seconds for r in results),
                eval=scores,
            )
            header = UploadHeader(
                round=task.round, rank=update.adapter.max_rank, num_examples=len(self._dataset),
                total_bytes=len(blob), sha256=digest, metrics=metrics,
            )
            beat.state = ParticipantState.UPLOADING
            receipt = self._upload(task, header, blob)
            if receipt is None:
                return None
        record = {
            "round": task.round,
            **strategy.record_fields(plan, scores),
            "rank": header.rank,
            "assigned_rank": lora.rank,
            "steps": metrics.steps,
            "loss_first": metrics.loss_first,
            "loss_last": metrics.loss_last,
            "train_seconds": round(metrics.train_seconds, 3),
            "upload_bytes": len(blob),
            "sha256": digest,
            "duplicate": receipt.duplicate,
            "heartbeats": beat.sent,
            "download_sha256": manifest.sha256,
        }
        self._emit("uploaded", record)
        return record

    def _download(self, task: TrainTask, kind: str) -> tuple[TransferManifest, Adapter] | None:
        """The round's adapter (``kind``: "global" or "shared", for errors); None when the
        round closed before it came."""
        lora = task.assignment.lora
        try:
            manifest, blob = self.transport.download(
                task.round,
                expected_sha256=task.adapter_sha256,
                progress=lambda done, total: self._emit("download", {"bytes": done, "total": total}),
            )
        except StaleRoundError as err:
            self._emit("stale", {"round": task.round, "detail": str(err)})
            return None
        try:
            adapter = decode_adapter(blob)
        except (AdapterFormatError, AdapterValidationError) as err:
            raise AdapterError(f"the {kind} adapter of round {task.round} is malformed: {err}") from err
        if adapter.max_rank != lora.rank:
            log.warning("task rank %d but the adapter has rank %d; training at the adapter's", lora.rank, adapter.max_rank)
        return manifest, adapter

    def _train(self, model: Any, plan: RoundPlan, strategy: RoundStrategy, beat: Heartbeater) -> list[TrainResult]:
        """Train the plan's phases in order; stops after a phase the coordinator cut short
        (its heartbeat said the round closed: the coordinator's clock, not this device's)."""
        assert self._dataset is not None
        cache = self._cache(model)
        results: list[TrainResult] = []
        for i, phase in enumerate(plan.phases):
            done = sum(r.steps for r in results)
            later = sum(p.train.steps or 0 for p in plan.phases[i + 1 :])

            def on_step(info: StepInfo, done: int = done, later: int = later) -> None:
                beat.progress = (done + info.step) / (done + info.total + later)
                if self._on_step is not None:
                    self._on_step(info)

            strategy.enter_phase(phase.name)
            result = train_local(
                model, self._dataset, phase.train, on_step=on_step, should_stop=beat.round_closed.is_set,
                prefix_cache=cache,
            )
            results.append(result)
            if result.stopped_early:
                break
        return results

    def _cache(self, model: Any) -> PrefixCache | None:
        """The training set's states entering layer k, built once (the set is fixed after the
        held-out split). From the round's own model, never the shared base: the build hooks
        and switches the mode of the model it runs, which other devices may be copying."""
        k = self.config.freeze_below_layer
        if k is None or self._dataset is None:
            return None
        if self._prefix_cache is None:
            self._prefix_cache = self._build_cache(model, self._dataset, k, "train")
        return self._prefix_cache

    def _build_cache(self, model: Any, dataset: TextDataset, k: int, split: str) -> PrefixCache:
        start = time.perf_counter()
        where = self.config.prefix_cache_dir
        path = where / f"{cache_key(self.base_sha256, dataset, k)}.npz" if where is not None else None
        cache, loaded = PrefixCache.load_or_build(model, dataset, k, path)
        self._emit("prefix_cache", {"split": split, "layer": k, "examples": len(cache), "bytes": cache.nbytes,
                                    "loaded": loaded, "seconds": round(time.perf_counter() - start, 3)})
        return cache

    def _upload(self, task: TrainTask, header: UploadHeader, blob: bytes) -> UploadReceipt | None:
        """Upload one update; None when this round's update cannot count (the round closed,
        someone else's update is there, or the coordinator refused it): the client goes on
        with the next task instead of exiting."""
        try:
            return self.transport.upload(
                header, blob, progress=lambda done, total: self._emit("upload", {"bytes": done, "total": total}),
            )
        except StaleRoundError as err:
            self._emit("stale", {"round": task.round, "detail": str(err)})
        except DuplicateError as err:
            self._emit("duplicate", {"round": task.round, "detail": str(err)})
        except RejectedError as err:
            log.error("round %d: the coordinator refused our update: %s", task.round, err)
            self._emit("rejected", {"round": task.round, "code": err.code, "detail": str(err)})
        return None

    def _train_config(self, task: TrainTask) -> TrainConfig:
        c = self.config
        steps = c.steps if c.steps is not None else (None if c.epochs is not None else max(1, task.local_steps))
        return TrainConfig(
            steps=steps,
            epochs=c.epochs if steps is None else None,
            learning_rate=c.learning_rate or task.learning_rate or 2e-3,
            batch_size=c.batch_size or task.batch_size or 16,
            seed=(c.seed if c.seed is not None else task.seed) + task.round,
            hetlora_gamma=c.hetlora_gamma,
            hetlora_lambda=c.hetlora_lambda,
            freeze_below_layer=c.freeze_below_layer,
        )

    def _save_final(self, task: DoneTask) -> str:
        """The final global adapter itself (global rank, checked against the DONE task's
        digest) for export: merged into the base model, its rank costs nothing at inference.
        A failure here is an error, not a warning: the user asked for this file."""
        if self.config.out_dir is None:
            return ""
        _, blob = self.transport.download(0, expected_sha256=task.final_adapter_sha256, full=True)
        # The adapter describes itself (task, labels, target modules): the directory loads with
        # PeftModel.from_pretrained and exports with nothing but the base model.
        write_adapter_dir(self.config.out_dir, blob)
        return str(Path(self.config.out_dir) / ADAPTER_FILE)


def _capability_fields(cap: Capability) -> dict[str, Any]:
    from .probe import capability_dict

    return capability_dict(cap)
