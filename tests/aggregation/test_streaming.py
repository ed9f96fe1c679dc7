"""Streaming accumulators equal the batch rules; memory does not grow with clients."""

import gc
import weakref

import numpy as np
import pytest

from rankfed.aggregation import METHODS, AggregationError, get_method
from tests.aggregation.helpers import SPEC, random_adapter, rel

RANKS = [1, 2, 4, 8, 3, 8, 2]
OPTIONS = [
    ("zero_pad", {}),
    ("hetlora", {}),
    ("hetlora", {"norm": "module"}),
    ("hetlora", {"norm": "client_sum"}),
    ("rbla", {}),
    ("rbla", {"unowned": "drop"}),
    ("replication", {}),
    ("replication", {"fill": "top"}),
    ("flexlora", {}),
    ("flexlora", {"exact_global": True}),
    ("flexlora", {"compress_at": 3}),
    ("flora", {}),
]


@pytest.fixture(scope="module")
def clients():
    return [
        random_adapter(SPEC, r, alpha=2.0 * (k + 1), use_rslora=k % 2 == 1, seed=k)
        for k, r in enumerate(RANKS)
    ]


WEIGHTS = [5.0, 1.0, 0.0, 2.0, 7.0, 3.0, 4.0]


def stream(name, options, clients, weights, global_rank=8, previous=None):
    acc = get_method(name).accumulator(SPEC, global_rank=global_rank, previous=previous, **options)
    for c, w in zip(clients, weights):
        acc.fold(c, w)
    assert acc.count == len(clients)
    return acc


@pytest.mark.parametrize("name,options", OPTIONS, ids=[f"{n}-{o}" for n, o in OPTIONS])
def test_streaming_equals_batch(clients, name, options):
    batch = get_method(name).aggregate(clients, WEIGHTS, global_rank=8, **options)
    streamed = stream(name, options, clients, WEIGHTS).result()
    assert streamed.ranks == batch.ranks
    for module in SPEC.modules:
        assert rel(streamed.delta(module), batch.delta(module)) < 1e-6, module
        if get_method(name).redistribution == "truncate" or name == "flora":
            for x, y in [(streamed.modules[module].a, batch.modules[module].a),
                         (streamed.modules[module].b, batch.modules[module].b)]:
                assert rel(x, y) < 1e-6
    for key in SPEC.dense:
        assert rel(streamed.dense[key], batch.dense[key]) < 1e-6


def test_streaming_with_previous_equals_batch(clients):
    previous = get_method("rbla").aggregate(clients, WEIGHTS, global_rank=8)
    low = clients[:3]
    for name in ("rbla", "replication", "zero_pad"):
        batch = get_method(name).aggregate(low, WEIGHTS[:3], global_rank=8, previous=previous, unowned="previous")
        streamed = stream(name, {"unowned": "previous"}, low, WEIGHTS[:3], previous=previous).result()
        for module in SPEC.modules:
            assert rel(streamed.delta(module), batch.delta(module)) < 1e-6


def test_fedit_streaming(clients):
    same = [random_adapter(SPEC, 4, seed=s) for s in range(4)]
    batch = get_method("fedit").aggregate(same, [1, 2, 3, 4], global_rank=8)
    streamed = stream("fedit", {}, same, [1, 2, 3, 4]).result()
    assert streamed.ranks == batch.ranks == dict.fromkeys(SPEC.modules, 4)
    for module in SPEC.modules:
        assert rel(streamed.modules[module].a, batch.modules[module].a) < 1e-6


@pytest.mark.parametrize("name", [n for n, m in METHODS.items() if m.streaming and n != "fedit"])
def test_memory_does_not_grow_with_clients(name):
    acc = get_method(name).accumulator(SPEC, global_rank=8)
    sizes = []
    for k in range(60):
        acc.fold(random_adapter(SPEC, 1 + k % 8, seed=k), 1.0 + k)
        sizes.append(acc.nbytes)
    assert max(sizes[30:]) <= max(sizes[:30])  # bounded once the stack (flexlora) is full
    if name == "flexlora":
        assert acc.compressions > 0
        # the documented bound: (d_out + d_in) (2 min(d_out, d_in) + r_max) floats per module
        bound = 4 * sum((o + i) * (2 * min(o, i) + 8) for o, i in SPEC.modules.values())
        dense = 4 * sum(int(np.prod(s)) for s in SPEC.dense.values())
        assert acc.nbytes <= bound + dense


def test_flora_memory_is_the_sum_of_client_factors():
    acc = get_method("flora").accumulator(SPEC, global_rank=8)
    ranks = [1, 3, 5]
    for k, r in enumerate(ranks):
        acc.fold(random_adapter(SPEC, r, seed=k), 1.0)
    lora = 4 * sum(ranks) * sum(o + i for o, i in SPEC.modules.values())
    dense = 4 * sum(int(np.prod(s)) for s in SPEC.dense.values())
    assert acc.nbytes == lora + dense


@pytest.mark.parametrize("name", list(METHODS))
def test_no_reference_to_folded_adapters(name):
    acc = get_method(name).accumulator(SPEC, global_rank=8)
    adapter = random_adapter(SPEC, 4, seed=1)
    ref = weakref.ref(adapter.modules["enc.q"].a.base)  # the buffer behind the read-only view
    acc.fold(adapter, 1.0)
    del adapter
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("name", list(METHODS))
def test_result_before_fold_and_bad_weights(name):
    acc = get_method(name).accumulator(SPEC, global_rank=8)
    with pytest.raises(AggregationError, match="nothing folded"):
        acc.result()
    with pytest.raises(AggregationError, match="weight"):
        acc.fold(random_adapter(SPEC, 2), -1.0)
    with pytest.raises(AggregationError, match="weight"):
        acc.fold(random_adapter(SPEC, 2), float("nan"))
    acc.fold(random_adapter(SPEC, 2), 0.0)
    with pytest.raises(AggregationError, match="positive weight"):
        acc.result()


def test_fold_rejects_mismatched_adapters():
    acc = get_method("rbla").accumulator(SPEC, global_rank=8)
    other = type(SPEC)(modules={"enc.q": (6, 5)}, dense={})
    with pytest.raises(AggregationError, match="does not match the spec"):
        acc.fold(random_adapter(other, 2), 1.0)
    wrong = type(SPEC)(modules={**SPEC.modules, "enc.q": (6, 4)}, dense=SPEC.dense)
    with pytest.raises(AggregationError, match="enc.q"):
        acc.fold(random_adapter(wrong, 2), 1.0)
    assert acc.count == 0


def test_result_refuses_non_finite_aggregate():
    acc = get_method("zero_pad").accumulator(SPEC, global_rank=8)
    acc.fold(random_adapter(SPEC, 2, seed=0), 1e38)
    acc.fold(random_adapter(SPEC, 2, seed=1), 1e38)
    with pytest.raises(AggregationError, match="not finite"):
        acc.result()
