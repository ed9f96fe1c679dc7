"""Robust aggregation: no single update may dominate a round.

An update's size is the Frobenius norm of everything it would add to the model: every
module's ΔW = s·B·A and every dense tensor. Updates larger than ``factor`` × the median of
the round are scaled down to that bound before they are aggregated (median-based norm
clipping; with honest devices the norms sit within a small factor of each other, so a
generous factor never touches them). Norms are computed in the factored form: with
A (r, d_in) and B~ = s·B (d_out, r),

    ‖B~ A‖_F² = trace((B~ᵀ B~)(A Aᵀ))        two (r, r) products, never (d_out, d_in)
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

import numpy as np

from .adapter import Adapter, LoraModule


def update_norm(adapter: Adapter) -> float:
    """‖update‖_F over all modules and dense tensors. It runs on every accepted upload, so
    it never copies a factor: the (r, r) Gram matrices come from the float32 factors (BLAS)
    and only they are summed in float64; the scaling enters as s²."""
    total = 0.0
    for module in adapter.modules.values():
        s = module.scaling(adapter.use_rslora)
        gram_b = module.b.T @ module.b  # (r, d_out) @ (d_out, r)
        gram_a = module.a @ module.a.T  # (r, d_in) @ (d_in, r)
        term = float(np.sum(gram_b.astype(np.float64) * gram_a.astype(np.float64)))  # trace(G_b G_a)
        if not math.isfinite(term):  # float32 Gram overflowed: an outlier, measured exactly
            a64, b64 = module.a.astype(np.float64), module.b.astype(np.float64)
            term = float(np.sum((b64.T @ b64) * (a64 @ a64.T)))
        total += s * s * term
    for value in adapter.dense.values():
        total += float(np.sum(np.square(value, dtype=np.float64)))
    return math.sqrt(max(total, 0.0))


def clip_bound(norms: Sequence[float], factor: float) -> float | None:
    """The largest norm an update may have in a round with these norms (None: no bound:
    clipping is off, or too few updates to tell an outlier from the rest)."""
    finite = [n for n in norms if math.isfinite(n)]
    if factor <= 0 or len(finite) < 3:
        return None
    return factor * statistics.median(finite)


def scale_update(adapter: Adapter, factor: float) -> Adapter:
    """The adapter with its whole update multiplied by `factor` (B and dense tensors; A and
    alpha unchanged, so the rank structure and scaling rule are the device's own)."""
    f = np.float32(factor)
    modules = {name: LoraModule(a=m.a, b=m.b * f, alpha=m.alpha) for name, m in adapter.modules.items()}
    dense = {name: value * f for name, value in adapter.dense.items()}
    return Adapter(modules=modules, dense=dense, use_rslora=adapter.use_rslora)


def clip_factors(norms: Mapping[str, float], factor: float) -> dict[str, float]:
    """Per update (by key), the factor that brings it within the round's bound; only the
    updates that need one are listed."""
    bound = clip_bound(list(norms.values()), factor)
    if bound is None:
        return {}
    return {key: bound / norm for key, norm in norms.items() if norm > bound > 0}
