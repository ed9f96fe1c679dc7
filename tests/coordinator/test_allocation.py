"""Data-aware rank allocation, the pure part: scores + capability caps + hysteresis -> ranks,
the fraction's rounding, deterministic ties, re-ranking rounds, and the byte budget on top."""

from __future__ import annotations

import pytest

from rankfed.coordinator.allocation import (
    Ranking,
    data_rank,
    high_slots,
    is_ranking_round,
    lower_is_better,
    rank_devices,
)
from rankfed.coordinator.config import load_config
from rankfed.coordinator.errors import ConfigError
from rankfed.coordinator.rank_policy import apply_budget

NAMES = {f"c{i}": f"dev-{i}" for i in range(10)}


def _ranks(scores, caps, *, fraction=0.5, hysteresis=0.0, incumbents=(), high=16, low=2, metric="loss"):
    ranking = rank_devices(scores, NAMES, metric=metric, fraction=fraction, hysteresis=hysteresis,
                           incumbents=incumbents)
    out = {}
    for cid, cap in caps.items():
        out[cid], _ = data_rank(ranking.get(cid), cap_rank=cap, high_rank=high, low_rank=low, source="validation",
                                metric=metric, fraction=fraction)
    return out, ranking


@pytest.mark.parametrize(("fraction", "n", "slots"), [
    (0.25, 0, 0), (0.25, 1, 1), (0.25, 2, 1), (0.25, 4, 1), (0.25, 5, 2), (0.25, 20, 5),
    (0.3, 10, 3),  # 0.3 * 10 is 3.0000000000000004 in binary: still 3
    (0.5, 3, 2), (1.0, 7, 7), (0.01, 3, 1),
])
def test_high_slots_round_up_with_at_least_one(fraction, n, slots):
    assert high_slots(fraction, n) == slots


def test_lower_loss_gets_the_high_rank_capped_by_capability():
    ranks, ranking = _ranks({"c0": 0.9, "c1": 0.3, "c2": 0.5, "c3": 0.4}, {"c0": 16, "c1": 4, "c2": 16, "c3": 8})
    # top half by loss: c1 (0.3) and c3 (0.4); c1's capability caps its high rank at 4
    assert ranks == {"c0": 2, "c1": 4, "c2": 2, "c3": 8}
    assert [cid for cid, _ in sorted(ranking.standings.items(), key=lambda kv: kv[1].position)] == ["c1", "c3", "c2", "c0"]


def test_a_phone_never_gets_more_than_its_capability_even_when_low():
    ranks, _ = _ranks({"c0": 0.1, "c1": 0.9}, {"c0": 16, "c1": 1}, low=2)
    assert ranks == {"c0": 16, "c1": 1}


def test_higher_is_better_for_accuracy():
    assert lower_is_better("loss") and lower_is_better("eval_loss") and lower_is_better("perplexity")
    assert not lower_is_better("accuracy")
    ranks, _ = _ranks({"c0": 0.9, "c1": 0.3}, {"c0": 16, "c1": 16}, metric="accuracy")
    assert ranks == {"c0": 16, "c1": 2}


def test_ties_are_broken_by_device_name_then_client_id():
    names = {"b": "alpha", "a": "beta", "c": "alpha"}
    ranking = rank_devices({"a": 0.5, "b": 0.5, "c": 0.5}, names, metric="loss", fraction=0.25)
    assert ranking.high == {"b"}  # "alpha" < "beta"; between the two "alpha"s client id "b" < "c"
    assert [ranking.standings[c].position for c in ("b", "c", "a")] == [1, 2, 3]
    again = rank_devices({"c": 0.5, "a": 0.5, "b": 0.5}, names, metric="loss", fraction=0.25)
    assert again.standings == ranking.standings


def test_unscored_devices_get_the_low_rank_under_their_cap():
    rank, reason = data_rank(None, cap_rank=8, high_rank=16, low_rank=2, source="reported", metric="loss",
                             fraction=0.25, unscored="no reported loss yet")
    assert rank == 2 and reason == "no reported loss yet: low rank 2 (capability cap 8)"
    rank, _ = data_rank(None, cap_rank=1, high_rank=16, low_rank=2, source="reported", metric="loss", fraction=0.25)
    assert rank == 1


def test_reason_names_position_fraction_and_cap():
    ranking = rank_devices({f"c{i}": 0.1 * i for i in range(1, 21)}, NAMES, metric="loss", fraction=0.25)
    _, reason = data_rank(ranking.get("c3"), cap_rank=16, high_rank=16, low_rank=2, source="validation",
                          metric="loss", fraction=0.25)
    assert reason == "validation score rank 3/20 (loss 0.3; top 25%: 5 high): high rank 16 (capability cap 16)"
    _, reason = data_rank(ranking.get("c2"), cap_rank=4, high_rank=16, low_rank=2, source="validation",
                          metric="loss", fraction=0.25)
    assert reason.endswith("high rank 16 capped at capability rank 4")
    _, reason = data_rank(ranking.get("c9"), cap_rank=4, high_rank=16, low_rank=2, source="validation",
                          metric="loss", fraction=0.25)
    assert reason.startswith("validation score rank 9/20") and reason.endswith("low rank 2 (capability cap 4)")


