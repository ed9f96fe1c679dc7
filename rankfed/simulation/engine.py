"""Simulate a federation of many devices in one process, with the real code on both sides.

- The coordinator side is `Federation` itself (rank policy, rounds, quorum, streamed
  uploads folded into the rule's accumulator, global adapters on disk), on its own event
  loop (`host.FederationHost`), configured like `rankfed coordinator serve`.
- Each device is an `EdgeRunner` (probe-free: its capability comes from a device profile)
  in its own thread, over an `InProcessTransport` that converts every call exactly as gRPC
  would. Training is the edge client's `train_local` on a peft model of the real base model.
- `parallel` compute slots bound how many devices train at once (1: one after the other);
  torch runs with `threads` threads. Devices share one copy of the frozen base model and
  drop their peft model between rounds, so 100 devices fit in memory.

With every device taking part in every round (`clients_per_round = 0`), a run is a
function of the seeds: the same data, config and seed give the same global adapters as the
gRPC path up to float summation order (tested in tests/simulation/).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rankfed.aggregation import get_method
from rankfed.coordinator.export import global_adapter_dir
from rankfed.edge_client.provider import DiskModelProvider
from rankfed.edge_client.runner import EdgeRunner, RunnerConfig
from rankfed.protocol.artifact import ADAPTER_FILE

from .host import FederationHost
from .profiles import PROFILE_RANK, PROFILES, RANK_PROFILE  # noqa: F401 - re-exported
from .transport import InProcessTransport

log = logging.getLogger("rankfed.simulation")

@dataclass(frozen=True)
class SimClient:
    name: str
    profile: str  # a key of PROFILES
    data_path: Path
    eval_path: Path | None = None  # held-out data, scored after local training (metrics.eval)


@dataclass(frozen=True)
class SimConfig:
    method: str = "rbla"
    rounds: int = 5
    local_steps: int = 20
    learning_rate: float = 2e-3
    batch_size: int = 16
    max_rank: int = 16
    max_length: int = 64
    seed: int = 0
    clients_per_round: int = 0  # 0: every client every round (reproducible)
    parallel: int = 1  # devices training at once
    target_modules: tuple[str, ...] = ("query", "value")
    hetlora_lambda: float = 0.0
    hetlora_gamma: float = 0.99
    # LoRA on encoder layers >= k only, trained from cached layer-k states (None: every layer).
    freeze_below_layer: int | None = None
    round_deadline_seconds: float = 24 * 3600.0
    # Extra coordinator settings by dotted name, e.g. {"lora.alpha_rule": "fixed"}.
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class RoundReport:
    round: int
    phase: str
    method: str
    clients: list[dict[str, Any]]
    bytes_up: int
    bytes_down: int
    loss_first: float | None
    loss_last: float | None
    global_path: str
    seconds: float
    accuracy: float | None = None
    eval_loss: float | None = None
    predicted_histogram: list[int] | None = None

    @property
    def ranks(self) -> list[int]:
        return sorted(c["rank"] for c in self.clients)


@dataclass
class SimResult:
    rounds: list[RoundReport]
    final_global_path: str
    seconds: float
    data_dir: str


def coordinator_overrides(cfg: SimConfig, *, data_dir: Path, manifest: Path, num_clients: int) -> dict[str, Any]:
    """The coordinator settings of a simulation (dotted names, as `load_config` takes)."""
    participants = cfg.clients_per_round or num_clients
    values: dict[str, Any] = {
        "server.address": "127.0.0.1:0",
        "server.data_dir": str(data_dir),
        "server.long_poll_seconds": 5.0,
        "model.manifest": str(manifest),
        "lora.max_rank": cfg.max_rank,
        "federation.method": cfg.method,
        "federation.rounds": cfg.rounds,
        "federation.min_clients": participants,
        "federation.clients_per_round": cfg.clients_per_round,
        "federation.wait_for_clients_seconds": cfg.round_deadline_seconds,
        "federation.round_deadline_seconds": cfg.round_deadline_seconds,
        "federation.straggler_grace_seconds": cfg.round_deadline_seconds,
        "federation.local_steps": cfg.local_steps,
        "federation.learning_rate": cfg.learning_rate,
        "federation.batch_size": cfg.batch_size,
        "federation.seed": cfg.seed,
        # Devices waiting for a compute slot still heartbeat; the timeout is for crashes.
        "federation.heartbeat_interval_seconds": 5.0,
        "federation.heartbeat_timeout_seconds": 600.0,
    }
    values.update(cfg.overrides)
    return values


def write_manifest(
    model_dir: Path,
    path: Path,
    *,
    num_labels: int,
    target_modules: Sequence[str],
    freeze_below_layer: int | None = None,
) -> Path:
    from rankfed.edge_client.manifest import build_manifest
    from rankfed.edge_client.manifest import write_manifest as write

    manifest = build_manifest(
        model_dir, task="sequence-classification", num_labels=num_labels, target_modules=tuple(target_modules),
        freeze_below_layer=freeze_below_layer,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    write(manifest, path)
    return path


def round_reports(status: Any, data_dir: Path, started: dict[int, float]) -> list[RoundReport]:
    """Finished rounds of a `FederationStatus`, as plain reports."""
    out = []
    for rec in status.history:
        clients = []
        for p in rec.participants:
            clients.append({
                "name": p.device_name,
                "device_class": str(p.device_class) if p.device_class else "",
                "rank": p.rank,
                "state": str(p.state),
                "bytes_up": p.bytes_up,
                "bytes_down": p.bytes_down,
                "num_examples": p.num_examples,
                "loss_first": p.metrics.loss_first if p.metrics else None,
                "loss_last": p.metrics.loss_last if p.metrics else None,
                "eval": dict(p.metrics.eval) if p.metrics else {},
            })
        clients.sort(key=lambda c: c["name"])
        m = rec.metrics
        out.append(RoundReport(
            round=rec.round,
            phase=str(rec.phase),
            method=rec.method,
            clients=clients,
            bytes_up=int(m.get("bytes_up", 0)),
            bytes_down=int(m.get("bytes_down", 0)),
            loss_first=m.get("loss_first"),
            loss_last=m.get("loss_last"),
            global_path=str(global_adapter_dir(data_dir, rec.round) / ADAPTER_FILE),
            seconds=(rec.finished_at or time.time()) - started.get(rec.round, rec.started_at),
        ))
    return out


def run_simulation(
    model_dir: Path,
    clients: Sequence[SimClient],
    cfg: SimConfig,
    *,
    work_dir: Path,
    label_names: Sequence[str],
    evaluate: Callable[[Path], Any] | None = None,
    on_round: Callable[[RoundReport], None] | None = None,
    threads: int | None = None,
) -> SimResult:
    """Run one federation to the end. ``evaluate(path)`` (optional) scores each round's
    global adapter; it must return an object with ``accuracy`` and ``loss``."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    unknown = sorted({c.profile for c in clients} - set(PROFILES))
    if unknown:
        raise ValueError(f"unknown device profile(s) {unknown}; choose from {sorted(PROFILES)}")
    work_dir = Path(work_dir)
    data_dir = work_dir / "coordinator"
    manifest = write_manifest(
        Path(model_dir), work_dir / "model-manifest.json", num_labels=len(label_names), target_modules=cfg.target_modules,
        freeze_below_layer=cfg.freeze_below_layer,
    )
    from rankfed.coordinator.config import load_config

    config = load_config(None, overrides=coordinator_overrides(cfg, data_dir=data_dir, manifest=manifest,
                                                               num_clients=len(clients)))
    # One frozen base model for every device; each drops its peft model after its round.
    models = DiskModelProvider(Path(model_dir), keep_model=False)
    compute = threading.Semaphore(max(1, cfg.parallel))
    errors: list[BaseException] = []
    start = time.time()
    reports: list[RoundReport] = []
    with FederationHost(config) as host:
        threads_: list[threading.Thread] = []
        for client in clients:
            runner = EdgeRunner(
                InProcessTransport(host, compute=compute),
                RunnerConfig(
                    model_dir=Path(model_dir),
                    data_path=client.data_path,
                    eval_path=client.eval_path,
                    device_name=client.name,
                    label_names=tuple(label_names),
                    max_length=cfg.max_length,
                    hetlora_lambda=cfg.hetlora_lambda if get_method(cfg.method).client_pruning else 0.0,
                    hetlora_gamma=cfg.hetlora_gamma,
                    freeze_below_layer=cfg.freeze_below_layer,
                    max_wait_s=5.0,
                    rejoin_on_bandwidth_change=False,
                ),
                capability=PROFILES[client.profile],
                models=models,
            )
            t = threading.Thread(target=_run_device, args=(runner, errors), name=f"device-{client.name}", daemon=True)
            threads_.append(t)
            t.start()
        seen = 0
        while True:
            done = host.call(lambda: host.fed().done)
            status = host.call(lambda: host.fed().status(0))
            finished = round_reports(status, data_dir, {})
            for report in finished[seen:]:
                if report.phase == "done" and evaluate is not None:
                    result = evaluate(Path(report.global_path))
                    report.accuracy, report.eval_loss = result.accuracy, result.loss
                    report.predicted_histogram = list(getattr(result, "predicted_histogram", []) or []) or None
                reports.append(report)
                if on_round is not None:
                    on_round(report)
            seen = len(finished)
            if errors:
                raise RuntimeError(f"a simulated device failed: {errors[0]!r}") from errors[0]
            if done and seen >= cfg.rounds:
                break
            time.sleep(0.2)
        for t in threads_:
            t.join(timeout=120)
        if errors:
            raise RuntimeError(f"a simulated device failed: {errors[0]!r}") from errors[0]
    final = next((r.global_path for r in reversed(reports) if r.phase == "done"), "")
    return SimResult(rounds=reports, final_global_path=final, seconds=time.time() - start, data_dir=str(data_dir))


def _run_device(runner: EdgeRunner, errors: list[BaseException]) -> None:
    try:
        runner.run()
    except BaseException as exc:  # reported by the main thread
        log.exception("simulated device %s failed", runner.config.device_name)
        errors.append(exc)


def result_to_json(result: SimResult) -> dict[str, Any]:
    return {
        "seconds": round(result.seconds, 2),
        "final_global_path": result.final_global_path,
        "rounds": [{**r.__dict__, "ranks": r.ranks} for r in result.rounds],
    }


def dump(result: SimResult, path: Path) -> None:
    path.write_text(json.dumps(result_to_json(result), indent=2))
