"""Where a simulation's jobs run: one interface, three backends, the same `SimWorker` in each.

- ``threads``: one worker, N threads, one frozen base model (torch releases the GIL in its
  kernels, so N threads use N cores for the heavy parts).
- ``processes``: N worker processes (spawned, one base model each). A device's jobs always go
  to the same process (a stable hash of its name), so its tokenized data and frozen-layer
  states are found there again next time it is selected.
- ``ray``: N Ray actors with ``num_cpus``/``num_gpus`` each, on a local ``ray.init()`` or an
  existing cluster (``ray_address``); the base model's files travel once through the object
  store, so a node without the model directory still gets it. Devices are routed like the
  processes backend.

A worker that dies (a process killed, an actor lost) makes its job an error outcome: the
driver counts that device as dropped for the round, and the backend starts a new worker.
"""

from __future__ import annotations

import logging
import socket
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from .fleet import FleetError
from .workers import EvalJob, SimWorker, TrainJob, TrainOutcome, WorkerSettings

log = logging.getLogger("rankfed.simulation")


class Backend(Protocol):
    name: str
    slots: int

    def train(self, jobs: Sequence[TrainJob], on_done: Callable[[TrainOutcome], None] | None = None
              ) -> list[TrainOutcome]: ...

    def evaluate(self, jobs: Sequence[EvalJob]) -> list[dict[str, dict[str, float]]]: ...

    def stats(self) -> list[dict[str, Any]]: ...

    def close(self) -> None: ...


def slot_of(device: str, slots: int) -> int:
    """The worker a device's jobs go to: stable across runs and processes."""
    return zlib.crc32(device.encode()) % slots


def _collect(futures: list[tuple[TrainJob, Future[TrainOutcome]]], on_done: Callable[[TrainOutcome], None] | None,
             what: str) -> list[TrainOutcome]:
    out = []
    for job, fut in futures:
        try:
            outcome = fut.result()
        except Exception as exc:  # noqa: BLE001 - the worker died: this device dropped out
            log.warning("%s lost device %s's job: %s", what, job.device, exc)
            outcome = TrainOutcome(job.device, error=f"worker lost: {type(exc).__name__}: {exc}")
        if on_done is not None:
            on_done(outcome)
        out.append(outcome)
    return out


class ThreadBackend:
    name = "threads"

    def __init__(self, settings: WorkerSettings, slots: int) -> None:
        self.slots = slots
        self._worker = SimWorker(settings, name="threads")
        self._pool = ThreadPoolExecutor(slots, thread_name_prefix="rankfed-sim")

    def train(self, jobs: Sequence[TrainJob], on_done: Callable[[TrainOutcome], None] | None = None
              ) -> list[TrainOutcome]:
        return _collect([(j, self._pool.submit(self._worker.train, j)) for j in jobs], on_done, self.name)

    def evaluate(self, jobs: Sequence[EvalJob]) -> list[dict[str, dict[str, float]]]:
        return [f.result() for f in [self._pool.submit(self._worker.evaluate, j) for j in jobs]]

    def stats(self) -> list[dict[str, Any]]:
        return [self._worker.stats()]

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


# -- processes ------------------------------------------------------------------------------

_PROCESS_WORKER: SimWorker | None = None


def _process_init(settings: WorkerSettings, name: str) -> None:
    global _PROCESS_WORKER
    _PROCESS_WORKER = SimWorker(settings, name=name)


def _process_call(method: str, *args: Any) -> Any:
    assert _PROCESS_WORKER is not None
    return getattr(_PROCESS_WORKER, method)(*args)


class ProcessBackend:
    name = "processes"

    def __init__(self, settings: WorkerSettings, slots: int) -> None:
        import multiprocessing

        self.slots = slots
        self._settings = settings
        self._context = multiprocessing.get_context("spawn")  # never fork a process holding torch threads
        self._pools = [self._new_pool(i) for i in range(slots)]

    def _new_pool(self, i: int) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(1, mp_context=self._context, initializer=_process_init,
                                   initargs=(self._settings, f"process-{i}"))

    def train(self, jobs: Sequence[TrainJob], on_done: Callable[[TrainOutcome], None] | None = None
              ) -> list[TrainOutcome]:
        futures = [(j, self._pools[slot_of(j.device, self.slots)].submit(_process_call, "train", j)) for j in jobs]
        out = _collect(futures, on_done, self.name)
        self._replace_broken()
        return out

    def evaluate(self, jobs: Sequence[EvalJob]) -> list[dict[str, dict[str, float]]]:
        futures = [self._pools[i % self.slots].submit(_process_call, "evaluate", j) for i, j in enumerate(jobs)]
        return [f.result() for f in futures]

    def _replace_broken(self) -> None:
        from concurrent.futures.process import BrokenProcessPool

        for i, pool in enumerate(self._pools):
            try:
                pool.submit(int, 0).result()
            except BrokenProcessPool:
                log.warning("worker process %d died; starting a new one", i)
                self._pools[i] = self._new_pool(i)

    def stats(self) -> list[dict[str, Any]]:
        return [pool.submit(_process_call, "stats").result() for pool in self._pools]

    def close(self) -> None:
        for pool in self._pools:
            pool.shutdown(wait=True, cancel_futures=True)


