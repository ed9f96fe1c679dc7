"""The adapter data model: named LoRA modules (A, B, rank, alpha) plus dense trainables.

Orientation follows peft: ``lora_A.weight`` is (r, d_in) and ``lora_B.weight`` is
(d_out, r), so that the update of a module is ``ΔW = s · B @ A`` with the LoRA scaling
``s = alpha / r`` (rsLoRA: ``alpha / sqrt(r)``; Kalajdzievski 2023, arXiv 2312.03732).

Arrays are stored as read-only float32 views: the library never writes into an
adapter, and a caller who tries to gets an error instead of silently changing a global
adapter that other clients were redistributed from.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
import numpy.typing as npt

from .dtypes import F32Array
from .errors import AdapterValidationError

__all__ = ["LoraModule", "Adapter", "AdapterSpec", "as_readonly_f32"]


def as_readonly_f32(array: npt.ArrayLike) -> F32Array:
    """A C-contiguous float32 read-only view of ``array`` (a copy only when needed)."""
    out = np.ascontiguousarray(array, dtype=np.float32)
    if out.flags.writeable:
        out = out.view()
        out.flags.writeable = False
    return out


def lora_scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    """peft's LoRA scaling: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    if rank <= 0:
        raise AdapterValidationError(f"rank must be >= 1 to define a scaling, got {rank}")
    return float(alpha) / (math.sqrt(rank) if use_rslora else rank)


@dataclass(frozen=True, eq=False)
class LoraModule:
    """One LoRA module: ``a`` (r, d_in), ``b`` (d_out, r), ``alpha``.

    The rank is the number of rows of ``a``; ``b`` must have as many columns.
    """

    a: F32Array
    b: F32Array
    alpha: float

    def __post_init__(self) -> None:
        a = as_readonly_f32(self.a)
        b = as_readonly_f32(self.b)
        if a.ndim != 2 or b.ndim != 2:
            raise AdapterValidationError(
                f"lora_A and lora_B must be 2-D, got shapes {a.shape} and {b.shape}"
            )
        if a.shape[0] != b.shape[1]:
            raise AdapterValidationError(
                f"inconsistent rank: lora_A has {a.shape[0]} rows, lora_B has {b.shape[1]} columns"
            )
        alpha = float(self.alpha)
        if not math.isfinite(alpha) or alpha <= 0:
            raise AdapterValidationError(f"alpha must be a positive finite number, got {self.alpha!r}")
        object.__setattr__(self, "a", a)
        object.__setattr__(self, "b", b)
        object.__setattr__(self, "alpha", alpha)

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    @property
    def d_in(self) -> int:
        return int(self.a.shape[1])

    @property
    def d_out(self) -> int:
        return int(self.b.shape[0])

    def scaling(self, use_rslora: bool = False) -> float:
        """``alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA)."""
        return lora_scaling(self.alpha, self.rank, use_rslora)

    def delta(self, use_rslora: bool = False) -> F32Array:
        """The dense update ``s · B @ A``, shape (d_out, d_in). For tests and small modules."""
        return np.float32(self.scaling(use_rslora)) * (self.b @ self.a)  # (d_out, r) @ (r, d_in)

    def effective_b(self, use_rslora: bool = False) -> F32Array:
        """``s · B`` (d_out, r): B with the scaling folded in, so that ΔW = B~ @ A."""
        return self.b * np.float32(self.scaling(use_rslora))


@dataclass(frozen=True, eq=False)
class Adapter:
    """A LoRA adapter: modules by peft module path (no ``base_model.model.`` prefix) and
    dense trainables (e.g. ``classifier.weight``) by parameter name."""

    modules: Mapping[str, LoraModule]
    dense: Mapping[str, F32Array] = field(default_factory=dict)
    use_rslora: bool = False

    def __post_init__(self) -> None:
        for name, module in self.modules.items():
            if not isinstance(module, LoraModule):
                raise AdapterValidationError(
                    f"module {name!r} is a {type(module).__name__}, not a LoraModule", key=name
                )
        clash = set(self.modules) & set(self.dense)
        if clash:
            name = sorted(clash)[0]
            raise AdapterValidationError(f"{name!r} is both a LoRA module and a dense tensor", key=name)
        object.__setattr__(self, "modules", MappingProxyType(dict(self.modules)))
        dense = {name: as_readonly_f32(value) for name, value in self.dense.items()}
        object.__setattr__(self, "dense", MappingProxyType(dense))
        object.__setattr__(self, "use_rslora", bool(self.use_rslora))

    @property
    def ranks(self) -> dict[str, int]:
        return {name: module.rank for name, module in self.modules.items()}

    @property
    def alphas(self) -> dict[str, float]:
        return {name: module.alpha for name, module in self.modules.items()}

    @property
    def max_rank(self) -> int:
        return max((module.rank for module in self.modules.values()), default=0)

    @property
    def nbytes(self) -> int:
        lora = sum(m.a.nbytes + m.b.nbytes for m in self.modules.values())
        return int(lora + sum(v.nbytes for v in self.dense.values()))

    def scaling(self, name: str) -> float:
        return self.modules[name].scaling(self.use_rslora)

    def delta(self, name: str) -> F32Array:
        """Dense ΔW of module ``name``, (d_out, d_in)."""
        return self.modules[name].delta(self.use_rslora)

    def spec(self) -> AdapterSpec:
        """The shape spec this adapter satisfies."""
        return AdapterSpec(
            modules={n: (m.d_out, m.d_in) for n, m in self.modules.items()},
            dense={n: tuple(v.shape) for n, v in self.dense.items()},
        )


