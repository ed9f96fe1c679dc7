"""The model manifest: what the coordinator knows of the base model without loading torch.
Both ends use this module: the edge client writes manifests, the coordinator reads them.

Format (docs/model-manifest.md), written by `rankfed edge manifest` through `write_manifest`:

    {"format": "rankfed-model-manifest/1", "model_id": ..., "weights_sha256": ...,
     "task": "sequence-classification", "num_labels": 5,
     "labels": ["business", "entertainment", "politics", "sport", "tech"],  # optional
     "target_modules": ["query", "value"], "modules_to_save": ["classifier"],
     "modules": {"bert.encoder.layer.0.attention.self.query": [384, 384], ...},  # [d_out, d_in]
     "dense": {"classifier.weight": [5, 384], "classifier.bias": [5]}}

A personalized federation (docs/personalized.md) may admit several base models; its modules
are then the shared adapter's, named model-independently (a negative layer index counts from
the end of each client's model), and model_id / weights_sha256 default to the first entry:

    {"format": ..., "model_id": "shared-last-layer-qv",
     "models": [{"model_id": "all-MiniLM-L6-v2", "weights_sha256": ...},
                {"model_id": "paraphrase-MiniLM-L3-v2", "weights_sha256": ...}],
     "task": "sequence-classification", "num_labels": 5, "target_modules": ["query", "value"],
     "modules": {"encoder.layer.-1.attention.self.query": [384, 384], ...}}

Every problem raises ManifestError naming the field or module; the coordinator refuses to
start on one (exit 2), `rankfed edge manifest` validates what it writes with the same code.
"""

from __future__ import annotations

import difflib
import json
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ManifestError
from .files import write_atomic

if TYPE_CHECKING:
    from rankfed.aggregation import AdapterSpec

__all__ = ["MANIFEST_FORMAT", "TASKS", "BaseModelEntry", "ModelManifest", "load_manifest", "write_manifest"]

MANIFEST_FORMAT = "rankfed-model-manifest/1"
TASKS = ("sequence-classification", "causal-lm")
_KEYS = (
    "format",
    "model_id",
    "weights_sha256",
    "task",
    "num_labels",
    "target_modules",
    "modules_to_save",
    "modules",
    "dense",
    "models",
    "labels",
)


@dataclass(frozen=True)
class BaseModelEntry:
    """A base model a device may join with."""

    model_id: str
    weights_sha256: str


@dataclass(frozen=True)
class ModelManifest:
    model_id: str
    weights_sha256: str  # 64 lowercase hex digits
    task: str  # one of TASKS
    num_labels: int  # >= 1 for sequence-classification; 0 allowed for causal-lm
    target_modules: tuple[str, ...]
    modules_to_save: tuple[str, ...]
    modules: dict[str, tuple[int, int]]  # LoRA-wrapped module -> (d_out, d_in)
    dense: dict[str, tuple[int, ...]] = field(default_factory=dict)  # federated non-LoRA
    # Every admitted base model; empty: only (model_id, weights_sha256).
    models: tuple[BaseModelEntry, ...] = ()
    # Class names in label-id order (optional); they travel in every global adapter's card.
    labels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _validate(self)

    def allowed_models(self) -> tuple[BaseModelEntry, ...]:
        """The base models a device may join with, the manifest's own first."""
        own = BaseModelEntry(self.model_id, self.weights_sha256)
        return self.models or (own,)

    def model_for(self, weights_sha256: str) -> BaseModelEntry | None:
        """The admitted base model with these weights, or None."""
        return next((m for m in self.allowed_models() if m.weights_sha256 == weights_sha256), None)

    def adapter_spec(self) -> AdapterSpec:
        """The module shapes as the aggregation package's AdapterSpec."""
        from rankfed.aggregation import (
            AdapterSpec,  # lazy: written in parallel, numpy-heavy
        )

        return AdapterSpec(modules=dict(self.modules), dense=dict(self.dense))

    def to_json_dict(self) -> dict[str, Any]:
        """The manifest as JSON-ready data, in the documented key order."""
        return {
            "format": MANIFEST_FORMAT,
            "model_id": self.model_id,
            "weights_sha256": self.weights_sha256,
            "task": self.task,
            "num_labels": self.num_labels,
            "target_modules": list(self.target_modules),
            "modules_to_save": list(self.modules_to_save),
            "modules": {k: list(v) for k, v in self.modules.items()},
            "dense": {k: list(v) for k, v in self.dense.items()},
            **({"models": [{"model_id": m.model_id, "weights_sha256": m.weights_sha256} for m in self.models]}
               if self.models else {}),
            **({"labels": list(self.labels)} if self.labels else {}),
        }


