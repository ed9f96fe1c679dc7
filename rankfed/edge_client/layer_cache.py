"""The exact frozen-layer cache: train only encoder layers k.. when LoRA targets nothing below.

When LoRA (and every other trainable tensor) sits in layers >= k of an encoder, the hidden
states entering layer k are a function of the example alone: the embeddings and layers
0..k-1 never change during a round, nor between rounds. `PrefixCache.build` computes them
once per device dataset (batch by batch, kept on CPU, one (length, hidden) tensor per example
index) and `suffix_only` makes the model's own forward start from them, so a training step
runs layers k.., the pooler and the head, and nothing else.

Exact by definition, not an approximation: with ``freeze_below_layer`` set, the frozen
prefix is inference-only, i.e. it runs in eval mode (no dropout) in BOTH paths, the cached
one and the uncached reference (`set_prefix_eval`). Dropout in the trained layers and the
head still runs, and draws from the RNG in the same order in both paths, so the per-step
losses agree up to float summation order (tests/edge_client/test_layer_cache.py).

Padding: an example's cached rows are its real tokens only. A training batch pads them with
zeros; the attention mask keeps padded keys out of every real token's attention (their
softmax weight is exactly 0), and the pooler reads token 0, so what the loss sees is the
same as with the prefix run on the training batch's own padding.

Supported: BERT-like encoders (``<backbone>.embeddings`` and ``<backbone>.encoder.layer``),
the family of the federation's sentence models. A decoder (rotary positions, causal masks,
per-layer position arguments) raises `ConfigError`.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from rankfed.protocol.files import write_atomic

from .data import TextDataset
from .errors import ConfigError

if TYPE_CHECKING:
    import torch


def _backbone(model: Any) -> Any:
    """The encoder module (``bert`` of a BertForSequenceClassification) of a model or of a
    peft model wrapping one."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(inner, getattr(inner, "base_model_prefix", ""), inner)
    if not hasattr(backbone, "embeddings") or not hasattr(getattr(backbone, "encoder", None), "layer"):
        raise ConfigError(
            f"freeze_below_layer: {type(inner).__name__} is not a BERT-like encoder "
            "(embeddings + encoder.layer); the frozen-layer cache supports only those"
        )
    return backbone


def num_layers(model: Any) -> int:
    return len(_backbone(model).encoder.layer)


def check_layer(model: Any, k: int) -> None:
    """``k`` must leave at least one frozen and one trained layer."""
    n = num_layers(model)
    if not 1 <= k < n:
        raise ConfigError(f"freeze_below_layer must be in [1, {n - 1}] for this {n}-layer model, got {k}")


def trainable_below(model: Any, k: int) -> list[str]:
    """Names of trainable parameters in the frozen prefix (must be none for exactness)."""
    backbone = _backbone(model)
    prefix = ("embeddings.", *(f"encoder.layer.{i}." for i in range(k)))
    return [n for n, p in backbone.named_parameters() if p.requires_grad and n.startswith(prefix)]


def set_prefix_eval(model: Any, k: int) -> None:
    """Embeddings and layers 0..k-1 to eval mode: the frozen prefix is inference-only."""
    backbone = _backbone(model)
    backbone.embeddings.eval()
    for layer in backbone.encoder.layer[:k]:
        layer.eval()


