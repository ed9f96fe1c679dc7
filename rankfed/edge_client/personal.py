"""pFedLoRA on the device (Yi et al. 2024; docs/personalized.md): one peft model holding a
*shared* adapter, which is federated, and a *private* part, which never leaves the device.

- The shared adapter's modules are named model-independently by the coordinator's manifest:
  a negative layer index counts from the end of the model's layer stack, so
  ``encoder.layer.-1.attention.self.query`` is ``bert.encoder.layer.5...`` on a 6-layer BERT
  and ``bert.encoder.layer.2...`` on a 3-layer one (`resolve_shared`).
- The private part is a LoRA on the same target modules of every other layer, at the
  device's own rank, plus the classification head (and the pooler, when the model has one:
  a checkpoint without pooler weights would otherwise keep a random one).
- `PersonalModel.set_phase` implements the alternating schedule: "private" trains the
  private part with the shared adapter frozen; "shared" trains the shared adapter with the
  private part frozen. "joint" trains both at once (FedPer: a shared body, a local head).
- `PersonalStore` keeps the private part on disk (safetensors + a small JSON) between rounds
  and across restarts; it is never uploaded.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rankfed.aggregation import Adapter, decode_adapter, encode_adapter
from rankfed.protocol import LoraSettings
from rankfed.protocol.files import write_atomic

from .errors import AdapterError, ConfigError, ModelError
from .model import (
    PEFT_PREFIX,
    adapter_from_peft,
    build_peft_model,
    default_modules_to_save,
    load_adapter,
)

if TYPE_CHECKING:
    import torch

STATE_FORMAT = "rankfed-personal-state/1"
PHASES = ("private", "shared", "joint", "frozen")
_INDEX = re.compile(r"^-?\d+$")


# --------------------------------------------------------------------------- names


def _linear_names(model: torch.nn.Module) -> list[str]:
    import torch

    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]


def resolve_shared(model: torch.nn.Module, shared_names: Iterable[str]) -> dict[str, str]:
    """Map each model-independent shared module name to this model's module name.

    A name with an integer component (``encoder.layer.-1.attention.self.query``) matches the
    model's modules ``<anything>.encoder.layer.<i>.attention.self.query``; a negative index
    counts from the end of that stack. A name without one must match exactly one module
    (as a suffix). Raises ModelError naming the shared module."""
    linears = _linear_names(model)
    out: dict[str, str] = {}
    for shared in shared_names:
        parts = shared.split(".")
        at = next((i for i, p in enumerate(parts) if _INDEX.match(p)), None)
        if at is None:
            found = [n for n in linears if n == shared or n.endswith("." + shared)]
            if len(found) != 1:
                raise ModelError(f"shared module {shared!r} matches {len(found)} linear modules of this model, not 1")
            out[shared] = found[0]
            continue
        prefix, suffix = ".".join(parts[:at]), ".".join(parts[at + 1 :])
        pattern = re.compile(rf"^(?:(.*)\.)?{re.escape(prefix)}\.(\d+)\.{re.escape(suffix)}$")
        stacks: dict[str, dict[int, str]] = {}
        for name in linears:
            m = pattern.match(name)
            if m:
                stacks.setdefault(m.group(1) or "", {})[int(m.group(2))] = name
        if len(stacks) != 1:
            raise ModelError(
                f"shared module {shared!r}: this model has {len(stacks)} layer stacks named "
                f"'{prefix}.<i>.{suffix}', expected exactly 1"
            )
        (layers,) = stacks.values()
        index = int(parts[at])
        local = index if index >= 0 else max(layers) + 1 + index
        if local not in layers:
            raise ModelError(
                f"shared module {shared!r}: this model has layers 0..{max(layers)}, no layer {index}"
            )
        out[shared] = layers[local]
    return out


def private_modules(model: torch.nn.Module, target_modules: Iterable[str], exclude: Iterable[str]) -> list[str]:
    """This model's modules that the private LoRA wraps: every target not shared."""
    targets, skip = tuple(target_modules), set(exclude)
    return [
        n for n in _linear_names(model)
        if n not in skip and any(n == t or n.endswith("." + t) for t in targets)
    ]


