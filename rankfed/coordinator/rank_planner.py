"""Ranks for a round: each participant's capability tier (demoted after missed deadlines),
with data-aware allocation the devices' scores under that cap, the method's needs (one rank
for homogeneous rules, HetLoRA's sticky self-pruning) and the per-round byte budget. The
pure rules live in `rank_policy` and `allocation`; this applies them to the clients of one
round, keeps the devices' ranking in the store and records why each got its rank."""

from __future__ import annotations

import logging
import math
from dataclasses import replace

from rankfed.coordinator import allocation, rank_policy
from rankfed.coordinator.context import SHARED_REASON, FederationContext
from rankfed.coordinator.models import ClientRecord, Participant
from rankfed.protocol import ParticipantState

log = logging.getLogger("rankfed.coordinator")
RANKING_KEY = "allocation.ranking"  # meta: the last ranking (a run key: a new run starts without)


def plan_round(ctx: FederationContext, round_no: int, client_ids: list[str]) -> tuple[list[Participant], dict[str, str]]:
    """The participants of round `round_no` with their ranks, and the reason for each rank.
    Updates each client's recorded rank and tier when they change."""
    cfg = ctx.config
    clients = {cid: ctx.require_client(cid) for cid in client_ids}
    ranks: dict[str, int] = {}
    tiers: dict[str, tuple[str, str]] = {}
    by_score = None if ctx.homogeneous or cfg.rank_policy.allocation == "capability" else DataAware(ctx, round_no)
    for cid, client in clients.items():
        rank, tier, reason = _tier_rank(ctx, client)
        if by_score is not None:
            rank, reason = by_score.rank(cid, rank, reason)
        if ctx.method.sticky_pruning:
            # HetLoRA's self-pruning sticks: a client that uploaded fewer components than it
            # was given keeps that smaller rank (r_k <- floor(gamma r_k) in the paper).
            last = ctx.store.get_receipt(round_no - 1, cid) if round_no > 1 else None
            if last is not None and last.rank < rank:
                rank, reason = last.rank, f"{reason}; self-pruned to rank {last.rank} in round {round_no - 1}"
        ranks[cid], tiers[cid] = rank, (tier, reason)
    budget = cfg.rank_policy.round_budget_bytes
    if ctx.homogeneous:
        rank, why = _homogeneous_rank(ctx, len(ranks))
        ranks = dict.fromkeys(clients, rank)
        tiers = {cid: (tier, why) for cid, (tier, _) in tiers.items()}
    elif budget:
        budgeted = rank_policy.apply_budget(
            ranks, bytes_at_rank=lambda r: rank_policy.update_bytes(r, ctx.manifest), budget_bytes=budget,
        )
        for cid, (old, new) in rank_policy.lowered_ranks(ranks, budgeted).items():
            tier, reason = tiers[cid]
            tiers[cid] = (tier, f"{reason}; lowered {old} -> {new} to fit the round budget of {budget} bytes")
        ranks = budgeted
    parts = []
    for cid in client_ids:
        lora = ctx.lora_for_rank(ranks[cid])
        client = clients[cid]
        if client.rank != ranks[cid] or client.tier != tiers[cid][0]:
            ctx.store.upsert_client(replace(client, rank=ranks[cid], tier=tiers[cid][0]))
        parts.append(Participant(
            round=round_no, client_id=cid, rank=lora.rank, alpha=lora.alpha,
            state=ParticipantState.ASSIGNED, num_examples=client.num_examples,
        ))
    return parts, {cid: reason for cid, (_, reason) in tiers.items()}


def _tier_rank(ctx: FederationContext, client: ClientRecord) -> tuple[int, str, str]:
    cfg = ctx.config
    demotions = rank_policy.demotions_for(client.deadlines_missed, cfg.federation.demote_after_missed_deadlines)
    # Within the hysteresis band a device keeps its tier; a demotion overrides the band.
    return rank_policy.assign(client.capability, cfg.rank_policy, max_rank=cfg.lora.max_rank, demotions=demotions,
                              current_tier=None if demotions else client.tier)


