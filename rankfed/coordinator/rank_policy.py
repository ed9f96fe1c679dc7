"""Rank assignment: pure functions from a device's capability and the policy to a rank.

    demotions = demotions_for(missed, cfg.federation.demote_after_missed_deadlines)
    rank, tier, reason = assign(capability, cfg.rank_policy, max_rank=cfg.lora.max_rank,
                                demotions=demotions)
    settings = lora_settings(rank, cfg.lora, target_modules=m.target_modules,
                             modules_to_save=m.modules_to_save)
    ranks = apply_budget(ranks, bytes_at_rank=lambda r: update_bytes(r, m),
                         budget_bytes=cfg.rank_policy.round_budget_bytes)

No grpc, no files, no clock: the rounds engine calls these at Join and at the start of
every round, and writes the reason into status.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Mapping, Sequence
from math import prod
from typing import TYPE_CHECKING

from rankfed.coordinator.config import LoraSection, RankPolicyConfig, RankTier
from rankfed.protocol import AlphaRule, Capability, DeviceClass, LoraSettings

if TYPE_CHECKING:
    from rankfed.protocol.manifest import ModelManifest

__all__ = [
    "GB",
    "apply_budget",
    "assign",
    "demotions_for",
    "lora_settings",
    "lowered_ranks",
    "tier_conditions",
    "update_bytes",
]

GB = 1e9  # min_memory_gb counts decimal gigabytes: a "16 GB" card reporting 15.7 GiB passes
_BYTES_PER_PARAM = 4  # updates travel as fp32


def lora_settings(
    rank: int,
    lora: LoraSection,
    *,
    target_modules: Sequence[str],
    modules_to_save: Sequence[str] = (),
) -> LoraSettings:
    """The LoRA config a client trains with at `rank`, alpha following lora.alpha_rule.

    constant_scaling: alpha = scaling * r, so alpha / r is the same at every rank;
    fixed: alpha for every rank (scaling alpha / r shrinks as r grows);
    rslora: alpha for every rank with use_rslora=True (peft scales by alpha / sqrt(r)).
    """
    if rank < 1:
        raise ValueError(f"rank must be ≥ 1, got {rank}")
    if lora.alpha_rule is AlphaRule.CONSTANT_SCALING:
        alpha, use_rslora = lora.scaling * rank, False
    elif lora.alpha_rule is AlphaRule.FIXED:
        alpha, use_rslora = lora.alpha, False
    elif lora.alpha_rule is AlphaRule.RSLORA:
        alpha, use_rslora = lora.alpha, True
    else:  # pragma: no cover - AlphaRule is closed
        raise ValueError(f"unknown alpha rule {lora.alpha_rule!r}")
    return LoraSettings(
        rank=rank,
        alpha=float(alpha),
        use_rslora=use_rslora,
        alpha_rule=lora.alpha_rule,
        target_modules=tuple(target_modules),
        dropout=lora.dropout,
        modules_to_save=tuple(modules_to_save),
    )


def demotions_for(deadlines_missed: int, demote_after: int) -> int:
    """Tiers to move a client down: one per `demote_after` deadlines missed in a row."""
    if demote_after <= 0 or deadlines_missed <= 0:
        return 0
    return deadlines_missed // demote_after


def tier_conditions(capability: Capability, tier: RankTier) -> tuple[bool, list[str]]:
    """Whether `capability` meets every condition of `tier`, and each condition as text."""
    cap = capability
    ok = True
    parts: list[str] = []
    if tier.device_class is not None:
        ok &= cap.device_class == tier.device_class
        parts.append(str(cap.device_class) if ok else f"{cap.device_class} ≠ {tier.device_class}")
    if tier.min_gflops is not None:
        held = cap.compute_gflops >= tier.min_gflops
        ok &= held
        parts.append(f"{cap.compute_gflops:g} GFLOP/s {_cmp(held)} {tier.min_gflops:g}")
    if tier.min_memory_gb is not None:
        label, nbytes = _memory(cap)
        held = nbytes >= tier.min_memory_gb * GB
        ok &= held
        parts.append(f"{label} {nbytes / GB:.1f} GB {_cmp(held)} {tier.min_memory_gb:g}")
    if tier.min_upload_mbps is not None:
        mbps = cap.upload_bytes_per_second * 8 / 1e6
        held = mbps >= tier.min_upload_mbps
        ok &= held
        parts.append(f"upload {mbps:.1f} Mbit/s {_cmp(held)} {tier.min_upload_mbps:g}")
    if tier.min_cores is not None:
        held = cap.cpu_cores >= tier.min_cores
        ok &= held
        parts.append(f"{cap.cpu_cores} cores {_cmp(held)} {tier.min_cores}")
    return bool(ok), parts


def assign(
    capability: Capability,
    policy: RankPolicyConfig,
    *,
    max_rank: int,
    demotions: int = 0,
    current_tier: str | None = None,
) -> tuple[int, str, str]:
    """(rank, tier name, reason) for a device; the first tier whose conditions all hold wins.

    `current_tier` (the tier the device had, None for a new device) applies the
    policy.hysteresis band: the device keeps that tier while it meets its conditions with
    thresholds lowered by the band, and moves to a higher tier only when it meets that
    tier's conditions with thresholds raised by the band; so a speed measured at 49 and
    then 51 GFLOP/s against a 50 GFLOP/s threshold does not flip the rank every round.
    `demotions` moves the client that many tiers further down among the tiers of its
    device class (never below the lowest one, never to a higher rank). When no tier
    matches, the rank is policy.default_rank and the tier name is "default". Every rank
    is capped at max_rank.
    """
    if max_rank < 1:
        raise ValueError(f"max_rank must be ≥ 1, got {max_rank}")
    cls = capability.device_class
    same_class = [t for t in policy.tiers if t.device_class is None or t.device_class == cls]
    index, parts = _first_match(capability, same_class, current_tier, policy.hysteresis)
    if index is not None:
        tier = same_class[index]
    else:
        rank = min(policy.default_rank, max_rank)
        reason = (
            f"no tier matches {cls} ({_summary(capability)}) "
            f"→ default rank {rank}{_capped(policy.default_rank, max_rank)}"
        )
        return rank, "default", reason

    chosen, rank = tier, tier.rank
    head = f"tier {tier.name}: {', '.join(parts)}"
    if demotions > 0:
        low = min(index + demotions, len(same_class) - 1)
        if low == index:
            head += f" (lowest {cls} tier; {demotions} demotion(s) have no effect)"
        else:
            chosen = same_class[low]
            rank = min(chosen.rank, tier.rank)
            head = (
                f"tier {chosen.name}: demoted {low - index} tier(s) from {head} "
                "after missed deadlines"
            )
    final = min(rank, max_rank)
    return final, chosen.name, f"{head} → rank {final}{_capped(rank, max_rank)}"


def _first_match(capability: Capability, tiers: Sequence[RankTier], current: str | None,
                 band: float) -> tuple[int | None, list[str]]:
    """Index of the tier a device gets (None: no tier matches) and its conditions as text,
    with the hysteresis band around the tier the device already has."""
    held = next((i for i, t in enumerate(tiers) if t.name == current), None) if band > 0 else None
    for index, tier in enumerate(tiers):
        if held is not None and index < held:
            # A higher tier than the one held: only past the band.
            ok, parts = tier_conditions(capability, _scaled(tier, 1 + band))
        elif held is not None and index == held:
            # The tier held: kept until the device falls below the band.
            ok, parts = tier_conditions(capability, _scaled(tier, 1 - band))
            if ok:
                parts.append(f"kept within the ±{band:g} hysteresis band")
        else:
            ok, parts = tier_conditions(capability, tier)
        if ok:
            return index, parts
    return None, []


def _scaled(tier: RankTier, factor: float) -> RankTier:
    """`tier` with every numeric threshold multiplied by `factor`."""
    from dataclasses import replace

    def times(value: float | None) -> float | None:
        return None if value is None else value * factor

    return replace(
        tier, min_memory_gb=times(tier.min_memory_gb), min_gflops=times(tier.min_gflops),
        min_upload_mbps=times(tier.min_upload_mbps),
        min_cores=None if tier.min_cores is None else int(math.ceil(tier.min_cores * factor)),
    )


def update_bytes(rank: int, manifest: ModelManifest) -> int:
    """Bytes of one fp32 update at `rank`: A (r × d_in) and B (d_out × r) per module, plus
    the dense trainables."""
    lora = sum(rank * (d_out + d_in) for d_out, d_in in manifest.modules.values())
    dense = sum(prod(shape) for shape in manifest.dense.values())
    return (lora + dense) * _BYTES_PER_PARAM


def apply_budget(
    ranks: Mapping[str, int],
    *,
    bytes_at_rank: Callable[[int], int],
    budget_bytes: int,
    min_rank: int = 1,
) -> dict[str, int]:
    """Lower ranks until the round's summed update bytes fit `budget_bytes` (0: no budget).

    The largest rank is halved (not below min_rank) one client at a time; among equal
    ranks the smallest client id goes first, so the result is deterministic. When every
    client is at min_rank and the sum still exceeds the budget, that is the result.
    `lowered_ranks(ranks, result)` tells which clients were lowered.
    """
    result = dict(ranks)
    if budget_bytes <= 0:
        return result
    cache: dict[int, int] = {}

    def nbytes(r: int) -> int:
        if r not in cache:
            cache[r] = bytes_at_rank(r)
        return cache[r]

    total = sum(nbytes(r) for r in result.values())
    heap = [(-r, cid) for cid, r in result.items() if r > min_rank]
    heapq.heapify(heap)
    while total > budget_bytes and heap:
        neg, cid = heapq.heappop(heap)
        old = -neg
        new = max(min_rank, old // 2)
        total += nbytes(new) - nbytes(old)
        result[cid] = new
        if new > min_rank:
            heapq.heappush(heap, (-new, cid))
    return result


def lowered_ranks(
    before: Mapping[str, int], after: Mapping[str, int]
) -> dict[str, tuple[int, int]]:
    """client id -> (rank before, rank after) for every client `apply_budget` lowered."""
    return {cid: (r, after[cid]) for cid, r in before.items() if after.get(cid, r) < r}


def _memory(cap: Capability) -> tuple[str, int]:
    """Memory a tier's min_memory_gb is compared with: accelerator memory for cuda and
    mps (mps falls back to RAM when the device reports none: its memory is unified)."""
    if cap.device_class == DeviceClass.CUDA:
        return "accelerator", cap.accelerator_memory_bytes
    if cap.device_class == DeviceClass.MPS and cap.accelerator_memory_bytes > 0:
        return "accelerator", cap.accelerator_memory_bytes
    return "RAM", cap.memory_total_bytes


def _cmp(held: bool) -> str:
    return "≥" if held else "<"


def _capped(rank: int, max_rank: int) -> str:
    return f" (capped from {rank} at max_rank {max_rank})" if rank > max_rank else ""


def _summary(cap: Capability) -> str:
    label, nbytes = _memory(cap)
    return (
        f"{cap.compute_gflops:g} GFLOP/s, {label} {nbytes / GB:.1f} GB, {cap.cpu_cores} cores, "
        f"upload {cap.upload_bytes_per_second * 8 / 1e6:.1f} Mbit/s"
    )
