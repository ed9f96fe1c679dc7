"""Run an exported model with onnxruntime: classification or greedy generation.

Needs only onnxruntime, numpy and tokenizers (the `infer` extra); never imports torch or
transformers. The tokenizer, task and label names come from the ONNX file's metadata
(written by `export.py`); `--tokenizer DIR` (a directory with tokenizer.json) overrides it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError, ExportError


def _require(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(
            f"`rankfed edge infer` needs {module}; install it with pip install 'rankfed[infer]'"
        ) from None


@dataclass(frozen=True)
class Prediction:
    text: str
    label: str
    label_id: int
    scores: list[float]  # softmax probabilities, label id order


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def session_options(threads: int, *, spin: bool = False) -> Any:
    """onnxruntime session options for a device: ``threads`` intra-op threads, one inter-op.

    ``spin``: whether idle pool threads spin-wait for the next parallel section
    (onnxruntime's default) instead of sleeping. Off by default: on a device whose cores
    other work shares, a spinning thread burns the time slice its partner needs
    (bench/edge_threads.py, 2 threads at load 22-24 on 2 vCPUs: spinning off gave 1.2-2.9x
    lower wall p50 in all 8 pairs measured, docs/edge-client.md). Irrelevant at one thread
    (no pool threads).
    """
    ort = _require("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return options


class OnnxModel:
    """An exported rankfed model: an onnxruntime session plus its tokenizer and labels."""

    def __init__(self, path: str | Path, *, tokenizer_dir: str | Path | None = None, threads: int = 1,
                 spin: bool = False) -> None:
        ort = _require("onnxruntime")
        tokenizers = _require("tokenizers")
        options = session_options(threads, spin=spin)
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ExportError(f"cannot load {path}: {err}") from err
        meta = dict(self.session.get_modelmeta().custom_metadata_map)
        self.task = meta.get("rankfed.task", "sequence-classification")
        self.labels: list[str] | None = json.loads(meta.get("rankfed.labels", "null"))
        self.max_length = int(meta.get("rankfed.max_length", "512"))
        self.pad_id = int(meta.get("rankfed.pad_token_id", "0"))
        self.eos_id = int(meta.get("rankfed.eos_token_id", "-1"))
        if tokenizer_dir is not None:
            self.tokenizer = tokenizers.Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
        elif "rankfed.tokenizer" in meta:
            self.tokenizer = tokenizers.Tokenizer.from_str(meta["rankfed.tokenizer"])
        else:
            raise ConfigError(f"{path} carries no tokenizer; pass --tokenizer DIR (holding tokenizer.json)")
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_length)

    def _encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        encodings = self.tokenizer.encode_batch(texts)
        seq = max(2, max(len(e.ids) for e in encodings))
        ids = np.full((len(texts), seq), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(texts), seq), dtype=np.int64)
        for row, e in enumerate(encodings):
            ids[row, : len(e.ids)] = e.ids
            mask[row, : len(e.ids)] = 1
        return ids, mask

    def logits(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self.session.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]

    def classify(self, texts: list[str]) -> list[Prediction]:
        if self.task != "sequence-classification":
            raise ConfigError(f"this model is a {self.task} model; use generate")
        probs = _softmax(self.logits(*self._encode(texts)).astype(np.float64))
        out = []
        for text, p in zip(texts, probs, strict=True):
            i = int(p.argmax())
            name = self.labels[i] if self.labels and i < len(self.labels) else str(i)
            out.append(Prediction(text=text, label=name, label_id=i, scores=[round(float(x), 6) for x in p]))
        return out

    def generate(self, prompt: str, *, max_new_tokens: int = 32) -> str:
        """Greedy decoding with the no-cache graph (re-runs the whole sequence each token)."""
        if self.task != "causal-lm":
            raise ConfigError(f"this model is a {self.task} model; use classify")
        ids = list(self.tokenizer.encode(prompt).ids)
        new: list[int] = []
        for _ in range(max_new_tokens):
            seq = ids[-self.max_length :]
            pad = max(0, 2 - len(seq))  # the graph's sequence axis starts at 2
            x = np.array([[self.pad_id] * pad + seq], dtype=np.int64)
            mask = np.array([[0] * pad + [1] * len(seq)], dtype=np.int64)
            next_id = int(self.logits(x, mask)[0, -1].argmax())
            if next_id == self.eos_id:
                break
            ids.append(next_id)
            new.append(next_id)
        return self.tokenizer.decode(new)
