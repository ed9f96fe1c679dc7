"""An adapter's card survives its trip through safetensors metadata; malformed cards are a
DecodeError naming the field, and an adapter without one reads as None."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rankfed.protocol import DecodeError
from rankfed.protocol.artifact import AdapterCard

NAMES = st.lists(st.text(min_size=1, max_size=12), max_size=4).map(tuple)


@settings(max_examples=80, deadline=None)
@given(st.builds(
    AdapterCard, task=st.sampled_from(["sequence-classification", "causal-lm"]), target_modules=NAMES, labels=NAMES,
    num_labels=st.integers(0, 1000), modules_to_save=NAMES, base_model_id=st.text(max_size=20),
    base_model_sha256=st.text(max_size=64), round=st.integers(0, 2**62), method=st.text(max_size=10),
))
def test_card_round_trip(card: AdapterCard) -> None:
    metadata = card.to_metadata()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    assert AdapterCard.from_metadata({"round": "3", **metadata}) == card


def test_an_adapter_without_a_card_reads_as_none() -> None:
    assert AdapterCard.from_metadata({"round": "3", "base_model_id": "m"}) is None


@pytest.mark.parametrize(("key", "value", "message"), [
    ("rankfed.labels", "not json", "rankfed.labels is not JSON"),
    ("rankfed.labels", '{"a": 1}', "rankfed.labels is not a list of strings"),
    ("rankfed.target_modules", "[1, 2]", "rankfed.target_modules is not a list of strings"),
    ("rankfed.round", "three", "adapter metadata"),
])
def test_a_malformed_card_is_a_decode_error(key: str, value: str, message: str) -> None:
    metadata = AdapterCard(task="causal-lm", target_modules=("q",)).to_metadata()
    metadata[key] = value
    with pytest.raises(DecodeError, match=message):
        AdapterCard.from_metadata(metadata)


def test_a_downloaded_adapter_becomes_a_peft_directory(tmp_path) -> None:
    import json

    import numpy as np

    from rankfed.aggregation import Adapter, LoraModule, encode_adapter
    from rankfed.protocol.artifact import read_card, write_adapter_dir

    rng = np.random.default_rng(0)
    adapter = Adapter(
        modules={"bert.encoder.layer.0.attention.self.query": LoraModule(
            a=rng.normal(size=(4, 8)), b=rng.normal(size=(8, 4)), alpha=4.0)},
        dense={"classifier.weight": rng.normal(size=(3, 8))},
    )
    card = AdapterCard(task="sequence-classification", target_modules=("query",), labels=("a", "b", "c"),
                       num_labels=3, modules_to_save=("classifier",), base_model_id="tiny", round=5)
    blob = encode_adapter(adapter, metadata=card.to_metadata())
    assert write_adapter_dir(tmp_path / "final", blob) == card
    assert (tmp_path / "final" / "adapter_model.safetensors").read_bytes() == blob
    config = json.loads((tmp_path / "final" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["target_modules"] == ["query"] and config["task_type"] == "SEQ_CLS"
    assert read_card(tmp_path / "final") == card
    plain = encode_adapter(adapter)  # no card: only the weights are written
    assert write_adapter_dir(tmp_path / "plain", plain) is None
    assert not (tmp_path / "plain" / "adapter_config.json").exists()
