"""The coordinator's configuration: frozen dataclasses loaded from one TOML file.

The schema is deploy/coordinator.example.toml: every field is optional and its default is
the value written there, so `load_config()` with no file gives the same configuration as
`load_config(Path("deploy/coordinator.example.toml"))` (up to where relative paths point).

    cfg = load_config(Path("/etc/rankfed/coordinator.toml"),
                      overrides={"server.address": "0.0.0.0:50051", "federation.rounds": 3})

Each field carries its help text in `dataclasses.field(metadata={"help": ...})` (see
`field_help`). Validation collects every problem and raises one ConfigError whose lines
name the field (`federation.rounds`), the value and what is allowed. Overrides use dotted
names; a value of None means "not given" (so an argparse namespace can be passed as is),
and strings are converted for numeric fields (so CLI flags can be passed unparsed).

Relative paths in the file resolve against the file's directory; relative paths in the
defaults and in overrides resolve against the current working directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import operator
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rankfed.aggregation.registry import METHODS
from rankfed.coordinator.errors import ConfigError
from rankfed.protocol import AlphaRule, DeviceClass, FederationMode
from rankfed.protocol.limits import MAX_METRIC_NAME_CHARS, METRIC_NAME

__all__ = [
    "AGGREGATION_METHODS",
    "ALLOCATIONS",
    "CHUNK_OVERHEAD_BYTES",
    "CoordinatorConfig",
    "DEFAULT_TIERS",
    "FEDERATION_MODES",
    "FederationConfig",
    "LoraSection",
    "ModelConfig",
    "RankPolicyConfig",
    "RankTier",
    "ServerConfig",
    "StorageConfig",
    "TrackingConfig",
    "config_from_mapping",
    "config_to_dict",
    "field_help",
    "load_config",
]

FEDERATION_MODES = tuple(m.value for m in FederationMode)
AGGREGATION_METHODS = tuple(METHODS)  # the method registry is the one list of rules
# How a round's ranks are chosen (docs/rank-allocation.md): device capability alone, or the
# devices' scores too, as they report them (reported) or as an evaluator measures them (validation).
ALLOCATIONS = ("capability", "validation", "reported")
# Room a chunk message needs beyond its payload (offsets, ids, digest): the gRPC receive
# limit must exceed max_chunk_bytes by at least this much.
CHUNK_OVERHEAD_BYTES = 64 * 1024
_MIB = 1024 * 1024


def _f(default: Any = dataclasses.MISSING, help: str = "", **rules: Any) -> Any:
    """A dataclass field with help text and validation rules (ge, gt, le, lt, choices)."""
    return field(default=default, metadata={"help": help, **rules})


@dataclass(frozen=True)
class ServerConfig:
    address: str = _f("127.0.0.1:50051", "host:port to listen on; port 0 picks a free port.")
    data_dir: Path = _f(
        Path("rankfed-data"),
        "Directory for the SQLite state database and the blob store (updates, global adapters).",
    )
    max_chunk_bytes: int = _f(
        _MIB,
        "Largest chunk a client may send or is sent, in bytes.",
        ge=1024,
        le=64 * _MIB,
    )
    max_upload_bytes: int = _f(
        256 * _MIB,
        "Largest update a client may upload, in bytes; bigger uploads get RESOURCE_EXHAUSTED.",
        ge=1,
    )
    max_receive_message_bytes: int = _f(
        4 * _MIB,
        "Largest gRPC message accepted; must exceed max_chunk_bytes + 64 KiB.",
        ge=1,
    )
    long_poll_seconds: float = _f(
        30.0, "Longest a GetTask long-poll is held before the server answers WAIT.", gt=0
    )
    token_ttl_seconds: int = _f(
        86400, "Lifetime of a device session token, in seconds; devices re-join after.", ge=1
    )
    enrollment_secret: str = _f(
        "", "Shared secret a device must present at Join; empty: any device may join.", secret=True
    )
    admin_token: str = _f(
        "",
        "Bearer token the operator API and the dashboard require (operator certificates, "
        "mutual TLS OU=operators, work too); empty: one is generated at the first start into "
        "DATA_DIR/admin-token (owner-only), which rankfed status and rankfed admin read.",
        secret=True,
    )
    evaluator_token: str = _f(
        "",
        "Bearer token of the evaluator role (`rankfed edge evaluate`): it opens EvaluatorService "
        "only (evaluation tasks, their adapters, score reports), not the operator API. Operator "
        "credentials open EvaluatorService too. Empty: evaluators use operator credentials.",
        secret=True,
    )
    loopback_operators: bool = _f(
        False,
        "With no admin_token: let any loopback caller use the operator API and the dashboard "
        "without a credential (an explicit opt-in: everything behind a local proxy would be an "
        "operator), instead of generating a token.",
    )
    insecure: bool = _f(
        False,
        "Serve without TLS on a non-loopback address (--insecure). Without TLS and without "
        "this, the coordinator refuses any address but loopback.",
    )
    tls_cert_file: str = _f(
        "", "PEM certificate (chain) of the server; with tls_key_file it turns TLS on.", path=True
    )
    tls_key_file: str = _f("", "PEM private key of tls_cert_file.", path=True)
    tls_client_ca_file: str = _f(
        "",
        "PEM CA that signs client certificates; set: mutual TLS, every caller must present a "
        "certificate it signed (devices then enroll by certificate, CN = device name).",
        path=True,
    )
    metrics_address: str = _f(
        "", "host:port of the Prometheus endpoint (plain HTTP GET /metrics); empty: off."
    )
    health_address: str = _f(
        "",
        "host:port of a plaintext listener serving only grpc.health.v1, for Kubernetes gRPC "
        "probes (they cannot speak TLS); empty: off (health is always on the main port too).",
    )
    upload_idle_timeout_seconds: float = _f(
        30.0, "An upload stream silent this long (no header, no chunk) is aborted.", gt=0
    )
    loop_stall_seconds: float = _f(
        0.25,
        "Log a warning with the event loop's Python stack when the loop has not run for this "
        "long (every device's answers wait meanwhile); 0: off. Its lag is always measured "
        "(rankfed_event_loop_lag_seconds).",
        ge=0,
    )
    gc_full_collection_seconds: float = _f(
        300.0,
        "The daemon freezes its objects every second so that Python's automatic garbage "
        "collections walk only the newest (held long-polls live 30 s; with 10,000 devices one "
        "collection of them held the event loop 0.4 s), and runs one full collection this "
        "often to free garbage cycles; 0: Python's own collection policy.",
        ge=0,
    )
    upload_total_timeout_seconds: float = _f(
        3600.0, "Longest an upload stream may last from its first message to its last.", gt=0
    )
    upload_resume_ttl_seconds: float = _f(
        3600.0,
        "How long the bytes of a broken upload stream are kept for the device to resume "
        "(UploadStatus, UploadHeader.resume_offset); at most one per device and round, dropped "
        "when the round closes. 0: resuming is off, a broken upload leaves nothing.",
        ge=0,
    )
    download_idle_timeout_seconds: float = _f(
        30.0,
        "A download whose client takes no data for this long (one chunk waits that long to be "
        "sent) is aborted with DEADLINE_EXCEEDED; the device resumes it with offset.",
        gt=0,
    )
    download_total_timeout_seconds: float = _f(
        3600.0,
        "Longest a download stream may last, in seconds (a client that reads too slowly holds "
        "the stream no longer); the device resumes it with offset.",
        gt=0,
    )


@dataclass(frozen=True)
class ModelConfig:
    manifest: str = _f(
        "",
        "The model manifest (base model id, weights sha256, task, LoRA module shapes); "
        "write one with `rankfed edge manifest`. Empty: the bundled demo manifest "
        "(all-MiniLM-L6-v2, 5 labels: what `rankfed edge run` uses with no --model).",
        path=True,
    )


@dataclass(frozen=True)
class LoraSection:
    alpha_rule: AlphaRule = _f(
        AlphaRule.CONSTANT_SCALING,
        "How lora_alpha follows the rank: constant_scaling (alpha = scaling * r), "
        "fixed (same alpha for every rank) or rslora (scale alpha / sqrt(r)).",
    )
    scaling: float = _f(2.0, "Scaling alpha / r used by constant_scaling.", gt=0)
    alpha: float = _f(16.0, "alpha used by fixed and rslora.", gt=0)
    max_rank: int = _f(16, "Rank of the global adapter; no client is assigned more.", ge=1)
    dropout: float = _f(0.0, "LoRA dropout the clients train with.", ge=0, lt=1)


@dataclass(frozen=True)
class FederationConfig:
    mode: str = _f(
        "rank_heterogeneous",
        "rank_heterogeneous: one global adapter over one base model, a rank per device. "
        "personalized (pFedLoRA): each device keeps a private adapter and head on its own "
        "base model (the manifest may list several) and shares one small adapter at "
        "lora.max_rank, averaged with method fedit (docs/personalized.md).",
        choices=FEDERATION_MODES,
    )
    rounds: int = _f(5, "Number of rounds before the federation is done.", ge=1)
    method: str = _f("zero_pad", "Aggregation rule (the default is what study v2 supports for hardware ranks: docs/results.md §3).", choices=AGGREGATION_METHODS)
    min_clients: int = _f(
        2,
        "Clients online before a round starts, and updates needed by the deadline (quorum).",
        ge=1,
    )
    clients_per_round: int = _f(
        0, "Participants selected per round (0: every online client).", ge=0
    )
    wait_for_clients_seconds: float = _f(
        60.0, "Seconds a round waits for min_clients before it starts with those online.", gt=0
    )
    round_deadline_seconds: float = _f(
        300.0, "Seconds from the start of a round to its deadline.", gt=0
    )
    straggler_grace_seconds: float = _f(
        30.0, "Once min_clients updates are in, longest wait for the others.", ge=0
    )
    robust_clip_factor: float = _f(
        5.0, "Robust aggregation: an update whose norm exceeds this many times the round's median "
        "update norm is scaled down to that bound before it is aggregated, so no single device can "
        "dominate a round (needs 3 or more updates; 0 turns clipping off). Honest updates differ by "
        "up to ~3x across ranks (docs/aggregation.md), so the default leaves them untouched.", ge=0,
    )
    local_steps: int = _f(20, "Local training steps each client does per round.", ge=1)
    learning_rate: float = _f(0.002, "Learning rate of local training.", gt=0)
    batch_size: int = _f(16, "Batch size of local training.", ge=1)
    heartbeat_interval_seconds: float = _f(
        5.0, "Interval the clients are told to heartbeat at.", gt=0
    )
    heartbeat_timeout_seconds: float = _f(
        30.0, "Silence after which a client counts as dropped.", gt=0
    )
    demote_after_missed_deadlines: int = _f(
        2, "Deadlines missed in a row before a client moves one tier down (0: never).", ge=0
    )
    seed: int = _f(0, "Seed for the initial global adapter and participant selection.", ge=0)


@dataclass(frozen=True)
class RankTier:
    """One tier of the rank policy; conditions left as None always hold."""

    name: str = _f(help="Name shown in status and in the reason for a rank.")
    rank: int = _f(help="Rank given to a device in this tier (capped by lora.max_rank).", ge=1)
    device_class: DeviceClass | None = _f(
        None, "cpu, cuda, mps or mobile; omitted: any class."
    )
    min_memory_gb: float | None = _f(
        None, "Minimum memory in GB (1e9 bytes): accelerator memory for cuda/mps, RAM otherwise.",
        ge=0,
    )
    min_gflops: float | None = _f(
        None, "Minimum measured fp32 matmul throughput, in GFLOP/s.", ge=0
    )
    min_upload_mbps: float | None = _f(
        None, "Minimum measured upload bandwidth, in megabits per second.", ge=0
    )
    min_cores: int | None = _f(None, "Minimum number of CPU cores.", ge=0)


DEFAULT_TIERS: tuple[RankTier, ...] = (
    RankTier("cuda-large", 16, DeviceClass.CUDA, min_memory_gb=16.0),
    RankTier("cuda", 8, DeviceClass.CUDA),
    RankTier("cpu-fast", 8, DeviceClass.CPU, min_memory_gb=8.0, min_gflops=50.0),
    RankTier("cpu", 4, DeviceClass.CPU),
    RankTier("mobile", 2, DeviceClass.MOBILE),
)


@dataclass(frozen=True)
class RankPolicyConfig:
    default_rank: int = _f(2, "Rank for a device no tier matches.", ge=1)
    round_budget_bytes: int = _f(
        0,
        "Per-round upload budget in bytes over all participants (0: none); over it, the "
        "largest ranks are halved until the round fits.",
        ge=0,
    )
    tiers: tuple[RankTier, ...] = _f(
        DEFAULT_TIERS, "Tiers tried in order; the first whose conditions all hold wins."
    )
    hysteresis: float = _f(
        0.1,
        "Relative band around the tiers' numeric thresholds (min_gflops, min_memory_gb, "
        "min_upload_mbps, min_cores) that keeps a device's rank steady between rounds when "
        "its re-measured capability wobbles: it keeps its tier until it falls below "
        "threshold × (1 - hysteresis), and moves to a higher tier only past threshold × "
        "(1 + hysteresis). 0: no band.",
        ge=0,
        lt=1,
    )
    allocation: str = _f(
        "capability",
        "How each round's ranks are chosen: capability (the tiers alone), reported (the devices' "
        "own held-out score, metrics.eval) or validation (an evaluator scores each update on the "
        "operator's held-out set). The capability rank stays an upper bound in every mode "
        "(docs/rank-allocation.md).",
        choices=ALLOCATIONS,
    )
    score_metric: str = _f(
        "loss",
        "The score devices are ranked by: a key of their metrics.eval (reported) or of the "
        "evaluator's scores (validation). Names ending in 'loss' or 'perplexity' rank lower is "
        "better, others higher is better.",
    )
    high_rank_fraction: float = _f(
        0.25,
        "Fraction of the scored devices that get high_rank, rounded up (at least one device).",
        gt=0,
        le=1,
    )
    high_rank: int = _f(
        0, "Rank of the top-scored devices, capped by each one's capability rank; 0: lora.max_rank.", ge=0
    )
    low_rank: int = _f(
        2,
        "Rank of the other scored devices, and of devices with no score yet, capped by each "
        "one's capability rank.",
        ge=1,
    )
    warmup_rounds: int = _f(
        1,
        "Rounds at capability ranks before scores decide (their updates give the first scores).",
        ge=0,
    )
    reevaluate_every: int = _f(
        1,
        "Rounds between re-rankings of the devices by their latest scores (1: every round); in "
        "between, every device keeps its high or low status.",
        ge=1,
    )
    score_hysteresis: float = _f(
        0.05,
        "Relative margin that keeps a device's status steady between re-rankings: a device that "
        "holds the high rank keeps it unless a challenger's score is better than its own by more "
        "than this fraction of it. 0: the plain top fraction.",
        ge=0,
        lt=1,
    )
    evaluator_wait_seconds: float = _f(
        60.0,
        "validation: at a re-ranking round, wait up to this long for the evaluator to score the "
        "previous round's updates before the ranks are set (0: never wait; unscored devices get "
        "low_rank).",
        ge=0,
    )


@dataclass(frozen=True)
class StorageConfig:
    updates_keep_rounds: int = _f(
        0,
        "Retention of accepted update files (blobs/updates/): keep those of the last N closed "
        "rounds and delete older ones once their round's global adapter is on disk (or the "
        "round failed); 0: keep every update. Global adapters are never deleted.",
        ge=0,
    )


@dataclass(frozen=True)
class TrackingConfig:
    tensorboard_dir: str = _f(
        "",
        "Write round and per-device metrics as TensorBoard event files under this directory "
        "(one run per federation id; needs the `tracking` extra: tensorboardX). Empty: off.",
        path=True,
    )
    mlflow_uri: str = _f(
        "",
        "Log round and per-device metrics to MLflow: a tracking URI (http://host:5000, "
        "sqlite:///mlflow.db) or a directory for MLflow's file store (needs the `tracking` "
        "extra: mlflow-skinny). One MLflow run per federation, resumed after a restart. Empty: off.",
    )
    mlflow_experiment: str = _f("rankfed", "MLflow experiment the runs go to (created if missing).")


@dataclass(frozen=True)
class CoordinatorConfig:
    server: ServerConfig = field(default_factory=ServerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    federation: FederationConfig = field(default_factory=FederationConfig)
    rank_policy: RankPolicyConfig = field(default_factory=RankPolicyConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    source: Path | None = None  # the TOML file this came from; None: embedded defaults


_SECTIONS: dict[str, type] = {
    "server": ServerConfig,
    "model": ModelConfig,
    "lora": LoraSection,
    "federation": FederationConfig,
    "rank_policy": RankPolicyConfig,
    "storage": StorageConfig,
    "tracking": TrackingConfig,
}


# --------------------------------------------------------------------------- public API


def load_config(
    path: Path | None = None, *, overrides: Mapping[str, object] | None = None
) -> CoordinatorConfig:
    """Load the configuration from `path` (None: embedded defaults), then apply overrides.

    Raises ConfigError listing every problem, each naming its field.
    """
    data: Mapping[str, Any] = {}
    if path is not None:
        path = Path(path).expanduser()
        try:
            with path.open("rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(
                f"config file {str(path)!r} does not exist; start from "
                "deploy/coordinator.example.toml, or omit --config to use the defaults"
            ) from None
        except IsADirectoryError:
            raise ConfigError(
                f"config path {str(path)!r} is a directory, not a TOML file"
            ) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"cannot read config file {str(path)!r}: {exc}") from None
    return config_from_mapping(data, source=path, overrides=overrides)


def config_from_mapping(
    data: Mapping[str, Any],
    *,
    source: Path | None = None,
    overrides: Mapping[str, object] | None = None,
) -> CoordinatorConfig:
    """Build a config from parsed TOML (as `load_config` does); `source` sets the base
    directory of relative paths (its parent) and is named in errors."""
    errors: list[str] = []
    base_dir = Path(source).parent.absolute() if source is not None else Path.cwd()
    raw: dict[str, dict[str, Any]] = {}
    for section, value in data.items():
        if section not in _SECTIONS:
            errors.append(f"unknown section [{section}]{_suggest(section, _SECTIONS)}")
        elif not isinstance(value, Mapping):
            errors.append(f"[{section}] must be a table, got {_show(value)}")
        else:
            raw[section] = dict(value)

    from_cli: set[str] = set()
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        section, _, key = dotted.partition(".")
        if section not in _SECTIONS or not key or key not in _field_types(_SECTIONS[section]):
            errors.append(f"unknown setting {dotted!r}{_suggest(dotted, _all_dotted_names())}")
            continue
        raw.setdefault(section, {})[key] = value
        from_cli.add(dotted)

    sections: dict[str, Any] = {}
    for section, cls in _SECTIONS.items():
        sections[section] = _build(
            cls, raw.get(section, {}), section, errors, from_cli, base_dir
        )
    if not errors:
        _cross_check(sections, errors)
    if errors:
        where = f" in {source}" if source is not None else ""
        lines = "\n  - ".join(errors)
        noun = "problem" if len(errors) == 1 else "problems"
        raise ConfigError(f"configuration{where} has {len(errors)} {noun}:\n  - {lines}")
    return CoordinatorConfig(**sections, source=Path(source).absolute() if source else None)


def config_to_dict(cfg: CoordinatorConfig, *, redact_secrets: bool = True) -> dict[str, Any]:
    """The config as plain TOML/JSON-friendly data (for logs and --print-config).

    Paths become strings, enums their values, omitted tier conditions are left out; the
    result loads back with `config_from_mapping`. `source` is not included. Secrets
    (enrollment_secret, admin_token) are shown as "***" when set, unless redact_secrets
    is False.
    """
    out: dict[str, Any] = {}
    for section in _SECTIONS:
        obj = getattr(cfg, section)
        out[section] = _plain(obj, redact_secrets)
    return out


def field_help(name: str) -> str:
    """Help text of a dotted setting name, e.g. field_help("server.address")."""
    section, _, key = name.partition(".")
    cls = _SECTIONS.get(section)
    if section == "rank_policy" and key.startswith("tiers."):
        cls, key = RankTier, key.removeprefix("tiers.")
    fields = {f.name: f for f in dataclasses.fields(cls)} if cls else {}
    if key not in fields:
        raise KeyError(f"unknown setting {name!r}{_suggest(name, _all_dotted_names())}")
    return str(fields[key].metadata.get("help", ""))


# --------------------------------------------------------------------------- internals


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _all_dotted_names() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in _SECTIONS.items() for f in dataclasses.fields(cls)]


def _suggest(word: str, choices: typing.Iterable[str]) -> str:
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _show(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _build(
    cls: type,
    raw: Mapping[str, Any],
    prefix: str,
    errors: list[str],
    from_cli: set[str],
    base_dir: Path,
) -> Any:
    """Instantiate section dataclass `cls` from `raw`, appending problems to `errors`."""
    types_ = _field_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        name = f"{prefix}.{key}"
        if key not in fields:
            errors.append(f"unknown setting {name!r}{_suggest(key, fields)}")
            continue
        cli = name in from_cli
        tp = types_[key]
        n_before = len(errors)
        converted: Any  # a field value: its type is the field's, known only at run time
        if key == "tiers":
            converted = _convert_tiers(value, name, errors)
        else:
            converted = _convert(value, tp, name, errors, cli=cli)
        if len(errors) > n_before:
            continue
        if isinstance(converted, Path) or (fields[key].metadata.get("path") and converted):
            base = Path.cwd() if cli else base_dir
            resolved = Path(os.path.normpath(base / Path(converted).expanduser()))
            converted = resolved if isinstance(converted, Path) else str(resolved)
        _check_rules(fields[key], converted, name, errors)
        kwargs[key] = converted
    missing = False
    for key, f in fields.items():
        if key in kwargs:
            continue
        if f.default is dataclasses.MISSING:
            missing = True
            if key not in raw:  # else its conversion error is already reported
                errors.append(f"{prefix}.{key} is required: {f.metadata.get('help', '')}")
        elif isinstance(f.default, Path):
            kwargs[key] = Path(os.path.normpath(base_dir / f.default))
    if missing:
        return None
    return cls(**kwargs)


def _convert(value: Any, tp: Any, name: str, errors: list[str], *, cli: bool) -> Any:
    """Convert a TOML (or override) value to field type `tp`, or append an error."""
    if isinstance(tp, types.UnionType):  # X | None: None never comes from TOML
        (tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if cli and isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        errors.append(f"{name} = {_show(value)}: expected true or false")
    elif tp is int:
        if cli and isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                pass
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        errors.append(f"{name} = {_show(value)}: expected an integer")
    elif tp is float:
        if cli and isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                pass
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):
                errors.append(f"{name} = {value!r}: expected a finite number")
                return None
            return float(value)
        errors.append(f"{name} = {_show(value)}: expected a number")
    elif tp is str:
        if isinstance(value, str):
            return value
        errors.append(f"{name} = {_show(value)}: expected a string")
    elif tp is Path:
        if isinstance(value, str | os.PathLike) and str(value):
            return Path(value)
        errors.append(f"{name} = {_show(value)}: expected a non-empty path string")
    elif isinstance(tp, type) and issubclass(tp, enum.Enum):
        allowed = [m.value for m in tp]
        if isinstance(value, str) and value in allowed:
            return tp(value)
        errors.append(
            f"{name} = {_show(value)}: expected one of {', '.join(allowed)}"
            f"{_suggest(str(value), allowed)}"
        )
    else:  # pragma: no cover - a field type this loader does not know
        raise TypeError(f"unsupported config field type {tp!r} for {name}")
    return None


def _convert_tiers(value: Any, name: str, errors: list[str]) -> tuple[RankTier, ...] | None:
    if isinstance(value, tuple) and all(isinstance(t, RankTier) for t in value):
        return value
    if not isinstance(value, list | tuple):
        errors.append(
            f"{name} = {_show(value)}: expected a list of tables ([[rank_policy.tiers]])"
        )
        return None
    tiers: list[RankTier] = []
    n_before = len(errors)
    for i, item in enumerate(value):
        item_name = f"{name}[{i}]"
        if isinstance(item, RankTier):
            tiers.append(item)
            continue
        if not isinstance(item, Mapping):
            errors.append(f"{item_name} = {_show(item)}: expected a table")
            continue
        tier = _build(RankTier, item, item_name, errors, set(), Path.cwd())
        if tier is not None:
            if not tier.name.strip():
                errors.append(f"{item_name}.name = {tier.name!r}: expected a non-empty name")
            tiers.append(tier)
    seen: dict[str, int] = {}
    for i, tier in enumerate(tiers):
        if tier.name in seen:
            errors.append(
                f"{name}[{i}].name = {tier.name!r}: already used by tier {seen[tier.name]}; "
                "tier names must be unique"
            )
        seen.setdefault(tier.name, i)
    return tuple(tiers) if len(errors) == n_before else None


def _check_rules(f: dataclasses.Field[Any], value: Any, name: str, errors: list[str]) -> None:
    if value is None:
        return
    meta = f.metadata
    if "choices" in meta and value not in meta["choices"]:
        choices = meta["choices"]
        errors.append(
            f"{name} = {value!r}: expected one of {', '.join(choices)}{_suggest(value, choices)}"
        )
        return
    bounds = [
        ("ge", operator.ge, "≥"),
        ("gt", operator.gt, ">"),
        ("le", operator.le, "≤"),
        ("lt", operator.lt, "<"),
    ]
    for rule, ok, sym in bounds:
        if rule in meta and not ok(value, meta[rule]):
            allowed = " and ".join(f"{s} {meta[r]}" for r, _, s in bounds if r in meta)
            errors.append(f"{name} = {value!r}: must be {allowed}")
            return


def _cross_check(s: Mapping[str, Any], errors: list[str]) -> None:
    server: ServerConfig = s["server"]
    fed: FederationConfig = s["federation"]
    _check_address(server.address, errors)
    for name in ("metrics_address", "health_address"):
        if getattr(server, name):
            _check_address(getattr(server, name), errors, name=f"server.{name}")
    if bool(server.tls_cert_file) != bool(server.tls_key_file):
        errors.append(
            "server.tls_cert_file and server.tls_key_file: set both (TLS) or neither (plaintext)"
        )
    if server.tls_client_ca_file and not server.tls_cert_file:
        errors.append(
            "server.tls_client_ca_file needs server.tls_cert_file and server.tls_key_file: "
            "mutual TLS is TLS plus client certificates"
        )
    need = server.max_chunk_bytes + CHUNK_OVERHEAD_BYTES
    if server.max_receive_message_bytes <= need:
        errors.append(
            f"server.max_receive_message_bytes = {server.max_receive_message_bytes}: must "
            f"exceed server.max_chunk_bytes + 64 KiB overhead = {need}"
        )
    if fed.clients_per_round and fed.clients_per_round < fed.min_clients:
        errors.append(
            f"federation.clients_per_round = {fed.clients_per_round}: must be 0 (every online "
            f"client) or ≥ federation.min_clients = {fed.min_clients}, or no round can "
            "reach its quorum"
        )
    if fed.mode == FederationMode.PERSONALIZED and fed.method in METHODS and not METHODS[fed.method].homogeneous:
        homogeneous = [name for name, m in METHODS.items() if m.homogeneous]
        errors.append(
            f"federation.method = {fed.method!r}: federation.mode = 'personalized' averages one "
            f"homogeneous shared adapter; set federation.method to one of {homogeneous}"
        )
    _check_allocation(s, errors)
    tracking: TrackingConfig = s["tracking"]
    if tracking.mlflow_uri and not tracking.mlflow_experiment.strip():
        errors.append("tracking.mlflow_experiment = '': name the MLflow experiment (default \"rankfed\")")
    if fed.heartbeat_timeout_seconds <= fed.heartbeat_interval_seconds:
        errors.append(
            f"federation.heartbeat_timeout_seconds = {fed.heartbeat_timeout_seconds}: must "
            f"exceed federation.heartbeat_interval_seconds = {fed.heartbeat_interval_seconds}"
        )


def _check_allocation(s: Mapping[str, Any], errors: list[str]) -> None:
    policy: RankPolicyConfig = s["rank_policy"]
    fed: FederationConfig = s["federation"]
    lora: LoraSection = s["lora"]
    if len(policy.score_metric) > MAX_METRIC_NAME_CHARS or not METRIC_NAME.fullmatch(policy.score_metric):
        errors.append(
            f"rank_policy.score_metric = {policy.score_metric!r}: expected a metric name of 1..{MAX_METRIC_NAME_CHARS} "
            "letters, digits and _ . : / - (e.g. loss or accuracy)"
        )
    if policy.allocation == "capability":
        return
    high = policy.high_rank or lora.max_rank
    if policy.high_rank > lora.max_rank:
        errors.append(f"rank_policy.high_rank = {policy.high_rank}: must be ≤ lora.max_rank = {lora.max_rank} (0: lora.max_rank)")
    if policy.low_rank > high:
        errors.append(f"rank_policy.low_rank = {policy.low_rank}: must be ≤ the high rank {high} (rank_policy.high_rank, "
                      "0: lora.max_rank)")
    if fed.mode == FederationMode.PERSONALIZED or (fed.method in METHODS and METHODS[fed.method].homogeneous):
        errors.append(
            f"rank_policy.allocation = {policy.allocation!r}: federation.method = {fed.method!r} "
            f"({fed.mode}) trains every client at one rank; data-aware allocation needs a rank-heterogeneous "
            "method, or set allocation = 'capability'"
        )


def _check_address(address: str, errors: list[str], name: str = "server.address") -> None:
    host, sep, port = address.rpartition(":")
    problem = ""
    if not sep or not host:
        problem = "expected host:port, e.g. 127.0.0.1:50051, 0.0.0.0:50051 or [::]:50051"
    elif not port.isdigit() or not 0 <= int(port) <= 65535:
        problem = "port must be an integer 0..65535 (0 picks a free port)"
    elif ":" in host and not (host.startswith("[") and host.endswith("]")):
        problem = "write an IPv6 host in brackets, e.g. [::]:50051"
    elif any(c.isspace() for c in host):
        problem = "host must not contain spaces"
    if problem:
        errors.append(f"{name} = {address!r}: {problem}")


def _plain(obj: Any, redact: bool) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if value is None:
                continue
            if redact and f.metadata.get("secret") and value:
                value = "***"
            out[f.name] = _plain(value, redact)
        return out
    if isinstance(obj, tuple | list):
        return [_plain(v, redact) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, enum.Enum):
        return obj.value
    return obj
