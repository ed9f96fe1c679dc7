"""`rankfed simulate`: a fleet of virtual devices against the real coordinator core.

The coordinator is `Federation` itself (rank policy, selection, deadlines, quorum, streamed
uploads folded into the rule's accumulator, global adapters on disk) on its own loop, with a
*virtual clock*. For each round the driver, acting for the virtual devices through the same
core calls as gRPC (`join`, `get_task`, `open_download`, `upload`, in
`transport.InProcessTransport`):

1. sees which devices the coordinator selected, and drops each with ``devices.dropout``;
2. downloads each remaining device's adapter and sends the round to a worker (a thread,
   process or Ray actor: `backends.py`), which runs the edge client's round code;
3. draws each device's latency (``devices.latency``) on the virtual clock, uploads the
   updates that arrive by the deadline in arrival order, moves the clock past the deadline
   and lets the coordinator close the round: later devices are LATE there, missing ones
   count as missed deadlines, and the quorum decides DONE or FAILED, as in a deployment;
4. scores the new global adapter on the validation set (and the test set), and writes a
   JSON line.

Straggler grace equals the deadline, so the round closes at the deadline (or when every
participant answered): with the virtual clock a run is a function of the fleet and its seed,
never of how fast this machine is.
"""

from __future__ import annotations

import json
import logging
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from rankfed.coordinator.export import global_adapter_dir
from rankfed.protocol import JoinRequest, LoraSettings, ParticipantState, RoundPhase, TrainTask
from rankfed.protocol.artifact import ADAPTER_FILE

from .backends import Backend, make_backend
from .fleet import Fleet, FleetError
from .host import FederationHost
from .population import Population, build_population
from .profiles import PROFILE_RANK, PROFILES
from .transport import InProcessTransport
from .workers import EvalJob, TrainJob, TrainOutcome, WorkerSettings

log = logging.getLogger("rankfed.simulation")


class VirtualClock:
    """Wall time plus an offset the driver moves forward (never back)."""

    def __init__(self) -> None:
        self._offset = 0.0

    def __call__(self) -> float:
        return time.time() + self._offset

    def advance_to(self, t: float) -> None:
        now = self()
        if t > now:
            self._offset += t - now


@dataclass
class SimulationResult:
    rounds: list[dict[str, Any]]
    summary: dict[str, Any]
    out_dir: Path
    final_global_path: str = ""
    population: Population | None = field(default=None, repr=False)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def coordinator_settings(fleet: Fleet, *, data_dir: Path, manifest: Path) -> dict[str, Any]:
    f = fleet.federation
    values: dict[str, Any] = {
        "server.address": "127.0.0.1:0",
        "server.data_dir": str(data_dir),
        "server.long_poll_seconds": 1.0,
        "server.token_ttl_seconds": 10 * 365 * 86400,  # virtual time runs far ahead of wall time
        "model.manifest": str(manifest),
        "lora.max_rank": fleet.training.max_rank,
        "federation.method": fleet.method,
        "federation.rounds": fleet.rounds,
        "federation.min_clients": fleet.quorum,
        "federation.clients_per_round": fleet.participants,
        "federation.wait_for_clients_seconds": 0.001,  # every device is online from the start
        "federation.round_deadline_seconds": f.deadline_s,
        "federation.straggler_grace_seconds": f.deadline_s,
        "federation.local_steps": fleet.training.local_steps,
        "federation.learning_rate": fleet.training.learning_rate,
        "federation.batch_size": fleet.training.batch_size,
        "federation.seed": fleet.seed,
        # Virtual devices do not heartbeat between rounds: liveness is the fleet's dropout.
        "federation.heartbeat_interval_seconds": 3600.0,
        "federation.heartbeat_timeout_seconds": 10 * 365 * 86400.0,
    }
    values.update(dict(f.coordinator))
    if values.get("rank_policy.allocation") == "validation":
        # The driver is the evaluator and scores every update right after the round closes:
        # let the next round wait for it (virtual seconds; the scoring takes real ones).
        values.setdefault("rank_policy.evaluator_wait_seconds", 24 * 3600.0)
    return values