def private_modules_to_save(model: torch.nn.Module, task: str) -> tuple[str, ...]:
    """The classification head, plus the pooler when the model has one."""
    head = default_modules_to_save(model, task)
    pooler = tuple(
        name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name.endswith(".pooler") or name == "pooler"
    )
    return head + pooler[:1] if head else head


def shared_module_names(model: torch.nn.Module, target_modules: Iterable[str], layers: Iterable[int]) -> dict[str, tuple[int, int]]:
    """Model-independent names and (d_out, d_in) of the target modules of ``layers`` (negative:
    from the end), for a manifest: ``bert.encoder.layer.5.attention.self.query`` on a 6-layer
    model with layer -1 becomes ``encoder.layer.-1.attention.self.query``."""
    import torch

    targets = tuple(target_modules)
    by_stack: dict[tuple[str, str], dict[int, str]] = {}
    for name in _linear_names(model):
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        parts = name.split(".")
        at = max((i for i, p in enumerate(parts) if p.isdigit()), default=None)
        if at is None:
            continue
        stack = ".".join(parts[1:at]) if at > 1 else ".".join(parts[:at])
        by_stack.setdefault((stack, ".".join(parts[at + 1 :])), {})[int(parts[at])] = name
    out: dict[str, tuple[int, int]] = {}
    modules = dict(model.named_modules())
    for (stack, suffix), found in sorted(by_stack.items()):
        for layer in layers:
            local = layer if layer >= 0 else max(found) + 1 + layer
            if local not in found:
                raise ModelError(f"{stack}.<i>.{suffix}: no layer {layer} (the model has 0..{max(found)})")
            module = modules[found[local]]
            assert isinstance(module, torch.nn.Linear)
            out[f"{stack}.{layer}.{suffix}"] = (int(module.out_features), int(module.in_features))
    if not out:
        raise ModelError(f"no module in a layer stack matches target modules {list(targets)}")
    return out


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class PrivateSettings:
    """The private part: its LoRA rank and alpha, targets and trained dense modules."""

    rank: int = 8
    alpha: float | None = None  # None: 2 * rank (the scaling the shared adapter usually has)
    target_modules: tuple[str, ...] | None = None  # None: the shared adapter's target modules
    modules_to_save: tuple[str, ...] | None = None  # None: the head, plus the pooler if any

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"private rank must be >= 1, got {self.rank}")
        if self.alpha is not None and not self.alpha > 0:
            raise ConfigError(f"private alpha must be > 0, got {self.alpha}")


