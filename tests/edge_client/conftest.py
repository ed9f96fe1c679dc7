"""Tiny models built from configs (no downloads), saved as local Hugging Face directories
with a real tokenizer, plus small synthetic datasets that a tiny model can learn."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

WORDS = (
    "the a an this that movie film book song great good fine nice awesome bad awful poor "
    "terrible boring market stock fell rose sharply today team won lost match goal hello "
    "world is was very quite not and or what where who how"
).split()
POSITIVE = ("great", "good", "nice", "awesome", "fine")
NEGATIVE = ("bad", "awful", "poor", "terrible", "boring")
SPORT = ("team", "won", "lost", "match", "goal")


def _tokenizer(kind: str):  # -> PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if kind == "bert":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    else:
        specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials[1]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if kind == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
            sep_token="[SEP]", mask_token="[MASK]",
        )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def make_bert_dir(path: Path, *, seed: int = 0, num_hidden_layers: int = 2) -> Path:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    tok = _tokenizer("bert")
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=num_hidden_layers, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, num_labels=3, initializer_range=0.2,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    model = BertForSequenceClassification(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_llama_dir(path: Path, *, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tokenizer("llama")
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_cls_data(path: Path, n: int = 60, *, seed: int = 0) -> Path:
    """Three classes the tiny model can learn: label = which keyword group the text uses."""
    import random

    rng = random.Random(seed)
    groups = (NEGATIVE, POSITIVE, SPORT)
    filler = ("the", "a", "this", "movie", "is", "very", "quite", "today")
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            label = i % 3
            words = [rng.choice(filler) for _ in range(rng.randint(0, 2))] + [rng.choice(groups[label])]
            rng.shuffle(words)
            f.write(json.dumps({"text": " ".join(words), "label": label}) + "\n")
    return path


def write_lm_data(path: Path, n: int = 24) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": "what is the film", "response": POSITIVE[i % 5] if i % 2 else "bad"}) + "\n")
    return path


def pytest_configure(config):
    # pyproject's filter for this peft/transformers deprecation misses the leading backtick
    # of the real message; the lead fixes pyproject, this keeps the edge tests independent.
    config.addinivalue_line(
        "filterwarnings", "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"
    )


@pytest.fixture(scope="session", autouse=True)
def _threads():
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory) -> Path:
    return make_bert_dir(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    return make_llama_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def cls_data(tmp_path_factory) -> Path:
    return write_cls_data(tmp_path_factory.mktemp("data") / "train.jsonl")


@pytest.fixture(scope="session")
def lm_data(tmp_path_factory) -> Path:
    return write_lm_data(tmp_path_factory.mktemp("data") / "lm.jsonl")


def randomize_lora(peft_model, seed: int = 1, scale: float = 0.2) -> None:
    """Non-zero LoRA B (fresh adapters have B = 0, so delta W = 0 and tests prove nothing)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
