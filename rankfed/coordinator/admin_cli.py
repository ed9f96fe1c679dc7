"""`rankfed admin ACTION`: operator controls of a running coordinator. Each needs operator
credentials (the admin token, an operator certificate, or loopback when no token is set)
and is logged by the coordinator with who asked.

    rankfed admin pause --reason "maintenance"     no new round starts; devices wait
    rankfed admin resume
    rankfed admin close-round                      aggregate the open round now
    rankfed admin stop                             close the open round, start no other
    rankfed admin remove-device phone-7 [--ban]    revoke its tokens; --ban: it may not rejoin
    rankfed admin allow-device phone-7             lift a ban
    rankfed admin new-run                          a new federation; the old one is archived
"""

from __future__ import annotations

import argparse
import sys

ACTIONS = ("pause", "resume", "close-round", "stop", "remove-device", "allow-device", "new-run")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("admin", help="operator controls: pause, resume, close-round, stop, remove-device",
                            description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=ACTIONS)
    parser.add_argument("device", nargs="?", help="device name (remove-device, allow-device)")
    parser.add_argument("--ban", action="store_true", help="remove-device: and refuse its future joins")
    parser.add_argument("--reason", default="", help="why, for the coordinator's log")
    parser.add_argument("--address", default="127.0.0.1:50051", help="coordinator host:port")
    parser.add_argument("--admin-token", default="", help="operator token (default: $RANKFED_ADMIN_TOKEN)")
    parser.add_argument("--data-dir", default="rankfed-data",
                        help="the coordinator's data directory on this host: its generated operator token "
                             "(DATA_DIR/admin-token) is used when no --admin-token is given")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the coordinator")
    parser.add_argument("--tls-ca", help="CA PEM that signed the coordinator's certificate (turns TLS on)")
    parser.add_argument("--tls-cert", help="operator certificate PEM, for mutual TLS")
    parser.add_argument("--tls-key", help="private key PEM of --tls-cert")
    parser.add_argument("--tls-server-name", default="", help="name to verify in the coordinator's certificate")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from rankfed.coordinator.admin_client import AdminError, client_from_args

    needs_device = args.action in ("remove-device", "allow-device")
    if needs_device != bool(args.device):
        print(f"rankfed admin {args.action}: " + ("name the device" if needs_device else "takes no device name"),
              file=sys.stderr)
        return 2
    admin = client_from_args(args, "rankfed admin")
    if admin is None:
        return 2
    with admin:
        try:
            message = {
                "pause": lambda: admin.pause(args.reason),
                "resume": lambda: admin.resume(args.reason),
                "close-round": lambda: admin.close_round(args.reason),
                "stop": lambda: admin.stop(args.reason),
                "remove-device": lambda: admin.remove_device(args.device, ban=args.ban, reason=args.reason),
                "allow-device": lambda: admin.allow_device(args.device),
                "new-run": lambda: admin.new_run(args.reason),
            }[args.action]()
        except AdminError as exc:
            print(f"rankfed admin {args.action}: {exc}", file=sys.stderr)
            return 1
    print(message)
    return 0
