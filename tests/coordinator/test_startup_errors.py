"""Start-up failures of `rankfed coordinator serve` as an operator sees them: one line on
stderr naming the setting and the fix, no traceback, exit status 2 (configuration: systemd's
RestartPreventExitStatus=2 keeps it from restarting into the same error)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.coordinator.harness import MANIFEST, CoordinatorThread, make_config


def serve(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rankfed", "coordinator", "serve", "--log-format", "text", *args],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("rankfed:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = serve("--address", f"127.0.0.1:{port}", "--data-dir", str(tmp_path / "d"),
                       "--manifest", str(MANIFEST))
    assert result.returncode == 2
    line = one_line(result)
    assert "server.address" in line and f"port {port}" in line


def test_data_dir_of_another_model(tmp_path: Path) -> None:
    data = tmp_path / "state"
    first = CoordinatorThread(make_config(data))  # the tests' tiny model
    first.stop()
    result = serve("--address", "127.0.0.1:0", "--data-dir", str(data))  # the bundled demo model
    assert result.returncode == 2
    line = one_line(result)
    assert "holds a federation of" in line and "all-MiniLM-L6-v2" in line and "--data-dir" in line


def test_data_dir_that_cannot_be_created(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = serve("--address", "127.0.0.1:0", "--data-dir", str(blocker / "state"), "--manifest", str(MANIFEST))
    assert result.returncode == 2
    line = one_line(result)
    assert "server.data_dir" in line and "--data-dir" in line


def test_missing_manifest_names_the_file(tmp_path: Path) -> None:
    result = serve("--address", "127.0.0.1:0", "--data-dir", str(tmp_path / "d"),
                   "--manifest", str(tmp_path / "nope.json"))
    assert result.returncode == 2
    assert "nope.json" in one_line(result)
