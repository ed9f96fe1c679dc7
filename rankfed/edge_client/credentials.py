"""The device key a coordinator issues at a device name's first enrollment: kept on the
device and sent with every later Join, so nobody else can join under the name (without
mutual TLS, where the certificate proves it). One owner-only file per (coordinator, name)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from rankfed.protocol.files import write_atomic


def default_key_dir() -> Path:
    """$RANKFED_STATE_DIR/device-keys, else the XDG state directory."""
    base = os.environ.get("RANKFED_STATE_DIR") or os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / ("device-keys" if os.environ.get("RANKFED_STATE_DIR") else "rankfed/device-keys")


class DeviceKeys:
    """Keys by (coordinator address, device name); in memory only when `directory` is None."""

    def __init__(self, directory: Path | None = None) -> None:
        self._dir = directory
        self._memory: dict[tuple[str, str], str] = {}

    def _path(self, address: str, name: str) -> Path:
        assert self._dir is not None
        # A digest keeps arbitrary addresses and names out of the file system's way.
        return self._dir / (hashlib.sha256(f"{address}\0{name}".encode()).hexdigest()[:32] + ".key")

    def get(self, address: str, name: str) -> str:
        if self._dir is None:
            return self._memory.get((address, name), "")
        try:
            return self._path(address, name).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return ""

    def put(self, address: str, name: str, key: str) -> None:
        if self._dir is None:
            self._memory[(address, name)] = key
            return
        self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomic(self._path(address, name), (key + "\n").encode("utf-8"), mode=0o600)
