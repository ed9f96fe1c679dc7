"""Heterogeneous-rank LoRA aggregation: the adapter data model, its safetensors codec,
every aggregation rule (batch and streaming), redistribution and factored SVD.

numpy only; torch is never imported (the HetLoRA penalty accepts torch tensors if given).

>>> from rankfed.aggregation import get_method
>>> rule = get_method("rbla")
>>> global_adapter = rule.aggregate(adapters, weights, global_rank=16)       # doctest: +SKIP
>>> mine = rule.redistribute(global_adapter, rank=4, alpha=8.0)              # doctest: +SKIP

See docs/aggregation.md for the formulas, choices and memory bounds.
"""

from .adapter import Adapter, AdapterSpec, LoraModule
from .codec import FORMAT, decode_adapter, encode_adapter, read_adapter_metadata, write_adapter
from .errors import (
    AdapterError,
    AdapterFormatError,
    AdapterValidationError,
    AggregationError,
)
from .hetlora_client import hetlora_prune_rank, hetlora_tail_norm, hetlora_tail_penalty
from .peft_config import peft_adapter_config
from .redistribute import (
    redistribute_svd,
    redistribute_truncate,
    rescale,
    revive_inert,
    truncate,
)
from .registry import METHODS, Method, get_method
from .rules.padding import fedit, hetlora, hetlora_norms, rbla, replication, zero_pad
from .rules.svd_based import flexlora, flora
from .streaming import (
    Accumulator,
    ComponentAccumulator,
    FlexLoraAccumulator,
    FloraAccumulator,
)
from .svd import factored_svd, factored_svd_parts

__all__ = [
    "Accumulator",
    "Adapter",
    "AdapterError",
    "AdapterFormatError",
    "AdapterSpec",
    "AdapterValidationError",
    "AggregationError",
    "ComponentAccumulator",
    "FORMAT",
    "FlexLoraAccumulator",
    "FloraAccumulator",
    "LoraModule",
    "METHODS",
    "Method",
    "decode_adapter",
    "encode_adapter",
    "write_adapter",
    "factored_svd",
    "factored_svd_parts",
    "fedit",
    "flexlora",
    "flora",
    "get_method",
    "hetlora",
    "hetlora_norms",
    "hetlora_prune_rank",
    "hetlora_tail_norm",
    "hetlora_tail_penalty",
    "peft_adapter_config",
    "rbla",
    "read_adapter_metadata",
    "redistribute_svd",
    "redistribute_truncate",
    "replication",
    "rescale",
    "revive_inert",
    "truncate",
    "zero_pad",
]
