"""Global adapters on disk: written tensor by tensor yet byte for byte what encode_adapter
gives, and kept as a read-only mapping of their file."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from rankfed.aggregation import (
    Adapter,
    AdapterValidationError,
    LoraModule,
    decode_adapter,
    encode_adapter,
    get_method,
    revive_inert,
)
from rankfed.coordinator.errors import NotFoundError
from rankfed.coordinator.global_adapters import GlobalAdapters
from rankfed.coordinator.store import BlobStore
from tests.coordinator.harness import random_adapter


def read(globals_: GlobalAdapters, relpath: str) -> bytes:
    with globals_.open(relpath) as fh:
        return fh.read()


@pytest.fixture
def globals_(tmp_path, tiny_manifest):
    return GlobalAdapters(BlobStore(tmp_path / "blobs"), tiny_manifest, get_method("rbla"), seed=3)


def test_save_streams_exactly_encode_adapters_bytes(globals_, tiny_manifest):
    adapter = random_adapter(tiny_manifest, 4, 8.0, seed=1)
    sha = globals_.save(2, adapter)
    data = read(globals_, globals_.relpath(2))
    assert data == encode_adapter(adapter, metadata=globals_._metadata(2))
    assert sha == hashlib.sha256(data).hexdigest() == globals_.sha256(2)


def test_load_maps_the_file_and_survives_releasing_its_pages(globals_, tiny_manifest):
    adapter = random_adapter(tiny_manifest, 4, 8.0, seed=2)
    globals_.save(1, adapter)
    loaded = globals_.load(1)
    globals_.release_pages(1)
    for name, module in adapter.modules.items():
        assert not loaded.modules[name].a.flags.writeable  # a view of the read-only mapping
        np.testing.assert_array_equal(loaded.modules[name].a, module.a)
        np.testing.assert_array_equal(loaded.modules[name].b, module.b)
    for name, value in adapter.dense.items():
        np.testing.assert_array_equal(loaded.dense[name], value)
    with pytest.raises(NotFoundError):
        globals_.load(9)


def test_rank_file_is_the_encoded_redistribution(globals_, tiny_manifest):
    globals_.save(1, random_adapter(tiny_manifest, 4, 8.0, seed=3))
    loaded = globals_.load(1)
    entry = globals_.rank_file(1, loaded, rank=2, alpha=4.0, use_rslora=False)
    data = read(globals_, entry.relpath)
    local = revive_inert(get_method("rbla").redistribute(loaded, rank=2, alpha=4.0), seed=3 * 1_000_003 + 1)
    assert data == encode_adapter(local, metadata=globals_._metadata(1))
    assert (entry.size, entry.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert decode_adapter(data).ranks == dict.fromkeys(tiny_manifest.modules, 2)


def test_a_non_finite_tensor_leaves_no_file(globals_, tiny_manifest):
    """Streaming writes the tensors before the bad one; the blob is discarded, not published."""
    adapter = random_adapter(tiny_manifest, 4, 8.0, seed=4)
    last = sorted(adapter.modules)[-1]
    bad = adapter.modules[last].b.copy()
    bad[0, 0] = np.nan
    modules = {**adapter.modules, last: LoraModule(a=adapter.modules[last].a, b=bad, alpha=adapter.modules[last].alpha)}
    adapter = Adapter(modules=modules, dense=adapter.dense)
    with pytest.raises(AdapterValidationError, match="non-finite"):
        globals_.save(3, adapter)
    assert not globals_.exists(3)
    assert not [p for p in globals_._blobs.root.rglob("*") if p.is_file() and "round-000003/adapter_model" in str(p)]
