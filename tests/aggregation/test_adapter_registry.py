"""The data model (validation names the key, peft-like init) and the method registry."""

import numpy as np
import pytest

from rankfed.aggregation import (
    METHODS,
    Adapter,
    AdapterSpec,
    AdapterValidationError,
    LoraModule,
    get_method,
)
from tests.aggregation.helpers import SPEC, random_adapter


def test_module_properties_and_scaling():
    m = LoraModule(a=np.ones((4, 3)), b=np.ones((2, 4)), alpha=8)
    assert (m.rank, m.d_in, m.d_out) == (4, 3, 2)
    assert m.scaling(False) == 2.0 and m.scaling(True) == 4.0
    np.testing.assert_allclose(m.delta(), np.full((2, 3), 8.0))
    assert m.a.dtype == np.float32 and not m.a.flags.writeable
    with pytest.raises(AdapterValidationError, match="inconsistent rank"):
        LoraModule(a=np.ones((4, 3)), b=np.ones((2, 3)), alpha=8)
    with pytest.raises(AdapterValidationError, match="alpha"):
        LoraModule(a=np.ones((4, 3)), b=np.ones((2, 4)), alpha=0)


def test_adapter_properties():
    adapter = random_adapter(SPEC, {"enc.q": 2, "enc.v": 5, "dec.o": 1})
    assert adapter.ranks == {"enc.q": 2, "enc.v": 5, "dec.o": 1} and adapter.max_rank == 5
    lora = 4 * (2 * (6 + 5) + 5 * (4 + 5) + 1 * (3 + 7))
    assert adapter.nbytes == lora + 4 * (10 + 2)
    assert adapter.spec() == SPEC


@pytest.mark.parametrize(
    "change,match,key",
    [
        (lambda m, d: m.pop("enc.q"), "missing LoRA module", "enc.q"),
        (lambda m, d: m.update(extra=m["enc.q"]), "unexpected LoRA module", "extra"),
        (lambda m, d: d.pop("classifier.bias"), "missing dense", "classifier.bias"),
        (lambda m, d: d.update(x=np.ones(1)), "unexpected dense", "x"),
        (lambda m, d: m.update({"enc.q": LoraModule(np.ones((2, 4)), np.ones((6, 2)), 1)}), "lora_A: shape", "enc.q"),
        (lambda m, d: m.update({"enc.q": LoraModule(np.ones((2, 5)), np.ones((7, 2)), 1)}), "lora_B: shape", "enc.q"),
        (lambda m, d: m.update({"enc.q": LoraModule(np.ones((0, 5)), np.ones((6, 0)), 1)}), "rank 0", "enc.q"),
        (lambda m, d: m.update({"enc.q": LoraModule(np.full((2, 5), np.inf), np.ones((6, 2)), 1)}), "non-finite", "enc.q"),
        (lambda m, d: d.update({"classifier.bias": np.ones(3)}), "shape", "classifier.bias"),
        (lambda m, d: d.update({"classifier.bias": np.array([np.nan, 1])}), "non-finite", "classifier.bias"),
    ],
)
def test_validate_names_the_key(change, match, key):
    adapter = random_adapter(SPEC, 2)
    modules, dense = dict(adapter.modules), dict(adapter.dense)
    change(modules, dense)
    with pytest.raises(AdapterValidationError, match=match) as info:
        SPEC.validate(Adapter(modules, dense))
    assert info.value.key == key


def test_validate_max_rank():
    with pytest.raises(AdapterValidationError, match="exceeds max_rank 3"):
        SPEC.validate(random_adapter(SPEC, 4), max_rank=3)
    SPEC.validate(random_adapter(SPEC, 3), max_rank=3)


def test_init_adapter_like_peft():
    spec = AdapterSpec({"q": (64, 100)}, {"head.weight": (3, 100), "head.bias": (3,)})
    adapter = spec.init_adapter(rank=8, alpha=16, use_rslora=True, seed=5)
    q = adapter.modules["q"]
    assert q.rank == 8 and q.alpha == 16 and adapter.use_rslora
    assert not q.b.any() and np.abs(q.a).max() <= 0.1 and np.abs(q.a).max() > 0.09  # U(±1/√100)
    assert not adapter.dense["head.bias"].any()
    assert 0.01 < adapter.dense["head.weight"].std() < 0.03
    again = spec.init_adapter(rank=8, alpha=16, use_rslora=True, seed=5)
    np.testing.assert_array_equal(again.modules["q"].a, q.a)
    assert not np.array_equal(spec.init_adapter(rank=8, alpha=16, seed=6).modules["q"].a, q.a)


def test_registry():
    assert list(METHODS) == ["fedit", "zero_pad", "hetlora", "replication", "rbla", "flexlora", "flora"]
    for name, method in METHODS.items():
        assert get_method(name) is method and method.name == name
        assert method.redistribution in ("truncate", "svd")
    assert not METHODS["flora"].streaming and METHODS["flora"].merges_global
    assert METHODS["flexlora"].redistribution == "svd" and METHODS["hetlora"].redistribution == "truncate"
    with pytest.raises(ValueError, match="valid: fedit, zero_pad, hetlora"):
        get_method("fedavg")


def test_package_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, rankfed.aggregation; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
