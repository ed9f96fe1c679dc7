"""The compute side of a simulation: a worker trains virtual devices' rounds and scores global
adapters. Every backend (threads, processes, Ray actors) runs this same `SimWorker`.

A training job is one device's round: the driver has already joined for the device, taken
its task from the coordinator's `get_task` and downloaded its adapter; the worker runs the
edge client's own round (`EdgeRunner.train_round`: model from the adapter, local training,
evaluation, the update encoded) over a `JobTransport` that hands it the downloaded bytes and
keeps the update, which the driver then uploads through the coordinator's `upload`. Virtual
devices are data: a worker keeps the runners (tokenized data, frozen-layer states) of the
devices it saw last in a bounded LRU, and builds one again from the job when needed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from rankfed.protocol import (
    HeartbeatResult,
    JoinResult,
    LoraSettings,
    ParticipantState,
    TrainMetrics,
    TrainTask,
    TransferManifest,
    UploadHeader,
    UploadReceipt,
)

log = logging.getLogger("rankfed.simulation")


@dataclass(frozen=True)
class WorkerSettings:
    """What every worker of one simulation shares."""

    model_dir: str  # on this machine, or materialised from `model_files` (Ray nodes)
    label_names: tuple[str, ...]
    max_length: int
    base_sha256: str
    freeze_below_layer: int | None = None
    hetlora_lambda: float = 0.0
    hetlora_gamma: float = 0.99
    local_validation: float = 0.0
    synthetic: bool = False
    torch_threads: int = 1
    cache_dir: str = ""  # frozen-layer states kept across jobs and runs ("" = a temp dir)
    max_devices: int = 256  # runners kept per worker (LRU)


@dataclass(frozen=True)
class TrainJob:
    device: str
    data: bytes  # the device's JSONL training data
    joined: JoinResult
    task: TrainTask
    manifest: TransferManifest
    adapter: bytes
    seed: int = 0  # synthetic updates only
    eval_data: bytes | None = None  # the device's own held-out data (JSONL)


@dataclass
class TrainOutcome:
    device: str
    header: UploadHeader | None = None
    blob: bytes | None = None
    record: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    seconds: float = 0.0
    worker: str = ""


@dataclass(frozen=True)
class EvalJob:
    """Score a global adapter (optionally truncated to ranks) on a JSONL dataset."""

    name: str  # "validation", "test"
    data: bytes
    adapter: bytes
    lora: LoraSettings  # target modules and modules_to_save of the federation
    method: str
    ranks: tuple[int, ...] = ()  # also each truncation to these ranks


class JobTransport:
    """The `Transport` of one job: the adapter the driver downloaded, and a place for the
    update. Heartbeats are answered locally: the driver's virtual clock decides lateness."""

    upload_bytes_per_second = 0.0
    download_bytes_per_second = 0.0

    def __init__(self, manifest: TransferManifest, adapter: bytes) -> None:
        self._manifest, self._adapter = manifest, adapter
        self.header: UploadHeader | None = None
        self.blob: bytes | None = None

    def download(self, round: int, *, expected_sha256: str = "", progress: Any = None,
                 full: bool = False) -> tuple[TransferManifest, bytes]:
        return self._manifest, self._adapter

    def upload(self, header: UploadHeader, blob: bytes, *, progress: Any = None) -> UploadReceipt:
        self.header, self.blob = header, blob
        return UploadReceipt(round=header.round, bytes_received=len(blob), sha256=header.sha256)

    def heartbeat(self, round: int, state: ParticipantState, progress: float) -> HeartbeatResult:
        return HeartbeatResult(next_in_s=3600.0, round_open=True)

    def join(self, request: Any) -> Any:  # pragma: no cover - the driver joins
        raise RuntimeError("a simulation worker never joins: the driver does")

    def get_task(self, max_wait_s: float) -> Any:  # pragma: no cover - the driver asks
        raise RuntimeError("a simulation worker never asks for tasks: the driver does")

    def leave(self, reason: str) -> None:
        return None