def _homogeneous_rank(ctx: FederationContext, participants: int) -> tuple[int, str]:
    """FedIT (and pFedLoRA's shared adapter) average A and B directly, which needs one rank
    for everyone: lora.max_rank, halved for all alike to fit a round budget."""
    cfg = ctx.config
    rank = cfg.lora.max_rank
    why = (SHARED_REASON.format(rank=rank) if ctx.personalized
           else f"{ctx.method.name} is homogeneous: every client trains at lora.max_rank {rank}")
    budget = 0 if ctx.personalized else cfg.rank_policy.round_budget_bytes
    while budget and rank > 1 and participants * rank_policy.update_bytes(rank, ctx.manifest) > budget:
        rank //= 2
    if rank != cfg.lora.max_rank:
        why += f"; lowered to {rank} for every client to fit the round budget of {budget} bytes"
    return rank, why


class DataAware:
    """rank_policy.allocation "reported" or "validation" for one round: capability ranks
    during the warm-up, then high_rank or low_rank by the devices' ranking, capped by their
    capability rank. The ranking is redone at each re-ranking round and kept in the store's
    meta, so a restarted coordinator keeps every device's status and its hysteresis."""

    def __init__(self, ctx: FederationContext, round_no: int) -> None:
        self._ctx, self._round = ctx, round_no
        self._policy = policy = ctx.config.rank_policy
        self._high = policy.high_rank or ctx.config.lora.max_rank
        self.ranking = None if round_no <= policy.warmup_rounds else current_ranking(ctx, round_no)

    def rank(self, client_id: str, cap_rank: int, cap_reason: str) -> tuple[int, str]:
        policy = self._policy
        if self.ranking is None:
            return cap_rank, (f"{cap_reason}; warm-up round {self._round} of {policy.warmup_rounds}: capability rank "
                              f"({policy.allocation} scores decide from round {policy.warmup_rounds + 1})")
        rank, why = allocation.data_rank(
            self.ranking.get(client_id), cap_rank=cap_rank, high_rank=self._high, low_rank=policy.low_rank,
            source=policy.allocation, metric=policy.score_metric, fraction=policy.high_rank_fraction,
            unscored=self._unscored(),
        )
        return rank, f"{why}; {cap_reason}"

    def _unscored(self) -> str:
        policy, ranking = self._policy, self.ranking
        assert ranking is not None
        when = f"at the ranking of round {ranking.round}"
        if policy.allocation == "reported":
            return (f"no reported {policy.score_metric} {when} (its updates carried no metrics.eval."
                    f"{policy.score_metric}: run the device with --holdout or --eval-data)")
        return f"no validation score {when} (no evaluator had scored an update of this device)"


def current_ranking(ctx: FederationContext, round_no: int) -> allocation.Ranking:
    """The ranking that holds in round `round_no`: the stored one between re-rankings, else
    a new one of every registered device (not left) by its latest score, stored."""
    policy, store = ctx.config.rank_policy, ctx.store
    stored = _stored_ranking(ctx)
    if stored is not None and stored.metric == policy.score_metric and (
        stored.round == round_no
        or (stored.round < round_no and not allocation.is_ranking_round(
            round_no, warmup_rounds=policy.warmup_rounds, every=policy.reevaluate_every))
    ):
        return stored
    clients = {c.client_id: c for c in store.list_clients() if not c.left}
    values = {
        cid: score.metrics[policy.score_metric]
        for cid, score in store.latest_scores(policy.allocation).items()
        if cid in clients and math.isfinite(score.metrics.get(policy.score_metric, math.nan))
    }
    ranking = allocation.rank_devices(
        values, {cid: c.device_name for cid, c in clients.items()}, metric=policy.score_metric,
        fraction=policy.high_rank_fraction, hysteresis=policy.score_hysteresis,
        incumbents=stored.high if stored is not None and stored.metric == policy.score_metric else (),
        round_no=round_no,
    )
    store.set_meta(RANKING_KEY, ranking.to_json())
    log.info("devices ranked", extra={
        "round": round_no, "source": policy.allocation, "metric": policy.score_metric, "scored": len(values),
        "high": sorted(clients[cid].device_name for cid in ranking.high),
    })
    return ranking


def _stored_ranking(ctx: FederationContext) -> allocation.Ranking | None:
    text = ctx.store.get_meta(RANKING_KEY)
    if text is None:
        return None
    try:
        return allocation.Ranking.from_json(text)
    except ValueError as exc:
        log.warning("stored ranking ignored: %s", exc)
        return None
