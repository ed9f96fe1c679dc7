"""RankFed's simulation against Flower's Ray simulation engine on the same no-training
workload, in one run: per-round time, total wall time, start-up time and peak memory of
each side's process tree, and the ratio RankFed / Flower. A table on stdout and JSON in
bench/results/flower_sim.json.

    OMP_NUM_THREADS=1 python bench/flower_sim_bench.py            # 2 repetitions, ~5-10 min
    OMP_NUM_THREADS=1 python bench/flower_sim_bench.py --reps 1

The workload (both sides): 100 virtual clients, all 100 taking part in each of 3 rounds,
FedAvg, no training. Each client answers with the parameters it received plus small
Gaussian noise, as float32 arrays with RankFed's update shapes: rank-16 LoRA on query / key /
value of the 6 layers of all-MiniLM-L6-v2, i.e. 18 A (16 x 384) and 18 B (384 x 16) arrays
(24,576 bytes each), plus the 5 x 384 classifier weight and its 5 biases: 223,109 floats,
892,436 bytes (~0.9 MB) per update. Two clients run at a time on each side.

* Flower (`flwr[simulation]`, installed by this script into its own venv, by default
  /tmp/rankfed-flower-venv, reused when present): a generated script calls
  `flwr.simulation.run_simulation` with a message-API `ServerApp` whose strategy is
  `flwr.serverapp.strategy.FedAvg` (fraction_train = 1.0, min_train_nodes = 100, no
  federated evaluation) and a `ClientApp` whose train function adds the noise. Ray backend:
  `init_args.num_cpus = 2`, `client_resources.num_cpus = 1`, so 2 actors. A round is timed
  from the start of `configure_train` to the end of `aggregate_train` (the strategy is
  subclassed only to take those timestamps). Everything stays in memory: the server
  thread, Flower's in-memory link state and Ray's object store.
* RankFed (`rankfed.simulation.driver.simulate`, `training.synthetic`, `method = zero_pad`,
  `backend.workers = 2`, local threads backend) does **more per round than Flower**: the
  whole coordinator path runs in-process: selection, a per-device task and download of the
  global adapter (sha256-checked), and every update is streamed to the coordinator,
  sha256-checked and fsynced to disk before it is acknowledged, folded into a streaming
  aggregate, and the new global adapter is written to disk (fsynced) when the round closes.
  A round is the driver's own `seconds.round` (from the round going TRAINING to DONE).

Each side runs as its own process (RankFed: this script re-invoked with `--child rankfed`),
launched by this script, so both totals include interpreter start, imports and shutdown.
Timestamps are wall-clock (`time.time()`) from the launch. This script polls the child's
process tree (every process in the child's session, so Ray's raylet / GCS / workers are
counted even if re-parented) every 0.2 s: peak summed RSS and peak summed PSS (PSS splits
shared pages, e.g. Ray's object store or shared libraries, between the processes mapping
them; summed RSS counts them once per process). The order is Flower, RankFed, Flower,
RankFed, ... because the machine may be shared.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
OUT = Path(__file__).parent / "results" / "flower_sim.json"
DEFAULT_VENV = Path("/tmp/rankfed-flower-venv")
DEFAULT_FLWR = "flwr[simulation]==1.42.0"
CLIENTS, ROUNDS, SLOTS = 100, 3, 2
HIDDEN, RANK, LAYERS, MODULES, LABELS = 384, 16, 6, ("query", "key", "value"), 5
UPDATE_FLOATS = LAYERS * len(MODULES) * 2 * RANK * HIDDEN + LABELS * HIDDEN + LABELS  # 223,109
SHARED_NOTE = "machine shared with a background study on 2 cores"
MiB = 1 << 20

RANKFED_FLEET: dict[str, Any] = {
    "seed": 0, "rounds": ROUNDS, "method": "zero_pad", "devices.count": CLIENTS,
    "devices.profiles": {"cuda-large": 1.0}, "data.dataset": "tweets", "data.examples_per_device": 20,
    "data.validation_examples": 10, "data.test_examples": 10, "data.max_length": 32,
    "training.synthetic": True, "training.target_modules": list(MODULES),
    "federation.participation": CLIENTS, "backend.workers": SLOTS,
    # Not in the brief's fleet: with the default quality_fraction 0 the 2,000 examples are split
    # Dirichlet(0.5) over 100 devices with at least 5 each, and no draw in 1,000 gives that
    # (FleetError). All devices in the IID tier get exactly 20 examples each, so FedAvg's weights
    # are uniform, as on the Flower side (num-examples = 20); synthetic training ignores the data.
    "data.quality_fraction": 1.0,
}

# ----------------------------------------------------------------------------- Flower side
# Written to a temporary file and run with the venv's python. argv: result.json ray_tmp_dir.
FLOWER_APP = textwrap.dedent('''\
    import json, os, sys, time
    T_START = time.time()
    import numpy as np
    import flwr, ray
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation
    T_IMPORTED = time.time()

    CLIENTS, ROUNDS, SLOTS = {clients}, {rounds}, {slots}
    HIDDEN, RANK, LAYERS, MODULES, LABELS = {hidden}, {rank}, {layers}, {modules}, {labels}
    RESULT, RAY_TMP = sys.argv[1], sys.argv[2]
    MARKS = {{"start": T_START, "imported": T_IMPORTED, "rounds": []}}


    def initial_arrays():
        """RankFed's update shapes: per layer and module LoRA A (r x d) and B (d x r), then the head."""
        rng = np.random.default_rng(0)
        arrays = []
        for _layer in range(LAYERS):
            for _module in MODULES:
                arrays.append(rng.normal(0.0, 0.02, (RANK, HIDDEN)).astype(np.float32))
                arrays.append(rng.normal(0.0, 0.02, (HIDDEN, RANK)).astype(np.float32))
        arrays.append(rng.normal(0.0, 0.02, (LABELS, HIDDEN)).astype(np.float32))
        arrays.append(np.zeros(LABELS, dtype=np.float32))
        return arrays


    client = ClientApp()


    @client.train()
    def train(msg: Message, context: Context) -> Message:
        """No training: the received parameters plus small noise."""
        called = time.time()
        received = msg.content["arrays"].to_numpy_ndarrays()
        rng = np.random.default_rng([int(context.node_id) % (2 ** 32), int(msg.content["config"]["server-round"])])
        updated = [(a + rng.normal(0.0, 1e-3, a.shape)).astype(np.float32) for a in received]
        content = RecordDict({{"arrays": ArrayRecord(updated), "metrics": MetricRecord({{"num-examples": 20, "called-at": called}})}})
        return Message(content=content, reply_to=msg)


    class TimedFedAvg(FedAvg):
        """FedAvg, unchanged, plus timestamps around each round's train phase."""

        def configure_train(self, server_round, arrays, config, grid):
            MARKS["rounds"].append({{"round": server_round, "start": time.time()}})
            return super().configure_train(server_round, arrays, config, grid)

        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            ok = [m for m in replies if not m.has_error()]
            if ok and "update_payload_bytes" not in MARKS:
                record = ok[0].content["arrays"]
                MARKS["update_payload_bytes"] = sum(len(a.data) for a in record.values())
                MARKS["update_array_bytes"] = sum(int(np.prod(a.shape)) * 4 for a in record.values())
                MARKS["update_arrays"] = len(record)
            if ok and "first_client_call" not in MARKS:  # round 1: Ray and its actors are up by then
                MARKS["first_client_call"] = min(float(m.content["metrics"]["called-at"]) for m in ok)
            out = super().aggregate_train(server_round, replies)
            entry = MARKS["rounds"][-1]
            entry.update(end=time.time(), replies=len(replies), ok=len(ok))
            return out


    server = ServerApp()


    @server.main()
    def main(grid: Grid, context: Context) -> None:
        MARKS["server_main"] = time.time()
        strategy = TimedFedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=CLIENTS,
                               min_available_nodes=CLIENTS)
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(initial_arrays()), num_rounds=ROUNDS)
        final = result.arrays.to_numpy_ndarrays()
        MARKS["final_arrays"] = len(final)
        MARKS["final_floats"] = int(sum(a.size for a in final))
        MARKS["strategy_done"] = time.time()


    if __name__ == "__main__":
        backend_config = {{
            "init_args": {{"num_cpus": SLOTS, "num_gpus": 0, "_temp_dir": RAY_TMP}},
            "client_resources": {{"num_cpus": 1, "num_gpus": 0.0}},
        }}
        MARKS["run_simulation"] = time.time()
        run_simulation(server_app=server, client_app=client, num_supernodes=CLIENTS,
                       backend_name="ray", backend_config=backend_config)
        MARKS["returned"] = time.time()
        MARKS["versions"] = {{"flwr": flwr.__version__, "ray": ray.__version__, "numpy": np.__version__,
                              "python": sys.version.split()[0]}}
        with open(RESULT, "w") as fh:
            json.dump(MARKS, fh)
