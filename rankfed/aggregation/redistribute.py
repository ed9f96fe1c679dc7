"""From a global adapter to one client's (rank, alpha): truncation, SVD, zero-padding.

A global adapter holds effective factors: its delta is what a rule aggregated. To send it
to a client that trains at rank r with ``alpha`` (and rsLoRA or not), take r components
of the effective factors (B~ = s_g B_g) and unfold the client's scaling, B_c = B~ / s_c,
so that the client's ΔW = s_c B_c A_c is exactly the chosen rank-r part of the global ΔW.

* truncation (HetLoRA, zero-padding, RBLA, replication, FedIT): the first r components;
  zero rows of A and zero columns of B when r exceeds the global rank. Zero components
  are inert in training (both gradients vanish): :func:`revive_inert` gives their A rows
  peft's initialisation, which leaves the delta unchanged.
* SVD (FlexLoRA, FLoRA): the rank-r truncated SVD of the global ΔW, computed in factored
  form (:mod:`.svd`), split between B and A as ``split`` says.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping

import numpy as np

from .adapter import Adapter, LoraModule
from .dtypes import F32Array
from .svd import factored_svd_parts

__all__ = ["truncate", "redistribute_truncate", "redistribute_svd", "rescale", "revive_inert", "per_module", "SPLITS"]

SPLITS = ("sqrt", "a", "b")


def per_module(value: int | float | Mapping[str, int] | Mapping[str, float], name: str) -> float:
    """A per-module setting given as one value or a mapping by module name."""
    if isinstance(value, Mapping):
        if name not in value:
            raise ValueError(f"no value for module {name!r}")
        return value[name]
    return value


def _scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    return float(alpha) / (math.sqrt(rank) if use_rslora else rank)


def _pad(a: F32Array, b: F32Array, rank: int) -> tuple[F32Array, F32Array]:
    """First ``rank`` components of (a (r, d_in), b (d_out, r)); zeros beyond r."""
    r = a.shape[0]
    if rank <= r:
        return a[:rank], b[:, :rank]
    a_out = np.zeros((rank, a.shape[1]), np.float32)
    b_out = np.zeros((b.shape[0], rank), np.float32)
    a_out[:r] = a
    b_out[:, :r] = b
    return a_out, b_out


def truncate(adapter: Adapter, rank: int | Mapping[str, int]) -> Adapter:
    """Keep the first ``rank`` components of every module (zero-pad beyond its rank).

    The scaling is preserved (alpha is adjusted to ``s · r`` or ``s · sqrt(r)``), so the
    delta is exactly Σ_{i<rank} s b_i a_iᵀ. Used by HetLoRA's client-side pruning too.
    """
    modules = {}
    for name, module in adapter.modules.items():
        r = int(per_module(rank, name))
        if r < 1:
            raise ValueError(f"{name}: rank must be >= 1, got {r}")
        s = module.scaling(adapter.use_rslora)
        a, b = _pad(module.a, module.b, r)
        alpha = s * (math.sqrt(r) if adapter.use_rslora else r)
        modules[name] = LoraModule(a=a, b=b, alpha=alpha)
    return Adapter(modules=modules, dense=adapter.dense, use_rslora=adapter.use_rslora)


def rescale(adapter: Adapter, *, alpha: float | Mapping[str, float], use_rslora: bool = False) -> Adapter:
    """The same deltas expressed with another alpha (and scaling rule): B' = B · s / s'."""
    modules = {}
    for name, module in adapter.modules.items():
        new_alpha = float(per_module(alpha, name))
        ratio = module.scaling(adapter.use_rslora) / _scaling(new_alpha, module.rank, use_rslora)
        modules[name] = LoraModule(a=module.a, b=module.b * np.float32(ratio), alpha=new_alpha)
    return Adapter(modules=modules, dense=adapter.dense, use_rslora=use_rslora)


def redistribute_truncate(
    global_adapter: Adapter,
    *,
    rank: int | Mapping[str, int],
    alpha: float | Mapping[str, float],
    use_rslora: bool = False,
) -> Adapter:
    """Client k gets A_g[:r_k] and (s_g / s_k) · B_g[:, :r_k] (HetLoRA Fig. 2(c), RBLA)."""
    return rescale(truncate(global_adapter, rank), alpha=alpha, use_rslora=use_rslora)


def redistribute_svd(
    global_adapter: Adapter,
    *,
    rank: int | Mapping[str, int],
    alpha: float | Mapping[str, float],
    use_rslora: bool = False,
    split: str = "sqrt",
) -> Adapter:
    """Client k gets the rank-r_k truncated SVD of the global ΔW (FlexLoRA, Bai et al. 2024):

        ΔW_g ≈ U_r Σ_r V_rᵀ,  B~ = U_r Σ_r^{1-t},  A = Σ_r^t V_rᵀ,  B_k = B~ / s_k,

    with t = 1/2 (``split="sqrt"``, balanced, as PiSSA initialises), t = 1 (``"a"``: Σ on A,
    the HLoRA reading) or t = 0 (``"b"``). Only the product is pinned down by the paper;
    the split changes the training dynamics, not the delta. Zero-padded when r exceeds
    the rank of ΔW_g.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    modules = {}
    for name, module in global_adapter.modules.items():
        r = int(per_module(rank, name))
        if r < 1:
            raise ValueError(f"{name}: rank must be >= 1, got {r}")
        new_alpha = float(per_module(alpha, name))
        b_eff = module.effective_b(global_adapter.use_rslora)
        u, sigma, vt = factored_svd_parts([b_eff], [module.a], None, r)
        t = {"sqrt": 0.5, "a": 1.0, "b": 0.0}[split]
        a = (sigma[:, None] ** t) * vt  # (k, 1) * (k, d_in)
        b = u * (sigma[None, :] ** (1.0 - t))  # (d_out, k) * (1, k)
        b = b / _scaling(new_alpha, r, use_rslora)
        a_out, b_out = _pad(a.astype(np.float32), b.astype(np.float32), r)
        modules[name] = LoraModule(a=a_out, b=b_out, alpha=new_alpha)
    return Adapter(modules=modules, dense=global_adapter.dense, use_rslora=use_rslora)


