"""Data-aware rank allocation (rank_policy.allocation = "reported" or "validation"): pure
functions from the devices' latest scores, their capability ranks and the last ranking to
each device's rank and the reason for it (Byun & Lee 2024: after warm-up, the devices whose
updates score best get the high rank).

    ranking = rank_devices(scores, names, metric="loss", fraction=0.25, hysteresis=0.05,
                           incumbents=previous.high if previous else (), round_no=r)
    rank, reason = data_rank(ranking.get(cid), cap_rank=4, high_rank=16, low_rank=2, ...)

The capability rank (the tier, demoted after missed deadlines) is an upper bound in every
mode: a device is never assigned more than its tier allows. No store, no clock, no grpc:
`rank_planner` calls these at the start of each round and keeps the ranking in the store.
docs/rank-allocation.md explains the modes and their trade-offs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass

__all__ = [
    "Ranking",
    "Standing",
    "data_rank",
    "high_slots",
    "is_ranking_round",
    "lower_is_better",
    "rank_devices",
]


def lower_is_better(metric: str) -> bool:
    """Losses and perplexities rank lower-is-better; every other score higher-is-better."""
    return metric.endswith(("loss", "perplexity"))


def high_slots(fraction: float, scored: int) -> int:
    """How many of `scored` devices get the high rank: fraction × scored rounded up (so at
    least one device once any is scored), at most all of them."""
    if scored <= 0:
        return 0
    # 1e-9: 0.3 × 10 is 3.0000000000000004 in binary, which must stay 3 slots, not 4.
    return min(scored, max(1, math.ceil(fraction * scored - 1e-9)))


def is_ranking_round(round_no: int, *, warmup_rounds: int, every: int) -> bool:
    """Whether devices are re-ranked at the start of `round_no`: the first round after the
    warm-up, then every `every` rounds."""
    return round_no > warmup_rounds and (round_no - warmup_rounds - 1) % max(every, 1) == 0


@dataclass(frozen=True)
class Standing:
    """A device's place in one ranking."""

    position: int  # 1-based, best first (the hysteresis margin counted)
    of: int  # devices ranked
    slots: int  # how many of them got the high rank
    high: bool
    score: float  # the metric value it was ranked by
    by_margin: bool = False  # the hysteresis margin decided its status (kept high, or kept out)


@dataclass(frozen=True)
class Ranking:
    """The devices' standings from the ranking at the start of round `round`; between
    re-rankings every device keeps its standing."""

    round: int
    metric: str
    standings: Mapping[str, Standing]

    @property
    def high(self) -> frozenset[str]:
        return frozenset(cid for cid, s in self.standings.items() if s.high)

    def get(self, client_id: str) -> Standing | None:
        return self.standings.get(client_id)

    def to_json(self) -> str:
        return json.dumps({
            "round": self.round,
            "metric": self.metric,
            "standings": {cid: [s.position, s.of, s.slots, s.high, s.score, s.by_margin]
                          for cid, s in self.standings.items()},
        }, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Ranking:
        """The ranking `to_json` wrote; ValueError for anything else."""
        try:
            data = json.loads(text)
            standings = {
                str(cid): Standing(position=int(p), of=int(n), slots=int(k), high=bool(h), score=float(v),
                                   by_margin=bool(m))
                for cid, (p, n, k, h, v, m) in data["standings"].items()
            }
            return cls(round=int(data["round"]), metric=str(data["metric"]), standings=standings)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a stored ranking: {exc}") from None


def rank_devices(
    scores: Mapping[str, float],
    names: Mapping[str, str],
    *,
    metric: str,
    fraction: float,
    hysteresis: float = 0.0,
    incumbents: Collection[str] = (),
    round_no: int = 0,
) -> Ranking:
    """Rank the scored devices best first; the top `high_slots(fraction, n)` get the high status.

    `scores`: client id -> the latest value of `metric` (finite). `incumbents`: the devices
    that held the high status before; each competes with its quality raised by `hysteresis`
    × |quality| (quality = -score for a loss), so a challenger displaces it only when better
    by more than that margin, and a device whose score wobbles around the cut-off keeps its
    status. Ties are broken by device name (`names`), then by client id: the ranking of the
    same scores is the same in every run.
    """
    sign = -1.0 if lower_is_better(metric) else 1.0

    def order_key(cid: str, margin: bool) -> tuple[float, str, str]:
        quality = sign * scores[cid]
        if margin and cid in incumbents:
            quality += hysteresis * abs(quality)
        return (-quality, names.get(cid, ""), cid)

    ranked = sorted(scores, key=lambda cid: order_key(cid, True))
    plain = sorted(scores, key=lambda cid: order_key(cid, False))
    slots = high_slots(fraction, len(ranked))
    plain_high = set(plain[:slots])
    standings = {
        cid: Standing(position=i + 1, of=len(ranked), slots=slots, high=i < slots, score=scores[cid],
                      by_margin=(i < slots) != (cid in plain_high))
        for i, cid in enumerate(ranked)
    }
    return Ranking(round=round_no, metric=metric, standings=standings)


def data_rank(
    standing: Standing | None,
    *,
    cap_rank: int,
    high_rank: int,
    low_rank: int,
    source: str,
    metric: str,
    fraction: float,
    unscored: str = "",
) -> tuple[int, str]:
    """(rank, reason) of one device: high_rank or low_rank by its standing (low_rank with no
    standing: `unscored` says why), never above `cap_rank`, its capability rank."""
    if standing is None:
        want, level = low_rank, "low"
        why = unscored or f"no {source} score yet"
    else:
        want, level = (high_rank, "high") if standing.high else (low_rank, "low")
        why = (f"{source} score rank {standing.position}/{standing.of} ({metric} {standing.score:.4g}; "
               f"top {fraction:.0%}: {standing.slots} high)")
        if standing.by_margin:
            why += (" kept high within the score_hysteresis margin" if standing.high
                    else " not past the holders' score_hysteresis margin")
    rank = min(want, cap_rank)
    if cap_rank < want:
        return rank, f"{why}: {level} rank {want} capped at capability rank {cap_rank}"
    return rank, f"{why}: {level} rank {want} (capability cap {cap_rank})"
