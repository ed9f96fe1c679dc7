"""Experiment tracking: each closed round's metrics, and each participant's, written to
TensorBoard event files (tensorboardX) and/or MLflow ([tracking] in the config;
`--tensorboard` / `--mlflow` on `rankfed coordinator serve` and `rankfed demo`).

Both writers are optional extras (`pip install 'rankfed[tracking]'`), imported only when
configured. The federation's state is read on the event loop (the store is loop-owned);
the writing happens on one worker thread, in round order, so a slow tracking server
never holds up the rounds, and a failing one is logged, never fatal (hooks.py).

What is written, at step = round number:

    round/<metric>                    the round's metrics (loss_first, loss_last, eval_*,
                                      updates, bytes_up, bytes_down, aggregation_seconds)
    round/failed                      1 when the round failed, else 0
    device/<name>/<metric>            per participant: loss_first, loss_last, steps, eval_*,
                                      rank, bytes_up, bytes_down, uploaded (1 or 0)

MLflow names metrics with "." instead of "/" inside device names it does not allow.
One run per federation id: TensorBoard in `<dir>/<federation_id>/`, MLflow a run tagged
`rankfed.federation_id`, found again (and continued) after a coordinator restart.
"""

from __future__ import annotations

import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from rankfed.coordinator.errors import ConfigError
from rankfed.coordinator.hooks import add_round_closed
from rankfed.protocol import ParticipantState, RoundPhase

if TYPE_CHECKING:
    from rankfed.coordinator.config import CoordinatorConfig
    from rankfed.coordinator.federation import Federation
    from rankfed.coordinator.models import RoundRecord
    from rankfed.protocol import RoundStatus

log = logging.getLogger("rankfed.coordinator")

Scalars = dict[str, float]
_EXTRA_HINT = "install the tracking extra: pip install 'rankfed[tracking]'"
_MLFLOW_SAFE = re.compile(r"[^A-Za-z0-9_\-./ ]")


def round_scalars(view: RoundStatus) -> Scalars:
    """Everything written for one closed round, keyed `round/...` and `device/<name>/...`."""
    out: Scalars = {f"round/{k}": float(v) for k, v in view.metrics.items()}
    out["round/failed"] = 1.0 if view.phase is RoundPhase.FAILED else 0.0
    for part in view.participants:
        prefix = f"device/{part.device_name or part.client_id}/"
        out[prefix + "rank"] = float(part.rank)
        out[prefix + "bytes_up"] = float(part.bytes_up)
        out[prefix + "bytes_down"] = float(part.bytes_down)
        out[prefix + "uploaded"] = 1.0 if part.state is ParticipantState.UPLOADED else 0.0
        if part.metrics is not None:
            out[prefix + "loss_first"] = float(part.metrics.loss_first)
            out[prefix + "loss_last"] = float(part.metrics.loss_last)
            out[prefix + "steps"] = float(part.metrics.steps)
            for key, value in part.metrics.eval.items():
                out[prefix + f"eval_{key}"] = float(value)
    return out


class Writer(Protocol):
    def write(self, step: int, scalars: Scalars, done: bool) -> None: ...
    def close(self) -> None: ...


class TensorBoardWriter:
    def __init__(self, directory: Path, federation_id: str) -> None:
        try:
            from tensorboardX import SummaryWriter  # type: ignore[import-untyped]  # ships no type information
        except ImportError:
            raise ConfigError(f"tracking.tensorboard_dir is set but tensorboardX is missing: {_EXTRA_HINT}") from None
        self._writer = SummaryWriter(logdir=str(directory / federation_id))

    def write(self, step: int, scalars: Scalars, done: bool) -> None:
        for key, value in scalars.items():
            self._writer.add_scalar(key, value, global_step=step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class MlflowWriter:
    def __init__(self, uri: str, experiment: str, federation_id: str, params: dict[str, str]) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise ConfigError(f"tracking.mlflow_uri is set but mlflow is missing: {_EXTRA_HINT}") from None
        if "://" not in uri and not uri.startswith(("file:", "databricks")):
            # A directory: MLflow's file store, which MLflow 3 keeps behind an opt-in. The
            # operator asked for exactly that by giving a path.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = Path(uri).absolute().as_uri()
        self._client = client = MlflowClient(tracking_uri=uri)
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found is not None else client.create_experiment(experiment)
        runs = client.search_runs([experiment_id], f"tags.`rankfed.federation_id` = '{federation_id}'", max_results=1)
        if runs:
            self._run_id = runs[0].info.run_id  # a restarted coordinator continues its run
        else:
            run = client.create_run(experiment_id, run_name=federation_id, tags={"rankfed.federation_id": federation_id})
            self._run_id = run.info.run_id
            for key, value in params.items():
                client.log_param(self._run_id, key, value)
        self.run_id = self._run_id

    def write(self, step: int, scalars: Scalars, done: bool) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(_MLFLOW_SAFE.sub("_", key), value, now, step) for key, value in scalars.items()]
        for start in range(0, len(metrics), 1000):  # MLflow's batch limit
            self._client.log_batch(self._run_id, metrics=metrics[start:start + 1000])
        if done:
            self._client.set_terminated(self._run_id)

    def close(self) -> None:
        pass


class Tracking:
    """The configured writers behind one worker thread."""

    def __init__(self, writers: list[Writer]) -> None:
        self._writers = writers
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rankfed-tracking")

    def round_closed(self, federation: Federation, record: RoundRecord) -> None:
        view = next((r for r in reversed(federation.status().history) if r.round == record.round), None)
        if view is None:
            return
        scalars = round_scalars(view)
        done = federation.done
        self._pool.submit(self._write, record.round, scalars, done)

    def _write(self, step: int, scalars: Scalars, done: bool) -> None:
        for writer in self._writers:
            try:
                writer.write(step, scalars, done)
            except Exception:  # noqa: BLE001 - tracking is best effort (module docstring)
                log.exception("experiment tracking (%s) failed for round %d", type(writer).__name__, step)

    def close(self) -> None:
        """Finish pending writes, then close the writers (blocking: call off the loop)."""
        self._pool.shutdown(wait=True)
        for writer in self._writers:
            writer.close()


def open_tracking(config: CoordinatorConfig, federation: Federation) -> Tracking | None:
    """Writers for config.tracking, hooked to the federation's closed rounds; None when off."""
    cfg = config.tracking
    writers: list[Writer] = []
    if cfg.tensorboard_dir:
        writers.append(TensorBoardWriter(Path(cfg.tensorboard_dir), federation.federation_id))
    if cfg.mlflow_uri:
        fed = config.federation
        params = {
            "model_id": federation.manifest.model_id, "mode": str(fed.mode), "method": fed.method,
            "rounds": str(fed.rounds), "min_clients": str(fed.min_clients), "local_steps": str(fed.local_steps),
            "learning_rate": str(fed.learning_rate), "batch_size": str(fed.batch_size),
            "max_rank": str(config.lora.max_rank), "alpha_rule": config.lora.alpha_rule.value,
        }
        writers.append(MlflowWriter(cfg.mlflow_uri, cfg.mlflow_experiment, federation.federation_id, params))
    if not writers:
        return None
    tracking = Tracking(writers)
    add_round_closed(federation, lambda record: tracking.round_closed(federation, record), "experiment tracking")
    log.info("experiment tracking on", extra={"writers": [type(w).__name__ for w in writers]})
    return tracking
