"""Component-wise rules: FedIT, zero-padding, HetLoRA, replication padding, RBLA.

Each averages the factors component by component: component i of a module is row i of
A with column i of B (it contributes the outer product b_i a_iᵀ to B A). Clients of rank
r_k own components 0..r_k-1. Notation (algorithms.md §0): p_k = n_k / Σ_j n_j,
H_i = {k : r_k > i} (the owners of component i), P_i = Σ_{k∈H_i} p_k, R = global rank,
B~_k = s_k B_k (the client's scaling folded in). All factors below are effective ones.

Clients with weight 0 are left out entirely (they own nothing). Components that no
participant owns are handled by ``unowned``: ``"zero"`` (the literal padding rules),
``"previous"`` (keep last round's global values; RBLA's and replication's default, so a
component is not forgotten because its owners sat a round out) or ``"drop"`` (cut the
module to the participants' largest rank, as the RBLA author's code does).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..adapter import Adapter
from ..dtypes import F64Array, FloatArray
from ..errors import AggregationError
from .common import (
    check_adapters,
    check_weights,
    dense_average,
    effective,
    fill_unowned,
    make_global,
)

__all__ = [
    "fedit",
    "zero_pad",
    "hetlora",
    "hetlora_norms",
    "replication",
    "rbla",
    "update_norm",
    "HETLORA_NORMS",
    "FILLS",
]

HETLORA_NORMS = ("client", "module", "client_sum")
FILLS = ("owners", "top")


def _check_ranks(adapters: Sequence[Adapter], global_rank: int) -> None:
    if global_rank < 1:
        raise AggregationError(f"global_rank must be >= 1, got {global_rank}")
    for index, adapter in enumerate(adapters):
        for name, module in adapter.modules.items():
            if module.rank > global_rank:
                raise AggregationError(
                    f"adapter {index}: {name} has rank {module.rank} > global_rank {global_rank}"
                )


def _padded_average(
    adapters: Sequence[Adapter],
    lora_weights: dict[str, F64Array],
    data_weights: F64Array,
    global_rank: int,
    previous: Adapter | None,
    unowned: str,
) -> Adapter:
    """A_g = Σ_k q_k pad(A_k, R), B_g = Σ_k q_k pad(B~_k, R), q = lora weights normalised."""
    modules = {}
    for name, first in adapters[0].modules.items():
        w = lora_weights[name]
        q = w / w.sum()
        a_g = np.zeros((global_rank, first.d_in))
        b_g = np.zeros((first.d_out, global_rank))
        owned = 0
        for qk, adapter in zip(q, adapters):
            if qk == 0:
                continue
            a, b = effective(adapter, name)
            r = a.shape[0]
            a_g[:r] += qk * a  # (r, d_in)
            b_g[:, :r] += qk * b  # (d_out, r)
            owned = max(owned, r)
        modules[name] = fill_unowned(a_g, b_g, owned, name, unowned=unowned, previous=previous)
    return make_global(modules, dense_average(adapters, data_weights))


def fedit(
    adapters: Sequence[Adapter],
    weights: Sequence[float],
    *,
    global_rank: int,
    previous: Adapter | None = None,
) -> Adapter:
    """FedIT, FedAvg of A and B for homogeneous ranks (Zhang et al., "Towards Building the
    Federated GPT: Federated Instruction Tuning", ICASSP 2024):

        A_g = Σ_k p_k A_k,   B_g = Σ_k p_k B~_k.

    Not exact: B_g A_g ≠ Σ_k p_k B~_k A_k (cross terms). Raises AggregationError when the
    participants' ranks differ for a module; the result has the participants' rank.
    ``previous`` is accepted for a uniform signature and unused.
    """
    w = check_weights(weights, len(adapters))
    check_adapters(adapters)
    _check_ranks(adapters, global_rank)
    active = [ad for ad, wk in zip(adapters, w) if wk > 0]
    for name in adapters[0].modules:
        ranks = {ad.modules[name].rank for ad in active}
        if len(ranks) != 1:
            raise AggregationError(f"fedit needs equal ranks; {name} has ranks {sorted(ranks)}")
    lora = {name: w for name in adapters[0].modules}
    return _padded_average(adapters, lora, w, global_rank, None, "drop")


def zero_pad(
    adapters: Sequence[Adapter],
    weights: Sequence[float],
    *,
    global_rank: int,
    previous: Adapter | None = None,
    unowned: str = "zero",
) -> Adapter:
    """Zero-padding FedAvg (the FLoRA repository's ``zero_padding`` baseline; Wang et al.,
    NeurIPS 2024): pad A_k with zero rows and B~_k with zero columns to R, then FedAvg:

        A_g = Σ_k p_k pad(A_k, R),   B_g = Σ_k p_k pad(B~_k, R).

    Component i ends up at P_i times the owners' mean in each factor, so its contribution
    to B A shrinks by P_i² (the dilution of high-rank clients).
    """
    w = check_weights(weights, len(adapters))
    check_adapters(adapters)
    _check_ranks(adapters, global_rank)
    lora = {name: w for name in adapters[0].modules}
    return _padded_average(adapters, lora, w, global_rank, previous, unowned)


def update_norm(a: FloatArray, b_eff: FloatArray) -> float:
    """‖B~ A‖_F without forming B~ A: ‖BA‖_F² = Σ_ij (BᵀB)_ij (AAᵀ)_ij (both r×r).

    The r×r Gram matrices are computed in the inputs' precision (float32 on the streaming
    path: widening whole factors to float64 would cost a pass over the update) and
    combined in float64; the weight is then accurate to ~1e-7 relative."""
    gram_b = (b_eff.T @ b_eff).astype(np.float64)  # (r, d_out) @ (d_out, r)
    gram_a = (a @ a.T).astype(np.float64)  # (r, d_in) @ (d_in, r)
    return float(np.sqrt(max(np.sum(gram_b * gram_a), 0.0)))


def hetlora_norms(adapters: Sequence[Adapter], *, norm: str = "client") -> dict[str, F64Array]:
    """HetLoRA's unnormalised aggregation weights ‖S_k‖ per module, S_k = B~_k A_k.

    ``norm``: ``"module"`` uses each module's own ‖S_{k,m}‖_F; ``"client"`` one weight per
    client, the Frobenius norm of the whole update √(Σ_m ‖S_{k,m}‖_F²) (our reading of
    "the reconstructed model ΔW_k"); ``"client_sum"`` one weight Σ_m ‖S_{k,m}‖_F.
    """
    if norm not in HETLORA_NORMS:
        raise ValueError(f"norm must be one of {HETLORA_NORMS}, got {norm!r}")
    names = list(adapters[0].modules)
    per_module = {
        name: np.array([update_norm(*effective(ad, name)) for ad in adapters]) for name in names
    }
    if norm == "module":
        return per_module
    stacked = np.stack([per_module[n] for n in names])  # (modules, K)
    client = np.sqrt((stacked**2).sum(0)) if norm == "client" else stacked.sum(0)
    return {name: client for name in names}


def hetlora(
    adapters: Sequence[Adapter],
    weights: Sequence[float],
    *,
    global_rank: int,
    previous: Adapter | None = None,
    norm: str = "client",
    unowned: str = "zero",
) -> Adapter:
    """HetLoRA (Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device
    Foundation Models", EMNLP 2024, Fig. 2): zero-pad to R and average with weights
    proportional to the Frobenius norm of each client's update:

        S_k = B~_k A_k,  Z = Σ_j ‖S_j‖_F,
        A_g = Σ_k (‖S_k‖_F / Z) pad(A_k, R),   B_g = Σ_k (‖S_k‖_F / Z) pad(B~_k, R).

    Data sizes do not enter the LoRA weights; ``weights`` (data sizes) are used for the
    dense trainables only, and a client with weight 0 is left out. ``norm`` picks the
    per-client or per-module reading (see :func:`hetlora_norms`). Raises AggregationError
    when every update is zero (Z = 0). Clients receive truncations of the result.
    """
    w = check_weights(weights, len(adapters))
    check_adapters(adapters)
    _check_ranks(adapters, global_rank)
    norms = hetlora_norms(adapters, norm=norm)
    lora = {}
    for name, values in norms.items():
        values = np.where(w > 0, values, 0.0)
        if values.sum() <= 0:
            raise AggregationError(f"hetlora: every update of {name} is zero, the norm weights are undefined")
        lora[name] = values
    return _padded_average(adapters, lora, w, global_rank, previous, unowned)


def rbla(
    adapters: Sequence[Adapter],
    weights: Sequence[float],
    *,
    global_rank: int,
    previous: Adapter | None = None,
    unowned: str = "previous",
) -> Adapter:
    """RBLA (Chen et al., "Rank-Based LoRA Aggregation for Fine-tuning Heterogeneous Models
    in FLaaS", ICWS 2024): each component is averaged over its owners only, weights
    renormalised among them:

        A_g[i] = Σ_{k∈H_i} n_k A_k[i] / Σ_{k∈H_i} n_k,
        B_g[:, i] = Σ_{k∈H_i} n_k B~_k[:, i] / Σ_{k∈H_i} n_k.

    (As the first author's code computes it: a NaN-masked weighted mean.)
    """
    w = check_weights(weights, len(adapters))
    check_adapters(adapters)
    _check_ranks(adapters, global_rank)
    modules = {}
    for name, first in adapters[0].modules.items():
        a_g = np.zeros((global_rank, first.d_in))
        b_g = np.zeros((first.d_out, global_rank))
        owner_w = np.zeros(global_rank)
        for wk, adapter in zip(w, adapters):
            if wk == 0:
                continue
            a, b = effective(adapter, name)
            r = a.shape[0]
            a_g[:r] += wk * a  # (r, d_in)
            b_g[:, :r] += wk * b  # (d_out, r)
            owner_w[:r] += wk
        owned = int(np.count_nonzero(owner_w))
        a_g[:owned] /= owner_w[:owned, None]
        b_g[:, :owned] /= owner_w[None, :owned]
        modules[name] = fill_unowned(a_g, b_g, owned, name, unowned=unowned, previous=previous)
    return make_global(modules, dense_average(adapters, w))


def replication(
    adapters: Sequence[Adapter],
    weights: Sequence[float],
    *,
    global_rank: int,
    previous: Adapter | None = None,
    unowned: str = "previous",
    fill: str = "owners",
) -> Adapter:
    """Replication-based padding (Byun & Lee, "Towards Federated Low-Rank Adaptation of
    Language Models with Rank Heterogeneity", NAACL 2025): a low-rank client's missing
    components are filled with values replicated from the high-rank clients instead of
    zeros, then FedAvg:

        pad_k[i] = comp_i(k) if i < r_k else m_i,    A_g = Σ_k p_k pad_k (same for B~),
        m_i = Σ_{j∈F_i} p_j comp_i(j) / Σ_{j∈F_i} p_j,

    with the fill source F_i = H_i, all owners of component i (``fill="owners"``; then the
    result equals RBLA exactly, algorithms.md §4), or F_i = the clients with the largest
    rank (``fill="top"``; differs from RBLA only with more than two distinct ranks).
    """
    if fill not in FILLS:
        raise ValueError(f"fill must be one of {FILLS}, got {fill!r}")
    w = check_weights(weights, len(adapters))
    check_adapters(adapters)
    _check_ranks(adapters, global_rank)
    p = w / w.sum()
    modules = {}
    for name, first in adapters[0].modules.items():
        active = [(pk, *effective(ad, name)) for pk, ad in zip(p, adapters) if pk > 0]
        top = max(a.shape[0] for _, a, _ in active)
        sources = [(pk, a, b) for pk, a, b in active if fill == "owners" or a.shape[0] == top]
        fill_a = np.zeros((top, first.d_in))
        fill_b = np.zeros((first.d_out, top))
        fill_w = np.zeros(top)
        for pk, a, b in sources:
            r = a.shape[0]
            fill_a[:r] += pk * a
            fill_b[:, :r] += pk * b
            fill_w[:r] += pk
        fill_a /= fill_w[:, None]
        fill_b /= fill_w[None, :]
        a_g = np.zeros((global_rank, first.d_in))
        b_g = np.zeros((first.d_out, global_rank))
        for pk, a, b in active:
            r = a.shape[0]
            padded_a = np.concatenate([a, fill_a[r:top]], axis=0)  # (top, d_in)
            padded_b = np.concatenate([b, fill_b[:, r:top]], axis=1)  # (d_out, top)
            a_g[:top] += pk * padded_a
            b_g[:, :top] += pk * padded_b
        modules[name] = fill_unowned(a_g, b_g, top, name, unowned=unowned, previous=previous)
    return make_global(modules, dense_average(adapters, w))

