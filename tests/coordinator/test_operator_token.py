"""With no admin token configured, loopback callers are NOT operators unless the operator
opts in (server.loopback_operators): the coordinator generates a token into DATA_DIR/admin-token
(owner-only) at its first start, keeps it across restarts, and the local tools read it."""

from __future__ import annotations

import stat

import pytest

from rankfed.cli import main
from rankfed.coordinator.admin_client import AdminClient, AdminError, resolve_admin_token


def test_a_token_is_generated_and_loopback_alone_is_refused(start, capsys):
    server = start(**{"server.loopback_operators": False})
    data_dir = server.config.server.data_dir
    token_file = data_dir / "admin-token"
    assert token_file.is_file() and stat.S_IMODE(token_file.stat().st_mode) == 0o600
    with AdminClient(server.address) as anonymous, pytest.raises(AdminError) as err:
        anonymous.status()
    assert err.value.code == "UNAUTHENTICATED"
    with AdminClient(server.address, admin_token=resolve_admin_token("", data_dir)) as operator:
        assert operator.status().federation_id
    assert main(["status", "--address", server.address, "--data-dir", str(data_dir)]) == 0
    assert main(["status", "--address", server.address, "--data-dir", str(data_dir / "elsewhere")]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err


def test_the_token_survives_a_restart(start, tmp_path):
    from tests.coordinator.harness import CoordinatorThread, make_config

    first = CoordinatorThread(make_config(tmp_path / "data", **{"server.loopback_operators": False}))
    token = (first.config.server.data_dir / "admin-token").read_text()
    first.stop()
    second = start(**{"server.loopback_operators": False})  # the same data directory
    assert (second.config.server.data_dir / "admin-token").read_text() == token


def test_loopback_operators_is_an_explicit_opt_in(start):
    server = start(**{"server.loopback_operators": True})
    assert not (server.config.server.data_dir / "admin-token").exists()
    with AdminClient(server.address) as admin:
        assert admin.status().federation_id


def test_an_unreadable_token_file_is_reported_not_skipped(tmp_path, capsys):
    (tmp_path / "admin-token").mkdir()  # reading it fails with an OSError other than "not found"
    assert main(["status", "--address", "127.0.0.1:1", "--data-dir", str(tmp_path)]) == 2
    assert "cannot read the operator token" in capsys.readouterr().err
