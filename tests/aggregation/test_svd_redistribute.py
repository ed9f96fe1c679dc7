"""Factored SVD against dense SVD; redistribution by truncation and SVD; rescale."""

import numpy as np
import pytest

from rankfed.aggregation import (
    AggregationError,
    factored_svd,
    factored_svd_parts,
    get_method,
    redistribute_svd,
    rescale,
)
from tests.aggregation.helpers import SPEC, random_adapter, rel


def dense_truncated(bs, as_, weights, rank):
    total = sum(w * b.astype(np.float64) @ a.astype(np.float64) for w, b, a in zip(weights, bs, as_))
    u, s, vt = np.linalg.svd(total, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vt[:rank], s


@pytest.mark.parametrize("d_out,d_in,ranks,rank", [(40, 30, [2, 4, 8], 5), (12, 50, [8, 8], 16), (7, 9, [3, 5, 4], 7)])
def test_factored_equals_dense(d_out, d_in, ranks, rank):
    rng = np.random.default_rng(0)
    bs = [rng.normal(size=(d_out, r)).astype(np.float32) for r in ranks]
    as_ = [rng.normal(size=(r, d_in)).astype(np.float32) for r in ranks]
    weights = rng.uniform(0.1, 1, size=len(ranks))
    us, vt = factored_svd(bs, as_, weights, rank)
    expected, sigma = dense_truncated(bs, as_, weights, rank)
    assert rel(us @ vt, expected) < 1e-5
    u, s, vt64 = factored_svd_parts(bs, as_, weights, rank)
    np.testing.assert_allclose(s, sigma[: len(s)], rtol=1e-6)
    np.testing.assert_allclose(u.T @ u, np.eye(len(s)), atol=1e-10)  # orthonormal columns
    np.testing.assert_allclose(vt64 @ vt64.T, np.eye(len(s)), atol=1e-10)


def test_factored_svd_errors():
    with pytest.raises(AggregationError):
        factored_svd([], [], [], 2)
    with pytest.raises(AggregationError, match="do not multiply"):
        factored_svd([np.ones((3, 2))], [np.ones((3, 4))], [1.0], 2)


@pytest.mark.parametrize("split", ["sqrt", "a", "b"])
def test_svd_redistribution_is_rank_r_svd_of_global(split):
    g = get_method("flora").aggregate(
        [random_adapter(SPEC, r, seed=r) for r in (2, 4, 8)], [1, 2, 3], global_rank=8
    )
    for r, alpha, rs in [(1, 4.0, False), (3, 16.0, True), (14, 2.0, False), (20, 8.0, False)]:
        local = redistribute_svd(g, rank=r, alpha=alpha, use_rslora=rs, split=split)
        assert local.ranks == dict.fromkeys(SPEC.modules, r) and local.use_rslora == rs
        for name in SPEC.modules:
            u, s, vt = np.linalg.svd(g.delta(name).astype(np.float64), full_matrices=False)
            assert rel(local.delta(name), (u[:, :r] * s[:r]) @ vt[:r]) < 1e-5
    a = redistribute_svd(g, rank=3, alpha=3.0, split="a").modules["enc.q"]
    np.testing.assert_allclose(a.b.T @ a.b, np.eye(3), atol=1e-5)  # B = U, Σ on A


def test_per_module_rank_and_alpha():
    g = get_method("rbla").aggregate([random_adapter(SPEC, 4, seed=1)], [1.0], global_rank=4)
    ranks = {"enc.q": 1, "enc.v": 2, "dec.o": 3}
    alphas = {"enc.q": 2.0, "enc.v": 4.0, "dec.o": 6.0}
    local = get_method("rbla").redistribute(g, rank=ranks, alpha=alphas)
    assert local.ranks == ranks and local.alphas == alphas
    with pytest.raises(ValueError, match="no value for module"):
        get_method("rbla").redistribute(g, rank={"enc.q": 1}, alpha=1.0)


def test_rescale_keeps_the_delta():
    adapter = random_adapter(SPEC, 4, alpha=8.0, seed=2)
    other = rescale(adapter, alpha=32.0, use_rslora=True)
    assert other.use_rslora and other.alphas == dict.fromkeys(SPEC.modules, 32.0)
    for name in SPEC.modules:
        assert rel(other.delta(name), adapter.delta(name)) < 1e-6


def test_revive_inert_gives_dead_components_a_fresh_a_and_keeps_the_delta():
    from rankfed.aggregation import Adapter, AdapterSpec, get_method, revive_inert

    spec = AdapterSpec(modules={"m": (6, 5)})
    zero_global = spec.init_adapter(rank=4, alpha=4.0, seed=1)  # B = 0: delta 0
    for method in ("flexlora", "flora", "zero_pad"):
        local = get_method(method).redistribute(zero_global, rank=3, alpha=6.0)
        revived = revive_inert(local, seed=7)
        module = revived.modules["m"]
        np.testing.assert_array_equal(module.delta(False), local.modules["m"].delta(False))
        assert np.all(np.abs(module.a).max(axis=1) > 0), method  # every component can train now
        assert np.all(np.abs(module.a) <= 1 / np.sqrt(5))
    # The same component gets the same row whatever the client's rank, and live ones are untouched.
    wide = revive_inert(get_method("flexlora").redistribute(zero_global, rank=4, alpha=8.0), seed=7).modules["m"]
    narrow = revive_inert(get_method("flexlora").redistribute(zero_global, rank=2, alpha=4.0), seed=7).modules["m"]
    np.testing.assert_array_equal(wide.a[:2], narrow.a)
    live = Adapter(modules={"m": zero_global.modules["m"]})
    assert revive_inert(live, seed=7).modules["m"] is live.modules["m"]  # B = 0 but A != 0: not inert
