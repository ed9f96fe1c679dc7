"""The methods by name: one object per rule with its batch form, streaming form and
redistribution. ``get_method("rbla").aggregate(adapters, weights, global_rank=8)``."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from types import MappingProxyType
from typing import Any

import numpy as np

from .adapter import Adapter, AdapterSpec
from .errors import AggregationError
from .redistribute import redistribute_svd, redistribute_truncate
from .rules import padding, svd_based
from .streaming import (
    Accumulator,
    ComponentAccumulator,
    FlexLoraAccumulator,
    FloraAccumulator,
)

__all__ = ["Method", "METHODS", "get_method"]


@dataclass(frozen=True)
class Method:
    """An aggregation rule.

    ``streaming``: the accumulator's memory does not grow with the number of clients.
    ``redistribution``: ``"truncate"`` (first r components) or ``"svd"`` (rank-r SVD).
    ``merges_global``: in the paper clients merge the global ΔW into their base weights
    and start a fresh LoRA (FLoRA) instead of continuing from a redistributed adapter.
    ``homogeneous``: averages A and B as they are, so every client must train one rank.
    ``client_pruning``: clients may upload fewer components than assigned (HetLoRA's
    self-pruning), and ``sticky_pruning``: that smaller rank is kept for the next round.
    These traits are the only place the rest of RankFed learns what a rule needs.
    Options (``unowned``, ``norm``, ``fill``, ``exact_global``, ``compress_at``, ``split``)
    are keyword arguments of ``aggregate``/``accumulator``/``redistribute``; see the rule.
    """

    name: str
    streaming: bool
    redistribution: str
    batch: Callable[..., Adapter]
    make_accumulator: Callable[..., Accumulator]
    merges_global: bool = False
    homogeneous: bool = False
    client_pruning: bool = False
    sticky_pruning: bool = False
    summary: str = ""

    def aggregate(
        self,
        adapters: Sequence[Adapter],
        weights: Sequence[float],
        *,
        global_rank: int,
        previous: Adapter | None = None,
        **options: Any,
    ) -> Adapter:
        """The global adapter from all updates at once (the reference form). Like the
        streaming form, it refuses to return a non-finite aggregate (AggregationError)."""
        # An overflow is reported as an AggregationError below, not as numpy's warning.
        with np.errstate(over="ignore", invalid="ignore"):
            result = self.batch(adapters, weights, global_rank=global_rank, previous=previous, **options)
        check_finite(result, what=f"{self.name} aggregate")
        return result

    def accumulator(
        self, spec: AdapterSpec, *, global_rank: int, previous: Adapter | None = None, **options: Any
    ) -> Accumulator:
        """A streaming accumulator giving the same result as :meth:`aggregate`."""
        return self.make_accumulator(spec, global_rank=global_rank, previous=previous, **options)

    def redistribute(
        self,
        global_adapter: Adapter,
        *,
        rank: int | Mapping[str, int],
        alpha: float | Mapping[str, float],
        use_rslora: bool = False,
        **options: Any,
    ) -> Adapter:
        """The global adapter at one client's rank and alpha (truncation or SVD)."""
        if self.redistribution == "svd":
            return redistribute_svd(global_adapter, rank=rank, alpha=alpha, use_rslora=use_rslora, **options)
        return redistribute_truncate(global_adapter, rank=rank, alpha=alpha, use_rslora=use_rslora, **options)


def check_finite(adapter: Adapter, *, what: str) -> None:
    """AggregationError naming the first module or tensor holding NaN or Inf."""
    for name, module in adapter.modules.items():
        if not (np.isfinite(module.a).all() and np.isfinite(module.b).all()):
            raise AggregationError(f"{what}: module {name!r} is not finite")
    for name, value in adapter.dense.items():
        if not np.isfinite(value).all():
            raise AggregationError(f"{what}: dense tensor {name!r} is not finite")


def _component(rule: str) -> Callable[..., Accumulator]:
    return partial(ComponentAccumulator, rule=rule)


METHODS: Mapping[str, Method] = MappingProxyType(
    {
        m.name: m
        for m in (
            Method("fedit", True, "truncate", padding.fedit, _component("fedit"), homogeneous=True,
                   summary="FedAvg of A and B; equal ranks only"),
            Method("zero_pad", True, "truncate", padding.zero_pad, _component("zero_pad"),
                   summary="zero-pad to the global rank, FedAvg"),
            Method("hetlora", True, "truncate", padding.hetlora, _component("hetlora"),
                   client_pruning=True, sticky_pruning=True, summary="zero-pad, weights ∝ ‖B_k A_k‖_F, truncate back"),
            Method("replication", True, "truncate", padding.replication, _component("replication"),
                   summary="pad with the high-rank clients' values, FedAvg"),
            Method("rbla", True, "truncate", padding.rbla, _component("rbla"),
                   summary="each component averaged over its owners"),
            Method("flexlora", True, "svd", svd_based.flexlora, FlexLoraAccumulator,
                   summary="Σ p_k B_k A_k, rank-r_k SVD back"),
            Method("flora", False, "svd", svd_based.flora, FloraAccumulator, merges_global=True,
                   summary="stack the factors: exact, rank Σ r_k"),
        )
    }
)


def get_method(name: str) -> Method:
    """The method called ``name``; ValueError listing the valid names otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown aggregation method {name!r}; valid: {', '.join(METHODS)}") from None
