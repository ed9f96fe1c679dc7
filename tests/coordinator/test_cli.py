"""The command line: `rankfed coordinator serve` with embedded defaults, graceful SIGTERM,
structured logs, and `rankfed status` as a table, JSON and a watch stream."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema

from rankfed.cli import main
from tests.coordinator.harness import MANIFEST, EdgeTestClient, random_adapter, wait_for


def test_print_config_shows_embedded_defaults(capsys):
    assert main(["coordinator", "serve", "--print-config"]) == 0
    config = json.loads(capsys.readouterr().out)
    assert config["federation"]["method"] == "zero_pad"
    assert config["server"]["address"] == "127.0.0.1:50051"
    assert [t["name"] for t in config["rank_policy"]["tiers"]][:2] == ["cuda-large", "cuda"]


def test_bad_config_exits_2_with_the_field_named(tmp_path, capsys):
    bad = tmp_path / "c.toml"
    bad.write_text("[federation]\nmin_clinets = 3\n")
    assert main(["coordinator", "serve", "--config", str(bad)]) == 2
    assert "min_clients" in capsys.readouterr().err


def test_serve_status_and_sigterm(tmp_path, capsys, tiny_manifest):
    port_file = tmp_path / "port"
    proc = subprocess.Popen(
        [sys.executable, "-m", "rankfed", "coordinator", "serve", "--address", "127.0.0.1:0",
         "--data-dir", str(tmp_path / "data"), "--manifest", str(MANIFEST), "--port-file", str(port_file)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        wait_for(port_file.exists, timeout=60, what="coordinator to listen")
        address = f"127.0.0.1:{port_file.read_text().strip()}"
        client = EdgeTestClient(address, "laptop", "cpu")
        client.join(tiny_manifest.weights_sha256)
        client2 = EdgeTestClient(address, "phone", "mobile")
        client2.join(tiny_manifest.weights_sha256)
        task = client.wait_train()
        client.download(task.round)
        client.upload(task.round, random_adapter(tiny_manifest, task.assignment.lora.rank, 8.0, 0))

        assert main(["status", "--address", address, "--data-dir", str(tmp_path / "data")]) == 0
        table = capsys.readouterr().out
        assert "round 1/5" in table and "laptop" in table and "uploaded" in table and "phone" in table

        assert main(["status", "--address", address, "--data-dir", str(tmp_path / "data"), "--json"]) == 0
        as_json = json.loads(capsys.readouterr().out)
        states = {p["device_name"]: p["state"] for p in as_json["current"]["participants"]}
        assert states == {"laptop": "uploaded", "phone": "assigned"}

        assert main(["status", "--address", address, "--data-dir", str(tmp_path / "data"), "--clients"]) == 0
        assert "phone" in capsys.readouterr().out
        client.close()
        client2.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-2000:]
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    messages = [e["msg"] for e in events]
    assert "coordinator serving" in messages and messages[-1] == "coordinator stopped"
    accepted = next(e for e in events if e["msg"] == "update accepted")
    assert accepted["round"] == 1 and accepted["client_id"]


def test_status_reports_unreachable_coordinator(capsys):
    start = time.monotonic()
    assert main(["status", "--address", "127.0.0.1:1", "--timeout", "1"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err
    assert time.monotonic() - start < 10


def test_status_watch_follows_until_done(tmp_path, tiny_manifest):
    from tests.coordinator.harness import CoordinatorThread, make_config

    server = CoordinatorThread(make_config(tmp_path / "data", **{
        "federation.rounds": 1, "federation.min_clients": 1, "federation.straggler_grace_seconds": 0.0,
    }))
    try:
        watcher = subprocess.Popen(
            [sys.executable, "-m", "rankfed", "status", "--address", server.address, "--watch", "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        first = watcher.stdout.readline()  # the watch is established before anything happens
        client = EdgeTestClient(server.address, "solo", "cpu")
        client.join(tiny_manifest.weights_sha256)
        task = client.wait_train()
        client.download(task.round)
        client.upload(task.round, random_adapter(tiny_manifest, task.assignment.lora.rank, 8.0, 0))
        out, err = watcher.communicate(timeout=60)
        client.close()
    finally:
        server.stop()
    assert watcher.returncode == 0, err
    snapshots = [json.loads(line) for line in [first, *out.splitlines()]]
    assert len(snapshots) >= 3 and snapshots[-1]["done"] is True
    phases = [(s.get("current") or {}).get("phase") for s in snapshots]
    assert "training" in phases and phases[-1] == "done"
    schema = json.loads((Path(__file__).parents[2] / "docs" / "status-schema.json").read_text())
    for snapshot in snapshots:  # typed: numbers are numbers, every field is there
        jsonschema.validate(snapshot, schema)


def test_the_committed_status_schema_is_current(capsys):
    assert main(["status", "--schema"]) == 0
    generated = json.loads(capsys.readouterr().out)
    committed = json.loads((Path(__file__).parents[2] / "docs" / "status-schema.json").read_text())
    assert generated == committed, "regenerate: python -m rankfed status --schema > docs/status-schema.json"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_status_watch_reconnects_until_the_coordinator_is_back(tmp_path, tiny_manifest):
    from tests.coordinator.harness import CoordinatorThread, make_config

    port = _free_port()
    watcher = subprocess.Popen(
        [sys.executable, "-m", "rankfed", "status", "--address", f"127.0.0.1:{port}", "--watch", "--json",
         "--timeout", "2", "--reconnect-for", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    time.sleep(2.0)  # nothing listens yet: the watch keeps trying
    assert watcher.poll() is None
    server = CoordinatorThread(make_config(tmp_path / "data", **{
        "server.address": f"127.0.0.1:{port}", "federation.rounds": 1, "federation.min_clients": 1,
        "federation.straggler_grace_seconds": 0.0,
    }))
    try:
        client = EdgeTestClient(server.address, "solo", "cpu")
        client.join(tiny_manifest.weights_sha256)
        task = client.wait_train()
        client.download(task.round)
        client.upload(task.round, random_adapter(tiny_manifest, task.assignment.lora.rank, 8.0, 0))
        out, err = watcher.communicate(timeout=60)
        client.close()
    finally:
        server.stop()
    assert watcher.returncode == 0, err
    assert "reconnecting" in err
    assert json.loads(out.splitlines()[-1])["done"] is True


def test_status_into_a_closed_pipe_exits_cleanly(tmp_path):
    from tests.coordinator.harness import CoordinatorThread, make_config

    server = CoordinatorThread(make_config(tmp_path / "data"))
    try:
        status = subprocess.Popen([sys.executable, "-m", "rankfed", "status", "--address", server.address, "--json"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        status.stdout.close()  # the reader is gone before the first byte, like `| head -c 0`
        _, err = status.communicate(timeout=30)
    finally:
        server.stop()
    assert status.returncode == 0 and b"Traceback" not in err, err


def test_status_refuses_bad_flag_values(capsys):
    import pytest

    for flags in (["--history", "-1"], ["--timeout", "0"], ["--history", "many"]):
        with pytest.raises(SystemExit) as info:
            main(["status", *flags])
        assert info.value.code == 2
    assert "must be 0 or more" in capsys.readouterr().err
