"""Local training of a peft model: AdamW over the trainable parameters, for a number of
steps or epochs, deterministic for a seed.

The loop is deliberately bare (forward, optional HetLoRA tail penalty, backward, step):
the benchmark in bench/edge_bench.py holds it to within a few percent of a plain peft loop.
Progress, heartbeats and cancellation hook in through two callables, called once per step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .data import TextDataset
from .errors import ModelError, TrainingError
from .layer_cache import PrefixCache, check_layer, set_prefix_eval, suffix_only, trainable_below

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TrainConfig:
    steps: int | None = None  # exactly one of steps / epochs
    epochs: int | None = None
    learning_rate: float = 2e-3
    batch_size: int = 16
    seed: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    # HetLoRA (Cho et al. 2024) rank self-pruning: lambda > 0 adds the tail penalty
    # lambda * ||B[:, floor(gamma r):]|| * ||A[floor(gamma r):, :]|| to the loss.
    hetlora_lambda: float = 0.0
    hetlora_gamma: float = 0.99
    # Train encoder layers >= k only (LoRA there, layers below frozen and inference-only:
    # eval mode, no dropout). None: every layer as configured. With a `PrefixCache` the
    # step starts at layer k from cached states (layer_cache.py); without, the whole model
    # runs with the same eval-mode prefix, which is the exactness reference.
    freeze_below_layer: int | None = None

    def __post_init__(self) -> None:
        if (self.steps is None) == (self.epochs is None):
            raise TrainingError("give exactly one of steps or epochs")
        if (self.steps is not None and self.steps < 1) or (self.epochs is not None and self.epochs < 1):
            raise TrainingError("steps and epochs must be >= 1")
        if not self.learning_rate > 0 or self.batch_size < 1:
            raise TrainingError("learning_rate must be > 0 and batch_size >= 1")
        if self.freeze_below_layer is not None and self.freeze_below_layer < 1:
            raise TrainingError(f"freeze_below_layer must be >= 1, got {self.freeze_below_layer}")

    def total_steps(self, num_examples: int) -> int:
        if self.steps is not None:
            return self.steps
        assert self.epochs is not None
        return self.epochs * math.ceil(num_examples / self.batch_size)


@dataclass(frozen=True)
class StepInfo:
    step: int  # 1-based
    total: int
    loss: float
    examples: int


@dataclass(frozen=True)
class TrainResult:
    steps: int
    examples: int  # examples seen, counting repeats
    loss_first: float
    loss_last: float
    seconds: float
    stopped_early: bool = False
    losses: list[float] = field(default_factory=list)


def lora_pairs(model: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(A, B) weight pairs of every LoRA layer of a peft model (active adapter 'default')."""
    import torch
    from peft.tuners.lora import LoraLayer

    pairs = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
                raise ModelError(f"{name}: the LoRA factors' weights are not tensors")
            pairs.append((a, b))
    return pairs


def _hetlora_penalty(model: torch.nn.Module, gamma: float, lam: float) -> Callable[[], torch.Tensor]:
    from rankfed.aggregation import hetlora_tail_penalty

    pairs = lora_pairs(model)

    def penalty() -> Any:
        return sum(hetlora_tail_penalty(a, b, gamma=gamma, lam=lam) for a, b in pairs)

    return penalty


