from __future__ import annotations

import json

import numpy as np
import pytest

from rankfed.edge_client.data import IGNORE_INDEX, load_dataset, read_records
from rankfed.edge_client.errors import DataError
from rankfed.edge_client.model import load_tokenizer


@pytest.fixture(scope="module")
def bert_tok(bert_dir):
    return load_tokenizer(bert_dir)


@pytest.fixture(scope="module")
def llama_tok(llama_dir):
    return load_tokenizer(llama_dir)


def test_jsonl_and_csv_agree(tmp_path, bert_tok):
    rows = [("good movie", 1), ("bad film", 0), ("team won", 2)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in rows))
    (tmp_path / "d.csv").write_text("text,label\n" + "".join(f"{t},{l}\n" for t, l in rows))
    a = load_dataset(tmp_path / "d.jsonl", bert_tok, task="sequence-classification", num_labels=3)
    b = load_dataset(tmp_path / "d.csv", bert_tok, task="sequence-classification", num_labels=3)
    assert a.examples == b.examples
    assert [e.labels for e in a.examples] == [1, 0, 2]
    assert a.examples[0].input_ids[0] == bert_tok.cls_token_id


def test_label_names_resolve_through_the_given_list(tmp_path, bert_tok):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "good", "label": "pos"}) + "\n" + json.dumps({"text": "bad", "label": "neg"}) + "\n")
    ds = load_dataset(path, bert_tok, task="sequence-classification", num_labels=2, label_names=["neg", "pos"])
    assert [e.labels for e in ds.examples] == [1, 0]
    with pytest.raises(DataError, match="example 1: label 'pos' is not an integer.*--labels"):
        load_dataset(path, bert_tok, task="sequence-classification", num_labels=2)


@pytest.mark.parametrize(
    "content, match",
    [
        ('{"text": "a", "label": 5}\n', r"example 1: label 5 outside \[0, 3\)"),
        ('{"text": "a"}\n', "example 1 has no 'label' field"),
        ('{"text": "a", "label": 1}\nnot json\n', r"d.jsonl:2: not valid JSON"),
        ("", "holds no examples"),
    ],
)
def test_bad_files_name_the_problem(tmp_path, bert_tok, content, match):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=match):
        load_dataset(path, bert_tok, task="sequence-classification", num_labels=3)


def test_unsupported_suffix(tmp_path):
    (tmp_path / "d.parquet").write_bytes(b"x")
    with pytest.raises(DataError, match="unsupported data format"):
        read_records(tmp_path / "d.parquet")


def test_causal_lm_trains_on_the_response_only(lm_data, llama_tok):
    ds = load_dataset(lm_data, llama_tok, task="causal-lm", max_length=32)
    e = ds.examples[0]
    prompt_len = len(llama_tok("what is the film")["input_ids"])
    assert e.labels[:prompt_len] == (IGNORE_INDEX,) * prompt_len
    assert e.labels[-1] == llama_tok.eos_token_id
    batch = ds.collate(ds.examples[:3])
    assert batch.labels.shape == batch.input_ids.shape
    assert (batch.labels[batch.attention_mask == 0] == IGNORE_INDEX).all()


def test_batches_are_deterministic_for_a_seed(cls_data, bert_tok):
    ds = load_dataset(cls_data, bert_tok, task="sequence-classification", num_labels=3)
    first = [b.labels.tolist() for b in ds.batches(8, seed=3, epochs=2)]
    again = [b.labels.tolist() for b in ds.batches(8, seed=3, epochs=2)]
    other = [b.labels.tolist() for b in ds.batches(8, seed=4, epochs=2)]
    assert first == again and first != other
    assert sum(len(x) for x in first) == 2 * len(ds)
    b = next(ds.batches(8, seed=0))
    assert b.input_ids.dtype == np.int64 and (b.attention_mask.sum(1) > 0).all()
