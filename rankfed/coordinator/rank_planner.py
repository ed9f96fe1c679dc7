"""Ranks for a round: each participant's capability tier (demoted after missed deadlines),
the method's needs (one rank for homogeneous rules, HetLoRA's sticky self-pruning) and the
per-round byte budget. The policy's pure rules live in `rank_policy`; this applies them to
the clients of one round and records why each got its rank."""

from __future__ import annotations

from dataclasses import replace

from rankfed.coordinator import rank_policy
from rankfed.coordinator.context import SHARED_REASON, FederationContext
from rankfed.coordinator.models import ClientRecord, Participant
from rankfed.protocol import ParticipantState


def plan_round(ctx: FederationContext, round_no: int, client_ids: list[str]) -> tuple[list[Participant], dict[str, str]]:
    """The participants of round `round_no` with their ranks, and the reason for each rank.
    Updates each client's recorded rank and tier when they change."""
    cfg = ctx.config
    clients = {cid: ctx.require_client(cid) for cid in client_ids}
    ranks: dict[str, int] = {}
    tiers: dict[str, tuple[str, str]] = {}
    for cid, client in clients.items():
        rank, tier, reason = _tier_rank(ctx, client)
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
