"""Builders shared by the aggregation tests: random adapters with non-zero B."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from rankfed.aggregation import Adapter, AdapterSpec, LoraModule

SPEC = AdapterSpec(
    modules={"enc.q": (6, 5), "enc.v": (4, 5), "dec.o": (3, 7)},
    dense={"classifier.weight": (2, 5), "classifier.bias": (2,)},
)


def random_adapter(
    spec: AdapterSpec,
    rank: int | Mapping[str, int],
    *,
    alpha: float | Mapping[str, float] = 8.0,
    use_rslora: bool = False,
    seed: int = 0,
) -> Adapter:
    rng = np.random.default_rng(seed)
    modules = {}
    for name, (d_out, d_in) in spec.modules.items():
        r = rank[name] if isinstance(rank, Mapping) else rank
        al = alpha[name] if isinstance(alpha, Mapping) else alpha
        modules[name] = LoraModule(
            a=rng.normal(size=(r, d_in)), b=rng.normal(size=(d_out, r)), alpha=al
        )
    dense = {name: rng.normal(size=shape) for name, shape in spec.dense.items()}
    return Adapter(modules=modules, dense=dense, use_rslora=use_rslora)


def module(a, b, alpha=None) -> LoraModule:
    a = np.asarray(a, np.float32)
    return LoraModule(a=a, b=np.asarray(b, np.float32), alpha=float(a.shape[0] if alpha is None else alpha))


def rel(x: np.ndarray, y: np.ndarray) -> float:
    """Norm-wise relative difference ‖x − y‖ / max(‖y‖, tiny)."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    return float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30))


def ideal(adapters, weights, name) -> np.ndarray:
    """Σ_k p_k s_k B_k A_k in float64: the exact weighted mean of the updates."""
    w = np.asarray(weights, np.float64)
    p = w / w.sum()
    return sum(
        pk * ad.scaling(name) * (ad.modules[name].b.astype(np.float64) @ ad.modules[name].a.astype(np.float64))
        for pk, ad in zip(p, adapters)
    )
