"""The fleet file of `rankfed simulate`: typed sections read from TOML, every value checked
before anything starts (`FleetError` names the key and what is allowed).

    seed = 0
    rounds = 20
    method = "zero_pad"

    [devices]          # virtual devices: data, not processes
    count = 100
    profiles = { cuda-large = 0.2, cpu-fast = 0.3, mobile = 0.5 }   # fractions, sum 1
    assignment = "random"      # random | aligned | anti-aligned (high ranks vs data quality)
    dropout = 0.05             # chance a selected device never answers
    latency = { distribution = "lognormal", median_s = 30.0, sigma = 0.5 }

    [data]
    dataset = "wordnet"        # bbc | tweets | wordnet | a JSONL file of {"text", "label"}
    ...

Sections and keys are listed by the dataclasses below; an unknown key is an error, not a
silently ignored typo.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rankfed.aggregation import METHODS

from .profiles import PROFILES


class FleetError(ValueError):
    """A fleet file or flag that cannot describe a simulation; one line saying what to fix."""


@dataclass(frozen=True)
class Latency:
    distribution: str = "fixed"  # fixed | lognormal | exponential
    median_s: float = 1.0  # fixed: the value; lognormal: exp(mu); exponential: the median
    sigma: float = 0.5  # lognormal only


@dataclass(frozen=True)
class Devices:
    count: int = 10
    profiles: Mapping[str, float] = field(default_factory=lambda: {"cuda-large": 0.2, "cpu-fast": 0.3, "mobile": 0.5})
    assignment: str = "random"
    dropout: float = 0.0
    latency: Latency = field(default_factory=Latency)


@dataclass(frozen=True)
class Data:
    dataset: str = "bbc"
    examples_per_device: int = 100  # mean training examples per device (Dirichlet sizes vary)
    dirichlet_alpha: float = 0.5
    quality_fraction: float = 0.0  # devices with near-balanced (IID) and clean labels
    label_noise: float = 0.0  # fraction of flipped labels on the other devices
    local_validation: float = 0.0  # each device's own held-out split (its metrics.eval)
    validation_examples: int = 500  # the global validation set (tuning, allocation scores)
    test_examples: int = 500
    max_length: int = 64


@dataclass(frozen=True)
class Training:
    local_steps: int = 10
    learning_rate: float = 5e-3
    batch_size: int = 16
    max_rank: int = 16
    target_modules: tuple[str, ...] = ("query", "value")
    freeze_below_layer: int | None = None  # LoRA on layers >= k, trained from cached states
    hetlora_lambda: float = 0.0
    hetlora_gamma: float = 0.99
    # No training: each device uploads its downloaded adapter plus noise (system benchmarks:
    # the coordinator, transport and scheduling at scale without torch).
    synthetic: bool = False
    model: str = ""  # a model directory; "" = the bundled all-MiniLM-L6-v2


@dataclass(frozen=True)
class Federation:
    participation: float = 0.1  # < 1: a fraction of the devices per round; >= 1: a count
    min_updates: int = 0  # the round's quorum; 0: half the participants (at least 1)
    deadline_s: float = 600.0  # virtual seconds: devices later than this are LATE
    # Any coordinator setting by dotted name, e.g. { "rank_policy.round_budget_bytes" = 1e6 }.
    coordinator: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Backend:
    kind: str = "local"  # local | ray
    workers: int = 2  # compute slots (threads, processes or Ray actors)
    mode: str = "threads"  # local: threads | processes
    ray_address: str = ""  # "" = ray.init() here; "auto" or host:port = an existing cluster
    num_cpus: float = 1.0  # per slot (Ray)
    num_gpus: float = 0.0  # per slot (Ray; fractions share a GPU)
    torch_threads: int = 1  # per slot


@dataclass(frozen=True)
class Evaluation:
    every: int = 1  # score the global adapter every N rounds (and always the last)
    per_rank: bool = False  # also each rank's truncation of it (what each device trains)
    test: bool = True  # the test set too (the validation set is always scored)


@dataclass(frozen=True)
class Fleet:
    seed: int = 0
    rounds: int = 5
    method: str = "zero_pad"
    devices: Devices = field(default_factory=Devices)
    data: Data = field(default_factory=Data)
    training: Training = field(default_factory=Training)
    federation: Federation = field(default_factory=Federation)
    backend: Backend = field(default_factory=Backend)
    eval: Evaluation = field(default_factory=Evaluation)

    @property
    def participants(self) -> int:
        p = self.federation.participation
        return max(1, round(p * self.devices.count)) if p < 1 else int(p)

    @property
    def quorum(self) -> int:
        return self.federation.min_updates or max(1, self.participants // 2)


_SECTIONS = {"devices": Devices, "data": Data, "training": Training, "federation": Federation,
             "backend": Backend, "eval": Evaluation}
_FREE_MAPS = {("devices", "profiles"), ("federation", "coordinator")}


def _build(cls: type, values: Mapping[str, Any], where: str) -> Any:
    if not isinstance(values, Mapping):
        raise FleetError(f"{where} must be a table, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise FleetError(f"unknown key {where}.{unknown[0]}; valid keys: {', '.join(sorted(fields))}")
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        spec = fields[name]
        default = spec.default_factory() if callable(spec.default_factory) else spec.default
        if name == "latency":
            kwargs[name] = _build(Latency, value, f"{where}.latency")
        elif (where, name) in _FREE_MAPS:
            if not isinstance(value, Mapping):
                raise FleetError(f"{where}.{name} must be a table, got {value!r}")
            kwargs[name] = dict(value)
        elif isinstance(default, tuple):
            if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
                raise FleetError(f"{where}.{name} must be a list of strings, got {value!r}")
            kwargs[name] = tuple(value)
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise FleetError(f"{where}.{name} must be true or false, got {value!r}")
            kwargs[name] = value
        elif isinstance(default, int) or (default is None and name == "freeze_below_layer"):
            if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
                raise FleetError(f"{where}.{name} must be an integer, got {value!r}")
            kwargs[name] = int(value)
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise FleetError(f"{where}.{name} must be a finite number, got {value!r}")
            kwargs[name] = float(value)
        elif isinstance(default, str):
            if not isinstance(value, str):
                raise FleetError(f"{where}.{name} must be a string, got {value!r}")
            kwargs[name] = value
        else:  # pragma: no cover - every field type is handled above
            kwargs[name] = value
    return cls(**kwargs)


def fleet_from_dict(values: Mapping[str, Any]) -> Fleet:
    top = {f.name: f for f in dataclasses.fields(Fleet)}
    unknown = sorted(set(values) - set(top))
    if unknown:
        raise FleetError(f"unknown key {unknown[0]!r}; valid top-level keys: {', '.join(sorted(top))}")
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        if name in _SECTIONS:
            kwargs[name] = _build(_SECTIONS[name], value, name)
        elif name == "method":
            if not isinstance(value, str):
                raise FleetError(f"method must be a string, got {value!r}")
            kwargs[name] = value
        else:
            if isinstance(value, bool) or not isinstance(value, int):
                raise FleetError(f"{name} must be an integer, got {value!r}")
            kwargs[name] = value
    fleet = Fleet(**kwargs)
    validate(fleet)
    return fleet


def set_dotted(values: dict[str, Any], dotted: str, raw: str) -> None:
    """Apply one ``--set section.key=value`` (value parsed as TOML, else a string)."""
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    *path, last = dotted.split(".")
    node = values
    for part in path:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise FleetError(f"--set {dotted}: {part} is not a table")
    node[last] = value


def load_fleet(path: Path | None, overrides: Mapping[str, Any] | None = None,
               settings: list[str] | None = None) -> Fleet:
    """The fleet of a TOML file (None: every default), then ``settings`` (``key=value``
    strings, dotted keys) and ``overrides`` (dotted key -> value) on top."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            values = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise FleetError(f"fleet file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise FleetError(f"fleet file {path} is not valid TOML: {exc}") from None
    for item in settings or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise FleetError(f"--set {item!r}: expected key=value")
        set_dotted(values, key.strip(), raw.strip())
    for key, value in (overrides or {}).items():
        if value is not None:
            *parts, last = key.split(".")
            node = values
            for part in parts:
                node = node.setdefault(part, {})
            node[last] = value
    return fleet_from_dict(values)


