"""Rules that aggregate products, not factors: FlexLoRA (sum, then SVD) and FLoRA (stacking).

Both are exact on the weighted sum of the clients' updates, ΔW_g = Σ_k p_k B~_k A_k
(B~_k = s_k B_k), unlike the component-wise rules whose B_g A_g carries cross terms.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..adapter import Adapter
from ..dtypes import F64Array, FloatArray
from ..errors import AggregationError
from ..svd import factored_svd_parts
from .common import check_adapters, check_weights, dense_average, effective, make_global

__all__ = ["flexlora", "flora", "svd_global"]


def svd_global(
    bs: Sequence[FloatArray], as_: Sequence[FloatArray], weights: Sequence[float], rank: int | None
) -> tuple[F64Array, F64Array]:
    """(A (k, d_in), B~ (d_out, k)) holding the rank-k truncated SVD of Σ w_k B_k A_k in SVD
    order (σ descending, σ split as √σ on both sides), so that truncating to r components
    *is* the rank-r SVD. k = min(rank, numerical rank available), at least 1."""
    u, sigma, vt = factored_svd_parts(bs, as_, weights, rank)
    if len(sigma) == 0:
        raise AggregationError("the aggregate has no components")
    root = np.sqrt(sigma)
    return root[:, None] * vt, u * root[None, :]  # (k, 1) * (k, d_in); (d_out, k) * (1, k)


def flexlora(
    adapters: Sequence[Adapter],
    weights: Sequence[float],
    *,
    global_rank: int,
    previous: Adapter | None = None,
    exact_global: bool = False,
    compress_at: int | None = None,
) -> Adapter:
    """FlexLoRA (Bai et al., "Federated Fine-tuning of Large Language Models under
    Heterogeneous Tasks and Client Resources", NeurIPS 2024):

        ΔW_g = Σ_k p_k s_k B_k A_k = U Σ Vᵀ,   client k gets the rank-r_k truncation.

    The SVD is computed in factored form (never a dense d_out × d_in SVD). The global
    adapter keeps the leading ``global_rank`` singular components (√σ on each factor, SVD
    order), so redistributing to any r_k <= global_rank equals the paper's per-client SVD
    (Eckart–Young truncations nest). ``exact_global=True`` keeps every component instead,
    so that ``delta()`` is ΔW_g exactly (rank up to min(Σ r_k, d_out, d_in)).
    ``previous`` is unused: every component of ΔW_g comes from this round.
    ``compress_at`` only tunes the streaming accumulator; accepted here so that the same
    options work for both forms.
    """
    w = check_weights(weights, len(adapters))
    check_adapters(adapters)
    if global_rank < 1:
        raise AggregationError(f"global_rank must be >= 1, got {global_rank}")
    p = w / w.sum()
    active = [(pk, ad) for pk, ad in zip(p, adapters) if pk > 0]
    modules = {}
    for name in adapters[0].modules:
        factors = [effective(ad, name) for _, ad in active]
        modules[name] = svd_global(
            [b for _, b in factors], [a for a, _ in factors], [pk for pk, _ in active],
            None if exact_global else global_rank,
        )
    return make_global(modules, dense_average(adapters, w))


def flora(
    adapters: Sequence[Adapter],
    weights: Sequence[float],
    *,
    global_rank: int,
    previous: Adapter | None = None,
) -> Adapter:
    """FLoRA (Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with
    Heterogeneous Low-Rank Adaptations", NeurIPS 2024): stack the clients' factors,

        A_g = [p_1 A_1; …; p_K A_K]  (Σ r_k, d_in),   B_g = [B~_1, …, B~_K]  (d_out, Σ r_k),
        B_g A_g = Σ_k p_k B~_k A_k  exactly, for any ranks.

    The global rank is Σ r_k over participants, whatever ``global_rank`` says (it is only
    checked to be >= 1). In the paper clients merge this ΔW into their base weights and
    re-initialise their own LoRA (``Method.merges_global``); redistributing to a rank
    instead uses the rank-r SVD. ``previous`` is unused.
    """
    w = check_weights(weights, len(adapters))
    check_adapters(adapters)
    if global_rank < 1:
        raise AggregationError(f"global_rank must be >= 1, got {global_rank}")
    p = w / w.sum()
    active = [(pk, ad) for pk, ad in zip(p, adapters) if pk > 0]
    modules = {}
    for name in adapters[0].modules:
        factors = [(pk, *effective(ad, name)) for pk, ad in active]
        a_g = np.concatenate([pk * a for pk, a, _ in factors], axis=0)  # (Σ r_k, d_in)
        b_g = np.concatenate([b for _, _, b in factors], axis=1)  # (d_out, Σ r_k)
        modules[name] = (a_g, b_g)
    return make_global(modules, dense_average(adapters, w))
