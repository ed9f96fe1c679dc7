"""`rankfed edge ...`: probe, run, evaluate, export, infer, manifest.

Heavy imports (torch, transformers, peft, grpc) happen inside the command functions, so
`rankfed edge infer` works with only the `infer` extra installed.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

from .errors import ConfigError, EdgeError

DEVICE_CLASSES = ("cpu", "cuda", "mps", "mobile")


def _csv(value: str) -> tuple[str, ...]:
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


def _ints(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in _csv(value))
    except ValueError:
        raise argparse.ArgumentTypeError("expected comma-separated integers, e.g. -1 or -2,-1") from None


def _offline(threads: int | None) -> None:
    """Nothing is downloaded at run time; optionally pin torch's thread count."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if threads:
        import torch

        torch.set_num_threads(threads)


class _Printer:
    """Events as JSON lines on stdout (--json) or short lines on stderr."""

    def __init__(self, as_json: bool, quiet: bool = False) -> None:
        self.as_json = as_json
        self.quiet = quiet

    def __call__(self, name: str, fields: dict[str, Any]) -> None:
        if name in ("download", "upload") and fields.get("bytes") != fields.get("total"):
            return  # only the end of a transfer
        if self.as_json:
            print(json.dumps({"event": name, **fields}, default=str), flush=True)
        elif not self.quiet:
            text = " ".join(f"{k}={v}" for k, v in fields.items() if k != "capability")
            print(f"[edge] {name} {text}", file=sys.stderr, flush=True)


def _step_progress(as_json: bool, quiet: bool) -> Any:
    """A per-step callback: a tqdm bar on a terminal, nothing otherwise."""
    if as_json or quiet or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    state: dict[str, Any] = {}

    def on_step(info: Any) -> None:
        bar = state.get("bar")
        if bar is None or info.step == 1:
            if bar is not None:
                bar.close()
            bar = state["bar"] = tqdm(total=info.total, desc="train", unit="step", leave=False)
        bar.update(1)
        bar.set_postfix(loss=f"{info.loss:.4f}")
        if info.step == info.total:
            bar.close()
            state.pop("bar")

    return on_step


def _tls_options(args: argparse.Namespace) -> Any:
    """TlsOptions from --tls/--tls-ca/--tls-cert/--tls-key/--tls-server-name; None: plaintext."""
    if not (args.tls or args.tls_ca or args.tls_cert or args.tls_key):
        return None
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together (mutual TLS)")
    from rankfed.tls import TlsOptions

    return TlsOptions(
        ca_file=args.tls_ca, cert_file=args.tls_cert, key_file=args.tls_key, server_name=args.tls_server_name or ""
    )


# -- commands ---------------------------------------------------------------------------


