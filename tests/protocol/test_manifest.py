"""The model manifest: load, validate (errors name the field or module), round trip."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from rankfed.protocol import ManifestError
from rankfed.protocol.manifest import load_manifest, write_manifest

TINY = Path(__file__).parent.parent / "coordinator" / "data" / "tiny-manifest.json"


def tiny_dict() -> dict[str, Any]:
    return json.loads(TINY.read_text(encoding="utf-8"))


def load_error(tmp_path: Path, data: Any) -> str:
    path = tmp_path / "m.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert str(path) in str(info.value)
    return str(info.value)


def test_load_tiny() -> None:
    m = load_manifest(TINY)
    assert m.model_id == "tiny-bert"
    assert m.task == "sequence-classification"
    assert m.num_labels == 3
    assert m.target_modules == ("query", "value")
    assert m.modules_to_save == ("classifier",)
    assert len(m.modules) == 4
    assert m.modules["bert.encoder.layer.0.attention.self.query"] == (8, 8)
    assert m.dense == {"classifier.weight": (3, 8), "classifier.bias": (3,)}


def test_round_trip(tmp_path: Path) -> None:
    m = load_manifest(TINY)
    out = tmp_path / "copy.json"
    write_manifest(m, out)
    assert load_manifest(out) == m
    assert json.loads(out.read_text()) == tiny_dict()  # same content, documented keys
    assert [p.name for p in tmp_path.iterdir()] == ["copy.json"]  # no temporary left


def test_optional_fields_default(tmp_path: Path) -> None:
    data = tiny_dict()
    del data["dense"], data["modules_to_save"]
    data["task"] = "causal-lm"
    del data["num_labels"]
    path = tmp_path / "m.json"
    path.write_text(json.dumps(data))
    m = load_manifest(path)
    assert (m.dense, m.modules_to_save, m.num_labels) == ({}, (), 0)


def test_uppercase_digest_is_normalised(tmp_path: Path) -> None:
    data = tiny_dict()
    data["weights_sha256"] = data["weights_sha256"].upper()
    path = tmp_path / "m.json"
    path.write_text(json.dumps(data))
    assert load_manifest(path).weights_sha256 == tiny_dict()["weights_sha256"]


def test_missing_file_hints_at_the_command(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="does not exist.*rankfed edge manifest"):
        load_manifest(tmp_path / "nope.json")


def test_bad_json(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    path.write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_manifest(path)


def _with(**changes: Any) -> dict[str, Any]:
    data = tiny_dict()
    for key, value in changes.items():
        if value is ...:
            del data[key]
        else:
            data[key] = value
    return data


Q = "bert.encoder.layer.0.attention.self.query"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ([1, 2], "expected a JSON object"),
        (_with(format="rankfed-model-manifest/2"), "format = 'rankfed-model-manifest/2': expected 'rankfed-model-manifest/1'"),
        (_with(format=...), "format = None"),
        (_with(model_id=...), "missing field 'model_id'"),
        (_with(modul={}), "unknown field 'modul' (did you mean 'modules'?)"),
        (_with(model_id=""), "model_id = '': expected a non-empty string"),
        (_with(weights_sha256="53aa51"), "weights_sha256 = '53aa51': expected 64 lowercase hex digits"),
        (_with(task="token-classification"), "task = 'token-classification': expected one of sequence-classification, causal-lm"),
        (_with(num_labels=0), "num_labels = 0: expected an integer ≥ 1"),
        (_with(num_labels=...), "missing field 'num_labels'"),
        (_with(num_labels=-1, task="causal-lm"), "num_labels = -1: expected an integer ≥ 0"),
        (_with(target_modules=[]), "target_modules is empty"),
        (_with(target_modules="query"), "target_modules = 'query': expected a list"),
        (_with(modules={}), "modules is empty"),
        (_with(modules={Q: [8, 0]}), f"modules[{Q!r}] = [8, 0]: dimensions must be positive"),
        (_with(modules={Q: [8, -2]}), f"modules[{Q!r}] = [8, -2]: dimensions must be positive"),
        (_with(modules={Q: [8]}), f"modules[{Q!r}] = [8]: expected [d_out, d_in]"),
        (_with(modules={Q: [8, 8.5]}), f"modules[{Q!r}] = [8, 8.5]: expected a list of integers"),
        (_with(modules={"bert.pooler.dense": [8, 8]}), "modules['bert.pooler.dense']: matches none of target_modules"),
        (_with(dense={"classifier.bias": [0]}), "dense['classifier.bias'] = [0]: expected a non-empty shape"),
        (_with(dense={"classifier.bias": []}), "dense['classifier.bias'] = []: expected a non-empty shape"),
        (_with(dense=[1]), "dense = [1]: expected an object"),
    ],
)
def test_validation_names_the_field(tmp_path: Path, data: Any, expected: str) -> None:
    assert expected in load_error(tmp_path, data)


def test_constructing_an_invalid_manifest_raises() -> None:
    m = load_manifest(TINY)
    with pytest.raises(ManifestError, match="task"):
        dataclasses.replace(m, task="vision")


def test_adapter_spec() -> None:
    try:
        from rankfed.aggregation import AdapterSpec
    except ImportError:
        pytest.skip("rankfed.aggregation.AdapterSpec is not available yet")
    m = load_manifest(TINY)
    spec = m.adapter_spec()
    assert isinstance(spec, AdapterSpec)
    assert dict(spec.modules) == m.modules
    assert dict(spec.dense) == m.dense


def test_labels_are_optional_and_must_match_num_labels(tmp_path: Path) -> None:
    path = tmp_path / "labelled.json"
    path.write_text(json.dumps(_with(labels=["a", "b", "c"])))
    assert load_manifest(path).labels == ("a", "b", "c")
    assert "labels lists 2 names for num_labels = 3" in load_error(tmp_path, _with(labels=["a", "b"]))
