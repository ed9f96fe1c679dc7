"""The base model, its identity, and the bridge between peft and `aggregation.Adapter`.

- `weights_sha256(dir)`: the identity of a local Hugging Face model directory.
- `load_base_model` / `load_tokenizer`: local files only, nothing is downloaded.
- `build_peft_model`: a peft model at a rank and alpha per module (rank_pattern/alpha_pattern).
- `adapter_from_peft` / `load_adapter`: peft state dict <-> `Adapter`, strict on keys and
  shapes (peft's own loader is not: engineering.md §1 pitfalls 2-3).

Module names are peft module paths without the ``base_model.model.`` prefix
(``bert.encoder.layer.0.attention.self.query``); dense names are parameter names
(``classifier.weight``).
"""

from __future__ import annotations

import copy
import hashlib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rankfed.aggregation import Adapter, LoraModule
from rankfed.protocol import LoraSettings
from rankfed.protocol.manifest import TASKS

from .errors import AdapterError, ModelError

if TYPE_CHECKING:
    import torch
    from peft import PeftModel

PEFT_PREFIX = "base_model.model."
_WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin")
_HEAD_NAMES = ("classifier", "score")  # seq-classification heads of BERT-like / decoder models


def resolve_model_dir(path: str | Path) -> Path:
    model_dir = Path(path).expanduser()
    if not (model_dir / "config.json").is_file():
        raise ModelError(
            f"{model_dir} is not a Hugging Face model directory (no config.json); "
            "pass the directory that holds config.json and the weights"
        )
    return model_dir


def weight_files(model_dir: str | Path) -> list[Path]:
    model_dir = resolve_model_dir(model_dir)
    for pattern in _WEIGHT_GLOBS:
        files = sorted(p for p in model_dir.glob(pattern) if p.is_file())
        if files:
            return files
    raise ModelError(f"{model_dir} holds no weight files (*.safetensors or pytorch_model*.bin)")


def weights_sha256(model_dir: str | Path) -> str:
    """sha256 over the weight files' bytes, concatenated in sorted file-name order.

    For the usual single ``model.safetensors`` this is that file's sha256, so it can be
    checked with ``sha256sum``. Safetensors files win over ``pytorch_model*.bin``.
    """
    digest = hashlib.sha256()
    for path in weight_files(model_dir):
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ModelError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")


def load_base_model(
    model_dir: str | Path, task: str, *, num_labels: int = 0, **config_overrides: Any
) -> torch.nn.Module:
    """The base model in fp32 and eval mode, from local files only."""
    _check_task(task)
    model_dir = resolve_model_dir(model_dir)
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    kwargs: dict[str, Any] = dict(config_overrides, local_files_only=True)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected: it is federated
    try:
        if task == "sequence-classification":
            if num_labels < 2:
                raise ModelError(f"sequence-classification needs num_labels >= 2, got {num_labels}")
            model = AutoModelForSequenceClassification.from_pretrained(
                model_dir, num_labels=num_labels, **kwargs
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load the model in {model_dir}: {err}") from err
    finally:
        hf_logging.set_verbosity(verbosity)
    return model.float().eval()


def load_tokenizer(model_dir: str | Path) -> Any:
    from transformers import AutoTokenizer

    model_dir = resolve_model_dir(model_dir)
    try:
        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load the tokenizer in {model_dir}: {err}") from err
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # decoder-only models often ship without a pad token
    return tok


def default_modules_to_save(model: torch.nn.Module, task: str) -> tuple[str, ...]:
    """The classification head (federated like the LoRA factors); nothing for causal LMs."""
    if task != "sequence-classification":
        return ()
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_children()}
    return tuple(n for n in _HEAD_NAMES if n in names)


def _exact(name: str) -> str:
    return f"^{re.escape(name)}$"


def peft_config(
    settings: LoraSettings,
    task: str,
    *,
    ranks: Mapping[str, int] | None = None,
    alphas: Mapping[str, float] | None = None,
    layers: Sequence[int] | None = None,
) -> Any:
    """A peft LoraConfig; per-module ``ranks``/``alphas`` that differ from the settings
    become exact-name rank_pattern/alpha_pattern entries. ``layers``: only the target
    modules of these layer indices get LoRA (peft's layers_to_transform); None: all."""
    _check_task(task)
    from peft import LoraConfig, TaskType

    rank_pattern = {_exact(n): int(r) for n, r in (ranks or {}).items() if int(r) != settings.rank}
    alpha_pattern = {
        _exact(n): float(a) for n, a in (alphas or {}).items() if float(a) != settings.alpha
    }
    return LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,  # type: ignore[arg-type]  # peft scales by any number; its stub says int
        lora_dropout=settings.dropout,
        use_rslora=settings.use_rslora,
        target_modules=list(settings.target_modules),
        modules_to_save=list(settings.modules_to_save) or None,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        layers_to_transform=list(layers) if layers is not None else None,
        task_type=TaskType.SEQ_CLS if task == "sequence-classification" else TaskType.CAUSAL_LM,
    )


def build_peft_model(
    base: torch.nn.Module,
    settings: LoraSettings,
    task: str,
    *,
    ranks: Mapping[str, int] | None = None,
    alphas: Mapping[str, float] | None = None,
    copy_base: bool = True,
    freeze_below_layer: int | None = None,
) -> PeftModel:
    """A peft model over ``base`` (deep-copied unless ``copy_base=False``: peft modifies the
    model it wraps in place). ``freeze_below_layer=k``: LoRA on encoder layers >= k only,
    the adapter's modules are those layers' (layer_cache.py trains them from cached states)."""
    from peft import get_peft_model

    from .layer_cache import check_layer, num_layers

    if settings.rank < 1:
        raise AdapterError(f"LoRA rank must be >= 1, got {settings.rank}")
    layers = None
    if freeze_below_layer is not None:
        check_layer(base, freeze_below_layer)
        layers = range(freeze_below_layer, num_layers(base))
    model = copy.deepcopy(base) if copy_base else base
    try:
        return get_peft_model(model, peft_config(settings, task, ranks=ranks, alphas=alphas, layers=layers))
    except ValueError as err:  # e.g. "Target modules {...} not found in the base model"
        raise AdapterError(f"cannot apply LoRA settings {settings}: {err}") from err