def revive_inert(adapter: Adapter, *, seed: int) -> Adapter:
    """Give every inert component (row i of A and column i of B both zero) a fresh A row
    drawn like peft's LoRA init, U(-1/sqrt(d_in), 1/sqrt(d_in)); B stays 0.

    Why: with A_i = 0 and B_i = 0 both gradients of component i vanish, so it never trains.
    That happens to every component an SVD redistribution takes from a zero (or low-rank)
    global delta — the initial global adapter has B = 0, so FlexLoRA and FLoRA clients
    would only ever train the head — and to padded or unowned components of the truncation
    rules. The delta is unchanged (B_i = 0). Row i of a module is drawn from
    (seed, module name, i) alone, so clients of different ranks that share a component get
    the same A row, and their updates of it average meaningfully.
    """
    modules = {}
    for name, module in adapter.modules.items():
        inert = ~np.any(module.a != 0, axis=1) & ~np.any(module.b != 0, axis=0)  # (r,)
        if not inert.any():
            modules[name] = module
            continue
        a = np.array(module.a, dtype=np.float32)
        bound = 1.0 / math.sqrt(module.d_in)
        key = zlib.crc32(name.encode())
        for i in np.flatnonzero(inert):
            rng = np.random.default_rng([seed & 0xFFFFFFFF, key, int(i)])
            a[i] = rng.uniform(-bound, bound, size=module.d_in)
        modules[name] = LoraModule(a=a, b=module.b, alpha=module.alpha)
    return Adapter(modules=modules, dense=adapter.dense, use_rslora=adapter.use_rslora)