@dataclass(frozen=True)
class AdapterSpec:
    """What a round expects: module name -> (d_out, d_in), dense name -> shape."""

    modules: Mapping[str, tuple[int, int]]
    dense: Mapping[str, tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        modules = {n: (int(s[0]), int(s[1])) for n, s in self.modules.items()}
        dense = {n: tuple(int(d) for d in s) for n, s in self.dense.items()}
        object.__setattr__(self, "modules", MappingProxyType(modules))
        object.__setattr__(self, "dense", MappingProxyType(dense))

    def __hash__(self) -> int:
        return hash((tuple(sorted(self.modules.items())), tuple(sorted(self.dense.items()))))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AdapterSpec):
            return NotImplemented
        return dict(self.modules) == dict(other.modules) and dict(self.dense) == dict(other.dense)

    def validate(self, adapter: Adapter, *, max_rank: int | None = None) -> None:
        """Raise :class:`AdapterValidationError` naming the first offending key.

        Checks, in order: missing and extra modules and dense tensors, shapes, rank 0,
        ranks above ``max_rank``, A/B rank consistency and finiteness.
        """
        for name in self.modules:
            if name not in adapter.modules:
                raise AdapterValidationError(f"missing LoRA module {name!r}", key=name)
        for name in adapter.modules:
            if name not in self.modules:
                raise AdapterValidationError(f"unexpected LoRA module {name!r}", key=name)
        for name in self.dense:
            if name not in adapter.dense:
                raise AdapterValidationError(f"missing dense tensor {name!r}", key=name)
        for name in adapter.dense:
            if name not in self.dense:
                raise AdapterValidationError(f"unexpected dense tensor {name!r}", key=name)
        for name, (d_out, d_in) in self.modules.items():
            module = adapter.modules[name]
            if module.a.shape[0] != module.b.shape[1]:
                raise AdapterValidationError(
                    f"{name}: lora_A rank {module.a.shape[0]} != lora_B rank {module.b.shape[1]}",
                    key=name,
                )
            if module.d_in != d_in:
                raise AdapterValidationError(
                    f"{name}.lora_A: shape {module.a.shape}, expected (r, {d_in})", key=name
                )
            if module.d_out != d_out:
                raise AdapterValidationError(
                    f"{name}.lora_B: shape {module.b.shape}, expected ({d_out}, r)", key=name
                )
            if module.rank == 0:
                raise AdapterValidationError(f"{name}: rank 0", key=name)
            if max_rank is not None and module.rank > max_rank:
                raise AdapterValidationError(
                    f"{name}: rank {module.rank} exceeds max_rank {max_rank}", key=name
                )
            for part, array in (("lora_A", module.a), ("lora_B", module.b)):
                if not np.isfinite(array).all():
                    raise AdapterValidationError(f"{name}.{part}: non-finite values", key=name)
        for name, shape in self.dense.items():
            value = adapter.dense[name]
            if value.shape != shape:
                raise AdapterValidationError(
                    f"{name}: shape {value.shape}, expected {shape}", key=name
                )
            if not np.isfinite(value).all():
                raise AdapterValidationError(f"{name}: non-finite values", key=name)

    def init_adapter(
        self, *, rank: int, alpha: float, use_rslora: bool = False, seed: int = 0
    ) -> Adapter:
        """A fresh adapter as peft initialises one (``init_lora_weights=True``).

        A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(d_in), 1/sqrt(d_in)), B = 0, so ΔW = 0.
        Dense tensors: names ending in ``.bias`` are zeros, others N(0, 0.02) (the usual
        transformer head init). Modules are drawn in sorted-name order from one generator,
        so the result depends only on (spec, rank, seed).
        """
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        rng = np.random.default_rng(seed)
        modules = {}
        for name in sorted(self.modules):
            d_out, d_in = self.modules[name]
            bound = 1.0 / math.sqrt(d_in)
            a = rng.uniform(-bound, bound, size=(rank, d_in)).astype(np.float32)
            modules[name] = LoraModule(a=a, b=np.zeros((d_out, rank), np.float32), alpha=alpha)
        dense = {}
        for name in sorted(self.dense):
            shape = self.dense[name]
            if name.endswith(".bias"):
                dense[name] = np.zeros(shape, np.float32)
            else:
                dense[name] = rng.normal(0.0, 0.02, size=shape).astype(np.float32)
        return Adapter(modules=modules, dense=dense, use_rslora=use_rslora)
