"""`rankfed coordinator serve`: the daemon's command line."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import sys
from pathlib import Path

from rankfed import logs


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("coordinator", help="run the coordinator daemon")
    commands = parser.add_subparsers(dest="coordinator_command", metavar="COMMAND", required=True)
    serve = commands.add_parser(
        "serve",
        help="serve the federation (embedded defaults when no --config is given)",
        description="Serve the edge and operator gRPC services until SIGTERM. Flags override the config file.",
    )
    serve.add_argument("--config", type=Path, help="TOML config (see deploy/coordinator.example.toml)")
    serve.add_argument("--address", help="host:port to listen on, e.g. 127.0.0.1:50051 (port 0: any free port)")
    serve.add_argument("--data-dir", type=Path, help="state database and blob directory")
    serve.add_argument("--manifest", type=Path, help="model manifest JSON (overrides model.manifest; default: the bundled all-MiniLM-L6-v2 demo manifest)")
    serve.add_argument("--insecure", action="store_true", default=None,
                       help="serve plaintext on a non-loopback address (server.insecure); prefer TLS")
    serve.add_argument("--tls-cert", type=Path, help="server certificate PEM (server.tls_cert_file)")
    serve.add_argument("--tls-key", type=Path, help="server private key PEM (server.tls_key_file)")
    serve.add_argument("--tls-client-ca", type=Path,
                       help="CA PEM for client certificates: mutual TLS (server.tls_client_ca_file)")
    serve.add_argument("--metrics-address", help="host:port for Prometheus /metrics and the live dashboard at /dashboard (server.metrics_address)")
    serve.add_argument("--tensorboard", metavar="DIR",
                       help="write round and device metrics as TensorBoard event files here (tracking.tensorboard_dir)")
    serve.add_argument("--mlflow", metavar="URI",
                       help="log round and device metrics to MLflow: a tracking URI or a directory (tracking.mlflow_uri)")
    serve.add_argument("--port-file", type=Path, help="write the bound port here once serving")
    serve.add_argument("--exit-when-done", action="store_true", help="exit after the last round instead of idling")
    serve.add_argument("--log-format", choices=("json", "text"), default="json")
    serve.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    serve.add_argument("--print-config", action="store_true", help="print the effective config as JSON and exit")
    serve.set_defaults(func=_serve)
    export = commands.add_parser(
        "export",
        help="write one global adapter (a round, the last or the best) as a PEFT-loadable directory",
        description="Copy a round's global adapter out of a coordinator's data directory: "
                    "adapter_model.safetensors (its metadata names the task, labels and target modules), "
                    "adapter_config.json and rankfed-export.json. Safe beside a running coordinator.",
    )
    export.add_argument("--data-dir", type=Path, default=Path("rankfed-data"), help="the coordinator's data directory")
    export.add_argument("--round", default="last", help="a round number, 'last' or 'best' (default: last)")
    export.add_argument("--metric", default="eval_accuracy",
                        help="metric that ranks rounds for --round best: an evaluator's score of the global "
                             "adapters (eval_accuracy reads its accuracy) when there are some, else the devices' "
                             "reported evaluation")
    export.add_argument("--out", type=Path, required=True, help="directory to write")
    export.set_defaults(func=_export)


def _serve(args: argparse.Namespace) -> int:
    from rankfed.coordinator import heap
    from rankfed.coordinator.config import config_to_dict, load_config
    from rankfed.coordinator.errors import ConfigError
    from rankfed.coordinator.server import serve

    overrides: dict[str, object] = {}
    # Secrets from the environment (systemd EnvironmentFile=, a Kubernetes Secret), so they
    # need not sit in the config file.
    for env, name in (("RANKFED_ENROLLMENT_SECRET", "server.enrollment_secret"), ("RANKFED_ADMIN_TOKEN", "server.admin_token"),
                      ("RANKFED_EVALUATOR_TOKEN", "server.evaluator_token")):
        if os.environ.get(env):
            overrides[name] = os.environ[env]
    for flag, name in (("tls_cert", "server.tls_cert_file"), ("tls_key", "server.tls_key_file"),
                       ("tls_client_ca", "server.tls_client_ca_file")):
        if getattr(args, flag):
            overrides[name] = str(getattr(args, flag).resolve())
    if args.insecure:
        overrides["server.insecure"] = True
    if args.metrics_address:
        overrides["server.metrics_address"] = args.metrics_address
    if args.tensorboard:
        overrides["tracking.tensorboard_dir"] = args.tensorboard
    if args.mlflow:
        overrides["tracking.mlflow_uri"] = args.mlflow
    if args.address:
        overrides["server.address"] = args.address
    if args.data_dir:
        overrides["server.data_dir"] = str(args.data_dir.resolve())
    if args.manifest:
        overrides["model.manifest"] = str(args.manifest.resolve())
    try:
        config = load_config(args.config, overrides=overrides)
    except ConfigError as exc:
        print(f"rankfed: config error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(config_to_dict(config), indent=2, default=str))
        return 0
    logs.configure(args.log_format, args.log_level)
    heap.limit_arenas()
    heap.keep_buffers()
    # Fewer cyclic-GC passes: every RPC allocates a few dozen short-lived objects, and the
    # default threshold (700) ran a collection every few chunks of an upload (py-spy: 13 %
    # of the event loop's busy time during a 128 MiB upload). Memory is bounded by refcounting;
    # the collector only has cycles to find. serve() also freezes the start-up objects.
    gc.set_threshold(20_000, 20, 20)
    try:
        return asyncio.run(serve(config, port_file=args.port_file, exit_when_done=args.exit_when_done))
    except ConfigError as exc:
        # Exit 2: the unit file (RestartPreventExitStatus=2) does not restart into the same error.
        print(f"rankfed: config error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - one line for the operator, the traceback in the log
        logging.getLogger("rankfed.coordinator").debug("coordinator failed", exc_info=True)
        print(f"rankfed: error: {type(exc).__name__}: {exc} (run with --log-level debug for the traceback)",
              file=sys.stderr)
        return 1


def _export(args: argparse.Namespace) -> int:
    from rankfed.coordinator.errors import ConfigError, NotFoundError
    from rankfed.coordinator.export import export_global_adapter

    try:
        result = export_global_adapter(args.data_dir, args.round, args.out, metric=args.metric)
    except ConfigError as exc:
        print(f"rankfed coordinator export: {exc}", file=sys.stderr)
        return 2
    except (NotFoundError, OSError) as exc:
        print(f"rankfed coordinator export: {exc}", file=sys.stderr)
        return 1
    print(f"wrote round {result.round} ({result.chosen_by}) to {result.out_dir}, sha256 {result.sha256[:16]}…")
    return 0
