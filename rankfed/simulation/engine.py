"""The explicit-devices API of the simulation: `run_simulation(model_dir, clients, cfg)` runs
a federation of the given devices (name, profile, data file, optional eval file) to the end
and reports each round. It is the fleet driver of `rankfed simulate` (`driver.Simulation`)
with these devices as its population: the same coordinator core, virtual clock, workers and
edge round code; the demo's `--in-process` mode and bench/quality v1 use it.

With every device taking part in every round (`clients_per_round = 0`), a run is a
function of the seeds: the same data, config and seed give the same global adapters as the
gRPC path up to float summation order (tested in tests/simulation/).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rankfed.aggregation import get_method
from rankfed.coordinator.export import global_adapter_dir
from rankfed.protocol.artifact import ADAPTER_FILE

from .profiles import PROFILE_RANK, PROFILES, RANK_PROFILE  # noqa: F401 - re-exported


@dataclass(frozen=True)
class SimClient:
    name: str
    profile: str  # a key of PROFILES
    data_path: Path
    eval_path: Path | None = None  # held-out data, scored after local training (metrics.eval)


@dataclass(frozen=True)
class SimConfig:
    method: str = "zero_pad"
    rounds: int = 5
    local_steps: int = 20
    learning_rate: float = 2e-3
    batch_size: int = 16
    max_rank: int = 16
    max_length: int = 64
    seed: int = 0
    clients_per_round: int = 0  # 0: every client every round (reproducible)
    parallel: int = 1  # devices training at once (worker threads)
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
    """Run one federation of explicit devices to the end (the fleet driver of `rankfed
    simulate` underneath: `driver.Simulation` with these devices as its population).
    ``evaluate(path)`` (optional) scores each round's global adapter; it must return an
    object with ``accuracy`` and ``loss``."""
    from .driver import Simulation
    from .fleet import Backend, Data, Devices, Federation, Fleet, Training
    from .population import Population, VirtualDevice

    unknown = sorted({c.profile for c in clients} - set(PROFILES))
    if unknown:
        raise ValueError(f"unknown device profile(s) {unknown}; choose from {sorted(PROFILES)}")
    counts: dict[str, int] = {}
    for c in clients:
        counts[c.profile] = counts.get(c.profile, 0) + 1
    participants = cfg.clients_per_round or len(clients)
    fleet = Fleet(
        seed=cfg.seed, rounds=cfg.rounds, method=cfg.method,
        devices=Devices(count=len(clients), profiles={p: n / len(clients) for p, n in counts.items()}),
        data=Data(max_length=cfg.max_length),
        training=Training(
            local_steps=cfg.local_steps, learning_rate=cfg.learning_rate, batch_size=cfg.batch_size,
            max_rank=cfg.max_rank, target_modules=tuple(cfg.target_modules), freeze_below_layer=cfg.freeze_below_layer,
            hetlora_lambda=cfg.hetlora_lambda if get_method(cfg.method).client_pruning else 0.0,
            hetlora_gamma=cfg.hetlora_gamma, model=str(model_dir),
        ),
        federation=Federation(participation=float(participants), min_updates=participants,
                              deadline_s=cfg.round_deadline_seconds, coordinator=dict(cfg.overrides)),
        backend=Backend(workers=max(1, cfg.parallel), torch_threads=threads or 1),
    )
    devices = []
    for c in clients:
        data = Path(c.data_path).read_bytes()
        devices.append(VirtualDevice(
            name=c.name, profile=c.profile, quality=False, data=data, num_examples=data.count(b"\n"), noisy_labels=0,
            eval_data=Path(c.eval_path).read_bytes() if c.eval_path is not None else None,
        ))
    # No validation set: the driver scores nothing itself; ``evaluate`` does, per round.
    population = Population(tuple(devices), b"", b"", tuple(label_names))
    data_dir = Path(work_dir) / "coordinator"
    reports: list[RoundReport] = []

    def report(line: dict[str, Any]) -> None:
        rep = RoundReport(
            round=line["round"], phase=line["phase"], method=line["method"],
            clients=[{"name": d["name"], "rank": d["rank"], "state": d["state"], "bytes_up": d["bytes_up"],
                      "bytes_down": d["bytes_down"], "loss_first": d.get("loss_first"),
                      "loss_last": d.get("loss_last"), "eval": d.get("eval", {})} for d in line["devices"]],
            bytes_up=line["bytes_up"], bytes_down=line["bytes_down"], loss_first=line["loss_first"],
            loss_last=line["loss_last"], global_path=str(global_adapter_dir(data_dir, line["round"]) / ADAPTER_FILE),
            seconds=line["seconds"]["round"],
        )
        if rep.phase == "done" and evaluate is not None:
            result = evaluate(Path(rep.global_path))
            rep.accuracy, rep.eval_loss = result.accuracy, result.loss
            rep.predicted_histogram = list(getattr(result, "predicted_histogram", []) or []) or None
        reports.append(rep)
        if on_round is not None:
            on_round(rep)

    result = Simulation(fleet, Path(work_dir), progress=None, on_round=report, model_dir=Path(model_dir),
                        population=population).run()
    final = next((r.global_path for r in reversed(reports) if r.phase == "done"), "")
    return SimResult(rounds=reports, final_global_path=final, seconds=result.summary["seconds"], data_dir=str(data_dir))