def validate(fleet: Fleet) -> None:
    d, data, t, f, b = fleet.devices, fleet.data, fleet.training, fleet.federation, fleet.backend
    if fleet.rounds < 1:
        raise FleetError(f"rounds must be >= 1, got {fleet.rounds}")
    if fleet.method not in METHODS:
        raise FleetError(f"unknown method {fleet.method!r}; choose from {', '.join(METHODS)}")
    if d.count < 1:
        raise FleetError(f"devices.count must be >= 1, got {d.count}")
    unknown = sorted(set(d.profiles) - set(PROFILES))
    if unknown:
        raise FleetError(f"devices.profiles: unknown profile {unknown[0]!r}; choose from {', '.join(PROFILES)}")
    if not d.profiles or any(not (isinstance(v, int | float) and 0 <= v <= 1) for v in d.profiles.values()):
        raise FleetError(f"devices.profiles must map profiles to fractions in [0, 1], got {dict(d.profiles)}")
    if abs(sum(d.profiles.values()) - 1.0) > 1e-6:
        raise FleetError(f"devices.profiles fractions must sum to 1, got {sum(d.profiles.values()):g}")
    if d.assignment not in ("random", "aligned", "anti-aligned"):
        raise FleetError(f"devices.assignment must be random, aligned or anti-aligned, got {d.assignment!r}")
    if not 0 <= d.dropout < 1:
        raise FleetError(f"devices.dropout must be in [0, 1), got {d.dropout}")
    if d.latency.distribution not in ("fixed", "lognormal", "exponential"):
        raise FleetError(f"devices.latency.distribution must be fixed, lognormal or exponential, got {d.latency.distribution!r}")
    if d.latency.median_s < 0 or d.latency.sigma < 0:
        raise FleetError("devices.latency.median_s and sigma must be >= 0")
    for name in ("quality_fraction", "label_noise"):
        if not 0 <= getattr(data, name) <= 1:
            raise FleetError(f"data.{name} must be in [0, 1], got {getattr(data, name)}")
    if not 0 <= data.local_validation < 1:
        raise FleetError(f"data.local_validation must be in [0, 1), got {data.local_validation}")
    if data.dirichlet_alpha <= 0:
        raise FleetError(f"data.dirichlet_alpha must be > 0, got {data.dirichlet_alpha}")
    for name in ("examples_per_device", "validation_examples", "test_examples"):
        if getattr(data, name) < 1:
            raise FleetError(f"data.{name} must be >= 1, got {getattr(data, name)}")
    if data.max_length < 2:
        raise FleetError(f"data.max_length must be >= 2, got {data.max_length}")
    if f.participation <= 0 or (f.participation >= 1 and not float(f.participation).is_integer()):
        raise FleetError(f"federation.participation must be a fraction in (0, 1) or a whole count, got {f.participation}")
    if fleet.participants > d.count:
        raise FleetError(f"federation.participation asks for {fleet.participants} devices per round but the fleet has {d.count}")
    if f.min_updates < 0 or f.min_updates > fleet.participants:
        raise FleetError(f"federation.min_updates must be in [0, {fleet.participants}] (the participants), got {f.min_updates}")
    if f.deadline_s <= 0:
        raise FleetError(f"federation.deadline_s must be > 0, got {f.deadline_s}")
    for name in ("local_steps", "batch_size", "max_rank"):
        if getattr(t, name) < 1:
            raise FleetError(f"training.{name} must be >= 1, got {getattr(t, name)}")
    if not t.learning_rate > 0:
        raise FleetError(f"training.learning_rate must be > 0, got {t.learning_rate}")
    if not t.target_modules:
        raise FleetError("training.target_modules must name at least one module")
    if t.model and not Path(t.model).is_dir():
        raise FleetError(f"training.model {t.model} is not a directory")
    if b.kind not in ("local", "ray"):
        raise FleetError(f"backend.kind must be local or ray, got {b.kind!r}")
    if b.mode not in ("threads", "processes"):
        raise FleetError(f"backend.mode must be threads or processes, got {b.mode!r}")
    if b.workers < 1 or b.torch_threads < 1:
        raise FleetError("backend.workers and backend.torch_threads must be >= 1")
    if b.num_cpus < 0 or b.num_gpus < 0:
        raise FleetError("backend.num_cpus and backend.num_gpus must be >= 0")
    if fleet.eval.every < 1:
        raise FleetError(f"eval.every must be >= 1, got {fleet.eval.every}")