def _gflops(value: str) -> float:
    from .probe import parse_gflops

    try:
        return parse_gflops(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_probe(args: argparse.Namespace) -> int:
    from rankfed.protocol import DeviceClass

    from .probe import capability_dict, probe

    cap = probe(declared_class=DeviceClass(args.device_class) if args.device_class else None,
                declared_gflops=args.gflops)
    data = capability_dict(cap)
    if args.json:
        print(json.dumps(data))
    else:
        for key, value in data.items():
            print(f"{key:28s} {value}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    _offline(args.threads)
    from rankfed.protocol import DeviceClass

    from .personal import PrivateSettings
    from .runner import EdgeRunner, RunnerConfig
    from .transport import EdgeTransport, RetryPolicy

    if args.steps is not None and args.epochs is not None:
        raise ConfigError("--steps and --epochs are exclusive")
    tls = _tls_options(args)
    from rankfed.tls import transport_mismatch

    mismatch = transport_mismatch(args.coordinator, tls)
    if mismatch:
        raise ConfigError(mismatch)  # now, instead of retrying for --retry-for seconds
    if args.gflops is not None:
        # The runner probes (and re-probes) inside; the probe reads the override from here.
        from .probe import GFLOPS_ENV

        os.environ[GFLOPS_ENV] = repr(args.gflops)
    # Under mutual TLS an empty name lets the coordinator take the certificate's CN.
    device_name = args.device_name or ("" if args.tls_cert else socket.gethostname())
    model_dir, data_path, labels = _model_and_data(args, device_name)
    config = RunnerConfig(
        model_dir=model_dir,
        data_path=data_path,
        device_name=device_name,
        enrollment_secret=args.secret or os.environ.get("RANKFED_ENROLLMENT_SECRET", ""),
        declared_class=DeviceClass(args.device_class) if args.device_class else None,
        label_names=labels,
        max_length=args.max_length,
        epochs=args.epochs,
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        seed=args.seed,
        hetlora_lambda=args.hetlora_lambda,
        hetlora_gamma=args.hetlora_gamma,
        hetlora_min_rank=args.hetlora_min_rank,
        freeze_below_layer=args.freeze_below_layer,
        max_wait_s=args.max_wait,
        max_rounds=args.max_rounds,
        out_dir=Path(args.out) if args.out else None,
        upload_dtype=args.upload_dtype,
        eval_path=Path(args.eval_data) if args.eval_data else None,
        holdout_fraction=args.holdout,
        personal_dir=Path(args.personal_dir) if args.personal_dir else None,
        private_steps=args.private_steps,
        shared_steps=args.shared_steps,
        private=PrivateSettings(rank=args.private_rank, alpha=args.private_alpha),
    )
    printer = _Printer(args.json, args.quiet)
    retry = RetryPolicy(max_elapsed_s=args.retry_for)
    _terminate_like_interrupt()
    from .credentials import DeviceKeys, default_key_dir

    keys = DeviceKeys(default_key_dir())  # a restarted device rejoins under its name
    with EdgeTransport(args.coordinator, tls=tls, retry=retry, keys=keys) as transport:
        runner = EdgeRunner(transport, config, on_event=printer, on_step=_step_progress(args.json, args.quiet))
        try:
            summary = runner.run()
        except KeyboardInterrupt:
            # Interrupted after Join but before the round loop (the runner leaves from
            # inside its loop only): leave here, so the coordinator does not wait for us.
            if transport.joined:
                try:
                    transport.leave("interrupted")
                except EdgeError:
                    pass
            raise
    printer("summary", {
        "client_id": summary.client_id,
        "rounds": len(summary.rounds),
        "final_round": summary.final_round,
        "final_adapter": summary.final_adapter_path,
        "reason": summary.reason,
    })
    return 0


def _evaluator_token(args: argparse.Namespace) -> str:
    """--token, else the first line of --token-file, else $RANKFED_EVALUATOR_TOKEN, else
    $RANKFED_ADMIN_TOKEN (an operator credential opens EvaluatorService too), else ""."""
    if args.token:
        return str(args.token)
    if args.token_file:
        try:
            return Path(args.token_file).read_text(encoding="utf-8").strip()
        except OSError as err:
            raise ConfigError(f"--token-file {args.token_file}: {err}") from None
    return os.environ.get("RANKFED_EVALUATOR_TOKEN") or os.environ.get("RANKFED_ADMIN_TOKEN", "")


def cmd_evaluate(args: argparse.Namespace) -> int:
    _offline(args.threads)
    from rankfed.tls import transport_mismatch

    from .evaluator import Evaluator, EvaluatorConfig
    from .evaluator_transport import EvaluatorTransport
    from .transport import RetryPolicy

    tls = _tls_options(args)
    mismatch = transport_mismatch(args.coordinator, tls)
    if mismatch:
        raise ConfigError(mismatch)
    if args.no_updates and args.no_globals:
        raise ConfigError("--no-updates and --no-globals together leave nothing to score")
    if args.model:
        model_dir = Path(args.model)
    else:
        from rankfed.datasets import DemoDataError
        from rankfed.datasets import model_dir as demo_model_dir

        try:
            model_dir = demo_model_dir()
        except DemoDataError as exc:
            raise ConfigError(f"no --model given and the bundled demo model is missing: {exc}") from None
    config = EvaluatorConfig(
        model_dir=model_dir, data_path=Path(args.data), label_names=args.labels, max_length=args.max_length,
        batch_size=args.batch_size, max_wait_s=args.max_wait, updates=not args.no_updates,
        globals=not args.no_globals, max_tasks=args.max_tasks,
    )
    printer = _Printer(args.json, args.quiet)
    _terminate_like_interrupt()
    with EvaluatorTransport(args.coordinator, token=_evaluator_token(args), tls=tls,
                            retry=RetryPolicy(max_elapsed_s=args.retry_for)) as transport:
        summary = Evaluator(transport, config, on_event=printer).run()
    printer("summary", {"scored": len(summary.scored), "failed": summary.failed, "reason": summary.reason})
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM (systemd stop, docker stop, Kubernetes) taken like Ctrl-C: the runner leaves
    the federation, then the process exits (status 143)."""


def _terminate_like_interrupt() -> None:
    import signal

    def on_sigterm(signum: int, frame: object) -> None:
        raise Terminated()

    signal.signal(signal.SIGTERM, on_sigterm)


def _model_and_data(args: argparse.Namespace, device_name: str) -> tuple[Path, Path, tuple[str, ...] | None]:
    """--model and --data, or the bundled demo defaults: all-MiniLM-L6-v2 (the model whose
    manifest `rankfed coordinator serve` uses without --manifest) and a BBC News shard
    chosen by the device name."""
    if args.model and args.data:
        return Path(args.model), Path(args.data), args.labels
    if args.model:
        raise ConfigError("--model without --data: the demo shard fits only the bundled demo model; give --data FILE")
    from rankfed.datasets import DemoDataError, demo_shard, model_dir

    try:
        model = model_dir()
        if args.data:
            return model, Path(args.data), args.labels
        path, labels = demo_shard(device_name or "device")
    except DemoDataError as exc:
        raise ConfigError(f"no --model/--data given and the bundled demo model or data is missing: {exc}") from None
    print(f"[edge] no --model/--data: demo model {model.parent.name} and data shard {path}", file=sys.stderr)
    return model, path, args.labels or labels



def _lossy_line(name: str, path: str, size: str, accuracy: float | None, agreement: float | None,
                forced: bool) -> str:
    """One line for a lossy export (int8, fp16): where, how big, and what the accuracy gate saw."""
    if accuracy is None:
        acc = "held-out accuracy not checked (--force without --validation)"
    else:
        agrees = "" if agreement is None else f" (agrees with fp32 on {agreement:.1%})"
        acc = f"held-out accuracy {accuracy:.1%}{agrees}"
    return f"{name}: {path} ({size}), {acc}{'; FORCED past the accuracy gate' if forced else ''}"


def cmd_export(args: argparse.Namespace) -> int:
    _offline(args.threads)
    from .export import export_onnx

    report = export_onnx(
        args.model,
        args.adapter,
        args.out,
        task=args.task,
        labels=list(args.labels) if args.labels else None,
        max_length=args.max_length,
        tolerance=args.tolerance,
        quantize=args.quantize,
        validation=args.validation,
        max_accuracy_drop=args.max_accuracy_drop,
        eval_max_length=args.eval_max_length,
        force=args.force,
        mobile=args.mobile,
        fp16=args.fp16,
        exporter=args.exporter,
        optimize=not args.no_optimize,
        threads=args.threads or 1,
    )
    data = dict(report.__dict__)
    if args.json:
        print(json.dumps(data))
        return 0
    fused = ", ".join(f"{n} {op}" for op, n in report.fused_ops.items()) or "none"
    print(f"wrote {report.path} ({report.bytes} bytes, {report.export_seconds:.1f}s; {report.exporter} exporter, "
          f"fused: {fused})")
    print(f"parity: max |torch - onnxruntime| = {report.max_abs_diff:.3g} over {report.parity_batches} batches")
    if report.accuracy is not None:
        print(f"held-out accuracy on {report.validation_path} ({report.validation_examples} examples): "
              f"fp32 {report.accuracy:.1%}")
    if report.quantized_path:
        print(_lossy_line("int8", report.quantized_path, f"{report.quantized_bytes} bytes", report.quantized_accuracy,
                          report.quantized_heldout_agreement, report.forced))
    if report.fp16_path:
        print(_lossy_line("fp16 weights", report.fp16_path,
                          f"{report.fp16_bytes} bytes, max |torch - fp16| {report.fp16_max_abs_diff:.2g}",
                          report.fp16_accuracy, report.fp16_heldout_agreement, report.fp16_forced))
    if report.mobile_path:
        acc = f", held-out accuracy {report.mobile_accuracy:.1%}" if report.mobile_accuracy is not None else ""
        print(f"ORT format (mobile): {report.mobile_path} ({report.mobile_bytes} bytes){acc}")
    return 0


def cmd_infer(args: argparse.Namespace) -> int:
    from .infer import OnnxModel

    model = OnnxModel(args.onnx, tokenizer_dir=args.tokenizer, threads=args.threads or 1, spin=args.spin)
    texts = list(args.text or [])
    if not texts:
        texts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        raise ConfigError("give --text (repeatable) or lines on stdin")
    if model.task == "causal-lm":
        for text in texts:
            completion = model.generate(text, max_new_tokens=args.max_new_tokens)
            if args.json:
                print(json.dumps({"prompt": text, "completion": completion}))
            else:
                print(f"{text}{completion}")
        return 0
    for p in model.classify(texts):
        if args.json:
            print(json.dumps(p.__dict__))
        else:
            print(f"{p.label}\t{max(p.scores):.3f}\t{p.text}")
    return 0


def cmd_manifest(args: argparse.Namespace) -> int:
    _offline(None)
    from .manifest import build_manifest, build_personalized_manifest, write_manifest

    if args.shared_layers is not None:
        manifest = build_personalized_manifest(
            args.model, task=args.task, num_labels=args.num_labels, target_modules=args.target_modules,
            shared_layers=args.shared_layers, model_id=args.model_id,
        )
    elif len(args.model) > 1:
        raise ConfigError("several --model need --shared-layers (a personalized federation's manifest)")
    else:
        manifest = build_manifest(
            args.model[0],
            task=args.task,
            num_labels=args.num_labels,
            target_modules=args.target_modules,
            modules_to_save=args.modules_to_save,
            model_id=args.model_id,
            labels=tuple(args.labels or ()),
            freeze_below_layer=args.freeze_below_layer,
        )
    if args.out == "-":
        print(json.dumps(manifest, indent=2))
    else:
        write_manifest(manifest, args.out)
        print(f"wrote {args.out}: {len(manifest['modules'])} LoRA modules, {len(manifest['dense'])} dense tensors, weights {manifest['weights_sha256'][:12]}…", file=sys.stderr)
    return 0


def _guarded(func: Any) -> Any:
    """Edge errors become one line on stderr and exit status 1 (no traceback)."""

    def run(args: argparse.Namespace) -> int:
        try:
            return int(func(args) or 0)
        except EdgeError as err:
            print(f"rankfed edge {args.edge_command}: error: {err}", file=sys.stderr)
            return 1
        except Terminated:
            print("terminated (SIGTERM): left the federation", file=sys.stderr)
            return 143
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return run


def add_parser(sub: Any) -> None:
    edge = sub.add_parser("edge", help="edge-device commands", description=__doc__.split("\n\n")[0])
    cmds = edge.add_subparsers(dest="edge_command", metavar="SUBCOMMAND", required=True)

    p = cmds.add_parser("probe", help="measure and print this device's capability")
    p.add_argument("--device-class", choices=DEVICE_CLASSES, help="report this class instead of the detected one")
    p.add_argument("--gflops", type=_gflops, help="report this speed instead of measuring it (GFLOP/s)")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(func=_guarded(cmd_probe))

    p = cmds.add_parser("run", help="take part in a federation until it is done")
    p.add_argument("--coordinator", required=True, metavar="HOST:PORT")
    p.add_argument("--model", metavar="DIR",
                   help="local Hugging Face model directory (default: the bundled demo model, all-MiniLM-L6-v2)")
    p.add_argument("--data", metavar="FILE", help="JSONL or CSV: text,label or prompt,response "
                   "(default with the demo model: a BBC News shard picked by the device name)")
    p.add_argument("--device-name", help="stable device name (default: host name)")
    p.add_argument("--secret", help="enrollment secret (default: $RANKFED_ENROLLMENT_SECRET)")
    p.add_argument("--device-class", choices=DEVICE_CLASSES, help="report this class instead of the detected one")
    p.add_argument("--gflops", type=_gflops,
                   help="report this speed (GFLOP/s) instead of measuring it; the rank policy's tiers use it")
    p.add_argument("--labels", type=_csv, help="label names in id order, for data with named labels")
    p.add_argument("--max-length", type=int, default=128, help="tokens per example (default 128)")
    g = p.add_argument_group("local training (default: what the coordinator's task says)")
    g.add_argument("--steps", type=int, help="local steps per round")
    g.add_argument("--epochs", type=int, help="local epochs per round instead of steps")
    g.add_argument("--batch-size", type=int)
    g.add_argument("--lr", type=float, help="learning rate")
    g.add_argument("--seed", type=int, help="base seed (the round number is added)")
    g.add_argument("--hetlora-lambda", type=float, default=0.0, help="HetLoRA self-pruning penalty strength (0: off)")
    g.add_argument("--hetlora-gamma", type=float, default=0.99, help="HetLoRA decay factor (default 0.99)")
    g.add_argument("--hetlora-min-rank", type=int, default=1)
    g.add_argument("--freeze-below-layer", type=int, metavar="K",
                   help="train encoder layers >= K only, from their inputs computed once per dataset (exact; "
                        "the federation's manifest must be written with the same --freeze-below-layer)")
    e = p.add_argument_group("evaluation on held-out local data (reported in the update's metrics.eval)")
    e.add_argument("--eval-data", metavar="FILE", help="held-out examples (default: a --holdout fraction of --data)")
    e.add_argument("--holdout", type=float, metavar="FRACTION",
                   help="hold out this fraction of --data (default 0.2 in a personalized federation, else none)")
    g2 = p.add_argument_group("personalized federations (pFedLoRA, docs/personalized.md)")
    g2.add_argument("--personal-dir", metavar="DIR",
                    help="keep the private adapter and head here between rounds and restarts (never uploaded)")
    g2.add_argument("--private-steps", type=int, help="steps training the private part, shared adapter frozen "
                    "(default: half the task's local steps)")
    g2.add_argument("--shared-steps", type=int, help="steps training the shared adapter, private part frozen "
                    "(default: the other half)")
    g2.add_argument("--private-rank", type=int, default=8, help="rank of the private LoRA (default 8)")
    g2.add_argument("--private-alpha", type=float, help="alpha of the private LoRA (default 2 x rank)")
    t = p.add_argument_group("transport security (default: plaintext, which coordinators allow on loopback only)")
    t.add_argument("--tls", action="store_true", help="TLS, verifying the coordinator with the system roots")
    t.add_argument("--tls-ca", metavar="PEM", help="CA that signed the coordinator's certificate (implies --tls)")
    t.add_argument("--tls-cert", metavar="PEM", help="this device's certificate, for mutual TLS")
    t.add_argument("--tls-key", metavar="PEM", help="its private key")
    t.add_argument("--tls-server-name", metavar="NAME", help="expected name in the coordinator's certificate")
    p.add_argument("--max-wait", type=float, default=30.0, help="long-poll wait per GetTask, seconds")
    p.add_argument("--retry-for", type=float, default=300.0, help="give up after this long unreachable, seconds")
    p.add_argument("--max-rounds", type=int, help="leave after this many trained rounds")
    p.add_argument("--out", metavar="DIR", help="write the final global adapter here")
    p.add_argument("--upload-dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    p.add_argument("--threads", type=int, help="torch threads")
    p.add_argument("--json", action="store_true", help="events as JSON lines on stdout")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_guarded(cmd_run))

    p = cmds.add_parser(
        "evaluate", help="the evaluator role: score devices' updates and global adapters on a validation set",
        description="Score the adapters a coordinator asks about (devices' updates for rank_policy.allocation = "
                    "'validation', each round's global adapter for `coordinator export --round best`) on a "
                    "held-out validation set, and report the scores. See docs/rank-allocation.md.",
    )
    p.add_argument("--coordinator", required=True, metavar="HOST:PORT")
    p.add_argument("--data", required=True, metavar="FILE",
                   help="the validation set: JSONL or CSV like the devices' data (text,label or prompt,response)")
    p.add_argument("--model", metavar="DIR", help="the federation's base model (default: the bundled demo model)")
    p.add_argument("--token", help="server.evaluator_token or the operator's admin token "
                   "(default: --token-file, $RANKFED_EVALUATOR_TOKEN, then $RANKFED_ADMIN_TOKEN)")
    p.add_argument("--token-file", metavar="FILE", help="read the token from this file (e.g. DATA_DIR/admin-token)")
    p.add_argument("--labels", type=_csv, help="label names in id order, for data with named labels")
    p.add_argument("--max-length", type=int, default=128, help="tokens per example (default 128)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--no-updates", action="store_true", help="score no device updates")
    p.add_argument("--no-globals", action="store_true", help="score no global adapters")
    p.add_argument("--max-tasks", type=int, help="exit after this many scores (default: when the federation is done)")
    p.add_argument("--max-wait", type=float, default=30.0, help="long-poll wait per task request, seconds")
    p.add_argument("--retry-for", type=float, default=300.0, help="give up after this long unreachable, seconds")
    t = p.add_argument_group("transport security (default: plaintext, which coordinators allow on loopback only)")
    t.add_argument("--tls", action="store_true", help="TLS, verifying the coordinator with the system roots")
    t.add_argument("--tls-ca", metavar="PEM", help="CA that signed the coordinator's certificate (implies --tls)")
    t.add_argument("--tls-cert", metavar="PEM", help="an operator certificate (OU=operators), for mutual TLS")
    t.add_argument("--tls-key", metavar="PEM", help="its private key")
    t.add_argument("--tls-server-name", metavar="NAME", help="expected name in the coordinator's certificate")
    p.add_argument("--threads", type=int, help="torch threads")
    p.add_argument("--json", action="store_true", help="events as JSON lines on stdout")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_guarded(cmd_evaluate))

    p = cmds.add_parser("export", help="merge an adapter and export to ONNX")
    p.add_argument("--model", required=True, metavar="DIR")
    p.add_argument("--adapter", required=True, metavar="FILE", help="adapter safetensors (or a directory holding adapter_model.safetensors)")
    p.add_argument("--out", required=True, metavar="FILE.onnx")
    p.add_argument("--task", choices=("sequence-classification", "causal-lm"), help="default: from the adapter (a head means classification)")
    p.add_argument("--labels", type=_csv, help="label names in id order (stored in the file)")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--tolerance", type=float, default=1e-4, help="max |torch - onnxruntime| allowed (default 1e-4)")
    p.add_argument("--exporter", choices=("auto", "dynamo", "torchscript"), default="auto",
                   help="auto (default): TorchScript for BERT-family classifiers (fusable), dynamo otherwise")
    p.add_argument("--no-optimize", action="store_true",
                   help="skip onnxruntime's transformer fusions (the file then holds standard ONNX ops only)")
    q = p.add_argument_group("int8, fp16 and mobile formats (lossy: gated on held-out accuracy)")
    q.add_argument("--quantize", action="store_true", help="also write FILE.int8.onnx (dynamic int8, per-channel)")
    q.add_argument("--validation", metavar="FILE", help="held-out examples (JSONL/CSV, as the training data) "
                   "scored by fp32 and int8/fp16")
    q.add_argument("--max-accuracy-drop", type=float, default=1.0, metavar="POINTS",
                   help="refuse int8/fp16 when it is more than this many points below fp32 (default 1)")
    q.add_argument("--eval-max-length", type=int, default=128, help="tokens per validation example (default 128)")
    q.add_argument("--force", action="store_true", help="write int8/fp16 even when the accuracy gate refuses it "
                   "(or without --validation)")
    q.add_argument("--mobile", action="store_true", help="also write the ORT format (.ort) of the final model "
                   "(int8 with --quantize) for onnxruntime mobile builds")
    q.add_argument("--fp16", action="store_true", help="also write FILE.fp16.onnx: fp16 weights, fp32 inputs and "
                   "outputs; half the size, for targets with fp16 kernels (GPU, NNAPI, CoreML); "
                   "x86 onnxruntime runs it at fp32 speed")
    p.add_argument("--threads", type=int)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_guarded(cmd_export))

    p = cmds.add_parser("infer", help="run an exported model with onnxruntime (no torch needed)")
    p.add_argument("--onnx", required=True, metavar="FILE")
    p.add_argument("--text", action="append", help="input text (repeatable; default: lines on stdin)")
    p.add_argument("--tokenizer", metavar="DIR", help="directory with tokenizer.json (default: the one in the file)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="causal LMs: tokens to generate")
    p.add_argument("--threads", type=int)
    p.add_argument("--spin", action="store_true", help="with --threads > 1: idle threads spin-wait instead of "
                   "sleeping (onnxruntime's default; faster only on cores nothing else uses)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_guarded(cmd_infer))

    p = cmds.add_parser("manifest", help="write the model manifest a coordinator serves")
    p.add_argument("--model", required=True, metavar="DIR", action="append",
                   help="model directory; repeat it with --shared-layers to admit several models")
    p.add_argument("--shared-layers", type=_ints, metavar="I,J",
                   help="personalized federation: the shared adapter sits on the target modules of these layers "
                        "(negative: from the end, e.g. -1), named model-independently (docs/personalized.md)")
    p.add_argument("--task", required=True, choices=("sequence-classification", "causal-lm"))
    p.add_argument("--num-labels", type=int, default=0)
    p.add_argument("--target-modules", type=_csv, required=True, help="e.g. query,value")
    p.add_argument("--modules-to-save", type=_csv, help="dense modules to federate (default: the classification head)")
    p.add_argument("--model-id", help="default: the model directory's name")
    p.add_argument("--labels", type=_csv, help="class names in label-id order, e.g. business,sport,tech: every "
                   "global adapter carries them, so export needs no --labels")
    p.add_argument("--freeze-below-layer", type=int, metavar="K",
                   help="LoRA on encoder layers >= K only; devices must run with --freeze-below-layer K "
                        "and train from cached layer-K states (default: every layer)")
    p.add_argument("--out", required=True, metavar="FILE", help="'-' for stdout")
    p.set_defaults(func=_guarded(cmd_manifest))
