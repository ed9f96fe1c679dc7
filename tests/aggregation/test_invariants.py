"""The invariants of algorithms.md §11 on random adapters."""

import numpy as np
import pytest

from rankfed.aggregation import (
    METHODS,
    AggregationError,
    fedit,
    flexlora,
    flora,
    get_method,
    hetlora,
    hetlora_norms,
    rbla,
    replication,
    truncate,
    zero_pad,
)
from rankfed.aggregation.adapter import Adapter, LoraModule
from tests.aggregation.helpers import SPEC, ideal, random_adapter, rel

RANKS = [2, 4, 8]
WEIGHTS = [3.0, 1.0, 2.0]


@pytest.fixture(scope="module")
def clients():
    alphas = [4.0, 16.0, 8.0]
    return [random_adapter(SPEC, r, alpha=a, use_rslora=(r == 4), seed=r) for r, a in zip(RANKS, alphas)]


def factors(adapter, name):
    m = adapter.modules[name]
    return m.a, m.scaling(adapter.use_rslora) * m.b


def assert_same_factors(x, y, tol=1e-6):
    assert x.ranks == y.ranks
    for name in x.modules:
        for fx, fy in zip(factors(x, name), factors(y, name)):
            assert rel(fx, fy) < tol, name


def test_equal_ranks_padding_rules_equal_fedit():
    same = [random_adapter(SPEC, 4, alpha=a, seed=s) for s, a in enumerate([4.0, 8.0, 2.0])]
    reference = fedit(same, WEIGHTS, global_rank=4)
    for rule in (zero_pad, rbla, replication):
        assert_same_factors(rule(same, WEIGHTS, global_rank=4), reference)


def test_fedit_is_not_exact():
    same = [random_adapter(SPEC, 4, seed=s) for s in range(3)]
    g = fedit(same, WEIGHTS, global_rank=4)
    assert rel(g.delta("enc.q"), ideal(same, WEIGHTS, "enc.q")) > 0.1