class SimWorker:
    """Trains jobs and scores adapters; thread-safe (one lock per device, one for the LRU)."""

    def __init__(self, settings: WorkerSettings, *, name: str = "worker") -> None:
        self.settings = settings
        self.name = name
        self._lock = threading.Lock()
        self._runners: OrderedDict[str, Any] = OrderedDict()
        self._device_locks: dict[str, threading.Lock] = {}
        self._tmp = Path(tempfile.mkdtemp(prefix="rankfed-sim-worker-"))
        self._cache_dir = Path(settings.cache_dir) if settings.cache_dir else self._tmp / "prefix-cache"
        self._models: Any = None
        self._eval_sets: dict[str, Any] = {}
        if not settings.synthetic:
            import torch

            torch.set_num_threads(settings.torch_threads)

    # -- models -------------------------------------------------------------------------------

    def _provider(self) -> Any:
        if self._models is None:
            from rankfed.edge_client.provider import DiskModelProvider

            # One frozen base model per worker; each device drops its peft model after its round.
            self._models = DiskModelProvider(Path(self.settings.model_dir), keep_model=False)
        return self._models

    def _runner(self, job: TrainJob) -> Any:
        from rankfed.edge_client.runner import EdgeRunner, RunnerConfig

        with self._lock:
            runner = self._runners.get(job.device)
            if runner is not None:
                self._runners.move_to_end(job.device)
                return runner
            path = self._tmp / "devices" / f"{job.device}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(job.data)
            eval_path = None
            if job.eval_data is not None:
                eval_path = path.with_suffix(".eval.jsonl")
                eval_path.write_bytes(job.eval_data)
            s = self.settings
            runner = EdgeRunner(
                JobTransport(job.manifest, job.adapter),
                RunnerConfig(
                    model_dir=Path(s.model_dir), data_path=path, device_name=job.device,
                    label_names=s.label_names, max_length=s.max_length,
                    hetlora_lambda=s.hetlora_lambda, hetlora_gamma=s.hetlora_gamma,
                    freeze_below_layer=s.freeze_below_layer, rejoin_on_bandwidth_change=False,
                    holdout_fraction=s.local_validation or None, prefix_cache_dir=self._cache_dir,
                    eval_path=eval_path,
                ),
                models=self._provider(),
            )
            runner.adopt(job.joined, s.base_sha256)
            self._runners[job.device] = runner
            while len(self._runners) > s.max_devices:
                self._runners.popitem(last=False)
            return runner

    # -- jobs -----------------------------------------------------------------------------------

    def train(self, job: TrainJob) -> TrainOutcome:
        start = time.perf_counter()
        with self._lock:
            lock = self._device_locks.setdefault(job.device, threading.Lock())
        try:
            header: UploadHeader | None
            blob: bytes | None
            with lock:
                if self.settings.synthetic:
                    header, blob, record = synthetic_update(job)
                else:
                    runner = self._runner(job)
                    runner.transport = transport = JobTransport(job.manifest, job.adapter)
                    if runner.join_result != job.joined:
                        runner.adopt(job.joined, self.settings.base_sha256)
                    record = runner.train_round(job.task) or {}
                    header, blob = transport.header, transport.blob
            if header is None or blob is None:
                return TrainOutcome(job.device, record=record, error="the round produced no update",
                                    seconds=time.perf_counter() - start, worker=self.name)
            return TrainOutcome(job.device, header, blob, record, seconds=time.perf_counter() - start, worker=self.name)
        except Exception as exc:  # noqa: BLE001 - one device's failure is that device's dropout
            log.warning("simulated device %s failed: %s", job.device, exc)
            return TrainOutcome(job.device, error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}",
                                seconds=time.perf_counter() - start, worker=self.name)

    def evaluate(self, job: EvalJob) -> dict[str, dict[str, float]]:
        """{"global": metrics, "r<rank>": metrics of the truncation, ...} on ``job.data``."""
        from rankfed.aggregation import decode_adapter, get_method
        from rankfed.edge_client.layer_cache import PrefixCache, cache_key
        from rankfed.edge_client.model import peft_model_for_adapter
        from rankfed.edge_client.train import evaluate

        dataset = self._eval_set(job)
        provider = self._provider()
        base = provider.base_model("sequence-classification", len(self.settings.label_names))
        adapter = decode_adapter(job.adapter)
        method = get_method(job.method)
        variants = [("global", adapter)]
        for r in job.ranks:
            variants.append((f"r{r}", method.redistribute(adapter, rank=r, alpha=float(r))))
        out: dict[str, dict[str, float]] = {}
        k = self.settings.freeze_below_layer
        for label, variant in variants:
            settings = replace(job.lora, rank=variant.max_rank, alpha=float(variant.max_rank))
            model = peft_model_for_adapter(base, variant, settings, "sequence-classification", freeze_below_layer=k)
            cache = None
            if k is not None:
                key = cache_key(self.settings.base_sha256, dataset, k)
                cache = self._eval_sets.get(key)
                if cache is None:
                    cache, _ = PrefixCache.load_or_build(model, dataset, k, self._cache_dir / f"{key}.npz")
                    self._eval_sets[key] = cache
            out[label] = evaluate(model, dataset, batch_size=64, prefix_cache=cache)
            del model
        return out

    def _eval_set(self, job: EvalJob) -> Any:
        from rankfed.edge_client.data import load_dataset

        digest = hashlib.sha256(job.data).hexdigest()[:16]
        with self._lock:
            if digest not in self._eval_sets:
                path = self._tmp / "eval" / f"{job.name}-{digest}.jsonl"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(job.data)
                self._eval_sets[digest] = load_dataset(
                    path, self._provider().tokenizer(), task="sequence-classification",
                    num_labels=len(self.settings.label_names), label_names=self.settings.label_names,
                    max_length=self.settings.max_length,
                )
            return self._eval_sets[digest]

    def stats(self) -> dict[str, Any]:
        import resource

        return {"worker": self.name, "pid": os.getpid(), "devices_cached": len(self._runners),
                "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def synthetic_update(job: TrainJob) -> tuple[UploadHeader, bytes, dict[str, Any]]:
    """The downloaded adapter plus small noise, encoded: an update of the right rank and size
    without training (no torch)."""
    from rankfed.aggregation import Adapter, LoraModule, decode_adapter, encode_adapter

    adapter = decode_adapter(job.adapter)
    rng = np.random.default_rng(job.seed)
    modules = {
        name: LoraModule(a=(m.a + rng.normal(0, 1e-3, m.a.shape)).astype(np.float32),
                         b=(m.b + rng.normal(0, 1e-3, m.b.shape)).astype(np.float32), alpha=m.alpha)
        for name, m in adapter.modules.items()
    }
    update = Adapter(modules=modules, dense=dict(adapter.dense), use_rslora=adapter.use_rslora)
    blob = encode_adapter(update)
    n = job.data.count(b"\n")
    header = UploadHeader(
        round=job.task.round, rank=update.max_rank, num_examples=max(n, 1), total_bytes=len(blob),
        sha256=hashlib.sha256(blob).hexdigest(),
        metrics=TrainMetrics(loss_first=0.0, loss_last=0.0, steps=job.task.local_steps, train_seconds=0.0),
    )
    return header, blob, {"round": job.task.round, "rank": update.max_rank, "synthetic": True}
