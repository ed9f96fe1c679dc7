"""A real link, no relay: the coordinator and a device in two network namespaces joined by
a veth pair, the device's side rate-limited by a tc tbf qdisc; in the middle of the
device's upload its interface goes down (`ip link set ... down`) for longer than the
coordinator's upload idle timeout, then comes back up. The coordinator keeps the broken
stream's bytes; the device resumes from them, and the update counts once.

Needs root and iproute2 (`ip netns`, veth, `tc ... tbf`): skipped with the reason
otherwise. CI runs as root and scripts/test.sh installs iproute2 when it is missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.edge_client.test_bad_link import WEIGHTS, write_manifest

ROOT = Path(__file__).resolve().parents[2]
COORDINATOR_IP, DEVICE_IP = "10.77.0.1", "10.77.0.2"
RATE = "4mbit"  # the device's uplink: 2 MiB take ~4 s
DOWN_AFTER_S, DOWN_FOR_S = 1.0, 4.0
IDLE_TIMEOUT_S = 1.5  # server.upload_idle_timeout_seconds: shorter than the outage

DEVICE = textwrap.dedent("""
    import hashlib, json, sys, time
    sys.path.insert(0, sys.argv[3])
    from rankfed.aggregation import encode_adapter
    from rankfed.edge_client.transport import EdgeTransport, RetryPolicy
    from rankfed.protocol import Capability, DeviceClass, JoinRequest, TrainTask, UploadHeader
    from rankfed.protocol.manifest import load_manifest
    from tests.coordinator.harness import random_adapter

    address, manifest_path = sys.argv[1], sys.argv[2]
    retry = RetryPolicy(initial_backoff_s=0.2, max_backoff_s=1.0, max_elapsed_s=120.0)
    with EdgeTransport(address, retry=retry, seed=0) as t:
        t.join(JoinRequest(device_name="netns-dev", base_model_sha256=sys.argv[4], num_examples=10,
                           capability=Capability(device_class=DeviceClass.CPU, memory_total_bytes=8 * 10**9,
                                                 cpu_cores=4, compute_gflops=20.0)))
        while not isinstance(task := t.get_task(2.0), TrainTask):
            pass
        t.download(task.round)
        lora = task.assignment.lora
        data = encode_adapter(random_adapter(load_manifest(manifest_path), lora.rank, lora.alpha, seed=7))
        header = UploadHeader(round=task.round, rank=lora.rank, num_examples=10, total_bytes=len(data),
                              sha256=hashlib.sha256(data).hexdigest())
        print("UPLOADING", len(data), flush=True)
        started = time.monotonic()
        receipt = t.upload(header, data)
        s = t.last_upload
        print(json.dumps({"sha256": receipt.sha256, "expected": header.sha256, "bytes": len(data),
                          "attempts": s.attempts, "resumed_from": s.resumed_from,
                          "payload_bytes": s.payload_bytes, "seconds": time.monotonic() - started}), flush=True)
""")


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root: network namespaces, veth pairs and tc qdiscs"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"needs iproute2: no `{tool}` command (apt-get install iproute2)"
    return None


def _sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True, timeout=30)


@pytest.fixture
def veth():
    """Two namespaces (coordinator, device) joined by a veth pair; the device's end limited by tbf."""
    reason = _unavailable()
    if reason:
        pytest.skip(reason)
    tag = os.getpid() % 100_000
    ns_coord, ns_dev = f"rfcoord{tag}", f"rfdev{tag}"
    if_coord, if_dev = f"rfc{tag}", f"rfd{tag}"
    try:
        _sh("ip", "netns", "add", ns_coord)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot create a network namespace here: {exc.stderr.strip()}")
    try:
        _sh("ip", "netns", "add", ns_dev)
        _sh("ip", "link", "add", if_coord, "type", "veth", "peer", "name", if_dev)
        _sh("ip", "link", "set", if_coord, "netns", ns_coord)
        _sh("ip", "link", "set", if_dev, "netns", ns_dev)
        for ns, dev, ip in ((ns_coord, if_coord, COORDINATOR_IP), (ns_dev, if_dev, DEVICE_IP)):
            _sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            _sh("ip", "-n", ns, "link", "set", dev, "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
        _sh("tc", "-n", ns_dev, "qdisc", "add", "dev", if_dev, "root", "tbf", "rate", RATE, "burst", "16kb",
            "latency", "100ms")
        yield ns_coord, ns_dev, if_dev
    finally:
        for ns in (ns_dev, ns_coord):  # deleting a namespace deletes its end of the veth pair, and the pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def _config(tmp_path: Path, manifest: Path) -> Path:
    path = tmp_path / "coordinator.toml"
    path.write_text(f"""
[server]
insecure = true  # plaintext on a veth address: a test network of its own
max_chunk_bytes = 65536
long_poll_seconds = 2.0
upload_idle_timeout_seconds = {IDLE_TIMEOUT_S}
[model]
manifest = "{manifest}"
[federation]
rounds = 1
min_clients = 1
clients_per_round = 1
round_deadline_seconds = 300.0
straggler_grace_seconds = 0.0
heartbeat_interval_seconds = 30.0
heartbeat_timeout_seconds = 300.0
""")
    return path


def test_upload_resumes_after_the_link_goes_down_and_up(veth, tmp_path):
    ns_coord, ns_dev, if_dev = veth
    manifest = write_manifest(tmp_path / "manifest.json", modules=32)  # rank 4: 2 MiB
    data_dir, port_file, log_path = tmp_path / "data", tmp_path / "port", tmp_path / "coordinator.log"
    with open(log_path, "wb") as log:
        coordinator = subprocess.Popen(
            ["ip", "netns", "exec", ns_coord, sys.executable, "-m", "rankfed", "coordinator", "serve",
             "--config", str(_config(tmp_path, manifest)), "--data-dir", str(data_dir),
             "--address", f"{COORDINATOR_IP}:0", "--port-file", str(port_file)],
            stdout=log, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    device = None
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists():
            assert coordinator.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        address = f"{COORDINATOR_IP}:{port_file.read_text().strip()}"
        device = subprocess.Popen(
            ["ip", "netns", "exec", ns_dev, sys.executable, "-c", DEVICE, address, str(manifest), str(ROOT), WEIGHTS],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert device.stdout is not None
        line = device.stdout.readline()
        assert line.startswith("UPLOADING"), (line, device.stderr.read() if device.poll() is not None else "")
        time.sleep(DOWN_AFTER_S)
        _sh("ip", "-n", ns_dev, "link", "set", if_dev, "down")
        time.sleep(DOWN_FOR_S)
        _sh("ip", "-n", ns_dev, "link", "set", if_dev, "up")
        out, err = device.communicate(timeout=120)
        assert device.returncode == 0, err
        result = json.loads(out.strip().splitlines()[-1])
    finally:
        for proc in (device, coordinator):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)
    assert result["sha256"] == result["expected"]
    # The outage outlasted the coordinator's idle timeout: it ended the stream and kept its
    # bytes; the device learned it when the link came back, and sent only the rest.
    assert result["attempts"] >= 2 and result["resumed_from"] and result["resumed_from"][0] > 0, result
    assert result["payload_bytes"] < 2 * result["bytes"], result
    updates = list((data_dir / "blobs" / "updates").rglob("*.safetensors"))
    assert len(updates) == 1 and hashlib.sha256(updates[0].read_bytes()).hexdigest() == result["expected"]
    assert "broken upload kept for a resume" in log_path.read_text()
