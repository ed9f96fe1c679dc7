"""A real coordinator process and three real `rankfed edge run` processes over loopback.

Ranks 2, 4 and 8 come from the coordinator's rank policy (tiers on the declared device
class), not from the clients. Two rounds of three local steps on the tiny BERT.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

from rankfed.aggregation import decode_adapter
from rankfed.edge_client.manifest import build_manifest, write_manifest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("rankfed.coordinator.server") is None,
    reason="the coordinator daemon (rankfed.coordinator.server) is not built into this checkout",
)

CONFIG = """
[server]
max_chunk_bytes = 65536
long_poll_seconds = 2.0

[model]
manifest = "{manifest}"

[lora]
alpha_rule = "constant_scaling"
scaling = 2.0
max_rank = 8

[federation]
rounds = 2
method = "rbla"
min_clients = 3
wait_for_clients_seconds = 120.0
round_deadline_seconds = 180.0
straggler_grace_seconds = 60.0
local_steps = 3
learning_rate = 0.01
batch_size = 8
heartbeat_interval_seconds = 1.0
heartbeat_timeout_seconds = 60.0

[rank_policy]
default_rank = 2

[[rank_policy.tiers]]
name = "big"
device_class = "cuda"
rank = 8

[[rank_policy.tiers]]
name = "cpu"
device_class = "cpu"
rank = 4

[[rank_policy.tiers]]
name = "mobile"
device_class = "mobile"
rank = 2
"""

CLIENTS = {"phone": ("mobile", 2), "laptop": ("cpu", 4), "gpu-box": ("cuda", 8)}


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def test_three_clients_at_ranks_2_4_8_finish_a_federation(bert_dir, cls_data, tmp_path):
    manifest = tmp_path / "manifest.json"
    write_manifest(build_manifest(bert_dir, task="sequence-classification", num_labels=3,
                                  target_modules=("query", "value")), manifest)
    config = tmp_path / "coordinator.toml"
    config.write_text(CONFIG.format(manifest=manifest))
    port_file = tmp_path / "port"
    log = open(tmp_path / "coordinator.log", "wb")
    coordinator = subprocess.Popen(
        [sys.executable, "-m", "rankfed", "coordinator", "serve", "--config", str(config),
         "--data-dir", str(tmp_path / "state"), "--address", "127.0.0.1:0", "--port-file", str(port_file),
         "--exit-when-done"],
        stdout=log, stderr=log, env=_env(),
    )
    clients: dict[str, subprocess.Popen] = {}
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists():
            assert coordinator.poll() is None, (tmp_path / "coordinator.log").read_text()
            assert time.monotonic() < deadline, "coordinator did not start"
            time.sleep(0.05)
        address = f"127.0.0.1:{port_file.read_text().strip()}"
        for name, (device_class, _) in CLIENTS.items():
            clients[name] = subprocess.Popen(
                [sys.executable, "-m", "rankfed", "edge", "run", "--coordinator", address,
                 "--model", str(bert_dir), "--data", str(cls_data), "--device-name", name,
                 "--device-class", device_class, "--threads", "1", "--max-wait", "2",
                 "--out", str(tmp_path / f"out-{name}"), "--json"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
            )
        outputs = {name: proc.communicate(timeout=200) for name, proc in clients.items()}
    finally:
        for proc in [*clients.values(), coordinator]:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        log.close()
    for name, (device_class, rank) in CLIENTS.items():
        stdout, stderr = outputs[name]
        assert clients[name].returncode == 0, f"{name}: {stderr[-3000:]}"
        events = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
        joined = next(e for e in events if e["event"] == "joined")
        assert joined["rank"] == rank, (name, joined)
        uploads = [e for e in events if e["event"] == "uploaded"]
        assert [u["round"] for u in uploads] == [1, 2], (name, events)
        assert all(u["rank"] == rank and u["steps"] == 3 for u in uploads)
        done = next(e for e in events if e["event"] == "done")
        assert done["final_round"] == 2
        final = tmp_path / f"out-{name}" / "adapter_model.safetensors"
        adapter = decode_adapter(final.read_bytes())
        # Every device exports the global adapter itself, whatever rank it trained at.
        assert adapter.max_rank >= 8
        assert final.read_bytes() == (tmp_path / "out-phone" / "adapter_model.safetensors").read_bytes()
        assert any(abs(m.b).sum() > 0 for m in adapter.modules.values())  # aggregated, trained
