"""Write the model manifest (docs/model-manifest.md) the coordinator serves a federation from.

The module shapes come from peft itself, applied to the model built on the `meta` device
(no weights are read for that); the identity is `model.weights_sha256` over the real files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rankfed.protocol import LoraSettings
from rankfed.protocol.errors import ManifestError
from rankfed.protocol.manifest import MANIFEST_FORMAT, TASKS, manifest_from_dict
from rankfed.protocol.manifest import write_manifest as protocol_write_manifest

from .errors import ConfigError, ModelError
from .model import (
    PEFT_PREFIX,
    build_peft_model,
    default_modules_to_save,
    resolve_model_dir,
    weights_sha256,
)


def _meta_model(model_dir: Path, task: str, num_labels: int) -> Any:
    import torch
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
    )

    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot read the config in {model_dir}: {err}") from err
    auto: type[AutoModelForSequenceClassification] | type[AutoModelForCausalLM]
    if task == "sequence-classification":
        config.num_labels = num_labels
        auto = AutoModelForSequenceClassification
    else:
        auto = AutoModelForCausalLM
    with torch.device("meta"):
        # transformers leaves from_config unannotated (unused-ignore: only strict checking flags the call).
        return auto.from_config(config)  # type: ignore[no-untyped-call, unused-ignore]


def build_manifest(
    model_dir: str | Path,
    *,
    task: str,
    num_labels: int = 0,
    target_modules: tuple[str, ...],
    modules_to_save: tuple[str, ...] | None = None,
    model_id: str | None = None,
    labels: tuple[str, ...] = (),
    freeze_below_layer: int | None = None,
) -> dict[str, Any]:
    """The manifest as a JSON-ready dict, keys in the documented order. `labels`: class names
    in label-id order; every global adapter then carries them to the devices.
    `freeze_below_layer=k`: LoRA modules of encoder layers >= k only (devices then train
    from cached layer-k states; they must run with the same setting)."""
    if task not in TASKS:
        raise ConfigError(f"--task {task!r}: expected one of {', '.join(TASKS)}")
    if task == "sequence-classification" and num_labels < 2:
        raise ConfigError("--num-labels must be >= 2 for sequence-classification")
    if not target_modules:
        raise ConfigError("--target-modules is empty: name at least one module to wrap")
    model_dir = resolve_model_dir(model_dir)
    model = _meta_model(model_dir, task, num_labels)
    if modules_to_save is None:
        modules_to_save = default_modules_to_save(model, task)
    settings = LoraSettings(rank=1, alpha=1.0, target_modules=tuple(target_modules), modules_to_save=modules_to_save)
    peft_model = build_peft_model(model, settings, task, copy_base=False, freeze_below_layer=freeze_below_layer)
    from peft import get_peft_model_state_dict

    modules: dict[str, list[int]] = {}
    dense: dict[str, list[int]] = {}
    for key, tensor in get_peft_model_state_dict(peft_model).items():
        name = key.removeprefix(PEFT_PREFIX)
        if name.endswith(".lora_A.weight"):
            mod = name.removesuffix(".lora_A.weight")
            modules[mod] = [0, int(tensor.shape[1])]  # (r, d_in)
        elif name.endswith(".lora_B.weight"):
            mod = name.removesuffix(".lora_B.weight")
            modules.setdefault(mod, [0, 0])[0] = int(tensor.shape[0])  # (d_out, r)
        else:
            dense[name] = [int(d) for d in tensor.shape]
    if model_id is None:  # the directory name, or its parent's for a generic ".../model"
        resolved = model_dir.resolve()
        model_id = resolved.parent.name if resolved.name in ("model", "snapshot") else resolved.name
    return {
        "format": MANIFEST_FORMAT,
        "model_id": model_id,
        "weights_sha256": weights_sha256(model_dir),
        "task": task,
        "num_labels": num_labels if task == "sequence-classification" else 0,
        "target_modules": list(target_modules),
        "modules_to_save": list(modules_to_save),
        "modules": dict(sorted(modules.items())),
        "dense": dict(sorted(dense.items())),
        **({"labels": list(labels)} if labels else {}),
    }


def write_manifest(manifest: dict[str, Any], out: str | Path) -> None:
    """Validate with the coordinator's own reader, then write atomically: a manifest this
    writes is one the coordinator accepts."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        checked = manifest_from_dict(manifest)
    except ManifestError as err:
        raise ConfigError(f"the manifest for {out} would be invalid: {err}") from None
    protocol_write_manifest(checked, out)


def build_personalized_manifest(
    model_dirs: list[str | Path],
    *,
    task: str,
    num_labels: int = 0,
    target_modules: tuple[str, ...],
    shared_layers: tuple[int, ...] = (-1,),
    model_id: str | None = None,
    model_ids: list[str] | None = None,
) -> dict[str, Any]:
    """The manifest of a personalized federation (docs/personalized.md): the shared adapter's
    modules on ``shared_layers`` (negative: from the end) under model-independent names, and
    every model in ``model_dirs`` admitted; each must have those modules with the same shapes."""
    from .personal import shared_module_names

    if task not in TASKS:
        raise ConfigError(f"--task {task!r}: expected one of {', '.join(TASKS)}")
    if task == "sequence-classification" and num_labels < 2:
        raise ConfigError("--num-labels must be >= 2 for sequence-classification")
    if not model_dirs:
        raise ConfigError("give at least one --model")
    if model_ids is not None and len(model_ids) != len(model_dirs):
        raise ConfigError(f"{len(model_ids)} model ids for {len(model_dirs)} models")
    modules: dict[str, tuple[int, int]] | None = None
    models = []
    for i, path in enumerate(model_dirs):
        model_dir = resolve_model_dir(path)
        found = shared_module_names(_meta_model(model_dir, task, num_labels), target_modules, shared_layers)
        if modules is not None and found != modules:
            raise ConfigError(
                f"{model_dir}: shared modules {found} differ from the first model's {modules}; the shared "
                "adapter needs the same module names and shapes in every model"
            )
        modules = found
        resolved = model_dir.resolve()
        default_id = resolved.parent.name if resolved.name in ("model", "snapshot") else resolved.name
        models.append({"model_id": model_ids[i] if model_ids else default_id,
                       "weights_sha256": weights_sha256(model_dir)})
    assert modules is not None
    layers = ",".join(str(x) for x in shared_layers)
    return {
        "format": MANIFEST_FORMAT,
        "model_id": model_id or f"shared-layers-{layers}-{'-'.join(target_modules)}",
        "weights_sha256": models[0]["weights_sha256"],
        "task": task,
        "num_labels": num_labels if task == "sequence-classification" else 0,
        "target_modules": list(target_modules),
        "modules_to_save": [],
        "modules": {k: list(v) for k, v in sorted(modules.items())},
        "dense": {},
        "models": models,
    }
