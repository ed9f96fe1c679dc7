"""`rankfed demo`: a coordinator and several edge clients on localhost fine-tune
all-MiniLM-L6-v2 on BBC News at different LoRA ranks, then export the result to ONNX.

Imports nothing heavy at module level: `rankfed --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from rankfed.aggregation.registry import METHODS as _REGISTRY

METHODS = tuple(_REGISTRY)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="a real federation on localhost: coordinator + edge clients, BBC News, ONNX at the end",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--clients", type=int, default=4, help="edge clients (default 4: cuda, cpu, cpu, mobile profiles)")
    p.add_argument("--rounds", type=int, default=5, help="federated rounds (default 5)")
    p.add_argument("--local-steps", type=int, default=15, help="local training steps per round (default 15)")
    p.add_argument("--method", choices=METHODS, default="zero_pad", help="aggregation rule (default zero_pad: docs/results.md §3)")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label-skew alpha; smaller is more skewed (default 0.5)")
    p.add_argument("--max-length", type=int, default=64, help="tokens per article (default 64)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3, help="learning rate (default 2e-3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-limit", type=int, help="use at most this many training articles (default: all ~1,700)")
    p.add_argument("--test-limit", type=int, default=250, help="held-out articles scored each round (default 250)")
    p.add_argument("--profiles", default="cuda,cpu,cpu,mobile",
                   help="device classes cycled over the clients (cuda, cpu, mps, mobile)")
    p.add_argument("--out", type=Path, default=Path("rankfed-demo"), help="working directory (default ./rankfed-demo)")
    p.add_argument("--in-process", action="store_true",
                   help="simulate the clients in this process (rankfed.simulation) instead of gRPC processes")
    p.add_argument("--no-export", action="store_true", help="skip the ONNX export and predictions")
    p.add_argument("--tensorboard", metavar="DIR", type=Path,
                   help="the coordinator writes round and device metrics as TensorBoard event files here")
    p.add_argument("--mlflow", metavar="URI",
                   help="the coordinator logs round and device metrics to MLflow (a tracking URI or a directory)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from rankfed.datasets import DemoDataError

    from .run import DemoOptions, run_demo

    profiles = tuple(s.strip() for s in args.profiles.split(",") if s.strip())
    bad = [s for s in profiles if s not in ("cpu", "cuda", "mps", "mobile")]
    if bad or not profiles:
        print(f"rankfed demo: error: --profiles: unknown device class {bad or '(none)'}", file=sys.stderr)
        return 2
    if args.clients < 2:
        print("rankfed demo: error: --clients must be at least 2", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(1 if not args.in_process else (os.cpu_count() or 1))
    from transformers.utils import logging as hf_logging

    # transformers leaves it unannotated (unused-ignore: only strict checking flags the call).
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call, unused-ignore]
    opts = DemoOptions(
        clients=args.clients, rounds=args.rounds, local_steps=args.local_steps, method=args.method,
        alpha=args.alpha, max_length=args.max_length, batch_size=args.batch_size, learning_rate=args.lr,
        seed=args.seed, train_limit=args.train_limit, test_limit=args.test_limit, out=args.out,
        profiles=profiles, in_process=args.in_process, export=not args.no_export,
        tensorboard_dir=args.tensorboard.absolute() if args.tensorboard else None,
        mlflow_uri=args.mlflow or "",
    )
    try:
        run_demo(opts)
    except (DemoDataError, RuntimeError) as err:
        print(f"rankfed demo: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