def test_zero_pad_is_rbla_times_owner_share(clients):
    zp = zero_pad(clients, WEIGHTS, global_rank=8)
    rb = rbla(clients, WEIGHTS, global_rank=8)
    p = np.array(WEIGHTS) / sum(WEIGHTS)
    share = np.array([p[[r > i for r in RANKS]].sum() for i in range(8)])  # P_i
    for name in SPEC.modules:
        (za, zb), (ra, rb_) = factors(zp, name), factors(rb, name)
        np.testing.assert_allclose(za, share[:, None] * ra, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(zb, share[None, :] * rb_, rtol=1e-5, atol=1e-6)


def test_components_everyone_owns_agree(clients):
    results = [rule(clients, WEIGHTS, global_rank=8) for rule in (zero_pad, rbla, replication)]
    for name in SPEC.modules:
        first = factors(results[0], name)
        for other in results[1:]:
            a, b = factors(other, name)
            np.testing.assert_allclose(a[:2], first[0][:2], rtol=1e-6)
            np.testing.assert_allclose(b[:, :2], first[1][:, :2], rtol=1e-6)


def test_replication_with_owner_fill_is_rbla(clients):
    assert_same_factors(replication(clients, WEIGHTS, global_rank=8), rbla(clients, WEIGHTS, global_rank=8))


def test_replication_top_fill_differs_with_three_ranks(clients):
    top = replication(clients, WEIGHTS, global_rank=8, fill="top")
    rb = rbla(clients, WEIGHTS, global_rank=8)
    a_top, _ = factors(top, "enc.q")
    a_rb, _ = factors(rb, "enc.q")
    np.testing.assert_allclose(a_top[4:], a_rb[4:], rtol=1e-6)  # one owner: same
    assert rel(a_top[2:4], a_rb[2:4]) > 1e-3  # rank-2 client filled from rank-8 only


def test_flora_product_is_exact(clients):
    g = flora(clients, WEIGHTS, global_rank=8)
    assert g.ranks == {n: sum(RANKS) for n in SPEC.modules}
    for name in SPEC.modules:
        assert rel(g.delta(name), ideal(clients, WEIGHTS, name)) < 1e-6


def test_flexlora_full_rank_is_exact_and_truncation_is_eckart_young(clients):
    for name in SPEC.modules:
        exact = ideal(clients, WEIGHTS, name)
        full = flexlora(clients, WEIGHTS, global_rank=sum(RANKS))
        assert rel(full.delta(name), exact) < 1e-6
        sigma = np.linalg.svd(exact, compute_uv=False)
        low = flexlora(clients, WEIGHTS, global_rank=2)
        error = np.linalg.norm(low.delta(name) - exact)
        assert error == pytest.approx(np.sqrt((sigma[2:] ** 2).sum()), rel=1e-4)


def test_hetlora_weights_ignore_data_sizes(clients):
    norms = hetlora_norms(clients)
    q = norms["enc.q"] / norms["enc.q"].sum()
    assert q.sum() == pytest.approx(1.0)
    assert_same_factors(hetlora(clients, [1, 1, 1], global_rank=8), hetlora(clients, [5, 1, 9], global_rank=8))


def test_hetlora_equal_norms_is_uniform_zero_pad(clients):
    # rescale every client's B so that each whole-update norm is 1
    norms = hetlora_norms(clients)["enc.q"]
    equal = [
        Adapter({n: LoraModule(m.a, m.b / k, m.alpha) for n, m in c.modules.items()}, c.dense, c.use_rslora)
        for c, k in zip(clients, norms)
    ]
    het = hetlora(equal, [1, 1, 1], global_rank=8)
    assert_same_factors(het, zero_pad(equal, [1, 1, 1], global_rank=8), tol=1e-5)


def test_hetlora_per_module_norm_switch(clients):
    per_module = hetlora_norms(clients, norm="module")
    per_client = hetlora_norms(clients, norm="client")
    assert not np.allclose(per_module["enc.q"] / per_module["enc.q"].sum(),
                           per_module["dec.o"] / per_module["dec.o"].sum())
    np.testing.assert_allclose(per_client["enc.q"], np.sqrt(sum(v**2 for v in per_module.values())))


def test_truncation_keeps_first_components_and_pads(clients):
    g = rbla(clients, WEIGHTS, global_rank=8)
    for r in (1, 3, 8, 11):
        back = get_method("rbla").redistribute(g, rank=r, alpha=2.0 * r)
        for name in SPEC.modules:
            a, b = factors(g, name)
            k = min(r, 8)
            np.testing.assert_allclose(back.modules[name].a[:k], a[:k], rtol=1e-6)
            assert not back.modules[name].a[k:].any()
            assert rel(back.delta(name), b[:, :k] @ a[:k]) < 1e-6
    assert truncate(g, 3).ranks == dict.fromkeys(SPEC.modules, 3)
    assert rel(truncate(g, 3).delta("enc.q"), factors(g, "enc.q")[1][:, :3] @ factors(g, "enc.q")[0][:3]) < 1e-6


def test_unowned_components_previous_zero_drop(clients):
    previous = rbla(clients, WEIGHTS, global_rank=8)
    low = clients[:2]  # ranks 2 and 4: components 4..7 owned by nobody this round
    kept = rbla(low, WEIGHTS[:2], global_rank=8, previous=previous)
    pa, pb = factors(previous, "enc.q")
    ka, kb = factors(kept, "enc.q")
    np.testing.assert_allclose(ka[4:], pa[4:], rtol=1e-6)
    np.testing.assert_allclose(kb[:, 4:], pb[:, 4:], rtol=1e-6)
    assert rbla(low, WEIGHTS[:2], global_rank=8, unowned="drop").ranks["enc.q"] == 4
    zero = rbla(low, WEIGHTS[:2], global_rank=8, previous=previous, unowned="zero")
    assert not zero.modules["enc.q"].a[4:].any()
    assert rbla(low, WEIGHTS[:2], global_rank=8).modules["enc.q"].a[4:].any() == 0  # no previous


def test_dense_is_fedavg_by_data_weight_in_every_rule(clients):
    p = np.array(WEIGHTS) / sum(WEIGHTS)
    expected = sum(pk * c.dense["classifier.weight"] for pk, c in zip(p, clients))
    for name, method in METHODS.items():
        if name == "fedit":
            continue
        g = method.aggregate(clients, WEIGHTS, global_rank=8)
        np.testing.assert_allclose(g.dense["classifier.weight"], expected, rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("name", ["zero_pad", "hetlora", "rbla", "replication"])
def test_component_rules_refuse_ranks_above_global(clients, name):
    with pytest.raises(AggregationError, match="global_rank"):
        get_method(name).aggregate(clients, WEIGHTS, global_rank=4)
    acc = get_method(name).accumulator(SPEC, global_rank=4)
    with pytest.raises(AggregationError, match="global_rank"):
        acc.fold(clients[2], 1.0)
