"""Property-based tests over random shapes, ranks, alphas, weights and wire dtypes."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from rankfed.aggregation import (
    METHODS,
    Adapter,
    AdapterSpec,
    LoraModule,
    decode_adapter,
    encode_adapter,
    factored_svd,
    get_method,
)
from tests.aggregation.helpers import ideal, rel

SETTINGS = settings(max_examples=25, deadline=None)


@st.composite
def federation(draw):
    """A spec with 1-2 modules, 1-4 clients with their own ranks/alphas/rsLoRA, weights."""
    shapes = draw(st.lists(st.tuples(st.integers(1, 9), st.integers(1, 9)), min_size=1, max_size=2))
    spec = AdapterSpec({f"m{i}": s for i, s in enumerate(shapes)}, {"head": (2,)})
    global_rank = draw(st.integers(1, 6))
    count = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    adapters = []
    for _ in range(count):
        rank = draw(st.integers(1, global_rank))
        alpha = draw(st.sampled_from([1.0, 2.0, 8.0, 16.0]))
        rslora = draw(st.booleans())
        modules = {
            n: LoraModule(rng.normal(size=(rank, d_in)), rng.normal(size=(d_out, rank)), alpha)
            for n, (d_out, d_in) in spec.modules.items()
        }
        adapters.append(Adapter(modules, {"head": rng.normal(size=2)}, use_rslora=rslora))
    weights = draw(st.lists(st.floats(0.1, 100.0), min_size=count, max_size=count))
    return spec, adapters, weights, global_rank


@SETTINGS
@given(federation(), st.sampled_from([n for n in METHODS if n != "fedit"]))
def test_streaming_equals_batch(fed, name):
    spec, adapters, weights, global_rank = fed
    method = get_method(name)
    batch = method.aggregate(adapters, weights, global_rank=global_rank)
    acc = method.accumulator(spec, global_rank=global_rank)
    for adapter, weight in zip(adapters, weights):
        acc.fold(adapter, weight)
    streamed = acc.result()
    for module in spec.modules:
        scale = max(np.abs(batch.delta(module)).max(), 1e-3)
        assert np.abs(streamed.delta(module) - batch.delta(module)).max() / scale < 1e-5


@SETTINGS
@given(federation())
def test_exact_rules_are_exact(fed):
    spec, adapters, weights, global_rank = fed
    stacked = get_method("flora").aggregate(adapters, weights, global_rank=global_rank)
    full = get_method("flexlora").aggregate(adapters, weights, global_rank=global_rank, exact_global=True)
    for module in spec.modules:
        exact = ideal(adapters, weights, module)
        assert rel(stacked.delta(module), exact) < 1e-5
        assert rel(full.delta(module), exact) < 1e-5


@SETTINGS
@given(federation(), st.integers(1, 8))
def test_redistribution_delta(fed, rank):
    spec, adapters, weights, global_rank = fed
    for name in ("rbla", "flexlora"):
        method = get_method(name)
        g = method.aggregate(adapters, weights, global_rank=global_rank)
        local = method.redistribute(g, rank=rank, alpha=4.0, use_rslora=True)
        for module in spec.modules:
            ga = g.modules[module].a.astype(np.float64)
            gb = g.modules[module].b.astype(np.float64) * g.scaling(module)
            if name == "rbla":
                expected = gb[:, :rank] @ ga[:rank]
            else:
                u, s, vt = np.linalg.svd(gb @ ga, full_matrices=False)
                expected = (u[:, :rank] * s[:rank]) @ vt[:rank]
            scale = max(np.abs(expected).max(), 1e-3)
            assert np.abs(local.delta(module) - expected).max() / scale < 1e-4


@SETTINGS
@given(federation(), st.sampled_from(["float32", "float16", "bfloat16"]))
def test_codec_round_trip(fed, dtype):
    spec, adapters, _, _ = fed
    adapter = adapters[0]
    back = decode_adapter(encode_adapter(adapter, dtype=dtype), spec=spec)
    tol = {"float32": 0.0, "float16": 1e-3, "bfloat16": 1e-2}[dtype]
    assert back.ranks == adapter.ranks and back.use_rslora == adapter.use_rslora
    for name, m in adapter.modules.items():
        np.testing.assert_allclose(back.modules[name].a, m.a, rtol=tol, atol=tol)
        np.testing.assert_allclose(back.modules[name].b, m.b, rtol=tol, atol=tol)


@SETTINGS
@given(
    st.integers(1, 30), st.integers(1, 30), st.lists(st.integers(1, 6), min_size=1, max_size=5),
    st.integers(1, 40), st.integers(0, 2**31),
)
def test_factored_svd_matches_dense(d_out, d_in, ranks, rank, seed):
    rng = np.random.default_rng(seed)
    bs = [rng.normal(size=(d_out, r)) for r in ranks]
    as_ = [rng.normal(size=(r, d_in)) for r in ranks]
    weights = rng.uniform(0.1, 2.0, size=len(ranks))
    us, vt = factored_svd(bs, as_, weights, rank)
    total = sum(w * b @ a for w, b, a in zip(weights, bs, as_))
    u, s, v = np.linalg.svd(total, full_matrices=False)
    k = us.shape[1]
    assert k == min(rank, d_out, d_in, sum(ranks))
    expected = (u[:, :k] * s[:k]) @ v[:k]
    # compare only where the truncation is unambiguous (no tie at the cut)
    if k < len(s) and s[k - 1] - s[k] < 1e-6 * s[0]:
        return
    assert rel(us @ vt, expected) < 1e-5 or np.linalg.norm(expected) < 1e-9
