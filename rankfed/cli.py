"""The `rankfed` command: one entry point, subcommands per role (like `flwr` or `nvflare`).

    rankfed coordinator serve   run the coordinator daemon
    rankfed status              show round status of a running coordinator
    rankfed admin ACTION        operator controls (pause, resume, close-round, stop, remove-device)
    rankfed edge ...            edge-device commands (probe, run, export, infer, manifest)
    rankfed demo                a real federation on localhost
    rankfed simulate FLEET      a fleet of virtual devices over the real code (local or Ray)

Each role registers its own subcommands; heavy imports (torch) happen only when an edge
command runs, so `rankfed status` works on a machine with the core install only.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# (command, module providing add_parser(subparsers)): modules are imported lazily.
_ROLES = (
    ("coordinator", "rankfed.coordinator.cli"),
    ("status", "rankfed.coordinator.status_cli"),
    ("admin", "rankfed.coordinator.admin_cli"),
    ("edge", "rankfed.edge_client.cli"),
    ("demo", "rankfed.demo.cli"),
    ("simulate", "rankfed.simulation.cli"),
)


def build_parser() -> argparse.ArgumentParser:
    from rankfed import __version__

    parser = argparse.ArgumentParser(prog="rankfed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"rankfed {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in _ROLES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and (exc.name == module_name or module_name.startswith(exc.name + ".")):
                continue  # role not built into this install
            raise
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
