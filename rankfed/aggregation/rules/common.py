"""Shared pieces of the batch rules: input checks, effective factors, the global adapter.

Every rule works on **effective factors**: A_k and B~_k = s_k B_k with s_k the client's own
LoRA scaling (alpha_k / r_k, or alpha_k / sqrt(r_k) with rsLoRA), so that
ΔW_k = B~_k A_k whatever each client's rank and alpha (algorithms.md §10, option 2).

A global adapter is returned with ``alpha = r`` per module and ``use_rslora=False``, i.e.
scaling 1: its B *is* the effective B~ and ``delta()`` is exactly the rule's aggregate.
Redistribution unfolds each receiver's own scaling.

The batch rules compute in float64 (they are the reference the streaming accumulators
are tested against) and return float32.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..adapter import Adapter, LoraModule
from ..dtypes import F32Array, F64Array, FloatArray
from ..errors import AggregationError

__all__ = [
    "UNOWNED",
    "check_weights",
    "check_adapters",
    "effective",
    "global_module",
    "dense_average",
    "fill_unowned",
    "previous_factors",
]

UNOWNED = ("previous", "zero", "drop")


def check_weights(weights: Sequence[float], count: int) -> F64Array:
    """float64 weights, finite and >= 0, same length as the adapters, positive sum."""
    w = np.asarray(list(weights), dtype=np.float64)
    if w.shape != (count,):
        raise AggregationError(f"got {w.size} weights for {count} adapters")
    if not np.isfinite(w).all() or (w < 0).any():
        raise AggregationError(f"weights must be finite and >= 0, got {w.tolist()}")
    if w.sum() <= 0:
        raise AggregationError("weights sum to zero")
    return w


def check_adapters(adapters: Sequence[Adapter]) -> None:
    """All adapters share module names, module shapes and dense names/shapes."""
    if not adapters:
        raise AggregationError("no adapters to aggregate")
    spec = adapters[0].spec()
    for index, adapter in enumerate(adapters[1:], start=1):
        for name, (d_out, d_in) in spec.modules.items():
            module = adapter.modules.get(name)
            if module is None:
                raise AggregationError(f"adapter {index} lacks module {name!r}")
            if (module.d_out, module.d_in) != (d_out, d_in):
                raise AggregationError(
                    f"adapter {index}: {name} is {module.d_out}x{module.d_in}, expected {d_out}x{d_in}"
                )
        extra = set(adapter.modules) - set(spec.modules)
        if extra:
            raise AggregationError(f"adapter {index} has extra module {sorted(extra)[0]!r}")
        if set(adapter.dense) != set(spec.dense):
            diff = sorted(set(adapter.dense) ^ set(spec.dense))
            raise AggregationError(f"adapter {index}: dense tensors differ at {diff[0]!r}")
        for name, shape in spec.dense.items():
            if adapter.dense[name].shape != shape:
                raise AggregationError(f"adapter {index}: dense {name} has shape {adapter.dense[name].shape}")


def effective(adapter: Adapter, name: str) -> tuple[F64Array, F64Array]:
    """(A (r, d_in), B~ = s B (d_out, r)) in float64."""
    module = adapter.modules[name]
    s = module.scaling(adapter.use_rslora)
    return module.a.astype(np.float64), s * module.b.astype(np.float64)


def global_module(a: FloatArray, b_eff: FloatArray) -> LoraModule:
    """A module with scaling 1 (alpha = r, no rsLoRA) holding effective factors."""
    rank = a.shape[0]
    if rank < 1:
        raise AggregationError("a global module needs rank >= 1")
    return LoraModule(a=a.astype(np.float32), b=b_eff.astype(np.float32), alpha=float(rank))


def dense_average(adapters: Sequence[Adapter], weights: F64Array) -> dict[str, F32Array]:
    """FedAvg of the dense trainables by data weight (every rule does this)."""
    p = weights / weights.sum()
    names = adapters[0].dense
    return {
        name: sum(pk * ad.dense[name].astype(np.float64) for pk, ad in zip(p, adapters)).astype(np.float32)
        for name in names
    }


def previous_factors(
    previous: Adapter | None, name: str, d_out: int, d_in: int, rank: int
) -> tuple[F64Array, F64Array]:
    """Last round's effective factors of module ``name`` at ``rank`` components, float64:
    (A (rank, d_in), B~ = s B (d_out, rank)). Components beyond the previous adapter's rank
    are zero (truncating redistribution zero-pads them too); without a previous adapter, or
    without this module in it, all are zero."""
    a = np.zeros((rank, d_in))
    b_eff = np.zeros((d_out, rank))
    if previous is None or name not in previous.modules:
        return a, b_eff
    prev = previous.modules[name]
    if (prev.d_out, prev.d_in) != (d_out, d_in):
        raise AggregationError(f"previous adapter's {name} is {prev.d_out}x{prev.d_in}, expected {d_out}x{d_in}")
    stop = min(rank, prev.rank)
    a[:stop] = prev.a[:stop]
    b_eff[:, :stop] = prev.scaling(previous.use_rslora) * prev.b[:, :stop].astype(np.float64)
    return a, b_eff


def fill_unowned(
    a: F64Array,
    b_eff: F64Array,
    owned: int,
    name: str,
    *,
    unowned: str,
    previous: Adapter | None,
) -> tuple[F64Array, F64Array]:
    """Components ``owned..R-1`` of (a (R, d_in), b_eff (d_out, R)) were owned by no
    participant. ``"zero"`` leaves them zero, ``"drop"`` cuts the module to ``owned``
    components, ``"previous"`` copies last round's global values (zero where the previous
    adapter is shorter or missing)."""
    if unowned not in UNOWNED:
        raise ValueError(f"unowned must be one of {UNOWNED}, got {unowned!r}")
    rank = a.shape[0]
    if unowned == "drop":
        return a[:owned], b_eff[:, :owned]
    if unowned == "zero" or previous is None or owned >= rank:
        return a, b_eff
    prev_a, prev_b = previous_factors(previous, name, b_eff.shape[0], a.shape[1], rank)
    a = a.copy()
    b_eff = b_eff.copy()
    a[owned:] = prev_a[owned:]
    b_eff[:, owned:] = prev_b[:, owned:]
    return a, b_eff


def make_global(
    modules: Mapping[str, tuple[FloatArray, FloatArray]], dense: Mapping[str, F32Array]
) -> Adapter:
    return Adapter(
        modules={name: global_module(a, b) for name, (a, b) in modules.items()},
        dense=dense,
        use_rslora=False,
    )
