"""`rankfed demo`: a real federation on localhost, start to finish.

1. Data: BBC News, a stratified held-out test set, the rest split over the clients by
   Dirichlet(alpha) (label skew), one JSONL file per client.
2. A model manifest of all-MiniLM-L6-v2 and a coordinator config (default rank tiers).
3. One `rankfed coordinator serve` process and N `rankfed edge run` processes over real gRPC
   on 127.0.0.1, each device with its own profile (cuda, cpu, mobile: the coordinator's
   tiers turn them into different ranks), one torch thread each.
4. A live view from the operator API (WatchRounds): round, phase, each device's state, rank
   and bytes; after every round the global adapter in the coordinator's data directory is
   scored on the held-out set here, in the demo process.
5. `rankfed edge export --quantize` of the final global adapter to ONNX, fp32 and int8, with
   both held-out accuracies (int8 refused when it loses more than a point), then
   `rankfed edge infer` (onnxruntime) on a few held-out articles.

`--in-process` runs the same federation through `rankfed.simulation` (no processes, no
sockets) for runs with many clients.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from rankfed.datasets import (
    FederatedSplit,
    federated_split,
    label_histogram,
    load_bbc,
    model_dir,
    write_jsonl,
)

# Device profiles of the demo clients, cycled: `--device-class` of `rankfed edge run`.
DEMO_PROFILES = ("cuda", "cpu", "cpu", "mobile")
# The same devices in the simulation (rankfed.simulation.engine.PROFILES): a real CPU probed
# at 1 thread is "cpu-fast" (rank 8) when it is quick enough, "cpu" (rank 4) otherwise.
SIM_PROFILES = {"cuda": "cuda", "cpu": "cpu-fast", "mobile": "mobile"}


@dataclass(frozen=True)
class DemoOptions:
    clients: int = 4
    rounds: int = 5
    local_steps: int = 15
    method: str = "zero_pad"
    alpha: float = 0.5
    max_length: int = 64
    batch_size: int = 16
    learning_rate: float = 2e-3
    seed: int = 0
    train_limit: int | None = None
    test_limit: int | None = 250
    out: Path = Path("rankfed-demo")
    profiles: tuple[str, ...] = DEMO_PROFILES
    in_process: bool = False
    export: bool = True
    predictions: int = 5
    round_deadline_seconds: float = 900.0
    # Experiment tracking by the coordinator ([tracking] in its config): None / "" for off.
    tensorboard_dir: Path | None = None
    mlflow_uri: str = ""


@dataclass
class RoundRow:
    round: int
    phase: str = ""
    ranks: dict[str, int] = field(default_factory=dict)
    bytes_up: int = 0
    bytes_down: int = 0
    loss_first: float | None = None
    loss_last: float | None = None
    accuracy: float | None = None
    eval_loss: float | None = None
    seconds: float | None = None


class Console:
    """The live view: short lines on stdout, flushed."""

    def __init__(self, stream: TextIO = sys.stdout) -> None:
        self.stream = stream
        self.t0 = time.monotonic()

    def __call__(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {text}", file=self.stream, flush=True)


def _mib(n: float) -> str:
    return f"{n / (1 << 20):.2f} MiB"


def prepare_data(opts: DemoOptions, say: Console) -> tuple[FederatedSplit, list[Path]]:
    corpus = load_bbc()
    split = federated_split(
        corpus, num_clients=opts.clients, alpha=opts.alpha, seed=opts.seed,
        train_limit=opts.train_limit, test_limit=opts.test_limit,
    )
    say(f"data: BBC News, {len(corpus)} articles, classes {', '.join(corpus.label_names)}")
    say(f"held-out test set: {len(split.test)} articles (majority class {split.test.majority_fraction():.3f})")
    paths = []
    for i, part in enumerate(split.clients):
        path = write_jsonl(opts.out / "data" / f"client-{i}.jsonl", part)
        paths.append(path)
        say(f"  client {i} ({_profile(opts, i)}): {len(part)} articles, per class "
            f"{label_histogram(part.labels, len(corpus.label_names))}  (Dirichlet alpha={opts.alpha})")
    return split, paths


def _profile(opts: DemoOptions, i: int) -> str:
    return opts.profiles[i % len(opts.profiles)]


def device_name(opts: DemoOptions, i: int) -> str:
    return f"{_profile(opts, i)}-{i}"


def tracking_overrides(opts: DemoOptions) -> dict[str, str]:
    """The coordinator's [tracking] settings for --tensorboard / --mlflow (dotted names)."""
    out: dict[str, str] = {}
    if opts.tensorboard_dir is not None:
        out["tracking.tensorboard_dir"] = str(opts.tensorboard_dir)
    if opts.mlflow_uri:
        out["tracking.mlflow_uri"] = opts.mlflow_uri
    return out