def _lora_layers(peft_model: PeftModel) -> dict[str, Any]:
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.r:
            out[name.removeprefix(PEFT_PREFIX)] = module
    return out


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", copy=True).float().numpy()


def adapter_from_peft(peft_model: PeftModel) -> Adapter:
    """A copy of the trained adapter (LoRA factors per module, dense heads) as numpy."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model)
    layers = _lora_layers(peft_model)
    modules: dict[str, LoraModule] = {}
    dense: dict[str, np.ndarray] = {}
    for key, tensor in state.items():
        name = key.removeprefix(PEFT_PREFIX)
        if name.endswith(".lora_A.weight"):
            mod = name.removesuffix(".lora_A.weight")
            b = state[f"{PEFT_PREFIX}{mod}.lora_B.weight"]
            modules[mod] = LoraModule(
                a=_to_numpy(tensor), b=_to_numpy(b), alpha=float(layers[mod].lora_alpha["default"])
            )
        elif name.endswith(".lora_B.weight"):
            continue
        elif ".lora_" in name:
            raise AdapterError(f"unsupported LoRA tensor {key!r} (only lora_A/lora_B)", key=key)
        else:
            dense[name] = _to_numpy(tensor)
    return Adapter(modules=modules, dense=dense, use_rslora=_uses_rslora(peft_model))


def _uses_rslora(peft_model: PeftModel) -> bool:
    """Whether the model's LoRA scales by alpha/sqrt(r) (its config is a LoraConfig)."""
    return bool(getattr(peft_model.peft_config["default"], "use_rslora", False))


def load_adapter(peft_model: PeftModel, adapter: Adapter) -> None:
    """Load ``adapter`` into ``peft_model`` exactly: every LoRA module and dense tensor the
    model trains must be in the adapter with the model's shape and alpha, and nothing else.
    Raises AdapterError naming the first offending key."""
    import torch
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(peft_model).items()}
    layers = _lora_layers(peft_model)
    if _uses_rslora(peft_model) != adapter.use_rslora:
        raise AdapterError(
            f"adapter use_rslora={adapter.use_rslora} but the model was built with "
            f"use_rslora={_uses_rslora(peft_model)}"
        )
    incoming: dict[str, torch.Tensor] = {}
    for name, module in adapter.modules.items():
        if name not in layers:
            raise AdapterError(f"unexpected LoRA module {name!r}: the model has no such target", key=name)
        model_alpha = float(layers[name].lora_alpha["default"])
        if not np.isclose(model_alpha, module.alpha, rtol=1e-6):
            raise AdapterError(
                f"{name}: adapter alpha {module.alpha} but the model has {model_alpha}", key=name
            )
        incoming[f"{PEFT_PREFIX}{name}.lora_A.weight"] = torch.from_numpy(np.array(module.a))
        incoming[f"{PEFT_PREFIX}{name}.lora_B.weight"] = torch.from_numpy(np.array(module.b))
    for name, value in adapter.dense.items():
        incoming[f"{PEFT_PREFIX}{name}"] = torch.from_numpy(np.array(value))
    for key in expected:
        if key not in incoming:
            raise AdapterError(f"missing key {key!r} in the adapter", key=key.removeprefix(PEFT_PREFIX))
    for key, tensor in incoming.items():
        if key not in expected:
            raise AdapterError(f"unexpected key {key!r} in the adapter", key=key.removeprefix(PEFT_PREFIX))
        if tuple(tensor.shape) != expected[key]:
            raise AdapterError(
                f"{key}: adapter shape {tuple(tensor.shape)}, the model expects {expected[key]}",
                key=key.removeprefix(PEFT_PREFIX),
            )
    result: Any = set_peft_model_state_dict(peft_model, incoming)  # torch's (missing, unexpected) keys
    if result.unexpected_keys:
        raise AdapterError(f"peft did not load {result.unexpected_keys[0]!r}", key=result.unexpected_keys[0])
    missed = [k for k in result.missing_keys if ".lora_" in k or ".modules_to_save." in k]
    if missed:
        raise AdapterError(f"peft left {missed[0]!r} unloaded", key=missed[0])


def peft_model_for_adapter(
    base: torch.nn.Module,
    adapter: Adapter,
    settings: LoraSettings,
    task: str,
    *,
    copy_base: bool = True,
    freeze_below_layer: int | None = None,
) -> PeftModel:
    """A peft model shaped like ``adapter`` (its rank and alpha per module) holding it
    (``freeze_below_layer``: an adapter of encoder layers >= k only, as `build_peft_model`)."""
    settings = LoraSettings(
        rank=settings.rank,
        alpha=settings.alpha,
        target_modules=settings.target_modules,
        use_rslora=adapter.use_rslora,
        alpha_rule=settings.alpha_rule,
        dropout=settings.dropout,
        modules_to_save=settings.modules_to_save,
    )
    model = build_peft_model(
        base, settings, task, ranks=adapter.ranks, alphas=adapter.alphas, copy_base=copy_base,
        freeze_below_layer=freeze_below_layer,
    )
    load_adapter(model, adapter)
    return model
