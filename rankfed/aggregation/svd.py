"""Truncated SVD of a weighted sum of low-rank products, in factored form.

ΔW = Σ_k w_k B_k A_k has rank at most S = Σ_k r_k. Stack the factors,
B_cat = [w_1 B_1, …, w_K B_K] (d_out, S) and A_cat = [A_1; …; A_K] (S, d_in), so that
ΔW = B_cat A_cat. With thin QR decompositions B_cat = Q_B R_B and A_catᵀ = Q_A R_A,

    ΔW = Q_B (R_B R_Aᵀ) Q_Aᵀ,   R_B R_Aᵀ = U_c Σ V_cᵀ (a small S×S SVD),
    ΔW = (Q_B U_c) Σ (Q_A V_c)ᵀ,

which is an exact SVD of ΔW because Q_B U_c and Q_A V_c have orthonormal columns. Cost
O((d_out + d_in) S² + S³) instead of O(d_out d_in min(d_out, d_in)) for a dense SVD, and
the d_out × d_in matrix is never formed. Used by FlexLoRA (Bai et al., NeurIPS 2024) and
by every SVD redistribution.

Computed in float64 and returned in float32: the FlexLoRA accumulator re-compresses its
stack repeatedly, and float32 rounding in every QR/SVD would add up across rounds of
re-compression; at these sizes (S in the tens to hundreds) float64 costs little.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .dtypes import F32Array, F64Array, FloatArray
from .errors import AggregationError

__all__ = ["factored_svd", "factored_svd_parts"]


def factored_svd_parts(
    bs: Sequence[FloatArray],
    as_: Sequence[FloatArray],
    weights: Sequence[float] | None = None,
    rank: int | None = None,
) -> tuple[F64Array, F64Array, F64Array]:
    """(U (d_out, k), σ (k,), Vᵀ (k, d_in)) in float64, σ descending, of Σ w_k B_k A_k.

    ``k = min(rank, min(d_out, d_in, Σ r_k))``; ``rank=None`` keeps every component.
    ``weights=None`` means all ones.
    """
    if len(bs) != len(as_) or not bs:
        raise AggregationError(f"need as many B as A factors and at least one, got {len(bs)} and {len(as_)}")
    if weights is None:
        weights = [1.0] * len(bs)
    if len(weights) != len(bs):
        raise AggregationError(f"{len(weights)} weights for {len(bs)} factor pairs")
    for b, a in zip(bs, as_):
        if b.ndim != 2 or a.ndim != 2 or b.shape[1] != a.shape[0]:
            raise AggregationError(f"factor shapes {b.shape} and {a.shape} do not multiply")
        if b.shape[0] != bs[0].shape[0] or a.shape[1] != as_[0].shape[1]:
            raise AggregationError("all B must share d_out and all A must share d_in")
    b_cat = np.concatenate(
        [np.float64(w) * np.asarray(b, np.float64) for w, b in zip(weights, bs)], axis=1
    )  # (d_out, S)
    a_cat = np.concatenate([np.asarray(a, np.float64) for a in as_], axis=0)  # (S, d_in)
    if not (np.isfinite(b_cat).all() and np.isfinite(a_cat).all()):
        # LAPACK would fail with LinAlgError ("SVD did not converge"): say what is wrong, in
        # the package's own error, like every other rule does for a non-finite aggregate.
        raise AggregationError("the weighted factors are not finite: the aggregate is not finite")
    q_b, r_b = np.linalg.qr(b_cat)  # (d_out, k1), (k1, S)
    q_a, r_a = np.linalg.qr(a_cat.T)  # (d_in, k2), (k2, S)
    core = r_b @ r_a.T  # (k1, S) @ (S, k2)
    try:
        u_c, sigma, vt_c = np.linalg.svd(core, full_matrices=False)  # (k1, k), (k,), (k, k2)
    except np.linalg.LinAlgError as exc:
        raise AggregationError(f"the SVD of the aggregate failed: {exc}") from None
    k = len(sigma) if rank is None else max(0, min(int(rank), len(sigma)))
    u = q_b @ u_c[:, :k]  # (d_out, k1) @ (k1, k)
    vt = vt_c[:k] @ q_a.T  # (k, k2) @ (k2, d_in)
    return u, sigma[:k], vt


def factored_svd(
    bs: Sequence[FloatArray],
    as_: Sequence[FloatArray],
    weights: Sequence[float] | None = None,
    rank: int | None = None,
) -> tuple[F32Array, F32Array]:
    """Rank-``rank`` truncated SVD of Σ_k w_k B_k A_k as ``(U·Σ (d_out, k), Vᵀ (k, d_in))``.

    The product of the two (float32) factors is the best rank-k approximation of the sum
    (Eckart–Young); ``k = min(rank, available rank)``. See the module docstring.
    """
    u, sigma, vt = factored_svd_parts(bs, as_, weights, rank)
    return (u * sigma).astype(np.float32), vt.astype(np.float32)  # (d_out, k) * (k,)