def write_coordinator_config(opts: DemoOptions, path: Path, *, manifest: Path, data_dir: Path) -> Path:
    """The coordinator's TOML: default rank tiers, every client in every round."""
    text = f"""# Written by `rankfed demo`; see deploy/coordinator.example.toml for every field.
[server]
address = "127.0.0.1:0"
data_dir = "{data_dir}"
long_poll_seconds = 10.0

[model]
manifest = "{manifest}"

[lora]
max_rank = 16

[federation]
rounds = {opts.rounds}
method = "{opts.method}"
min_clients = {opts.clients}
clients_per_round = 0
wait_for_clients_seconds = 120.0
round_deadline_seconds = {opts.round_deadline_seconds}
straggler_grace_seconds = {opts.round_deadline_seconds}
local_steps = {opts.local_steps}
learning_rate = {opts.learning_rate}
batch_size = {opts.batch_size}
seed = {opts.seed}
"""
    tracking = tracking_overrides(opts)
    if tracking:
        text += "\n[tracking]\n" + "".join(f"{k.split('.', 1)[1]} = {json.dumps(v)}\n" for k, v in tracking.items())
    path.write_text(text)
    return path


class _Procs:
    """Child processes of the demo, stopped (by pid) on the way out."""

    def __init__(self) -> None:
        self.items: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = open(log_path, "wb")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)
        log.close()
        self.items.append((name, proc))
        return proc

    def failed(self) -> list[tuple[str, int]]:
        return [(n, p.returncode) for n, p in self.items if p.poll() is not None and p.returncode != 0]

    def stop(self) -> None:
        for _, proc in self.items:
            if proc.poll() is None:
                proc.terminate()
        for _, proc in self.items:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def child_env(threads: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "PYTHONUNBUFFERED": "1",
    })
    return env