def load_manifest(path: Path) -> ModelManifest:
    """Read and validate a manifest; ManifestError names the file and the field or module."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(
            f"model manifest {str(path)!r} does not exist; write one on a machine that has "
            "the model with `rankfed edge manifest --model DIR --out model-manifest.json` "
            "and point model.manifest at it"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"cannot read model manifest {str(path)!r}: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"model manifest {path}: not valid JSON: {exc}") from None
    try:
        return manifest_from_dict(data)
    except ManifestError as exc:
        raise ManifestError(f"model manifest {path}: {exc}") from None


def manifest_from_dict(data: Any) -> ModelManifest:
    """Validate parsed manifest JSON and build the dataclass."""
    if not isinstance(data, Mapping):
        raise ManifestError(f"expected a JSON object, got {type(data).__name__}")
    unknown = [k for k in data if k not in _KEYS]
    if unknown:
        hint = difflib.get_close_matches(unknown[0], _KEYS, n=1)
        raise ManifestError(
            f"unknown field {unknown[0]!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
        )
    fmt = data.get("format")
    if fmt != MANIFEST_FORMAT:
        raise ManifestError(
            f"format = {fmt!r}: expected {MANIFEST_FORMAT!r}; rewrite the manifest with "
            "this version's `rankfed edge manifest`"
        )
    models = _models(data["models"]) if "models" in data else ()
    data = dict(data)
    if models:  # the top-level identity defaults to the first admitted model
        data.setdefault("weights_sha256", models[0].weights_sha256)
        data.setdefault("model_id", models[0].model_id)
    for key in ("model_id", "weights_sha256", "task", "target_modules", "modules"):
        if key not in data:
            raise ManifestError(f"missing field {key!r}")
    task = data["task"]
    if task == "sequence-classification" and "num_labels" not in data:
        raise ManifestError("missing field 'num_labels' (required for sequence-classification)")
    num_labels = data.get("num_labels", 0)
    return ModelManifest(
        model_id=data["model_id"],
        weights_sha256=data["weights_sha256"].lower()
        if isinstance(data["weights_sha256"], str)
        else data["weights_sha256"],
        task=task,
        num_labels=num_labels,
        target_modules=_str_tuple(data["target_modules"], "target_modules"),
        modules_to_save=_str_tuple(data.get("modules_to_save", []), "modules_to_save"),
        modules=_shapes(data["modules"], "modules"),  # type: ignore[arg-type]
        dense=_shapes(data.get("dense", {}), "dense"),
        models=models,
        labels=_str_tuple(data.get("labels", []), "labels"),
    )


def write_manifest(manifest: ModelManifest, path: Path) -> None:
    """Write `manifest` as JSON, atomically (a temporary file renamed over `path`)."""
    path = Path(path)
    write_atomic(path, (json.dumps(manifest.to_json_dict(), indent=2) + "\n").encode("utf-8"))


def _str_tuple(value: Any, name: str) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) and v for v in value):
        raise ManifestError(f"{name} = {value!r}: expected a list of non-empty strings")
    return tuple(value)


def _models(value: Any) -> tuple[BaseModelEntry, ...]:
    if not isinstance(value, list | tuple) or not value:
        raise ManifestError(f"models = {value!r}: expected a non-empty list of {{model_id, weights_sha256}} objects")
    out: list[BaseModelEntry] = []
    for i, item in enumerate(value):
        if not isinstance(item, Mapping) or set(item) != {"model_id", "weights_sha256"}:
            raise ManifestError(f"models[{i}] = {item!r}: expected an object with model_id and weights_sha256")
        sha = item["weights_sha256"]
        out.append(BaseModelEntry(item["model_id"], sha.lower() if isinstance(sha, str) else sha))
    return tuple(out)


def _shapes(value: Any, name: str) -> dict[str, tuple[int, ...]]:
    if not isinstance(value, Mapping):
        raise ManifestError(f"{name} = {value!r}: expected an object of name -> shape")
    out: dict[str, tuple[int, ...]] = {}
    for key, dims in value.items():
        if not isinstance(dims, list | tuple) or not all(
            isinstance(d, int) and not isinstance(d, bool) for d in dims
        ):
            raise ManifestError(f"{name}[{key!r}] = {dims!r}: expected a list of integers")
        out[key] = tuple(dims)
    return out


def _is_sha(sha: Any) -> bool:
    return isinstance(sha, str) and len(sha) == 64 and set(sha) <= set(string.hexdigits.lower())


def _validate(m: ModelManifest) -> None:
    if not isinstance(m.model_id, str) or not m.model_id:
        raise ManifestError(f"model_id = {m.model_id!r}: expected a non-empty string")
    seen: set[str] = set()
    for i, entry in enumerate(m.models):
        if not isinstance(entry.model_id, str) or not entry.model_id:
            raise ManifestError(f"models[{i}].model_id = {entry.model_id!r}: expected a non-empty string")
        if not _is_sha(entry.weights_sha256):
            raise ManifestError(f"models[{i}].weights_sha256 = {entry.weights_sha256!r}: expected 64 lowercase hex digits")
        if entry.weights_sha256 in seen:
            raise ManifestError(f"models[{i}].weights_sha256: listed twice; list each base model once")
        seen.add(entry.weights_sha256)
    sha = m.weights_sha256
    if not _is_sha(sha):
        raise ManifestError(
            f"weights_sha256 = {sha!r}: expected 64 lowercase hex digits (sha256 of the "
            "base model's weight files)"
        )
    if m.models and sha not in seen:
        raise ManifestError(
            "weights_sha256 is not one of models[].weights_sha256; omit it (it defaults to the first) or list it"
        )
    if m.task not in TASKS:
        raise ManifestError(f"task = {m.task!r}: expected one of {', '.join(TASKS)}")
    low = 1 if m.task == "sequence-classification" else 0
    if not isinstance(m.num_labels, int) or isinstance(m.num_labels, bool) or m.num_labels < low:
        raise ManifestError(
            f"num_labels = {m.num_labels!r}: expected an integer ≥ {low} for task {m.task}"
        )
    if m.labels and len(m.labels) != m.num_labels:
        raise ManifestError(f"labels lists {len(m.labels)} names for num_labels = {m.num_labels}; list one per class")
    if not m.target_modules:
        raise ManifestError("target_modules is empty: name at least one module LoRA wraps")
    if not m.modules:
        raise ManifestError(
            "modules is empty: the manifest lists no LoRA-wrapped module; check "
            f"target_modules {list(m.target_modules)} against the model's module names"
        )
    for name, dims in m.modules.items():
        if len(dims) != 2:
            raise ManifestError(f"modules[{name!r}] = {list(dims)}: expected [d_out, d_in]")
        if any(d <= 0 for d in dims):
            raise ManifestError(f"modules[{name!r}] = {list(dims)}: dimensions must be positive")
        if not any(name == t or name.endswith("." + t) for t in m.target_modules):
            raise ManifestError(
                f"modules[{name!r}]: matches none of target_modules {list(m.target_modules)}"
            )
    for name, shape in m.dense.items():
        if not shape or any(d <= 0 for d in shape):
            raise ManifestError(
                f"dense[{name!r}] = {list(shape)}: expected a non-empty shape of positive sizes"
            )