''').format(clients=CLIENTS, rounds=ROUNDS, slots=SLOTS, hidden=HIDDEN, rank=RANK, layers=LAYERS,
            modules=repr(MODULES), labels=LABELS)


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_venv(venv: Path, spec: str) -> dict[str, Any]:
    """Create the Flower venv (or reuse it when flwr, ray, numpy and psutil import there)."""
    py = venv_python(venv)
    probe = "import flwr, ray, numpy, psutil; print(flwr.__version__, ray.__version__, numpy.__version__)"
    installed_now = False
    t0 = time.perf_counter()
    if not (py.exists() and subprocess.run([py, "-c", probe], capture_output=True).returncode == 0):
        print(f"creating {venv} and installing {spec} (one-off) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([py, "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
        subprocess.run([py, "-m", "pip", "install", "-q", spec, "psutil"], check=True)
        installed_now = True
    out = subprocess.run([py, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    return {"venv": str(venv), "spec": spec, "installed_now": installed_now,
            "install_seconds": round(time.perf_counter() - t0, 1) if installed_now else None,
            "flwr": out[0], "ray": out[1], "numpy": out[2]}


# ----------------------------------------------------------------------------- RankFed side


def rankfed_child(result_path: Path, work: Path) -> int:
    """Runs in its own process (`--child rankfed`): the fleet of the brief, timestamps out."""
    marks: dict[str, Any] = {"start": time.time()}
    sys.path.insert(0, str(REPO))
    from rankfed.simulation.driver import simulate
    from rankfed.simulation.fleet import load_fleet
    marks["imported"] = time.time()
    fleet = load_fleet(None, RANKFED_FLEET)
    round_ends: list[float] = []
    marks["simulate"] = time.time()
    result = simulate(fleet, work / "sim", progress=None, on_round=lambda line: round_ends.append(time.time()))
    marks["returned"] = time.time()
    s = result.summary
    marks["rounds"] = [{"round": line["round"], "seconds": line["seconds"]["round"], "end": end,
                        "start": end - line["seconds"]["round"], "phase": line["phase"],
                        "uploaded": line["uploaded"], "participants": line["participants"],
                        "bytes_up": line["bytes_up"], "bytes_down": line["bytes_down"]}
                       for line, end in zip(result.rounds, round_ends)]
    marks["summary"] = {k: s[k] for k in ("seconds", "setup_seconds", "round_seconds", "uplink_bytes",
                                          "downlink_bytes", "rounds_done", "peak_rss_bytes")}
    marks["participants"] = fleet.participants
    marks["backend"] = {"kind": fleet.backend.kind, "mode": fleet.backend.mode, "workers": fleet.backend.workers}
    result_path.write_text(json.dumps(marks))
    return 0


# ----------------------------------------------------------------------------- measuring a child


class TreeMonitor(threading.Thread):
    """Peak summed RSS / PSS over every process in the child's session (it is started with
    start_new_session, so its pid is the session id), sampled every `interval` s."""

    def __init__(self, sid: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.sid, self.interval = sid, interval
        self.stop = threading.Event()
        self.peak_rss = self.peak_pss = 0
        self.peak_at: dict[str, int] = {}
        self.max_procs = 0
        self.samples = 0
        self.seen: set[int] = set()

    def members(self) -> list[int]:
        import psutil
        out = []
        for pid in psutil.pids():
            try:
                if os.getsid(pid) == self.sid:
                    out.append(pid)
            except OSError:
                pass
        return out

    def run(self) -> None:
        import psutil
        while not self.stop.is_set():
            rss = pss = 0
            names: dict[str, int] = {}
            pids = self.members()
            for pid in pids:
                try:
                    p = psutil.Process(pid)
                    m = p.memory_full_info()
                    name = p.name()
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                rss += m.rss
                pss += getattr(m, "pss", m.rss)
                names[name] = names.get(name, 0) + getattr(m, "pss", m.rss)
            self.seen.update(pids)
            self.samples += 1
            self.max_procs = max(self.max_procs, len(pids))
            self.peak_rss = max(self.peak_rss, rss)
            if pss > self.peak_pss:
                self.peak_pss, self.peak_at = pss, names
            self.stop.wait(self.interval)


def run_child(cmd: list[str], env: dict[str, str], log: Path, timeout: float) -> dict[str, Any]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load0 = [round(x, 2) for x in os.getloadavg()]
    launch = time.time()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=str(REPO))
        mon = TreeMonitor(proc.pid)
        mon.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
    exited = time.time()
    mon.stop.set()
    mon.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    leftovers = []
    deadline = time.time() + 15
    while True:  # Ray's daemons normally leave with the driver; give them a moment, then end ours
        leftovers = mon.members()
        if not leftovers or time.time() > deadline:
            break
        time.sleep(0.5)
    for pid in leftovers:
        try:
            os.kill(pid, 9)
        except OSError:
            pass
    return {"rc": rc, "launch": launch, "exited": exited, "wall_s": round(exited - launch, 3),
            "cpu_s_waited_descendants": round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 2),
            "peak_tree_rss_mib": round(mon.peak_rss / MiB, 1), "peak_tree_pss_mib": round(mon.peak_pss / MiB, 1),
            "pss_by_process_at_peak_mib": {k: round(v / MiB, 1) for k, v in sorted(mon.peak_at.items(), key=lambda kv: -kv[1])},
            "max_processes": mon.max_procs, "processes_seen": len(mon.seen), "samples": mon.samples,
            "leftover_processes_killed": len(leftovers),
            "loadavg_before": load0, "loadavg_after": [round(x, 2) for x in os.getloadavg()]}


def _round_metrics(proc: dict[str, Any], marks: dict[str, Any], seconds: list[float]) -> dict[str, Any]:
    launch = proc["launch"]
    rounds = marks["rounds"]
    first_start, last_end = rounds[0]["start"], rounds[-1]["end"]
    return {
        "round_seconds": [round(x, 3) for x in seconds],
        "round1_s": round(seconds[0], 3),
        "round2_3_mean_s": round(statistics.fmean(seconds[1:]), 3) if len(seconds) > 1 else None,
        "startup_s": round(first_start - launch, 3),  # launch -> round 1 starts
        "rounds_span_s": round(last_end - first_start, 3),  # round 1 starts -> last round ends
        "teardown_s": round(proc["exited"] - last_end, 3),  # last round ends -> process gone
        "interpreter_and_imports_s": round(marks["imported"] - launch, 3),
        "total_s": proc["wall_s"],
    }


def run_flower(py: Path, tmp: Path, rep: int, timeout: float) -> dict[str, Any]:
    d = tmp / f"flower-{rep}"
    d.mkdir()
    script = d / "flower_app.py"
    script.write_text(FLOWER_APP)
    result = d / "result.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", FLWR_TELEMETRY_ENABLED="0", RAY_USAGE_STATS_ENABLED="0",
               PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)
    proc = run_child([str(py), str(script), str(result), str(d / "ray")], env, d / "log.txt", timeout)
    if proc["rc"] != 0 or not result.exists():
        tail = (d / "log.txt").read_text(errors="replace").splitlines()[-40:]
        raise RuntimeError(f"Flower run {rep} failed (rc {proc['rc']}):\n" + "\n".join(tail))
    marks = json.loads(result.read_text())
    seconds = [r["end"] - r["start"] for r in marks["rounds"]]
    row = {"side": "flower", "rep": rep, **_round_metrics(proc, marks, seconds), "process": proc,
           "server_main_after_launch_s": round(marks["server_main"] - proc["launch"], 3),
           # run_simulation starts Ray (ray.init, 2 actors) while the server thread already runs
           # round 1: the first ClientApp call marks when clients can run.
           "clients_ready_s": round(marks["first_client_call"] - proc["launch"], 3),
           "round1_after_clients_ready_s": round(marks["rounds"][0]["end"] - marks["first_client_call"], 3),
           "replies_ok": [r["ok"] for r in marks["rounds"]],
           "update_array_bytes": marks.get("update_array_bytes"),
           "update_payload_bytes": marks.get("update_payload_bytes"), "update_arrays": marks.get("update_arrays"),
           "final_arrays": marks.get("final_arrays"), "final_floats": marks.get("final_floats"),
           "versions": marks["versions"]}
    text = re.sub(r"\x1b\[[0-9;]*m", "", (d / "log.txt").read_text(errors="replace"))
    warnings = [ln.strip() for ln in text.splitlines() if "WARNING" in ln or "ERROR" in ln or "Error" in ln]
    row["log_warnings"] = warnings[:20]
    return row


def run_rankfed(tmp: Path, rep: int, timeout: float) -> dict[str, Any]:
    d = tmp / f"rankfed-{rep}"
    d.mkdir()
    result = d / "result.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "rankfed", "--child-result", str(result),
           "--child-work", str(d)]
    proc = run_child(cmd, env, d / "log.txt", timeout)
    if proc["rc"] != 0 or not result.exists():
        tail = (d / "log.txt").read_text(errors="replace").splitlines()[-40:]
        raise RuntimeError(f"RankFed run {rep} failed (rc {proc['rc']}):\n" + "\n".join(tail))
    marks = json.loads(result.read_text())
    s = marks["summary"]
    seconds = [r["seconds"] for r in marks["rounds"]]
    updates = sum(r["uploaded"] for r in marks["rounds"])
    row = {"side": "rankfed", "rep": rep, **_round_metrics(proc, marks, seconds), "process": proc,
           "setup_seconds_reported": s["setup_seconds"], "simulate_seconds_reported": s["seconds"],
           "uploaded": [r["uploaded"] for r in marks["rounds"]], "rounds_done": s["rounds_done"],
           "uplink_bytes": s["uplink_bytes"], "downlink_bytes": s["downlink_bytes"],
           "update_bytes": round(s["uplink_bytes"] / max(1, updates)), "updates": updates,
           "peak_rss_reported_mib": {"driver": round(s["peak_rss_bytes"]["driver"] / MiB, 1),
                                     "workers": [None if w is None else round(w / MiB, 1)
                                                 for w in s["peak_rss_bytes"]["workers"]]},
           "backend": marks["backend"]}
    return row


# ----------------------------------------------------------------------------- report

METRICS = (  # key, label
    ("round2_3_mean_s", "round time, mean of rounds 2-3 (s)"),
    ("round1_s", "round 1 time (s)"),
    ("rounds_span_s", "round 1 start -> round 3 end (s)"),
    ("startup_s", "start-up: launch -> round 1 starts (s)"),
    ("clients_ready_s", "launch -> clients can run (s) [*]"),
    ("teardown_s", "teardown: round 3 end -> exit (s)"),
    ("total_s", "total wall time incl. start-up (s)"),
    ("peak_tree_pss_mib", "peak PSS, process tree (MiB)"),
    ("peak_tree_rss_mib", "peak summed RSS, process tree (MiB)"),
    ("cpu_s_waited_descendants", "CPU time user+sys (s)"),
)


def _value(row: dict[str, Any], key: str) -> float:
    if key == "clients_ready_s" and row["side"] == "rankfed":
        return row["startup_s"]  # its backend (2 worker threads) is built before round 1 starts
    return row[key] if key in row else row["process"][key]


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    flower = [r for r in rows if r["side"] == "flower"]
    rankfed = [r for r in rows if r["side"] == "rankfed"]
    out: dict[str, Any] = {}
    for key, label in METRICS:
        f = [_value(r, key) for r in flower]
        k = [_value(r, key) for r in rankfed]
        fm, km = statistics.fmean(f), statistics.fmean(k)
        out[key] = {"label": label, "flower": f, "rankfed": k, "flower_mean": round(fm, 3),
                    "rankfed_mean": round(km, 3), "ratio_rankfed_over_flower": round(km / fm, 3) if fm else None,
                    "ratio_per_rep": [round(b / a, 3) if a else None for a, b in zip(f, k)]}
    return out


def print_table(summary: dict[str, Any], reps: int) -> None:
    head = (f"{'metric':42s}" + "".join(f"{'Flower #' + str(i + 1):>11s}" for i in range(reps))
            + "".join(f"{'RankFed #' + str(i + 1):>11s}" for i in range(reps)) + f"{'RankFed/Flower':>16s}")
    print(head)
    print("-" * len(head))
    for key, _label in METRICS:
        m = summary[key]
        cells = "".join(f"{v:11.2f}" for v in m["flower"]) + "".join(f"{v:11.2f}" for v in m["rankfed"])
        ratio = m["ratio_rankfed_over_flower"]
        per = "/".join(f"{x:.2f}" for x in m["ratio_per_rep"] if x is not None)
        print(f"{m['label']:42s}{cells}{ratio:8.2f} ({per})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=2, help="repetitions of each side, alternated (default 2)")
    ap.add_argument("--venv", type=Path, default=DEFAULT_VENV, help=f"Flower venv (default {DEFAULT_VENV})")
    ap.add_argument("--flwr", default=DEFAULT_FLWR, help=f"pip spec installed into a new venv (default {DEFAULT_FLWR})")
    ap.add_argument("--timeout", type=float, default=1200.0, help="per run, seconds")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, RankFed's data)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--child", choices=("rankfed",), help=argparse.SUPPRESS)
    ap.add_argument("--child-result", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--child-work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child == "rankfed":
        return rankfed_child(args.child_result, args.child_work)

    versions = ensure_venv(args.venv, args.flwr)
    print(f"Flower venv {versions['venv']}: flwr {versions['flwr']}, ray {versions['ray']}, "
          f"numpy {versions['numpy']}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="rankfed-flowerbench-"))
    rows: list[dict[str, Any]] = []
    try:
        for rep in range(1, args.reps + 1):
            for side in ("flower", "rankfed"):
                print(f"rep {rep}: {side} ...", end=" ", flush=True)
                row = (run_flower(venv_python(args.venv), tmp, rep, args.timeout) if side == "flower"
                       else run_rankfed(tmp, rep, args.timeout))
                rows.append(row)
                print(f"rounds {', '.join(f'{x:.2f}' for x in row['round_seconds'])} s, start-up "
                      f"{row['startup_s']:.1f} s, total {row['total_s']:.1f} s, peak PSS "
                      f"{row['process']['peak_tree_pss_mib']:.0f} MiB, load {row['process']['loadavg_after'][0]}",
                      flush=True)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    summary = summarize(rows)
    fl = [r for r in rows if r["side"] == "flower"]
    rf = [r for r in rows if r["side"] == "rankfed"]
    sizes = {"shapes": {"lora_a": [RANK, HIDDEN], "lora_b": [HIDDEN, RANK], "lora_pairs": LAYERS * len(MODULES),
                        "classifier_weight": [LABELS, HIDDEN], "classifier_bias": [LABELS]},
             "floats": UPDATE_FLOATS, "float32_bytes": UPDATE_FLOATS * 4,
             "flower_array_bytes": fl[0]["update_array_bytes"],
             "flower_serialized_array_bytes": fl[0]["update_payload_bytes"],
             "rankfed_uplink_bytes_per_update": rf[0]["update_bytes"],
             "rankfed_updates": rf[0]["updates"]}
    result = {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "note": SHARED_NOTE,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
        "workload": {"clients": CLIENTS, "per_round": CLIENTS, "rounds": ROUNDS, "concurrent_clients": SLOTS,
                     "training": "none: received parameters + N(0, 1e-3) noise", "update": sizes},
        "flower": {"versions": versions, "engine": "flwr.simulation.run_simulation, Ray backend",
                   "strategy": "flwr.serverapp.strategy.FedAvg(fraction_train=1.0, fraction_evaluate=0.0, "
                               "min_train_nodes=100, min_available_nodes=100)",
                   "backend_config": {"init_args": {"num_cpus": SLOTS, "num_gpus": 0},
                                      "client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
                   "round_timed_as": "configure_train start -> aggregate_train end (server thread)"},
        "rankfed": {"fleet": RANKFED_FLEET, "api": "rankfed.simulation.driver.simulate",
                    "round_timed_as": "the driver's seconds.round (round TRAINING -> DONE)",
                    "does_more": "per update: streamed upload, sha256 check, fsync before the receipt, "
                                 "streaming fold; per round: selection, per-device task + checked download, "
                                 "global adapter written and fsynced"},
        "definitions": {k: label for k, label in METRICS} | {
            "startup_s": "child launch -> first round starts (interpreter, imports, engine/coordinator set-up, "
                         "clients registered; Ray: ray.init; RankFed: population, manifest, 100 joins)",
            "clients_ready_s": "Flower: launch -> first ClientApp call of round 1 (ray.init and the 2 actors "
                               "start inside round 1, while the server thread waits); RankFed: = startup_s "
                               "(its 2 worker threads exist before round 1)",
            "peak_tree_pss_mib": "max over 0.2 s samples of the summed PSS of every process in the child's session",
            "peak_tree_rss_mib": "same, summed RSS (shared pages counted once per process)",
            "cpu_s_waited_descendants": "RUSAGE_CHILDREN delta: CPU of the child and the descendants it waited for"},
        "summary": summary,
        "runs": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(f"{CLIENTS} clients, all {CLIENTS} per round, {ROUNDS} rounds, FedAvg, no training, {SLOTS} at a time; "
          f"{SHARED_NOTE}")
    print(f"update: {UPDATE_FLOATS} float32 = {UPDATE_FLOATS * 4:,} B; Flower serialized arrays "
          f"{sizes['flower_serialized_array_bytes']:,} B; RankFed uplink per update "
          f"{sizes['rankfed_uplink_bytes_per_update']:,} B ({sizes['rankfed_updates']} updates)")
    print("RankFed's rounds do more: streamed + sha256-checked + fsynced uploads, streaming fold, global on disk")
    print()
    print_table(summary, args.reps)
    print("[*] Flower: launch -> first ClientApp call (Ray and its actors start inside round 1); "
          "RankFed: = start-up (worker threads exist before round 1)")
    print("PSS splits shared pages (Ray's object store, shared libraries) between processes; summed RSS counts "
          "them once per process")
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
