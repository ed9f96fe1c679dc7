"""Robust aggregation's pieces: the factored update norm equals the dense one, scaling an
update scales its ΔW, and every rule, batch and streaming alike, refuses to return a
non-finite aggregate."""

from __future__ import annotations

import numpy as np
import pytest

from rankfed.aggregation import METHODS, Adapter, AdapterSpec, AggregationError, LoraModule
from rankfed.aggregation.robust import clip_factors, scale_update, update_norm

SPEC = AdapterSpec(modules={"q": (6, 5), "v": (6, 5)}, dense={"head": (3, 6)})


def _adapter(rank: int, seed: int, scale: float = 1.0) -> Adapter:
    rng = np.random.default_rng(seed)
    return Adapter(
        modules={name: LoraModule(a=rng.normal(size=(rank, d_in)), b=scale * rng.normal(size=(d_out, rank)),
                                  alpha=2.0 * rank)
                 for name, (d_out, d_in) in SPEC.modules.items()},
        dense={"head": scale * rng.normal(size=(3, 6))},
    )


@pytest.mark.parametrize("use_rslora", [False, True])
def test_factored_norm_equals_dense_norm(use_rslora: bool) -> None:
    adapter = _adapter(3, 0)
    adapter = Adapter(modules=adapter.modules, dense=adapter.dense, use_rslora=use_rslora)
    dense = sum(np.sum(m.delta(use_rslora).astype(np.float64) ** 2) for m in adapter.modules.values())
    dense += np.sum(adapter.dense["head"].astype(np.float64) ** 2)
    assert update_norm(adapter) == pytest.approx(np.sqrt(dense), rel=1e-6)


def test_scaling_an_update_scales_its_norm_and_delta() -> None:
    adapter = _adapter(2, 1)
    half = scale_update(adapter, 0.5)
    assert update_norm(half) == pytest.approx(0.5 * update_norm(adapter), rel=1e-6)
    np.testing.assert_allclose(half.modules["q"].delta(), 0.5 * adapter.modules["q"].delta(), rtol=1e-6)
    assert half.ranks == adapter.ranks and half.alphas == adapter.alphas


def test_only_outliers_get_a_clip_factor() -> None:
    assert clip_factors({"a": 1.0, "b": 1.2, "c": 0.9, "d": 100.0}, 5.0) == {"d": pytest.approx(5.0 * 1.1 / 100.0)}  # median 1.1
    assert clip_factors({"a": 1.0, "b": 2.0, "c": 3.0}, 5.0) == {}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_batch_and_streaming_refuse_a_non_finite_aggregate(name: str) -> None:
    method = METHODS[name]
    rank = 2
    huge = Adapter(modules={k: LoraModule(a=np.full((rank, d_in), 3e38), b=np.full((d_out, rank), 3e38), alpha=4.0)
                            for k, (d_out, d_in) in SPEC.modules.items()},
                   dense={"head": np.full((3, 6), 3e38)})
    updates, weights = [huge, huge], [1.0, 1.0]
    with pytest.raises(AggregationError):
        method.aggregate(updates, weights, global_rank=4)
    with pytest.raises(AggregationError), np.errstate(over="ignore", invalid="ignore"):
        acc = method.accumulator(SPEC, global_rank=4)
        for update, weight in zip(updates, weights):
            acc.fold(update, weight)
        acc.result()