class PrefixCache:
    """Hidden states entering layer ``k``, one (length, hidden) fp32 CPU tensor per example."""

    def __init__(self, k: int, states: Sequence[torch.Tensor]) -> None:
        self.k = k
        self.states = list(states)

    def __len__(self) -> int:
        return len(self.states)

    @property
    def nbytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.states)

    @classmethod
    def build(cls, model: Any, dataset: TextDataset, k: int, *, batch_size: int = 32, device: str = "cpu") -> PrefixCache:
        """Run embeddings and layers 0..k-1 of ``model`` (a base or a peft model; no trainable
        tensor may sit there) in eval mode over ``dataset`` in index order."""
        import torch

        check_layer(model, k)
        if trained := trainable_below(model, k):
            raise ConfigError(f"freeze_below_layer={k} but {trained[0]} below layer {k} is trainable")
        states: list[torch.Tensor] = []
        captured: list[torch.Tensor] = []

        def grab(module: Any, args: Any, kwargs: Any) -> None:
            captured.append(args[0] if args else kwargs["hidden_states"])
            raise _PrefixDone

        backbone = _backbone(model)
        was_training = backbone.training
        backbone.eval()
        hook = backbone.encoder.layer[k].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with torch.no_grad():
                for start in range(0, len(dataset), batch_size):
                    items = dataset.examples[start : start + batch_size]
                    batch = dataset.collate(items)
                    captured.clear()
                    try:  # the backbone alone: the head would only be skipped anyway
                        backbone(
                            input_ids=torch.from_numpy(batch.input_ids).to(device),
                            attention_mask=torch.from_numpy(batch.attention_mask).to(device),
                        )
                    except _PrefixDone:
                        pass
                    hidden = captured[0].to("cpu", torch.float32)  # (batch, seq, hidden)
                    states += [hidden[row, : len(e.input_ids)].clone() for row, e in enumerate(items)]
        finally:
            hook.remove()
            backbone.train(was_training)
        return cls(k, states)

    def save(self, path: Path) -> None:
        """One fp32 array of every example's rows plus their lengths (exact, atomic)."""
        import torch

        lengths = np.array([s.shape[0] for s in self.states], dtype=np.int64)
        rows = torch.cat(self.states).numpy() if self.states else np.zeros((0, 0), np.float32)
        buf = io.BytesIO()
        np.savez(buf, k=np.int64(self.k), lengths=lengths, rows=rows)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, buf.getvalue())

    @classmethod
    def load(cls, path: Path) -> PrefixCache:
        import torch

        with np.load(path) as data:
            k, lengths, rows = int(data["k"]), data["lengths"], torch.from_numpy(data["rows"])
        return cls(k, list(torch.split(rows, [int(n) for n in lengths])))

    @classmethod
    def load_or_build(cls, model: Any, dataset: TextDataset, k: int, path: Path | None) -> tuple[PrefixCache, bool]:
        """The states kept at `path` if there, else built and kept there (None: not kept);
        and whether they were loaded."""
        if path is not None and path.is_file():
            return cls.load(path), True
        cache = cls.build(model, dataset, k)
        if path is not None:
            cache.save(path)
        return cache, False

    def batch(self, indices: Sequence[int] | npt.NDArray[np.int64], seq_len: int) -> torch.Tensor:
        """(len(indices), seq_len, hidden): the examples' states, zero-padded on the right."""
        import torch

        hidden = self.states[0].shape[-1]
        out = torch.zeros(len(indices), seq_len, hidden)
        for row, i in enumerate(indices):
            s = self.states[int(i)]
            out[row, : s.shape[0]] = s
        return out


def cache_key(base_sha256: str, dataset: TextDataset, k: int) -> str:
    """What the states entering layer k are a function of: the base weights, k and the
    tokenized examples in order (a different tokenizer or max_length gives other ids)."""
    h = hashlib.sha256(f"{base_sha256}|{k}|{len(dataset)}|".encode())
    for e in dataset.examples:
        h.update(np.asarray(e.input_ids, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()[:32]


class _PrefixDone(Exception):
    """Stops the backbone's forward once the states entering layer k are captured."""


@contextmanager
def suffix_only(model: Any, k: int) -> Iterator[_Feed]:
    """Inside, ``model``'s own forward (masks, pooler, head, loss) starts at layer ``k`` from
    the states given to the yielded feed; the embeddings and layers 0..k-1 are put back on
    exit. Going through the model's forward, not a copy of it, keeps the head, the mask
    and the loss exactly as in the uncached path."""
    import torch

    backbone = _backbone(model)
    check_layer(model, k)
    embeddings, layers = backbone.embeddings, backbone.encoder.layer
    feed = _Feed()
    # Module assignment replaces the submodules; the parameters of layers k.. stay the same
    # objects, so the optimizer built over the full model keeps training them.
    backbone.embeddings = _feed_module(feed)
    backbone.encoder.layer = torch.nn.ModuleList(list(layers[k:]))
    try:
        yield feed
    finally:
        backbone.embeddings = embeddings
        backbone.encoder.layer = layers


class _Feed:
    """The states the next forward starts from (set once per step)."""

    hidden: Any = None


def _feed_module(feed: _Feed) -> Any:
    """A module that stands in for the embeddings and returns the fed states (defined here:
    torch is imported lazily, like everywhere in the edge client)."""
    import torch

    class FeedModule(torch.nn.Module):
        def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
            if feed.hidden is None:
                raise ConfigError("suffix_only: no cached states fed for this forward")
            return feed.hidden

    return FeedModule()
