"""``adapter_config.json`` for an adapter, so a directory holding it and
``adapter_model.safetensors`` (from :func:`encode_adapter`) loads with
``PeftModel.from_pretrained`` and reproduces every module's ΔW.

Per-module ranks and alphas map one-to-one onto peft's ``rank_pattern``/``alpha_pattern``.
peft matches a pattern key ``k`` against a module name with ``re.match(rf"(.*\\.)?({k})$")``
(peft ``utils/other.py::get_pattern_key``); we use the escaped full module name anchored
at the start (``^``), so a key matches exactly one module.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Any, TypeVar

from .adapter import Adapter

__all__ = ["peft_adapter_config"]

_N = TypeVar("_N", int, float)


def _most_common(values: Sequence[_N]) -> _N:
    counts = Counter(values)
    best = max(counts.values())
    return max(v for v, c in counts.items() if c == best)  # ties: the larger value


def _targets(name: str, target_modules: Sequence[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in target_modules)


def peft_adapter_config(
    adapter: Adapter,
    *,
    base_model_name_or_path: str,
    target_modules: Sequence[str],
    task_type: str | None = None,
    modules_to_save: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The ``LoraConfig`` of ``adapter`` as a JSON-able dict.

    ``r``/``lora_alpha`` are the most common rank/alpha; modules that differ get an entry
    in ``rank_pattern``/``alpha_pattern``. Raises ValueError when a module is not covered
    by ``target_modules`` (peft would silently not load it).
    """
    if not adapter.modules:
        raise ValueError("the adapter has no LoRA modules")
    for name in adapter.modules:
        if not _targets(name, target_modules):
            raise ValueError(f"module {name!r} is not matched by target_modules {list(target_modules)}")
    ranks = adapter.ranks
    alphas = adapter.alphas
    r = _most_common(list(ranks.values()))
    alpha = _most_common(list(alphas.values()))
    # Longest names first: peft takes the first pattern that matches.
    names = sorted(adapter.modules, key=lambda n: (-len(n), n))

    def key(n: str) -> str:
        return "^" + re.escape(n)  # anchored: peft prepends (.*\.)?

    rank_pattern = {key(n): ranks[n] for n in names if ranks[n] != r}
    alpha_pattern = {key(n): alphas[n] for n in names if alphas[n] != alpha}
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": int(r),
        "lora_alpha": float(alpha),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_rslora": adapter.use_rslora,
        "target_modules": sorted(target_modules),
        "modules_to_save": None if modules_to_save is None else list(modules_to_save),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