def test_hysteresis_keeps_the_holder_against_a_slightly_better_challenger():
    scores = {"c0": 0.50, "c1": 0.49}  # c1 is 2% better than the holder c0
    plain = rank_devices(scores, NAMES, metric="loss", fraction=0.5)
    assert plain.high == {"c1"}
    kept = rank_devices(scores, NAMES, metric="loss", fraction=0.5, hysteresis=0.05, incumbents={"c0"})
    assert kept.high == {"c0"}
    assert kept.standings["c0"].by_margin and kept.standings["c1"].by_margin
    _, reason = data_rank(kept.get("c0"), cap_rank=16, high_rank=16, low_rank=2, source="reported", metric="loss",
                          fraction=0.5)
    assert "kept high within the score_hysteresis margin" in reason
    # past the margin the challenger wins
    moved = rank_devices({"c0": 0.50, "c1": 0.40}, NAMES, metric="loss", fraction=0.5, hysteresis=0.05,
                         incumbents={"c0"})
    assert moved.high == {"c1"} and not moved.standings["c1"].by_margin


def test_alternating_scores_do_not_flap_with_hysteresis():
    incumbents: frozenset[str] = frozenset()
    highs = []
    for r in range(6):
        a, b = (0.50, 0.49) if r % 2 else (0.49, 0.50)
        ranking = rank_devices({"c0": a, "c1": b}, NAMES, metric="loss", fraction=0.5, hysteresis=0.05,
                               incumbents=incumbents)
        incumbents = ranking.high
        highs.append(set(ranking.high))
    assert highs == [{"c0"}] * 6
    flapping = [set(rank_devices({"c0": a, "c1": b}, NAMES, metric="loss", fraction=0.5).high)
                for a, b in [(0.49, 0.50), (0.50, 0.49)] * 3]
    assert flapping == [{"c0"}, {"c1"}] * 3  # without the margin they swap every round


@pytest.mark.parametrize(("round_no", "ranking"), [(1, False), (2, True), (3, False), (4, True), (5, False), (6, True)])
def test_ranking_rounds_after_warmup_every_e(round_no, ranking):
    assert is_ranking_round(round_no, warmup_rounds=1, every=2) is ranking


def test_no_warmup_ranks_from_round_one():
    assert [is_ranking_round(r, warmup_rounds=0, every=1) for r in (1, 2, 3)] == [True, True, True]


def test_ranking_round_trips_through_json():
    ranking = rank_devices({"c0": 0.5, "c1": 0.25}, NAMES, metric="loss", fraction=0.5, round_no=4)
    assert Ranking.from_json(ranking.to_json()) == ranking
    with pytest.raises(ValueError, match="not a stored ranking"):
        Ranking.from_json('{"round": 1}')


def test_budget_still_halves_the_largest_ranks_after_allocation():
    ranks, _ = _ranks({"c0": 0.1, "c1": 0.2, "c2": 0.3, "c3": 0.4}, dict.fromkeys(["c0", "c1", "c2", "c3"], 16))
    assert ranks == {"c0": 16, "c1": 16, "c2": 2, "c3": 2}
    budgeted = apply_budget(ranks, bytes_at_rank=lambda r: 100 * r, budget_bytes=100 * 20)
    assert budgeted == {"c0": 8, "c1": 8, "c2": 2, "c3": 2}
    assert sum(budgeted.values()) * 100 <= 100 * 20


def test_config_checks_the_allocation_settings():
    cfg = load_config(None, overrides={"rank_policy.allocation": "reported", "rank_policy.high_rank": 8})
    assert cfg.rank_policy.allocation == "reported" and cfg.rank_policy.high_rank == 8
    with pytest.raises(ConfigError, match="rank_policy.allocation = 'bogus'"):
        load_config(None, overrides={"rank_policy.allocation": "bogus"})
    with pytest.raises(ConfigError, match="rank_policy.low_rank = 16: must be ≤ the high rank 8"):
        load_config(None, overrides={"rank_policy.allocation": "validation", "rank_policy.high_rank": 8,
                                     "rank_policy.low_rank": 16})
    with pytest.raises(ConfigError, match="rank_policy.high_rank = 32: must be ≤ lora.max_rank = 16"):
        load_config(None, overrides={"rank_policy.allocation": "validation", "rank_policy.high_rank": 32})
    with pytest.raises(ConfigError, match="trains every client at one rank"):
        load_config(None, overrides={"rank_policy.allocation": "reported", "federation.method": "fedit"})
    with pytest.raises(ConfigError, match="rank_policy.score_metric = 'a b'"):
        load_config(None, overrides={"rank_policy.score_metric": "a b"})
    with pytest.raises(ConfigError, match="rank_policy.high_rank_fraction = 0.0"):
        load_config(None, overrides={"rank_policy.high_rank_fraction": 0.0})
