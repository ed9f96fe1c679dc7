"""The house's never-rules, read from every module's imports: aggregation imports nothing
above it; protocol sits below both ends; the coordinator and the edge client never import
each other; product code never imports the simulation, the demo or the benchmarks; the
coordinator's core never imports grpc (only servicers, the admin client and the server do)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "rankfed"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                names.add(".".join([*base, node.module] if node.module else base))
            elif node.module:
                names.add(node.module)
    return names


def _modules(sub: str) -> list[Path]:
    return sorted((ROOT / sub).rglob("*.py")) if (ROOT / sub).is_dir() else [ROOT / f"{sub}.py"]


RULES = [
    ("aggregation", ("rankfed.protocol", "rankfed.coordinator", "rankfed.edge_client", "rankfed.simulation",
                     "rankfed.demo", "rankfed.datasets")),
    ("protocol", ("rankfed.coordinator", "rankfed.edge_client", "rankfed.simulation", "rankfed.demo")),
    ("coordinator", ("rankfed.edge_client", "rankfed.simulation", "rankfed.demo", "bench")),
    ("edge_client", ("rankfed.coordinator", "rankfed.simulation", "rankfed.demo", "bench")),
    ("datasets", ("rankfed.coordinator", "rankfed.edge_client", "rankfed.simulation", "rankfed.demo")),
]


@pytest.mark.parametrize(("package", "forbidden"), RULES, ids=[r[0] for r in RULES])
def test_never_rules(package: str, forbidden: tuple[str, ...]) -> None:
    offenders = [
        f"{path.relative_to(ROOT.parent)} imports {name}"
        for path in _modules(package)
        for name in sorted(_imports(path))
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    ]
    assert not offenders, "\n".join(offenders)


# The coordinator modules that speak gRPC or parse its messages (upload_wire: the zero-copy chunk
# deserializer of UploadUpdate): the edges of the house. Everything else is core.
GRPC_EDGES = {"servicer_edge.py", "servicer_admin.py", "servicer_evaluator.py", "servicer_errors.py", "server.py",
              "admin_client.py", "status_cli.py", "admin_cli.py", "http.py", "upload_wire.py"}


def test_the_coordinator_core_never_imports_grpc() -> None:
    offenders = [
        f"{path.name} imports {name}"
        for path in _modules("coordinator")
        if path.name not in GRPC_EDGES and path.parent.name != "dashboard"
        for name in sorted(_imports(path))
        if name == "grpc" or name.startswith(("grpc.", "grpc_", "rankfed.v1"))
    ]
    assert not offenders, "\n".join(offenders)
