from __future__ import annotations

import pytest

from tests.coordinator.harness import (
    CoordinatorThread,
    EdgeTestClient,
    make_config,
    manifest,
)


@pytest.fixture
def tiny_manifest():
    return manifest()


@pytest.fixture
def start(tmp_path):
    """start(**overrides) -> a running in-process coordinator; stopped after the test."""
    running: list[CoordinatorThread] = []

    def _start(**overrides) -> CoordinatorThread:
        server = CoordinatorThread(make_config(tmp_path / "data", **overrides))
        running.append(server)
        return server

    yield _start
    for server in running:
        server.stop()


@pytest.fixture
def clients():
    """clients(address, names...) -> joined EdgeTestClients; closed after the test."""
    made: list[EdgeTestClient] = []

    def _make(address: str, *specs, weights_sha256: str | None = None):
        out = []
        for spec in specs:
            name, device = spec if isinstance(spec, tuple) else (spec, "cpu")
            client = EdgeTestClient(address, name, device)
            client.join(weights_sha256 or manifest().weights_sha256)
            made.append(client)
            out.append(client)
        return out

    yield _make
    for client in made:
        client.close()