# -- Ray --------------------------------------------------------------------------------------


def model_files(model_dir: str) -> dict[str, bytes]:
    """The model directory's files (what a Ray node without it needs)."""
    root = Path(model_dir)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


class RayWorker:
    """A Ray actor around a `SimWorker`; the model comes from the object store when this node
    lacks the directory."""

    def __init__(self, settings: WorkerSettings, files: dict[str, bytes] | None, name: str) -> None:
        import dataclasses
        import tempfile

        if files and not Path(settings.model_dir, "config.json").is_file():
            root = Path(tempfile.mkdtemp(prefix="rankfed-ray-model-"))
            for rel, data in files.items():
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                (root / rel).write_bytes(data)
            settings = dataclasses.replace(settings, model_dir=str(root))
        self.worker = SimWorker(settings, name=name)

    def train(self, job: TrainJob) -> TrainOutcome:
        return self.worker.train(job)

    def evaluate(self, job: EvalJob) -> dict[str, dict[str, float]]:
        return self.worker.evaluate(job)

    def stats(self) -> dict[str, Any]:
        import ray

        return {**self.worker.stats(), "node_id": ray.get_runtime_context().get_node_id()}


def check_ray_address(address: str, timeout_s: float = 3.0) -> None:
    """FleetError unless something listens at ``host:port`` (a dead address would make
    ray.init wait for a long time before failing)."""
    if not address or address == "auto" or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
            pass
    except (OSError, ValueError) as exc:
        raise FleetError(f"Ray address {address} does not answer ({exc}); start the head with `ray start --head` "
                         "or fix --ray-address") from None


class RayBackend:
    name = "ray"

    def __init__(self, settings: WorkerSettings, slots: int, *, address: str = "", num_cpus: float = 1.0,
                 num_gpus: float = 0.0, local_cpus: int | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise FleetError("the ray backend needs Ray: pip install 'rankfed[sim]'") from None
        check_ray_address(address)
        self._ray = ray
        self._own = not ray.is_initialized()
        if self._own:
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                      "ignore_reinit_error": True}
            if address:
                kwargs["address"] = address
            elif local_cpus is not None:
                kwargs["num_cpus"] = local_cpus
            try:
                ray.init(**kwargs)
            except ConnectionError as exc:
                raise FleetError(f"cannot connect to the Ray cluster at {address or 'auto'}: {exc}") from None
        self.slots = slots
        files = ray.put(model_files(settings.model_dir)) if not settings.synthetic else None
        actor = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=-1, max_task_retries=0)(RayWorker)
        # Ray's actor handles are dynamic (.remote on every method): typed as Any here.
        self._actors: list[Any] = [actor.remote(settings, files, f"ray-{i}") for i in range(slots)]

    def train(self, jobs: Sequence[TrainJob], on_done: Callable[[TrainOutcome], None] | None = None
              ) -> list[TrainOutcome]:
        ray = self._ray
        refs = {self._actors[slot_of(j.device, self.slots)].train.remote(j): j for j in jobs}
        results: dict[str, TrainOutcome] = {}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            job = refs[done[0]]
            try:
                outcome = ray.get(done[0])
            except Exception as exc:  # noqa: BLE001 - the actor died: this device dropped out
                log.warning("ray lost device %s's job: %s", job.device, exc)
                outcome = TrainOutcome(job.device, error=f"worker lost: {type(exc).__name__}: {exc}")
            results[job.device] = outcome
            if on_done is not None:
                on_done(outcome)
        return [results[j.device] for j in jobs]

    def evaluate(self, jobs: Sequence[EvalJob]) -> list[dict[str, dict[str, float]]]:
        refs = [self._actors[i % self.slots].evaluate.remote(j) for i, j in enumerate(jobs)]
        return list(self._ray.get(refs))

    def stats(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for a in self._actors:
            try:
                out.append(self._ray.get(a.stats.remote(), timeout=30))
            except Exception as exc:  # noqa: BLE001 - a lost actor reports nothing
                out.append({"error": str(exc)})
        return out

    def close(self) -> None:
        for a in self._actors:
            self._ray.kill(a)
        if self._own:
            self._ray.shutdown()


def make_backend(kind: str, mode: str, settings: WorkerSettings, slots: int, *, address: str = "",
                 num_cpus: float = 1.0, num_gpus: float = 0.0) -> Backend:
    if kind == "ray":
        return RayBackend(settings, slots, address=address, num_cpus=num_cpus, num_gpus=num_gpus,
                          local_cpus=max(1, int(slots * max(num_cpus, 1.0))) if not address else None)
    if mode == "processes":
        return ProcessBackend(settings, slots)
    return ThreadBackend(settings, slots)