def _wait_for_port(path: Path, proc: subprocess.Popen[bytes], log: Path, timeout: float = 120.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            text = path.read_text().strip()
            if text:
                return int(text)
        if proc.poll() is not None:
            raise RuntimeError(f"the coordinator exited with status {proc.returncode}; see {log}")
        time.sleep(0.1)
    raise RuntimeError(f"the coordinator did not start within {timeout:.0f} s; see {log}")


def _watch(address: str, data_dir: Path, out: queue.Queue[Any], stop: threading.Event) -> None:
    """Stream the federation's status (WatchRounds) into a queue until done, with the
    operator token the coordinator generated into its data directory."""
    from rankfed.coordinator.admin_client import AdminClient, AdminError, resolve_admin_token

    while not stop.is_set():
        try:
            with AdminClient(address, admin_token=resolve_admin_token("", data_dir)) as admin:
                for status in admin.watch():
                    out.put(status)
                    if status.done:
                        out.put(None)
                        return
        except AdminError as err:
            if stop.is_set():
                return
            out.put(err)
            time.sleep(0.5)


class LiveView:
    """Turns status messages into a few lines per round and the per-round table."""

    def __init__(self, say: Console, total_rounds: int) -> None:
        self.say = say
        self.total = total_rounds
        self.rows: dict[int, RoundRow] = {}
        self._phase: dict[int, str] = {}
        self._states: dict[tuple[int, str], str] = {}

    def update(self, status: Any) -> list[RoundRow]:
        """Print what changed; return rounds that just finished."""
        finished = []
        for rs in [*status.history, *([status.current] if status.current else [])]:
            phase = rs.phase.value.replace("_", " ")
            row = self.rows.setdefault(rs.round, RoundRow(round=rs.round))
            row.ranks = {p.device_name: p.rank for p in rs.participants}
            if phase != self._phase.get(rs.round):
                self._phase[rs.round] = phase
                if phase == "training":
                    ranks = "  ".join(f"{n}:r{r}" for n, r in sorted(row.ranks.items()))
                    self.say(f"round {rs.round}/{self.total} training  ({rs.method}; ranks {ranks})")
                elif phase in ("done", "failed"):
                    row.phase = phase
                    m = rs.metrics
                    row.bytes_up, row.bytes_down = int(m.get("bytes_up", 0)), int(m.get("bytes_down", 0))
                    row.loss_first, row.loss_last = m.get("loss_first"), m.get("loss_last")
                    if rs.finished_at and rs.started_at:
                        row.seconds = rs.finished_at - rs.started_at
                    if phase == "failed":
                        self.say(f"round {rs.round}/{self.total} FAILED: {rs.failure_reason}")
                    else:
                        loss = (f"train loss {row.loss_first:.3f} -> {row.loss_last:.3f}"
                                if row.loss_first is not None and row.loss_last is not None else "")
                        self.say(f"round {rs.round}/{self.total} aggregated: global rank {rs.global_rank}, "
                                 f"up {_mib(row.bytes_up)}, down {_mib(row.bytes_down)}, {loss}")
                    finished.append(row)
                elif phase != "waiting for clients" or rs.round == 1:
                    self.say(f"round {rs.round}/{self.total} {phase}")
            for p in rs.participants:
                state = p.state.value
                key = (rs.round, p.device_name)
                if self._states.get(key) == state:
                    continue
                self._states[key] = state
                if state == "uploaded" and p.metrics is not None:
                    self.say(f"  {p.device_name:10s} rank {p.rank:2d}  uploaded {_mib(p.bytes_up)} "
                             f"(downloaded {_mib(p.bytes_down)}), local loss {p.metrics.loss_first:.3f} -> "
                             f"{p.metrics.loss_last:.3f} in {p.metrics.steps} steps")
                elif state in ("late", "dropped"):
                    self.say(f"  {p.device_name:10s} {state}")
        return finished


def global_adapter_path(data_dir: Path, round_no: int) -> Path:
    from rankfed.coordinator.export import global_adapter_dir
    from rankfed.protocol.artifact import ADAPTER_FILE

    return global_adapter_dir(data_dir, round_no) / ADAPTER_FILE


def run_federation(opts: DemoOptions, split: FederatedSplit, data_paths: list[Path], say: Console) -> list[RoundRow]:
    """Coordinator + N edge processes over gRPC, with the live view; returns the rounds."""
    from rankfed.edge_client.manifest import build_manifest, write_manifest

    from .evaluate import Evaluator

    mdir = model_dir()
    coord_dir = opts.out / "coordinator"
    logs = opts.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    manifest = opts.out / "model-manifest.json"
    write_manifest(build_manifest(mdir, task="sequence-classification", num_labels=len(split.label_names),
                                  target_modules=("query", "value"), labels=tuple(split.label_names)), manifest)
    config = write_coordinator_config(opts, opts.out / "coordinator.toml", manifest=manifest.resolve(),
                                      data_dir=coord_dir.resolve())
    port_file = opts.out / "coordinator.port"
    port_file.unlink(missing_ok=True)
    procs = _Procs()
    rankfed = [sys.executable, "-m", "rankfed"]
    stop = threading.Event()
    try:
        coordinator = procs.start("coordinator", [
            *rankfed, "coordinator", "serve", "--config", str(config), "--data-dir", str(coord_dir),
            "--address", "127.0.0.1:0", "--port-file", str(port_file), "--exit-when-done", "--log-format", "text",
        ], logs / "coordinator.log", child_env())
        port = _wait_for_port(port_file, coordinator, logs / "coordinator.log")
        address = f"127.0.0.1:{port}"
        say(f"coordinator: {address} (pid {coordinator.pid}), method {opts.method}, {opts.rounds} rounds x "
            f"{opts.local_steps} local steps, lr {opts.learning_rate}, seq {opts.max_length}; "
            f"log {logs / 'coordinator.log'}")
        labels = ",".join(split.label_names)
        for i, path in enumerate(data_paths):
            name = device_name(opts, i)
            procs.start(name, [
                *rankfed, "edge", "run", "--coordinator", address, "--model", str(mdir), "--data", str(path),
                "--device-class", _profile(opts, i), "--device-name", name, "--threads", "1", "--json",
                "--labels", labels, "--max-length", str(opts.max_length), "--max-wait", "10",
            ], logs / f"{name}.jsonl", child_env())
        say(f"started {len(data_paths)} edge clients: {', '.join(device_name(opts, i) for i in range(len(data_paths)))} "
            f"(1 torch thread each; logs in {logs})")
        say(f"loading the evaluator (all-MiniLM-L6-v2, {len(split.test)} held-out articles)")
        evaluator = Evaluator(mdir, split.test, max_length=opts.max_length)
        view = LiveView(say, opts.rounds)
        statuses: queue.Queue[Any] = queue.Queue()
        watcher = threading.Thread(target=_watch, args=(address, coord_dir, statuses, stop), daemon=True)
        watcher.start()
        pending: list[RoundRow] = []
        done = False
        while not done or pending:
            try:
                item = statuses.get(timeout=0.5)
            except queue.Empty:
                item = False
            if item is None:
                done = True
            elif item is not False and not isinstance(item, Exception):
                pending.extend(view.update(item))
            bad = [(n, rc) for n, rc in procs.failed()]
            if bad:
                name, rc = bad[0]
                raise RuntimeError(f"{name} exited with status {rc}; see {logs}")
            if pending and (statuses.empty() or done):
                row = pending.pop(0)
                if row.phase == "done":
                    result = evaluator.evaluate_file(global_adapter_path(coord_dir, row.round))
                    row.accuracy, row.eval_loss = result.accuracy, result.loss
                    say(f"round {row.round}/{opts.rounds} global adapter on the held-out set: accuracy "
                        f"{result.accuracy:.3f} (loss {result.loss:.3f}; majority class "
                        f"{split.test.majority_fraction():.3f}; predicted per class {list(result.predicted_histogram)})")
        for name, proc in procs.items:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                say(f"{name} still running after the federation finished; stopping it")
        bad = procs.failed()
        if bad:
            raise RuntimeError(f"{bad[0][0]} exited with status {bad[0][1]}; see {logs}")
    finally:
        stop.set()
        procs.stop()
    return [view.rows[r] for r in sorted(view.rows)]


def run_in_process(opts: DemoOptions, split: FederatedSplit, data_paths: list[Path], say: Console) -> list[RoundRow]:
    """The same federation through rankfed.simulation (real Federation and EdgeRunner code)."""
    from rankfed.simulation.engine import SimClient, SimConfig, run_simulation

    from .evaluate import Evaluator

    mdir = model_dir()
    clients = [SimClient(device_name(opts, i), SIM_PROFILES.get(_profile(opts, i), _profile(opts, i)), p)
               for i, p in enumerate(data_paths)]
    evaluator = Evaluator(mdir, split.test, max_length=opts.max_length)
    rows: list[RoundRow] = []

    def on_round(r: Any) -> None:
        ranks = "  ".join(f"{c['name']}:r{c['rank']}" for c in r.clients)
        say(f"round {r.round}/{opts.rounds} {r.phase}: ranks {ranks}; up {_mib(r.bytes_up)}, down {_mib(r.bytes_down)}, "
            f"train loss {r.loss_first:.3f} -> {r.loss_last:.3f}; held-out accuracy {r.accuracy:.3f}")
        rows.append(RoundRow(round=r.round, phase=r.phase, ranks={c["name"]: c["rank"] for c in r.clients},
                             bytes_up=r.bytes_up, bytes_down=r.bytes_down, loss_first=r.loss_first,
                             loss_last=r.loss_last, accuracy=r.accuracy, eval_loss=r.eval_loss, seconds=r.seconds))

    cfg = SimConfig(method=opts.method, rounds=opts.rounds, local_steps=opts.local_steps,
                    learning_rate=opts.learning_rate, batch_size=opts.batch_size, max_length=opts.max_length,
                    seed=opts.seed, overrides=tracking_overrides(opts))
    say(f"in-process simulation: {len(clients)} devices, one training at a time")
    run_simulation(mdir, clients, cfg, work_dir=opts.out, label_names=split.label_names,
                   evaluate=evaluator.evaluate_file, on_round=on_round, threads=os.cpu_count() or 1)
    return rows


def export_and_predict(opts: DemoOptions, split: FederatedSplit, adapter: Path, say: Console) -> dict[str, Any]:
    onnx_path = opts.out / "model.onnx"
    heldout = write_jsonl(opts.out / "data" / "heldout.jsonl", split.test)
    # No --labels: the global adapter's card carries the label names (from the manifest).
    argv = [sys.executable, "-m", "rankfed", "edge", "export", "--model", str(model_dir()), "--adapter", str(adapter),
            "--out", str(onnx_path), "--max-length", "512", "--threads", "2", "--json",
            "--quantize", "--validation", str(heldout), "--eval-max-length", str(opts.max_length)]
    say(f"exporting the final global adapter to ONNX, fp32 and int8: rankfed edge export --adapter {adapter} "
        f"--out {onnx_path} --quantize --validation {heldout}")
    done = subprocess.run(argv, capture_output=True, text=True, env=child_env(2))
    refused = done.returncode != 0 and "held-out accuracy" in done.stderr and onnx_path.is_file()
    if done.returncode != 0 and not refused:
        raise RuntimeError(f"rankfed edge export failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    if refused:  # the int8 gate said no; the fp32 file passed its parity check and stays
        say(f"int8 refused by the accuracy gate: {done.stderr.strip().splitlines()[-1]}")
        report: dict[str, Any] = {"bytes": onnx_path.stat().st_size, "max_abs_diff": None, "int8_refused": True}
    else:
        report = json.loads(done.stdout.strip().splitlines()[-1])
        say(f"wrote {onnx_path} ({_mib(report['bytes'])}); onnxruntime vs torch max |diff| "
            f"{report['max_abs_diff']:.2g}")
        say(f"held-out accuracy ({report['validation_examples']} articles): fp32 {report['accuracy']:.3f}, "
            f"int8 {report['quantized_accuracy']:.3f} ({_mib(report['quantized_bytes'])}; same prediction as fp32 "
            f"on {report['quantized_heldout_agreement']:.1%})")
    picks = [int(i) for i in _spread(len(split.test), opts.predictions)]
    texts = [" ".join(split.test.texts[i].split()[:60]) for i in picks]
    argv = [sys.executable, "-m", "rankfed", "edge", "infer", "--onnx", str(onnx_path), "--json", "--threads", "1"]
    for t in texts:
        argv += ["--text", t]
    done = subprocess.run(argv, capture_output=True, text=True, env=child_env(1))
    if done.returncode != 0:
        raise RuntimeError(f"rankfed edge infer failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    predictions = []
    say("onnxruntime predictions on held-out articles (rankfed edge infer):")
    for i, line in zip(picks, done.stdout.strip().splitlines(), strict=False):
        p = json.loads(line)
        truth = split.label_names[int(split.test.labels[i])]
        predictions.append({"text": p["text"][:200], "predicted": p["label"], "true": truth,
                            "score": max(p["scores"])})
        mark = "ok " if p["label"] == truth else "MISS"
        say(f"  [{mark}] {p['label']:13s} (true {truth:13s}) {p['text'][:70]}...")
    return {"onnx": str(onnx_path), "bytes": report["bytes"], "max_abs_diff": report["max_abs_diff"],
            "accuracy_fp32": report.get("accuracy"), "accuracy_int8": report.get("quantized_accuracy"),
            "int8_bytes": report.get("quantized_bytes"), "int8_refused": report.get("int8_refused", False),
            "predictions": predictions}


def _spread(n: int, k: int) -> list[int]:
    k = max(0, min(k, n))
    return [round(i * (n - 1) / max(1, k - 1)) for i in range(k)] if k else []


def run_demo(opts: DemoOptions, say: Console | None = None) -> dict[str, Any]:
    say = say or Console()
    t0 = time.monotonic()
    if opts.out.exists():
        for sub in ("coordinator", "data", "logs"):
            shutil.rmtree(opts.out / sub, ignore_errors=True)
    opts.out.mkdir(parents=True, exist_ok=True)
    split, paths = prepare_data(opts, say)
    rows = (run_in_process if opts.in_process else run_federation)(opts, split, paths, say)
    done_rows = [r for r in rows if r.phase == "done"]
    if not done_rows:
        raise RuntimeError("no round finished; see the logs")
    final = done_rows[-1]
    data_dir = opts.out / "coordinator"
    adapter = global_adapter_path(data_dir, final.round)
    summary: dict[str, Any] = {
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()},
        "majority_fraction": split.test.majority_fraction(),
        "test_examples": len(split.test),
        "client_examples": [len(c) for c in split.clients],
        "rounds": [asdict(r) for r in rows],
        "final_accuracy": final.accuracy,
        "final_adapter": str(adapter),
    }
    say("")
    say("round  ranks                 up          down        train loss       held-out accuracy")
    for r in rows:
        ranks = ",".join(str(v) for _, v in sorted(r.ranks.items()))
        loss = f"{r.loss_first:.3f} -> {r.loss_last:.3f}" if r.loss_first is not None and r.loss_last is not None else "-"
        acc = f"{r.accuracy:.3f}" if r.accuracy is not None else r.phase
        say(f"{r.round:5d}  {ranks:20s}  {_mib(r.bytes_up):10s}  {_mib(r.bytes_down):10s}  {loss:15s}  {acc}")
    say(f"majority class on the held-out set: {split.test.majority_fraction():.3f}")
    if opts.export:
        summary["export"] = export_and_predict(opts, split, adapter, say)
    summary["seconds"] = round(time.monotonic() - t0, 1)
    (opts.out / "demo-summary.json").write_text(json.dumps(summary, indent=2))
    say(f"done in {summary['seconds']:.0f} s; summary in {opts.out / 'demo-summary.json'}")
    return summary
