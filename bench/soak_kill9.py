"""Soak: kill -9 the coordinator again and again at random points of its rounds.

A real coordinator process serves a federation of several rounds to a few scripted
clients (threads speaking rankfed.v1 directly, with a simulated training delay and
slow chunked uploads so that kills land before, during and after uploads, during
aggregation and between rounds). A killer sends SIGKILL at random moments, at least
--kills times, restarting the coordinator on the same data directory and port each time.
Then the federation runs to its end and the run checks:

  * every update a client got a receipt for is in the final state: a receipt row with the
    same sha256, and its round DONE with that update counted (no acknowledged update lost);
  * SQLite `PRAGMA integrity_check` is ok, no temporary blob survives, and every global
    adapter on disk decodes and matches the sha256 its round recorded (no corrupt state);
  * the federation finished all its rounds.

    python bench/soak_kill9.py                     # 20 kills, about 2 minutes
    python bench/soak_kill9.py --kills 50 --rounds 40

Writes bench/results/soak_kill9.json. Loopback only; stops by itself (--max-seconds).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rankfed.aggregation import decode_adapter, encode_adapter  # noqa: E402
from rankfed.coordinator.export import global_adapter_dir  # noqa: E402
from rankfed.protocol.artifact import ADAPTER_FILE  # noqa: E402
from tests.coordinator.harness import (  # noqa: E402
    MANIFEST,
    CoordinatorProcess,
    EdgeTestClient,
    manifest,
    random_adapter,
)

CONFIG = """
[server]
loopback_operators = true  # a local benchmark: its tools ask without a token
max_chunk_bytes = 1024
long_poll_seconds = 1.0
upload_idle_timeout_seconds = 10.0
[model]
manifest = "{manifest}"
[federation]
rounds = {rounds}
method = "rbla"
min_clients = 3
wait_for_clients_seconds = 2.0
round_deadline_seconds = 60.0
straggler_grace_seconds = 3.0
heartbeat_interval_seconds = 1.0
heartbeat_timeout_seconds = 30.0
"""

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED,
             grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}


class Device(threading.Thread):
    """join -> loop(get task -> download -> 'train' -> upload slowly), surviving outages."""

    def __init__(self, name: str, address: str, stop: threading.Event, rng: random.Random) -> None:
        super().__init__(name=name, daemon=True)
        self.address, self.stop, self.rng = address, stop, rng
        self.client = EdgeTestClient(address, name, "cpu")
        self.acknowledged: dict[int, str] = {}  # round -> sha256 the coordinator acknowledged
        self.refused: dict[str, int] = {}
        self.done = False

    def run(self) -> None:
        spec = manifest()
        while not self.stop.is_set():
            try:
                self.step(spec)
            except grpc.RpcError as exc:
                if exc.code() not in RETRYABLE:
                    self.refused[exc.code().name] = self.refused.get(exc.code().name, 0) + 1
                time.sleep(0.2)  # the coordinator is down or restarting: come back shortly
            if self.done:
                return

    def step(self, spec) -> None:
        if not self.client.token:
            self.client.join(spec.weights_sha256)
        task = self.client.get_task(1.0)
        kind = task.WhichOneof("kind")
        if kind == "done":
            self.done = True
            return
        if kind != "train" or task.train.round in self.acknowledged:
            return
        train = task.train
        self.client.download(train.round)
        time.sleep(self.rng.uniform(0.1, 1.0))  # "training"
        update = random_adapter(spec, train.assignment.lora.rank, train.assignment.lora.alpha,
                                seed=hash((self.name, train.round)) % 2**31)
        data = encode_adapter(update)
        sha = hashlib.sha256(data).hexdigest()
        pause = self.rng.uniform(0.0, 0.1)

        def slow_chunks():
            for offset in range(0, len(data), 1024):
                time.sleep(pause)
                yield offset, data[offset:offset + 1024]

        try:
            receipt = self.client.upload_bytes(train.round, train.assignment.lora.rank, data, chunks=slow_chunks())
            assert receipt.sha256 == sha
            self.acknowledged[train.round] = sha
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.ALREADY_EXISTS and sha in (exc.details() or ""):
                self.acknowledged[train.round] = sha  # the receipt was lost in a kill, the update was not
            elif exc.code() in RETRYABLE:
                raise
            else:
                self.refused[exc.code().name] = self.refused.get(exc.code().name, 0) + 1


def check_state(data_dir: Path, devices: list[Device], rounds: int) -> dict:
    db = sqlite3.connect(f"file:{data_dir / 'state.sqlite3'}?mode=ro", uri=True)
    integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
    receipts = {(r, c): (sha, path) for r, c, sha, path in db.execute(
        "SELECT round, client_id, sha256, blob_path FROM receipts")}
    phases = {r: (phase, sha, json.loads(m)) for r, phase, sha, m in db.execute(
        "SELECT round, phase, global_sha256, metrics FROM rounds")}
    db.close()
    lost = []
    for device in devices:
        for round_no, sha in device.acknowledged.items():
            held = receipts.get((round_no, device.client.client_id))
            if held is None or held[0] != sha:
                lost.append((device.name, round_no, "no receipt" if held is None else "other sha"))
            elif phases.get(round_no, ("?",))[0] != "done":
                lost.append((device.name, round_no, f"round {phases.get(round_no, ('missing',))[0]}"))
    counted = {r: int(v[2].get("updates", 0)) for r, v in phases.items()}
    per_round = {}
    for (r, _), _ in receipts.items():
        per_round[r] = per_round.get(r, 0) + 1
    miscounted = {r: (counted.get(r), n) for r, n in per_round.items()
                  if phases[r][0] == "done" and counted.get(r) != n}
    temporaries = [str(p) for p in (data_dir / "blobs").rglob("*") if p.is_file() and ".rankfed-" in p.name]
    bad_globals = []
    for r, (phase, sha, _) in phases.items():
        if phase != "done":
            continue
        path = global_adapter_dir(data_dir, r) / ADAPTER_FILE
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != sha:
            bad_globals.append((r, "sha256"))
        decode_adapter(data)
    return {
        "integrity_check": integrity,
        "rounds": {str(r): v[0] for r, v in sorted(phases.items())},
        "all_rounds_closed": len(phases) == rounds and all(v[0] in ("done", "failed") for v in phases.values()),
        "acknowledged_updates": sum(len(d.acknowledged) for d in devices),
        "receipts": len(receipts),
        "lost_acknowledged_updates": lost,
        "miscounted_rounds": miscounted,
        "temporaries_left": temporaries,
        "bad_global_adapters": bad_globals,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-seconds", type=float, default=540.0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "soak_kill9.json")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    started = time.monotonic()

    with tempfile.TemporaryDirectory(prefix="rankfed-soak-") as tmp:
        work = Path(tmp)
        config = work / "coordinator.toml"
        config.write_text(CONFIG.format(manifest=MANIFEST, rounds=args.rounds))
        data_dir = work / "data"
        proc = CoordinatorProcess(config, data_dir, work / "coordinator.log")
        address = proc.start()
        stop = threading.Event()
        devices = [Device(f"dev-{i}", address, stop, random.Random(args.seed * 100 + i)) for i in range(args.devices)]
        for d in devices:
            d.start()
        kills, kill_log = 0, []
        try:
            while time.monotonic() - started < args.max_seconds:
                if all(d.done for d in devices):
                    break
                if kills < args.kills:
                    time.sleep(rng.uniform(0.3, 3.0))
                    proc.kill9()
                    kills += 1
                    acked = sum(len(d.acknowledged) for d in devices)
                    kill_log.append({"t": round(time.monotonic() - started, 2), "acknowledged_so_far": acked})
                    print(f"kill -9 #{kills} at {kill_log[-1]['t']:.1f} s ({acked} updates acknowledged so far)",
                          flush=True)
                    proc.start(address=address)
                else:
                    time.sleep(0.5)
            finished = all(d.done for d in devices)
        finally:
            stop.set()
            for d in devices:
                d.join(10)
                d.client.close()
            exit_code = proc.terminate()
        report = check_state(data_dir, devices, args.rounds)

    report.update({
        "benchmark": "soak_kill9", "kills": kills, "rounds_planned": args.rounds, "devices": args.devices,
        "federation_finished": finished, "coordinator_exit_after_sigterm": exit_code,
        "seconds": round(time.monotonic() - started, 1), "kill_log": kill_log,
        "refusals_seen_by_clients": {d.name: d.refused for d in devices if d.refused},
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    })
    ok = (finished and report["integrity_check"] == "ok" and not report["lost_acknowledged_updates"]
          and not report["temporaries_left"] and not report["bad_global_adapters"] and report["all_rounds_closed"]
          and not report["miscounted_rounds"] and kills >= args.kills)
    report["ok"] = ok
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{kills} kills in {report['seconds']} s; rounds {report['rounds']}")
    print(f"acknowledged updates {report['acknowledged_updates']}, receipts {report['receipts']}, "
          f"lost {len(report['lost_acknowledged_updates'])}; integrity {report['integrity_check']}; "
          f"temporaries left {len(report['temporaries_left'])}; federation finished: {finished}")
    print(("OK" if ok else "FAILED") + f"; wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
