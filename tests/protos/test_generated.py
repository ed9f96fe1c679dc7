"""The committed generated code matches protos/, and proto path, package and import path agree."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROTOS = sorted((ROOT / "protos" / "rankfed" / "v1").glob("*.proto"))


def test_generated_code_is_fresh():
    pytest.importorskip("grpc_tools", reason="grpcio-tools is a dev dependency: pip install -e '.[dev]'")
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("proto", PROTOS, ids=lambda p: p.name)
def test_paths_package_and_imports_agree(proto):
    module = importlib.import_module(f"rankfed.v1.{proto.stem}_pb2")
    assert module.DESCRIPTOR.package == "rankfed.v1"
    assert module.DESCRIPTOR.name == f"rankfed/v1/{proto.name}"
    for suffix in ("_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi"):
        assert (ROOT / "rankfed" / "v1" / f"{proto.stem}{suffix}").exists()


def test_services_have_the_agreed_methods():
    from rankfed.v1 import admin_pb2, edge_pb2

    edge = edge_pb2.DESCRIPTOR.services_by_name["EdgeService"]
    assert [m.name for m in edge.methods] == [
        "Join", "GetTask", "DownloadAdapter", "UploadUpdate", "UploadStatus", "Heartbeat", "Leave",
    ]
    assert edge.methods_by_name["DownloadAdapter"].server_streaming
    assert edge.methods_by_name["UploadUpdate"].client_streaming
    admin = admin_pb2.DESCRIPTOR.services_by_name["AdminService"]
    assert [m.name for m in admin.methods] == [
        "GetRoundStatus", "WatchRounds", "ListClients",
        "PauseFederation", "ResumeFederation", "CloseRound", "StopFederation", "RemoveDevice", "AllowDevice",
        "StartFederation",
    ]
    assert admin.methods_by_name["WatchRounds"].server_streaming
    from rankfed.v1 import evaluator_pb2

    evaluator = evaluator_pb2.DESCRIPTOR.services_by_name["EvaluatorService"]
    assert [m.name for m in evaluator.methods] == ["GetEvaluationTask", "DownloadEvaluationAdapter", "ReportScores"]
    assert evaluator.methods_by_name["DownloadEvaluationAdapter"].server_streaming