def _latency(fleet: Fleet, rng: np.random.Generator) -> float:
    lat = fleet.devices.latency
    if lat.distribution == "lognormal":
        return float(lat.median_s * np.exp(lat.sigma * rng.standard_normal()))
    if lat.distribution == "exponential":
        return float(rng.exponential(lat.median_s / np.log(2))) if lat.median_s > 0 else 0.0
    return lat.median_s


class Simulation:
    """One run; use `simulate()` unless you need the pieces."""

    def __init__(self, fleet: Fleet, out_dir: Path, *, progress: TextIO | None = sys.stderr,
                 on_round: Callable[[dict[str, Any]], None] | None = None,
                 model_dir: Path | None = None, cache_dir: Path | None = None,
                 population: Population | None = None) -> None:
        """``population``: explicit virtual devices (default: built from the fleet's data
        section); without validation data the driver scores no global adapter itself."""
        self.fleet = fleet
        self.population = population
        self.out_dir = Path(out_dir)
        self.progress = progress
        self.on_round = on_round
        self.model_dir = model_dir
        self.cache_dir = cache_dir
        self.clock = VirtualClock()

    def _say(self, text: str) -> None:
        if self.progress is not None:
            print(text, file=self.progress, flush=True)

    def run(self) -> SimulationResult:
        from rankfed.coordinator.config import ConfigError, load_config
        from rankfed.datasets import DemoDataError, model_dir
        from rankfed.edge_client.model import weights_sha256

        from .engine import write_manifest

        fleet = self.fleet
        started = time.perf_counter()
        population = self.population or build_population(fleet)
        try:
            mdir = self.model_dir or (Path(fleet.training.model) if fleet.training.model else model_dir())
        except DemoDataError as exc:
            raise FleetError(str(exc)) from None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        data_dir = self.out_dir / "coordinator"
        if data_dir.exists() and any(data_dir.iterdir()):
            raise FleetError(f"{data_dir} already holds a federation; give a new --out directory")
        manifest = write_manifest(mdir, self.out_dir / "model-manifest.json", num_labels=len(population.label_names),
                                  target_modules=fleet.training.target_modules,
                                  freeze_below_layer=fleet.training.freeze_below_layer)
        try:
            config = load_config(None, overrides=coordinator_settings(fleet, data_dir=data_dir, manifest=manifest))
        except ConfigError as exc:
            raise FleetError(f"federation.coordinator: {exc}") from None
        base_sha = weights_sha256(mdir)
        t = fleet.training
        settings = WorkerSettings(
            model_dir=str(mdir), label_names=population.label_names, max_length=fleet.data.max_length,
            base_sha256=base_sha, freeze_below_layer=t.freeze_below_layer, hetlora_lambda=t.hetlora_lambda,
            hetlora_gamma=t.hetlora_gamma, local_validation=fleet.data.local_validation, synthetic=t.synthetic,
            torch_threads=fleet.backend.torch_threads,
            cache_dir=str(self.cache_dir) if self.cache_dir else str(self.out_dir / "prefix-cache"),
        )
        b = fleet.backend
        backend = make_backend(b.kind, b.mode, settings, b.workers, address=b.ray_address, num_cpus=b.num_cpus,
                               num_gpus=b.num_gpus)
        setup_s = time.perf_counter() - started
        self._say(f"rankfed simulate: {fleet.devices.count} devices, {fleet.participants} per round, "
                  f"{fleet.rounds} rounds, {fleet.method}, backend {backend.name} x{backend.slots} "
                  f"(set up in {setup_s:.1f} s)")
        try:
            with FederationHost(config, clock=self.clock) as host:
                rounds = self._rounds(host, backend, population, base_sha, data_dir)
            worker_stats = backend.stats()
        finally:
            backend.close()
        result = self._summary(rounds, population, worker_stats, time.perf_counter() - started, setup_s)
        (self.out_dir / "summary.json").write_text(json.dumps(result.summary, indent=2))
        return result

    # -- rounds ---------------------------------------------------------------------------------

    def _rounds(self, host: FederationHost, backend: Backend, population: Population, base_sha: str,
                data_dir: Path) -> list[dict[str, Any]]:
        fleet = self.fleet
        devices = {d.name: d for d in population.devices}
        links: dict[str, InProcessTransport] = {}
        joined: dict[str, Any] = {}
        by_client: dict[str, str] = {}
        fed = host.fed()
        # The whole fleet is online before round 1 selects from it (as the operator would: pause).
        host.call(fed.pause, "rankfed simulate", "the fleet is joining")
        for d in population.devices:
            link = InProcessTransport(host)
            result = link.join(JoinRequest(device_name=d.name, capability=PROFILES[d.profile],
                                           base_model_sha256=base_sha, num_examples=d.num_examples))
            links[d.name], joined[d.name] = link, result
            by_client[result.client_id] = d.name
        host.call(fed.resume, "rankfed simulate", f"{len(links)} devices joined")
        lines: list[dict[str, Any]] = []
        rounds_file = open(self.out_dir / "rounds.jsonl", "w")  # noqa: SIM115 - closed below
        lora: LoraSettings | None = None
        try:
            while True:
                state = host.call(lambda: (fed.ctx.state.done, fed.ctx.state.open))
                done, record = state
                if done and record is None:
                    break
                if record is None or record.phase is not RoundPhase.TRAINING:
                    time.sleep(0.01)
                    continue
                wall = time.perf_counter()
                r = record.round
                parts = host.call(lambda r=r: fed.store.list_participants(r))
                names = sorted(by_client[p.client_id] for p in parts)
                rng = np.random.default_rng([fleet.seed, r, 1])
                dropped = {n for n in names if rng.random() < fleet.devices.dropout}
                jobs: list[TrainJob] = []
                for name in names:
                    if name in dropped:
                        continue
                    task = links[name].get_task(0.0)
                    if not isinstance(task, TrainTask) or task.round != r:
                        log.warning("device %s was selected for round %d but got %r", name, r, task)
                        continue
                    lora = lora or task.assignment.lora
                    manifest, blob = links[name].download(r, expected_sha256=task.adapter_sha256)
                    jobs.append(TrainJob(name, devices[name].data, joined[name], task, manifest, blob,
                                         seed=fleet.seed * 1_000_003 + r * 10_007 + len(jobs),
                                         eval_data=devices[name].eval_data))
                train_start = time.perf_counter()
                outcomes = backend.train(jobs)
                train_s = time.perf_counter() - train_start
                line = self._arrive_and_close(host, r, record.started_at, outcomes, names, dropped, by_client, links)
                line["seconds"] = {"train": round(train_s, 3)}
                if self._validation_allocation:
                    start = time.perf_counter()
                    line["evaluator"] = self._serve_evaluations(host, backend, population, lora)
                    line["seconds"]["evaluator"] = round(time.perf_counter() - start, 3)
                self._evaluate(backend, population, data_dir, line, lora)
                line["seconds"]["round"] = round(time.perf_counter() - wall, 3)
                line["rss_bytes"] = peak_rss_bytes()
                lines.append(line)
                rounds_file.write(json.dumps(line) + "\n")
                rounds_file.flush()
                if self.on_round is not None:
                    self.on_round(line)
                self._say(self._progress_line(line))
        finally:
            rounds_file.close()
        return lines

    def _arrive_and_close(self, host: FederationHost, r: int, round_start: float, outcomes: list[TrainOutcome],
                          names: list[str], dropped: set[str], by_client: dict[str, str],
                          links: dict[str, InProcessTransport]) -> dict[str, Any]:
        fleet, fed = self.fleet, host.fed()
        rng = np.random.default_rng([fleet.seed, r, 2])
        latency = {n: _latency(fleet, rng) for n in names}  # drawn for every participant: stable streams
        arrivals = sorted((latency[o.device], o.device, o) for o in outcomes)
        deadline = fleet.federation.deadline_s
        refused: dict[str, str] = {}
        for t, name, outcome in arrivals:
            if outcome.error or outcome.header is None or outcome.blob is None or t > deadline:
                continue
            self.clock.advance_to(round_start + t)
            try:
                links[name].upload(outcome.header, outcome.blob)
            except Exception as exc:  # noqa: BLE001 - the coordinator's answer is part of the result
                refused[name] = f"{type(exc).__name__}: {exc}"
        # Every answer is in: the rest of the round is the wait for the deadline.
        self.clock.advance_to(round_start + deadline + 0.001)
        host.call(lambda: fed.ctx.changes.notify())
        while True:
            rec = host.call(lambda: fed.store.get_round(r))
            if rec is not None and rec.phase in (RoundPhase.DONE, RoundPhase.FAILED):
                break
            time.sleep(0.005)
        parts = {by_client[p.client_id]: p for p in host.call(lambda: fed.store.list_participants(r))}
        errors = {o.device: o.error for o in outcomes if o.error}
        per_device = []
        for name in names:
            p = parts[name]
            m = p.metrics
            entry: dict[str, Any] = {
                "name": name, "rank": p.rank, "state": str(p.state), "bytes_up": p.bytes_up, "bytes_down": p.bytes_down,
                "latency_s": round(latency[name], 3),
            }
            if name in dropped:
                entry["dropout"] = True
            if name in errors:
                entry["error"] = errors[name].splitlines()[0]
            if name in refused:
                entry["refused"] = refused[name]
            if m is not None and p.state is ParticipantState.UPLOADED:
                entry.update(loss_first=m.loss_first, loss_last=m.loss_last, steps=m.steps,
                             train_seconds=round(m.train_seconds, 3), eval=dict(m.eval))
            per_device.append(entry)
        states = [e["state"] for e in per_device]
        metrics = dict(rec.metrics)
        return {
            "round": r, "phase": str(rec.phase), "method": rec.method,
            "participants": len(names), "uploaded": states.count(str(ParticipantState.UPLOADED)),
            "late": states.count(str(ParticipantState.LATE)), "dropped": len(dropped), "failed": len(errors),
            "ranks": sorted(e["rank"] for e in per_device),
            "bytes_up": int(metrics.get("bytes_up", 0)), "bytes_down": int(metrics.get("bytes_down", 0)),
            "loss_first": metrics.get("loss_first"), "loss_last": metrics.get("loss_last"),
            # robust aggregation at work: updates scaled down or left out at the close
            "clipped_updates": int(metrics.get("clipped_updates", 0)),
            "rejected_updates": int(metrics.get("rejected_updates", 0)),
            "failure_reason": rec.failure_reason or None, "global_round": rec.round if rec.phase is RoundPhase.DONE else None,
            "devices": per_device,
        }

    @property
    def _validation_allocation(self) -> bool:
        return str(self.fleet.federation.coordinator.get("rank_policy.allocation", "")) == "validation"

    def _serve_evaluations(self, host: FederationHost, backend: Backend, population: Population,
                           lora: LoraSettings | None) -> dict[str, int]:
        """The evaluator role of `rank_policy.allocation = "validation"`, in process: score every
        pending device update on the global validation set through the coordinator's own
        evaluator calls (the ones `rankfed edge evaluate` makes over gRPC), so the next
        round's ranks follow the scores."""
        from rankfed.protocol import (
            EvaluationDownloadRequest,
            EvaluationKind,
            EvaluationTask,
            EvaluationTaskRequest,
            ScoreReport,
        )

        fed = host.fed()
        scored = 0
        while lora is not None:
            task = host.submit(fed.evaluation_task(EvaluationTaskRequest(max_wait_s=0.0, updates=True, globals=False)))
            if not isinstance(task, EvaluationTask):
                break

            async def fetch(task: EvaluationTask = task) -> bytes:
                _, chunks = await fed.open_evaluation_download(
                    EvaluationDownloadRequest(kind=task.kind, round=task.round, client_id=task.client_id))
                return b"".join([c async for c in chunks])

            blob = host.submit(fetch())
            (scores,) = backend.evaluate([EvalJob("validation", population.validation, blob, lora, self.fleet.method)])
            metrics = {k: float(v) for k, v in scores["global"].items()}
            host.call(fed.report_scores, ScoreReport(
                kind=EvaluationKind.UPDATE if task.client_id else task.kind, round=task.round,
                adapter_sha256=task.adapter_sha256, metrics=metrics, client_id=task.client_id,
                num_examples=population.validation.count(b"\n")), "rankfed simulate")
            scored += 1
        return {"updates_scored": scored}

    def _evaluate(self, backend: Backend, population: Population, data_dir: Path, line: dict[str, Any],
                  lora: LoraSettings | None) -> None:
        fleet, r = self.fleet, line["round"]
        if fleet.training.synthetic or lora is None or line["phase"] != str(RoundPhase.DONE) or not population.validation:
            return
        if r % fleet.eval.every and r != fleet.rounds:
            return
        blob = (global_adapter_dir(data_dir, r) / ADAPTER_FILE).read_bytes()
        # Every rank a device of this fleet trains at: this round's, and each profile's tier
        # rank (so a rank nobody drew this round still has its accuracy, the worst device too).
        fleet_ranks = {min(PROFILE_RANK[p], fleet.training.max_rank) for p in fleet.devices.profiles}
        ranks = tuple(sorted(fleet_ranks | {int(x) for x in line["ranks"]})) if fleet.eval.per_rank else ()
        jobs = [EvalJob("validation", population.validation, blob, lora, fleet.method)]
        if fleet.eval.test:
            jobs.append(EvalJob("test", population.test, blob, lora, fleet.method, ranks=ranks))
        start = time.perf_counter()
        results = backend.evaluate(jobs)
        line["validation"] = results[0]["global"]
        if fleet.eval.test:
            line["test"] = results[1]["global"]
            if ranks:
                line["test_per_rank"] = {k: v for k, v in results[1].items() if k != "global"}
        line["seconds"]["eval"] = round(time.perf_counter() - start, 3)

    def _progress_line(self, line: dict[str, Any]) -> str:
        parts = [f"round {line['round']}/{self.fleet.rounds} {line['phase']}",
                 f"{line['uploaded']}/{line['participants']} uploaded"]
        for key in ("late", "dropped", "failed"):
            if line[key]:
                parts.append(f"{line[key]} {key}")
        if "validation" in line:
            parts.append(f"val acc {line['validation'].get('accuracy', float('nan')):.3f}")
        if "test" in line:
            parts.append(f"test acc {line['test'].get('accuracy', float('nan')):.3f}")
        parts.append(f"{line['bytes_up'] / 1e6:.2f} MB up")
        parts.append(f"{line['seconds']['round']:.1f} s")
        return " · ".join(parts)

    def _summary(self, rounds: list[dict[str, Any]], population: Population, worker_stats: list[dict[str, Any]],
                 seconds: float, setup_s: float) -> SimulationResult:
        done = [x for x in rounds if x["phase"] == str(RoundPhase.DONE)]
        scored = [x for x in rounds if "validation" in x]
        best = max(scored, key=lambda x: (x["validation"].get("accuracy", 0.0), -x["round"]), default=None)
        last = scored[-1] if scored else None
        final_global = (str(global_adapter_dir(self.out_dir / "coordinator", done[-1]["round"]) / ADAPTER_FILE)
                        if done else "")
        summary = {
            "fleet": asdict(self.fleet),
            "population": population.summary(),
            "rounds": len(rounds),
            "rounds_done": len(done),
            "rounds_failed": len(rounds) - len(done),
            "uplink_bytes": sum(x["bytes_up"] for x in rounds),
            "downlink_bytes": sum(x["bytes_down"] for x in rounds),
            "final": {"round": last["round"], "validation": last["validation"], "test": last.get("test"),
                      "test_per_rank": last.get("test_per_rank")} if last else None,
            "best_by_validation": {"round": best["round"], "validation": best["validation"],
                                   "test": best.get("test")} if best else None,
            "seconds": round(seconds, 3),
            "setup_seconds": round(setup_s, 3),
            "round_seconds": [x["seconds"]["round"] for x in rounds],
            "peak_rss_bytes": {"driver": peak_rss_bytes(),
                               "workers": [w.get("max_rss_bytes") for w in worker_stats]},
            "workers": worker_stats,
            "final_global_path": final_global,
        }
        return SimulationResult(rounds, summary, self.out_dir, final_global, population)


def simulate(fleet: Fleet, out_dir: Path, **kwargs: Any) -> SimulationResult:
    """Run ``fleet`` to the end; rounds.jsonl and summary.json are written under ``out_dir``."""
    return Simulation(fleet, out_dir, **kwargs).run()
