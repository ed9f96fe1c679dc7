"""`rankfed simulate FLEET.toml`: a fleet of virtual devices over the real coordinator and
edge code (`driver.py`). One JSON line per round (``--json`` on stdout, always in
OUT/rounds.jsonl), a summary in OUT/summary.json, a progress line per round on stderr.
A fleet that cannot run (unknown keys, impossible fractions, a missing dataset, a Ray
address that does not answer) is one error line and exit status 2, before anything starts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "simulate",
        help="a fleet of virtual devices (TOML) over the real coordinator and edge code; local or Ray",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("fleet", nargs="?", type=Path, help="fleet file (TOML; see examples/fleets/); none: the defaults")
    p.add_argument("--out", type=Path, default=Path("rankfed-sim"), help="output directory (default ./rankfed-sim)")
    p.add_argument("--devices", type=int, dest="devices.count", help="number of virtual devices")
    p.add_argument("--rounds", type=int, help="rounds")
    p.add_argument("--method", help="aggregation rule")
    p.add_argument("--seed", type=int, help="seed of data, selection, dropout, latency and training")
    p.add_argument("--participation", type=float, dest="federation.participation",
                   help="devices per round: a fraction in (0, 1) or a count")
    p.add_argument("--backend", choices=("local", "ray"), dest="backend.kind")
    p.add_argument("--mode", choices=("threads", "processes"), dest="backend.mode", help="local backend: threads or processes")
    p.add_argument("--workers", type=int, dest="backend.workers", help="compute slots (threads, processes or Ray actors)")
    p.add_argument("--ray-address", dest="backend.ray_address", help="an existing Ray cluster (host:port or auto)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any fleet key, dotted (e.g. --set data.label_noise=0.2); repeatable")
    p.add_argument("--cache-dir", type=Path, help="keep frozen-layer states here across runs (default OUT/prefix-cache)")
    p.add_argument("--json", action="store_true", help="also print each round's JSON line on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=_run)


_FLAGS = ("devices.count", "rounds", "method", "seed", "federation.participation", "backend.kind",
          "backend.mode", "backend.workers", "backend.ray_address")


def _run(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    from .driver import simulate
    from .fleet import FleetError, load_fleet

    overrides = {key: getattr(args, key) for key in _FLAGS}
    try:
        fleet = load_fleet(args.fleet, overrides, args.set)
        on_round = (lambda line: print(json.dumps(line), flush=True)) if args.json else None
        result = simulate(fleet, args.out, progress=None if args.quiet else sys.stderr, on_round=on_round,
                          cache_dir=args.cache_dir)
    except FleetError as exc:
        print(f"rankfed simulate: error: {exc}", file=sys.stderr)
        return 2
    final = result.summary.get("final") or {}
    test = (final.get("test") or {}).get("accuracy")
    print(f"rankfed simulate: {result.summary['rounds_done']}/{result.summary['rounds']} rounds done in "
          f"{result.summary['seconds']:.1f} s"
          + (f"; final test accuracy {test:.4f}" if test is not None else "")
          + f"; summary in {args.out / 'summary.json'}", file=sys.stderr)
    return 0
