"""Two clients, ranks 1 and 2, numbers you can check on paper.

Client 1 (rank 1, n=1): A1 = [[1, 0]],           B1 = [[2], [0]]
Client 2 (rank 2, n=3): A2 = [[0, 1], [1, 1]],   B2 = [[1, 0], [0, 2]]
alpha = r, so s = 1 and the effective factors are the raw ones; p = (1/4, 3/4).
S1 = B1 A1 = [[2, 0], [0, 0]] (‖S1‖ = 2),  S2 = B2 A2 = [[0, 1], [2, 2]] (‖S2‖ = 3).
"""

import numpy as np
import pytest

from rankfed.aggregation import Adapter, AggregationError, get_method
from tests.aggregation.helpers import module

C1 = Adapter({"m": module([[1, 0]], [[2], [0]])}, dense={"head": np.array([1.0, 0.0])})
C2 = Adapter({"m": module([[0, 1], [1, 1]], [[1, 0], [0, 2]])}, dense={"head": np.array([0.0, 4.0])})
CLIENTS, WEIGHTS = [C1, C2], [1.0, 3.0]
HEAD = [0.25, 3.0]  # 1/4 [1, 0] + 3/4 [0, 4]


def run(name, **options):
    """Batch and streaming results (both must give the same numbers)."""
    method = get_method(name)
    batch = method.aggregate(CLIENTS, WEIGHTS, global_rank=2, **options)
    acc = method.accumulator(C1.spec(), global_rank=2, **options)
    for client, weight in zip(CLIENTS, WEIGHTS):
        acc.fold(client, weight)
    return batch, acc.result()


def check(adapter, a, b):
    m = adapter.modules["m"]
    np.testing.assert_allclose(m.a, a, atol=1e-6)
    np.testing.assert_allclose(m.scaling(adapter.use_rslora) * m.b, b, atol=1e-6)
    np.testing.assert_allclose(adapter.dense["head"], HEAD, atol=1e-6)


def test_zero_pad():
    # row 0: 1/4 [1,0] + 3/4 [0,1]; row 1: 3/4 [1,1] (client 1 padded with zeros)
    for g in run("zero_pad"):
        check(g, [[0.25, 0.75], [0.75, 0.75]], [[1.25, 0], [0, 1.5]])


def test_rbla_and_replication():
    # component 1 has one owner (client 2): its values survive undiluted
    expected = ([[0.25, 0.75], [1, 1]], [[1.25, 0], [0, 2]])
    for name, options in [("rbla", {}), ("replication", {}), ("replication", {"fill": "top"})]:
        for g in run(name, **options):
            check(g, *expected)


def test_hetlora():
    # weights ‖S_k‖/Z = 2/5, 3/5: the data sizes 1 and 3 do not enter the LoRA weights
    for g in run("hetlora"):
        check(g, [[0.4, 0.6], [0.6, 0.6]], [[1.4, 0], [0, 1.2]])


def test_flora():
    # A = [1/4 A1; 3/4 A2], B = [B1, B2], B A = 1/4 S1 + 3/4 S2
    for g in run("flora"):
        check(g, [[0.25, 0], [0, 0.75], [0.75, 0.75]], [[2, 1, 0], [0, 0, 2]])
        np.testing.assert_allclose(g.delta("m"), [[0.5, 0.75], [1.5, 1.5]], atol=1e-6)


def test_flexlora():
    # ΔW = [[0.5, 0.75], [1.5, 1.5]]: ‖ΔW‖² = 5.3125 = σ1² + σ2², |det| = 0.375 = σ1 σ2
    for g in run("flexlora"):
        np.testing.assert_allclose(g.delta("m"), [[0.5, 0.75], [1.5, 1.5]], atol=1e-6)
        one = get_method("flexlora").redistribute(g, rank=1, alpha=1.0)
        sigma2 = np.linalg.norm(one.delta("m") - [[0.5, 0.75], [1.5, 1.5]])
        sigma1 = np.linalg.norm(one.delta("m"))
        assert sigma1**2 + sigma2**2 == pytest.approx(5.3125, rel=1e-6)
        assert sigma1 * sigma2 == pytest.approx(0.375, rel=1e-5)


def test_fedit_two_rank_one_clients():
    c2 = Adapter({"m": module([[0, 1]], [[1], [1]])}, dense={"head": np.array([0.0, 4.0])})
    g = get_method("fedit").aggregate([C1, c2], WEIGHTS, global_rank=2)
    check(g, [[0.25, 0.75]], [[1.25], [0.75]])
    # FedIT is not exact: B_g A_g = [[.3125, .9375], [.1875, .5625]] ≠ 1/4 S1 + 3/4 B2' A2'
    np.testing.assert_allclose(g.delta("m"), [[0.3125, 0.9375], [0.1875, 0.5625]], atol=1e-6)


def test_fedit_refuses_mixed_ranks():
    with pytest.raises(AggregationError, match="equal ranks"):
        get_method("fedit").aggregate(CLIENTS, WEIGHTS, global_rank=2)
    acc = get_method("fedit").accumulator(C1.spec(), global_rank=2)
    acc.fold(C1, 1.0)
    with pytest.raises(AggregationError, match="equal ranks"):
        acc.fold(C2, 3.0)
    assert acc.count == 1  # the rejected fold left no trace


def test_scaling_is_folded_in():
    # Client 1 at alpha 2 (s = 2), client 2 at alpha 1 (s = 1/2): effective B1 = [[4], [0]],
    # B2 = [[.5, 0], [0, 1]]. Zero-pad: B col 0 = 1/4·4 + 3/4·.5 = 1.375, col 1 = 3/4·1.
    c1 = Adapter({"m": module([[1, 0]], [[2], [0]], alpha=2.0)}, dense=C1.dense)
    c2 = Adapter({"m": module([[0, 1], [1, 1]], [[1, 0], [0, 2]], alpha=1.0)}, dense=C2.dense)
    g = get_method("zero_pad").aggregate([c1, c2], WEIGHTS, global_rank=2)
    check(g, [[0.25, 0.75], [0.75, 0.75]], [[1.375, 0], [0, 0.75]])
    # sent back at rank 1, alpha 4 (s = 4): A = [[.25, .75]], B = [[1.375], [0]] / 4
    back = get_method("zero_pad").redistribute(g, rank=1, alpha=4.0)
    np.testing.assert_allclose(back.modules["m"].a, [[0.25, 0.75]])
    np.testing.assert_allclose(back.modules["m"].b, [[0.34375], [0]])
    # and at rank 3, alpha 3 (s = 1): zero-padded, same delta
    up = get_method("zero_pad").redistribute(g, rank=3, alpha=3.0)
    np.testing.assert_allclose(up.modules["m"].a[2], [0, 0])
    np.testing.assert_allclose(up.delta("m"), g.delta("m"), atol=1e-6)