class PersonalModel:
    """A peft model over ``base`` with the shared adapter and the private part side by side."""

    def __init__(self, base: torch.nn.Module, task: str, shared: LoraSettings, shared_adapter: Adapter,
                 private: PrivateSettings) -> None:
        self.shared_map = resolve_shared(base, shared_adapter.modules)  # shared name -> local
        self._local_to_shared = {v: k for k, v in self.shared_map.items()}
        targets = private.target_modules or tuple(shared.target_modules)
        self.private_names = private_modules(base, targets, exclude=self.shared_map.values())
        p_alpha = private.alpha if private.alpha is not None else 2.0 * private.rank
        ranks = {n: private.rank for n in self.private_names}
        alphas = {n: p_alpha for n in self.private_names}
        for name, module in shared_adapter.modules.items():
            ranks[self.shared_map[name]] = module.rank
            alphas[self.shared_map[name]] = module.alpha
        to_save = private.modules_to_save if private.modules_to_save is not None else private_modules_to_save(base, task)
        settings = LoraSettings(
            rank=private.rank, alpha=p_alpha, target_modules=tuple(self.private_names) + tuple(self.shared_map.values()),
            use_rslora=shared_adapter.use_rslora, dropout=shared.dropout, modules_to_save=tuple(to_save),
        )
        self.model = build_peft_model(base, settings, task, ranks=ranks, alphas=alphas)
        self.key = (tuple(sorted(shared_adapter.ranks.items())), tuple(sorted(shared_adapter.alphas.items())),
                    shared_adapter.use_rslora, private)

    # -- adapters ----------------------------------------------------------------------

    def split(self) -> tuple[Adapter, Adapter]:
        """(shared adapter with model-independent names, private part with local names)."""
        full = adapter_from_peft(self.model)
        shared = {self._local_to_shared[n]: m for n, m in full.modules.items() if n in self._local_to_shared}
        private = {n: m for n, m in full.modules.items() if n not in self._local_to_shared}
        return (
            Adapter(modules=shared, use_rslora=full.use_rslora),
            Adapter(modules=private, dense=full.dense, use_rslora=full.use_rslora),
        )

    def load(self, shared: Adapter, private: Adapter) -> None:
        """Load both parts exactly (AdapterError names the first key that does not fit)."""
        modules = dict(private.modules)
        for name, module in shared.modules.items():
            if name not in self.shared_map:
                raise AdapterError(f"unexpected shared module {name!r}", key=name)
            modules[self.shared_map[name]] = module
        load_adapter(self.model, Adapter(modules=modules, dense=dict(private.dense), use_rslora=shared.use_rslora))

    # -- the alternating schedule ------------------------------------------------------

    def _is_shared(self, param_name: str) -> bool:
        return ".lora_" in param_name and param_name.split(".lora_")[0].removeprefix(PEFT_PREFIX) in self._local_to_shared

    def parameters_by_part(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(shared, private) trainable tensors by name: LoRA factors, and the dense copies."""
        shared: dict[str, Any] = {}
        private: dict[str, Any] = {}
        for name, p in self.model.named_parameters():
            if self._is_shared(name):
                shared[name] = p
            elif ".lora_" in name or ".modules_to_save." in name:
                private[name] = p
        return shared, private

    def set_phase(self, phase: str) -> None:
        """"private": train the private part, shared frozen; "shared": the opposite;
        "joint": both train; "frozen": nothing trains."""
        if phase not in PHASES:
            raise ValueError(f"phase {phase!r}: expected one of {PHASES}")
        shared, private = self.parameters_by_part()
        for p in shared.values():
            p.requires_grad_(phase in ("shared", "joint"))
        for p in private.values():
            p.requires_grad_(phase in ("private", "joint"))


# --------------------------------------------------------------------------- on disk


class PersonalStore:
    """``DIR/private_adapter.safetensors`` (private LoRA + head) and ``DIR/personal.json``
    (format, base model, digest of the weights file, rounds trained, eval history). The
    weights are written first and the JSON, which names their digest, last: a crash between
    the two leaves the previous state, never a mix."""

    WEIGHTS = "private_adapter.safetensors"
    INFO = "personal.json"

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory).expanduser()

    def load(self, base_sha256: str) -> tuple[Adapter, dict[str, Any]] | None:
        info_path = self.dir / self.INFO
        if not info_path.is_file():
            return None
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"{info_path}: cannot read the private state: {err}") from err
        if info.get("format") != STATE_FORMAT:
            raise ConfigError(f"{info_path}: format {info.get('format')!r}, expected {STATE_FORMAT!r}")
        if info.get("base_model_sha256") != base_sha256:
            raise ConfigError(
                f"{self.dir} holds the private state of another base model (sha256 "
                f"{str(info.get('base_model_sha256'))[:16]}…); use another --personal-dir for this model"
            )
        data = (self.dir / self.WEIGHTS).read_bytes()
        if hashlib.sha256(data).hexdigest() != info.get("weights_sha256"):
            raise ConfigError(f"{self.dir / self.WEIGHTS} does not match {info_path} (digest differs)")
        return decode_adapter(data), info

    def save(self, private: Adapter, info: Mapping[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        data = encode_adapter(private, metadata={"kind": "private", "base_model_sha256": str(info["base_model_sha256"])})
        write_atomic(self.dir / self.WEIGHTS, data)
        full = {"format": STATE_FORMAT, **info, "weights_sha256": hashlib.sha256(data).hexdigest()}
        write_atomic(self.dir / self.INFO, (json.dumps(full, indent=2) + "\n").encode())
