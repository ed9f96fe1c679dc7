"""Rank assignment: tier matching, caps, demotion, the budget, alpha rules, update sizes."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import pytest

from rankfed.coordinator.config import (
    LoraSection,
    RankPolicyConfig,
    RankTier,
    field_help,
    load_config,
)
from rankfed.coordinator.rank_policy import (
    apply_budget,
    assign,
    demotions_for,
    lora_settings,
    lowered_ranks,
    update_bytes,
)
from rankfed.protocol import AlphaRule, Capability, DeviceClass
from rankfed.protocol.manifest import load_manifest

GB = 10**9
POLICY = load_config().rank_policy  # the default tiers of deploy/coordinator.example.toml
DATA = Path(__file__).parent / "data"


def cpu(gflops: float = 10.0, ram_gb: float = 4.0, cores: int = 4, up_mbps: float = 10.0) -> Capability:
    return Capability(
        device_class=DeviceClass.CPU,
        memory_total_bytes=int(ram_gb * GB),
        cpu_cores=cores,
        compute_gflops=gflops,
        upload_bytes_per_second=up_mbps * 1e6 / 8,
    )


def gpu(vram_gb: float, ram_gb: float = 64.0, cls: DeviceClass = DeviceClass.CUDA) -> Capability:
    return Capability(
        device_class=cls,
        memory_total_bytes=int(ram_gb * GB),
        accelerator_memory_bytes=int(vram_gb * GB),
        compute_gflops=5000.0,
    )


# --------------------------------------------------------------------------- tiers


@pytest.mark.parametrize(
    ("capability", "rank", "tier"),
    [
        (gpu(24.0), 16, "cuda-large"),
        (gpu(8.0), 8, "cuda"),  # 64 GB of RAM does not count for a cuda device
        (cpu(gflops=94.0, ram_gb=16.0), 8, "cpu-fast"),
        (cpu(gflops=94.0, ram_gb=4.0), 4, "cpu"),  # fast but too little RAM
        (cpu(gflops=20.0, ram_gb=16.0), 4, "cpu"),
        (Capability(device_class=DeviceClass.MOBILE), 2, "mobile"),
        (gpu(32.0, cls=DeviceClass.MPS), 2, "default"),  # the default tiers have none for mps
    ],
)
def test_default_tiers(capability: Capability, rank: int, tier: str) -> None:
    got_rank, got_tier, reason = assign(capability, POLICY, max_rank=16)
    assert (got_rank, got_tier) == (rank, tier)
    assert reason


def test_reason_names_tier_conditions_and_rank() -> None:
    _, _, reason = assign(cpu(gflops=94.0, ram_gb=16.0), POLICY, max_rank=16)
    assert reason == "tier cpu-fast: cpu, 94 GFLOP/s ≥ 50, RAM 16.0 GB ≥ 8 → rank 8"
    _, _, reason = assign(gpu(24.0), POLICY, max_rank=16)
    assert reason == "tier cuda-large: cuda, accelerator 24.0 GB ≥ 16 → rank 16"


def test_capped_at_max_rank() -> None:
    rank, tier, reason = assign(gpu(24.0), POLICY, max_rank=4)
    assert (rank, tier) == (4, "cuda-large")
    assert reason.endswith("→ rank 4 (capped from 16 at max_rank 4)")


def test_default_rank_when_no_tier_matches_and_capped() -> None:
    policy = RankPolicyConfig(default_rank=8, tiers=())
    rank, tier, reason = assign(cpu(), policy, max_rank=16)
    assert (rank, tier) == (8, "default")
    assert reason.startswith("no tier matches cpu (10 GFLOP/s, RAM 4.0 GB, 4 cores, upload 10.0 Mbit/s)")
    assert assign(cpu(), policy, max_rank=2)[0] == 2


def test_memory_rule_per_class() -> None:
    policy = RankPolicyConfig(tiers=(RankTier("big", 8, None, min_memory_gb=16.0),))
    # cuda: accelerator memory, whatever the RAM
    assert assign(gpu(8.0, ram_gb=64.0), policy, max_rank=16)[1] == "default"
    assert assign(gpu(16.0, ram_gb=1.0), policy, max_rank=16)[1] == "big"
    # mps: accelerator memory when reported, else (unified memory) RAM
    assert assign(gpu(8.0, ram_gb=64.0, cls=DeviceClass.MPS), policy, max_rank=16)[1] == "default"
    assert assign(gpu(0.0, ram_gb=32.0, cls=DeviceClass.MPS), policy, max_rank=16)[1] == "big"
    # cpu and mobile: RAM, whatever the accelerator reports
    assert assign(cpu(ram_gb=16.0), policy, max_rank=16)[1] == "big"
    phone = Capability(DeviceClass.MOBILE, memory_total_bytes=8 * GB, accelerator_memory_bytes=32 * GB)
    assert assign(phone, policy, max_rank=16)[1] == "default"


def test_optional_conditions_upload_cores_gflops() -> None:
    policy = RankPolicyConfig(
        tiers=(
            RankTier("link", 12, DeviceClass.CPU, min_upload_mbps=100.0, min_cores=8, min_gflops=1.0),
            RankTier("any", 3, None),
        )
    )
    rank, tier, reason = assign(cpu(up_mbps=200.0, cores=8), policy, max_rank=16)
    assert (rank, tier) == (12, "link")
    assert "upload 200.0 Mbit/s ≥ 100" in reason and "8 cores ≥ 8" in reason
    assert assign(cpu(up_mbps=99.0, cores=8), policy, max_rank=16)[:2] == (3, "any")
    assert assign(cpu(up_mbps=200.0, cores=4), policy, max_rank=16)[:2] == (3, "any")
    assert assign(cpu(gflops=0.5, up_mbps=200.0, cores=8), policy, max_rank=16)[:2] == (3, "any")
    # a tier without device_class matches every class
    assert assign(Capability(DeviceClass.MOBILE), policy, max_rank=16)[:2] == (3, "any")


def test_first_matching_tier_wins() -> None:
    policy = RankPolicyConfig(tiers=(RankTier("small", 2, None), RankTier("big", 16, None)))
    assert assign(gpu(80.0), policy, max_rank=16)[:2] == (2, "small")


def test_demotion_moves_down_the_tiers_of_the_same_class() -> None:
    cap = gpu(24.0)
    assert assign(cap, POLICY, max_rank=16, demotions=1)[:2] == (8, "cuda")
    # never below the lowest cuda tier, and never into the cpu tiers
    rank, tier, reason = assign(cap, POLICY, max_rank=16, demotions=5)
    assert (rank, tier) == (8, "cuda")
    assert "demoted 1 tier(s) from tier cuda-large" in reason
    rank, tier, reason = assign(gpu(8.0), POLICY, max_rank=16, demotions=1)
    assert (rank, tier) == (8, "cuda")
    assert "lowest cuda tier" in reason
    fast = cpu(gflops=94.0, ram_gb=16.0)
    assert assign(fast, POLICY, max_rank=16, demotions=1)[:2] == (4, "cpu")


def test_demotion_never_raises_the_rank() -> None:
    policy = RankPolicyConfig(tiers=(RankTier("a", 4, None), RankTier("b", 8, None)))
    assert assign(cpu(), policy, max_rank=16, demotions=1)[:2] == (4, "b")


def test_demotions_for() -> None:
    assert demotions_for(0, 2) == 0
    assert demotions_for(1, 2) == 0
    assert demotions_for(2, 2) == 1
    assert demotions_for(5, 2) == 2
    assert demotions_for(9, 0) == 0  # 0: never demote


# --------------------------------------------------------------------------- budget


def test_no_budget_or_under_budget_changes_nothing() -> None:
    ranks = {"a": 16, "b": 4}
    assert apply_budget(ranks, bytes_at_rank=lambda r: r, budget_bytes=0) == ranks
    assert apply_budget(ranks, bytes_at_rank=lambda r: r, budget_bytes=20) == ranks


def test_budget_halves_the_largest_ranks_first() -> None:
    ranks = {"a": 16, "b": 8, "c": 2}
    out = apply_budget(ranks, bytes_at_rank=lambda r: 100 * r, budget_bytes=1800)
    # 2600 -> a:8 (1800): fits
    assert out == {"a": 8, "b": 8, "c": 2}
    out = apply_budget(ranks, bytes_at_rank=lambda r: 100 * r, budget_bytes=1000)
    # 2600 -> a:8 (1800) -> tie at 8, "a" first: a:4 (1400) -> b:4 (1000)
    assert out == {"a": 4, "b": 4, "c": 2}
    assert lowered_ranks(ranks, out) == {"a": (16, 4), "b": (8, 4)}


def test_budget_ties_are_deterministic_by_client_id() -> None:
    ranks = {"z": 8, "m": 8, "a": 8}
    # 24 -> a:4 (20) -> m:4 (16): fits 19
    out = apply_budget(ranks, bytes_at_rank=lambda r: r, budget_bytes=19)
    assert out == {"z": 8, "m": 4, "a": 4}
    assert apply_budget(dict(reversed(ranks.items())), bytes_at_rank=lambda r: r, budget_bytes=19) == out


def test_budget_stops_at_min_rank() -> None:
    ranks = {"a": 16, "b": 3, "c": 1}
    out = apply_budget(ranks, bytes_at_rank=lambda r: 1000 + r, budget_bytes=10, min_rank=2)
    assert out == {"a": 2, "b": 2, "c": 1}  # c was already below min_rank: untouched


def test_budget_with_manifest_sizes() -> None:
    m = load_manifest(DATA / "tiny-manifest.json")
    ranks = {f"client-{i}": 8 for i in range(4)}
    budget = 2 * update_bytes(8, m) + 2 * update_bytes(4, m)
    out = apply_budget(ranks, bytes_at_rank=lambda r: update_bytes(r, m), budget_bytes=budget)
    assert sum(update_bytes(r, m) for r in out.values()) <= budget
    assert sorted(out.values()) == [4, 4, 8, 8]


def test_update_bytes() -> None:
    m = load_manifest(DATA / "tiny-manifest.json")
    # 4 modules of 8x8: r * (8 + 8) each; dense 3*8 + 3
    assert update_bytes(1, m) == (4 * 16 + 27) * 4
    assert update_bytes(8, m) == (4 * 16 * 8 + 27) * 4


# --------------------------------------------------------------------------- alpha rules


@pytest.mark.parametrize(
    ("rule", "rank", "alpha", "use_rslora", "scaling"),
    [
        (AlphaRule.CONSTANT_SCALING, 4, 8.0, False, 2.0),
        (AlphaRule.CONSTANT_SCALING, 16, 32.0, False, 2.0),
        (AlphaRule.FIXED, 4, 16.0, False, 4.0),
        (AlphaRule.FIXED, 16, 16.0, False, 1.0),
        (AlphaRule.RSLORA, 4, 16.0, True, 8.0),
        (AlphaRule.RSLORA, 16, 16.0, True, 4.0),
    ],
)
def test_alpha_rules(rule: AlphaRule, rank: int, alpha: float, use_rslora: bool, scaling: float) -> None:
    lora = LoraSection(alpha_rule=rule, scaling=2.0, alpha=16.0, dropout=0.1)
    s = lora_settings(rank, lora, target_modules=["query", "value"], modules_to_save=["classifier"])
    assert (s.rank, s.alpha, s.use_rslora, s.alpha_rule) == (rank, alpha, use_rslora, rule)
    assert s.target_modules == ("query", "value")
    assert s.modules_to_save == ("classifier",)
    assert s.dropout == 0.1
    # the scaling peft applies: alpha / sqrt(r) with rslora, alpha / r otherwise
    assert s.alpha / (math.sqrt(s.rank) if s.use_rslora else s.rank) == scaling


def test_lora_settings_rejects_rank_zero() -> None:
    with pytest.raises(ValueError, match="rank"):
        lora_settings(0, LoraSection(), target_modules=["q"])


def test_config_policy_and_manifest_import_no_grpc_protobuf_or_torch() -> None:
    code = (
        "import sys, rankfed.coordinator.config, rankfed.coordinator.rank_policy, "
        "rankfed.protocol.manifest; "
        "print([m for m in ('grpc', 'google.protobuf', 'torch') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- hysteresis


def test_hysteresis_keeps_the_tier_inside_the_band() -> None:
    # cpu-fast needs 50 GFLOP/s and 8 GB; the band is 0.1 (45..55 GFLOP/s).
    assert POLICY.hysteresis == 0.1
    new = assign(cpu(gflops=51.0, ram_gb=16.0), POLICY, max_rank=16)
    assert new[:2] == (8, "cpu-fast")
    # Re-measured a little slower: a new device would drop, the device holding cpu-fast stays.
    assert assign(cpu(gflops=47.0, ram_gb=16.0), POLICY, max_rank=16)[:2] == (4, "cpu")
    kept = assign(cpu(gflops=47.0, ram_gb=16.0), POLICY, max_rank=16, current_tier="cpu-fast")
    assert kept[:2] == (8, "cpu-fast") and "hysteresis" in kept[2]
    # Below the band it drops.
    assert assign(cpu(gflops=44.0, ram_gb=16.0), POLICY, max_rank=16, current_tier="cpu-fast")[:2] == (4, "cpu")


def test_hysteresis_moves_up_only_past_the_band() -> None:
    fast = cpu(gflops=53.0, ram_gb=16.0)
    assert assign(fast, POLICY, max_rank=16)[:2] == (8, "cpu-fast")
    assert assign(fast, POLICY, max_rank=16, current_tier="cpu")[:2] == (4, "cpu")
    assert assign(cpu(gflops=56.0, ram_gb=16.0), POLICY, max_rank=16, current_tier="cpu")[:2] == (8, "cpu-fast")


def test_no_band_means_plain_first_match() -> None:
    policy = dataclasses.replace(POLICY, hysteresis=0.0)
    assert assign(cpu(gflops=47.0, ram_gb=16.0), policy, max_rank=16, current_tier="cpu-fast")[:2] == (4, "cpu")
    assert assign(cpu(gflops=53.0, ram_gb=16.0), policy, max_rank=16, current_tier="cpu")[:2] == (8, "cpu-fast")


def test_alternating_measurements_do_not_flip_the_rank() -> None:
    tier, ranks = None, []
    for gflops in (51.0, 48.0, 52.0, 46.0, 50.5, 49.0):
        rank, tier, _ = assign(cpu(gflops=gflops, ram_gb=16.0), POLICY, max_rank=16, current_tier=tier)
        ranks.append(rank)
    assert ranks == [8] * 6


@pytest.mark.parametrize("value", ["-0.1", "1.0", "nan"])
def test_hysteresis_is_validated(value: str) -> None:
    from rankfed.coordinator.errors import ConfigError

    with pytest.raises(ConfigError, match="rank_policy.hysteresis"):
        load_config(None, overrides={"rank_policy.hysteresis": value})
    assert "band" in field_help("rank_policy.hysteresis")
