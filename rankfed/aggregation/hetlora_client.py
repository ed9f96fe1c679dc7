"""HetLoRA's client-side rank self-pruning (Cho et al., EMNLP 2024), for the edge client.

The paper's abstract says only "rank self-pruning locally"; the form below is the one in
algorithms.md §3 ([MEM], matching a third-party FederatedScope-derived implementation):

* a regulariser added to the local loss, on the tail of each module's components,

      λ · ‖B[:, ⌊γ r⌋ : r]‖_F · ‖A[⌊γ r⌋ : r, :]‖_F ,     γ < 1 (decay), λ (strength);

* after local training, if the tail score fell below its value at the start of local
  training, prune: r ← max(r_min, ⌊γ r⌋). One decision per client, applied to every
  module (sum the per-module scores); the client then uploads ``truncate(adapter, r)``.

γ, λ and r_min of the paper were not read; the defaults γ = 0.99, λ = 0.01 are the
third-party code's. The penalty is written against whatever array library its inputs
come from, so it works on numpy arrays and on torch tensors (autograd flows through it).
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["hetlora_tail_start", "hetlora_tail_norm", "hetlora_tail_penalty", "hetlora_prune_rank"]


def hetlora_tail_start(rank: int, gamma: float) -> int:
    """⌊γ r⌋: the first component of the tail."""
    if not 0 < gamma < 1:
        raise ValueError(f"gamma must be in (0, 1), got {gamma}")
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    return math.floor(gamma * rank)


def _frobenius(x: Any) -> Any:
    """‖x‖_F in x's own array library (numpy, torch, or any array-API namespace)."""
    namespace = getattr(x, "__array_namespace__", None)
    if namespace is not None:
        xp = namespace()
        return xp.linalg.vector_norm(xp.reshape(x, (-1,)))
    if type(x).__module__.split(".")[0] == "torch":
        import torch  # only reached when the caller already uses torch

        # vector_norm has a zero subgradient at 0 (sqrt(sum(x**2)) would give NaN there)
        return torch.linalg.vector_norm(x)
    raise TypeError(f"unsupported array type {type(x).__name__}")


def hetlora_tail_norm(a: Any, b: Any, gamma: float = 0.99) -> Any:
    """‖B[:, ⌊γr⌋:]‖_F · ‖A[⌊γr⌋:, :]‖_F for A (r, d_in), B (d_out, r): the tail score."""
    if not (hasattr(a, "shape") and hasattr(b, "shape")):
        raise TypeError(f"unsupported array type {type(a).__name__}; pass numpy arrays or torch tensors")
    rank = a.shape[0]
    if b.shape[1] != rank:
        raise ValueError(f"lora_A has {rank} rows but lora_B has {b.shape[1]} columns")
    start = hetlora_tail_start(rank, gamma)
    return _frobenius(b[:, start:]) * _frobenius(a[start:, :])


def hetlora_tail_penalty(a: Any, b: Any, gamma: float = 0.99, lam: float = 0.01) -> Any:
    """λ · ‖B[:, ⌊γr⌋:]‖_F · ‖A[⌊γr⌋:, :]‖_F, to add to the local loss (differentiable)."""
    return lam * hetlora_tail_norm(a, b, gamma=gamma)


def hetlora_prune_rank(
    rank: int,
    *,
    tail_before: float,
    tail_after: float,
    gamma: float = 0.99,
    min_rank: int = 1,
) -> int:
    """The rank to upload: max(min_rank, ⌊γ r⌋) if the tail score fell during local
    training (tail_after < tail_before), else r unchanged."""
    if min_rank < 1:
        raise ValueError(f"min_rank must be >= 1, got {min_rank}")
    start = hetlora_tail_start(rank, gamma)
    if float(tail_after) < float(tail_before):
        return max(min(min_rank, rank), start)
    return rank
