"""`rankfed status`: what a running coordinator is doing, as a table, JSON, or a live view."""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

from rankfed.protocol import ClientInfo, FederationStatus, RoundPhase
from rankfed.protocol.limits import DEVICE_NAME


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("status", help="show the round status of a running coordinator")
    parser.add_argument("--address", default="127.0.0.1:50051", help="coordinator host:port")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--watch", action="store_true", help="follow status changes until the federation is done")
    parser.add_argument("--history", type=_count, default=0, help="past rounds to show (0: the newest page of 100)")
    parser.add_argument("--clients", action="store_true", help="list the registered clients instead")
    parser.add_argument("--admin-token", default="",
                        help="operator token (default: $RANKFED_ADMIN_TOKEN, else DATA_DIR/admin-token)")
    parser.add_argument("--data-dir", default="rankfed-data",
                        help="the coordinator's data directory on this host: its generated operator token "
                             "(DATA_DIR/admin-token) is used when no --admin-token is given")
    parser.add_argument("--timeout", type=_seconds, default=10.0, help="seconds to wait for the coordinator")
    parser.add_argument("--reconnect-for", type=_seconds, default=300.0, metavar="SECONDS",
                        help="with --watch: keep reconnecting this long while the coordinator is unreachable "
                             "(a restart), then give up")
    parser.add_argument("--schema", action="store_true",
                        help="print the JSON Schema of --json's output (docs/status-schema.json) and exit")
    parser.add_argument("--tls-ca", help="CA PEM that signed the coordinator's certificate (turns TLS on)")
    parser.add_argument("--tls-cert", help="operator certificate PEM, for mutual TLS")
    parser.add_argument("--tls-key", help="private key PEM of --tls-cert")
    parser.add_argument("--tls-server-name", default="", help="name to verify in the coordinator's certificate")
    parser.set_defaults(func=_run)


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def _run(args: argparse.Namespace) -> int:
    if args.schema:
        print(json.dumps(status_schema(), indent=2, sort_keys=True))
        return 0
    try:
        return _query(args)
    except BrokenPipeError:
        # `rankfed status --json | head`: the reader left; that is not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _query(args: argparse.Namespace) -> int:
    from rankfed.coordinator.admin_client import AdminError, client_from_args

    admin = client_from_args(args, "rankfed status")
    if admin is None:
        return 2
    with admin:
        try:
            if args.clients:
                clients = admin.clients()
                _emit(args, {"clients": [to_json(c) for c in clients]}, lambda: format_clients(clients))
                return 0
            if not args.watch:
                status = admin.status(args.history)
                _emit(args, to_json(status), lambda: format_status(status))
                return 0
            return _watch(admin, args)
        except AdminError as exc:
            print(f"rankfed status: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130


def _watch(admin: Any, args: argparse.Namespace) -> int:
    """Follow the status until the federation is done, reconnecting across coordinator
    restarts for up to --reconnect-for seconds of unreachability."""
    from rankfed.coordinator.admin_client import AdminError

    lost_since: float | None = None
    delay = 0.5
    while True:
        try:
            for status in admin.watch(args.history):
                lost_since, delay = None, 0.5
                if not args.json and sys.stdout.isatty():
                    sys.stdout.write("\x1b[2J\x1b[H")
                _emit(args, to_json(status), lambda: format_status(status))
                sys.stdout.flush()
                if status.done:
                    return 0
            return 0
        except AdminError as exc:
            if exc.code not in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
                raise
            now = time.monotonic()
            lost_since = now if lost_since is None else lost_since
            if now - lost_since > args.reconnect_for:
                raise
            print(f"rankfed status: coordinator unreachable, reconnecting ({exc.code})", file=sys.stderr)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def status_schema() -> dict[str, Any]:
    """The JSON Schema of `rankfed status --json` (and of each line of --watch --json), and
    of `--clients --json`: derived from the protocol dataclasses, so it cannot drift."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "rankfed status --json",
        "oneOf": [
            _schema_of(FederationStatus),
            {"type": "object", "required": ["clients"], "additionalProperties": False,
             "properties": {"clients": {"type": "array", "items": _schema_of(ClientInfo)}}},
        ],
    }


def _schema_of(tp: Any) -> dict[str, Any]:
    import types
    import typing

    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        fields = dataclasses.fields(tp)
        return {"type": "object", "additionalProperties": False, "required": [f.name for f in fields],
                "properties": {f.name: _schema_of(hints[f.name]) for f in fields}}
    if origin in (typing.Union, types.UnionType):
        return {"anyOf": [_schema_of(arg) for arg in typing.get_args(tp)]}
    if tp is type(None):
        return {"type": "null"}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return {"enum": [m.value for m in tp]}
    if origin is tuple:
        return {"type": "array", "items": _schema_of(typing.get_args(tp)[0])}
    if origin is dict:
        return {"type": "object", "additionalProperties": _schema_of(typing.get_args(tp)[1])}
    return {bool: {"type": "boolean"}, int: {"type": "integer"}, float: {"type": "number"},
            str: {"type": "string"}}[tp]


def to_json(value: Any) -> Any:
    """A protocol dataclass as JSON-ready data: every field present, numbers as numbers,
    enums as their values (they are StrEnums), unset times as 0."""
    return dataclasses.asdict(value)


def _emit(args: argparse.Namespace, as_dict: Any, as_text: Callable[[], str]) -> None:
    if args.json:
        print(json.dumps(as_dict, sort_keys=True) if args.watch else json.dumps(as_dict, indent=2, sort_keys=True))
    else:
        print(as_text())


def _table(headers: list[str], rows: Iterable[list[Any]]) -> str:
    cells = [list(map(str, r)) for r in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _safe(text: str) -> str:
    """A device-supplied name as it may be printed to a terminal: names registered before
    names were restricted (or from a newer server) are escaped, never printed raw."""
    return text if DEVICE_NAME.fullmatch(text) else ascii(text)


def _when(unix_s: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(unix_s)) if unix_s else "-"


def format_status(status: FederationStatus) -> str:
    out = [
        f"federation {status.federation_id}  model {status.base_model.id}  "
        f"clients online {status.clients_online}  rounds {status.total_rounds}"
        + ("  DONE" if status.done else "")
    ]
    cur = status.current
    if cur is not None:
        deadline = _when(cur.deadline)
        remaining = cur.deadline - time.time() if cur.deadline else 0
        if cur.phase is RoundPhase.TRAINING and remaining > 0:
            deadline += f" (in {remaining:.0f} s)"
        out.append(
            f"\nround {cur.round}/{status.total_rounds}  {cur.phase.value.replace('_', ' ')}  method {cur.method}  "
            f"min_clients {cur.min_clients}  deadline {deadline}"
        )
        if cur.failure_reason:
            out.append(f"failed: {cur.failure_reason}")
        out.append(_table(
            ["client", "device", "class", "state", "rank", "down", "up", "examples", "loss", "accuracy"],
            [
                [p.client_id, _safe(p.device_name), p.device_class.value if p.device_class else "?", p.state.value, p.rank,
                 _bytes(p.bytes_down), _bytes(p.bytes_up), p.num_examples or "-",
                 f"{p.metrics.loss_last:.4f}" if p.metrics and p.metrics.steps else "-",
                 f"{p.metrics.eval['accuracy']:.3f}" if p.metrics and "accuracy" in p.metrics.eval else "-"]
                for p in cur.participants
            ],
        ))
    if status.history:
        out.append("\nhistory")
        out.append(_table(
            ["round", "phase", "method", "updates", "up", "down", "loss", "accuracy", "agg s", "finished"],
            [
                [r.round, r.phase.value, r.method, f"{r.metrics.get('updates', 0):.0f}/{r.metrics.get('participants', 0):.0f}",
                 _bytes(int(r.metrics.get("bytes_up", 0))), _bytes(int(r.metrics.get("bytes_down", 0))),
                 f"{r.metrics['loss_last']:.4f}" if "loss_last" in r.metrics else "-",
                 f"{r.metrics['eval_accuracy']:.3f}" if "eval_accuracy" in r.metrics else "-",
                 f"{r.metrics['aggregation_seconds']:.3f}" if "aggregation_seconds" in r.metrics else "-",
                 _when(r.finished_at)]
                for r in status.history
            ],
        ))
    return "\n".join(out)


def format_clients(clients: list[ClientInfo]) -> str:
    return _table(
        ["client", "device", "class", "online", "rank", "tier", "GFLOP/s", "memory", "rounds", "missed"],
        [
            [c.client_id, _safe(c.device_name), c.capability.device_class.value, "yes" if c.online else "no",
             c.rank, c.tier, f"{c.capability.compute_gflops:.0f}", _bytes(c.capability.memory_total_bytes),
             c.rounds_completed, c.deadlines_missed]
            for c in clients
        ],
    )