def train_local(
    model: torch.nn.Module,
    dataset: TextDataset,
    config: TrainConfig,
    *,
    on_step: Callable[[StepInfo], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    device: str = "cpu",
    prefix_cache: PrefixCache | None = None,
) -> TrainResult:
    """Train ``model`` in place. ``should_stop`` is checked before every step (e.g. the round
    closed); ``on_step`` sees every finished step (progress bars, heartbeats).
    ``prefix_cache``: ``dataset``'s states entering layer ``config.freeze_below_layer``
    (built once per dataset with `PrefixCache.build`); each step then runs only layers k..
    and the head."""
    import torch

    k = config.freeze_below_layer
    if prefix_cache is not None and (prefix_cache.k != k or len(prefix_cache) != len(dataset)):
        raise TrainingError(
            f"the prefix cache holds {len(prefix_cache)} examples at layer {prefix_cache.k}, but the "
            f"dataset has {len(dataset)} and freeze_below_layer is {k}"
        )
    if k is not None:
        check_layer(model, k)
        if trained := trainable_below(model, k):
            raise TrainingError(f"freeze_below_layer={k} but {trained[0]} below layer {k} is trainable")
    torch.manual_seed(config.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    penalty = (
        _hetlora_penalty(model, config.hetlora_gamma, config.hetlora_lambda)
        if config.hetlora_lambda > 0
        else None
    )
    total = config.total_steps(len(dataset))
    batches = dataset.index_batches(config.batch_size, seed=config.seed, epochs=config.epochs)
    model.train()
    if k is not None:
        set_prefix_eval(model, k)
    losses: list[float] = []
    examples = 0
    stopped = False
    start = time.perf_counter()
    suffix = suffix_only(model, k) if prefix_cache is not None and k is not None else nullcontext(None)
    try:
        with suffix as feed:
            for step, indices in zip(range(1, total + 1), batches, strict=False):
                if should_stop is not None and should_stop():
                    stopped = True
                    break
                batch = dataset.collate([dataset.examples[i] for i in indices])
                if feed is not None and prefix_cache is not None:
                    feed.hidden = prefix_cache.batch(indices, batch.input_ids.shape[1]).to(device)
                out = model(
                    input_ids=torch.from_numpy(batch.input_ids).to(device),
                    attention_mask=torch.from_numpy(batch.attention_mask).to(device),
                    labels=torch.from_numpy(batch.labels).to(device),
                )
                loss = out.loss
                if penalty is not None:
                    loss = loss + penalty()
                loss.backward()
                if config.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                value = float(out.loss.detach())
                if not math.isfinite(value):
                    raise TrainingError(f"the loss became {value} at step {step}; lower the learning rate")
                losses.append(value)
                examples += len(batch)
                if on_step is not None:
                    on_step(StepInfo(step=step, total=total, loss=value, examples=examples))
    finally:
        model.eval()
    if not losses and not stopped:
        raise TrainingError("no training step ran (empty data?)")
    return TrainResult(
        steps=len(losses),
        examples=examples,
        loss_first=losses[0] if losses else float("nan"),
        loss_last=losses[-1] if losses else float("nan"),
        seconds=time.perf_counter() - start,
        stopped_early=stopped,
        losses=losses,
    )


def evaluate(
    model: torch.nn.Module,
    dataset: TextDataset,
    *,
    batch_size: int = 32,
    device: str = "cpu",
    prefix_cache: PrefixCache | None = None,
) -> dict[str, float]:
    """Mean loss over ``dataset`` and, for classification, accuracy (``{"accuracy", "loss"}``);
    the model is left in eval mode. ``prefix_cache``: ``dataset``'s states entering layer k
    (exact: the model then runs only layers k.. and the head)."""
    import torch

    model.eval()
    correct = total = 0
    loss_sum = 0.0
    if prefix_cache is not None and len(prefix_cache) != len(dataset):
        raise TrainingError(f"the prefix cache holds {len(prefix_cache)} examples, the dataset {len(dataset)}")
    suffix = suffix_only(model, prefix_cache.k) if prefix_cache is not None else nullcontext(None)
    # Batches of similar length: far less padding to run through the model; every example's
    # loss and prediction is the same whatever batch it is in, so the result is too.
    order = np.argsort([len(e.input_ids) for e in dataset.examples], kind="stable")
    with torch.no_grad(), suffix as feed:
        for start in range(0, len(dataset), batch_size):
            rows = order[start : start + batch_size]
            batch = dataset.collate([dataset.examples[i] for i in rows])
            if feed is not None and prefix_cache is not None:
                feed.hidden = prefix_cache.batch(rows, batch.input_ids.shape[1]).to(device)
            out = model(
                input_ids=torch.from_numpy(batch.input_ids).to(device),
                attention_mask=torch.from_numpy(batch.attention_mask).to(device),
                labels=torch.from_numpy(batch.labels).to(device),
            )
            loss_sum += float(out.loss) * len(batch)
            total += len(batch)
            if dataset.task != "causal-lm":
                correct += int((out.logits.argmax(-1).cpu().numpy() == batch.labels).sum())
    result = {"loss": loss_sum / max(total, 1)}
    if dataset.task != "causal-lm":
        result["accuracy"] = correct / max(total, 1)
    return result
