"""The round loop: WAITING_FOR_CLIENTS -> TRAINING -> AGGREGATING -> DONE (or FAILED when
fewer than min_clients updates arrive by the deadline, or aggregation fails). It selects
participants, plans their ranks, publishes the round, closes it at the deadline or once the
quorum is in and stragglers had their grace, and after a crash rebuilds the open round from
the acknowledged updates on disk."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from rankfed.aggregation import Accumulator, AdapterError, AggregationError
from rankfed.aggregation.robust import clip_factors, scale_update
from rankfed.coordinator import heap
from rankfed.coordinator.context import OPEN_STATES, FederationContext
from rankfed.coordinator.controls import Controls
from rankfed.coordinator.dispatch import TaskDispatcher
from rankfed.coordinator.errors import StorageError
from rankfed.coordinator.evaluations import Evaluations
from rankfed.coordinator.ingest import fold_update, load_update
from rankfed.coordinator.models import Participant, Receipt, RoundRecord
from rankfed.coordinator.rank_planner import plan_round
from rankfed.coordinator.registry import ClientRegistry
from rankfed.coordinator.store.blobs import round_dir
from rankfed.protocol import ParticipantState, RoundPhase
from rankfed.protocol.limits import MAX_METRICS

log = logging.getLogger("rankfed.coordinator")
ROUND_END_POLL_S = 0.05  # the round loop re-reads participants at most this often


class RoundLoop:
    def __init__(self, ctx: FederationContext, registry: ClientRegistry, dispatch: TaskDispatcher,
                 controls: Controls, evaluations: Evaluations) -> None:
        self._ctx = ctx
        self._registry = registry
        self._dispatch = dispatch
        self._controls = controls
        self._evaluations = evaluations
        self.fatal: BaseException | None = None
        # Called with each closed round's record (DONE or FAILED); the metrics use it.
        self.on_round_closed: Callable[[RoundRecord], None] | None = None

    # ------------------------------------------------------------------ start-up

    async def load_global(self) -> None:
        """The latest global adapter, or the initial one (created and saved on first start)."""
        ctx, state = self._ctx, self._ctx.state
        done = [r for r in ctx.store.list_rounds() if r.phase is RoundPhase.DONE]
        if done:
            state.global_round = done[-1].round
            state.global_adapter = await asyncio.to_thread(ctx.globals.load, state.global_round)
            return
        if ctx.globals.exists(0):
            state.global_adapter = await asyncio.to_thread(ctx.globals.load, 0)
            state.global_sha = (0, await asyncio.to_thread(ctx.globals.sha256, 0))
        else:
            lora = ctx.lora_for_rank(ctx.config.lora.max_rank)
            initial = ctx.spec.init_adapter(
                rank=lora.rank, alpha=lora.alpha, use_rslora=lora.use_rslora, seed=ctx.config.federation.seed
            )
            state.global_sha = (0, await asyncio.to_thread(ctx.globals.save, 0, initial))
            del initial  # kept as a mapping of its file from here (GlobalAdapters.load)
            state.global_adapter = await asyncio.to_thread(ctx.globals.load, 0)
        state.global_round = 0

    async def resume_open_round(self) -> None:
        ctx, state = self._ctx, self._ctx.state
        latest = ctx.store.latest_round()
        if latest is None or latest.phase in (RoundPhase.DONE, RoundPhase.FAILED):
            state.done = (latest is not None and latest.round >= ctx.config.federation.rounds) or self._controls.stopped
            return
        if latest.phase is RoundPhase.WAITING_FOR_CLIENTS:
            return  # nothing was assigned yet: the loop starts this round afresh
        # TRAINING or AGGREGATING: rebuild the accumulator from the acknowledged updates.
        accumulator = self._new_accumulator()
        receipts = ctx.store.list_receipts(latest.round)
        # A crash between an update's fsync and its receipt leaves a file nobody acknowledged.
        acknowledged = {r.blob_path for r in receipts}
        for relpath in ctx.blobs.list_blobs(f"updates/{round_dir(latest.round)}"):
            if relpath not in acknowledged:
                ctx.blobs.delete(relpath)
        state.norms, state.fold_failures = {}, {}
        for receipt in receipts:
            adapter = await asyncio.to_thread(load_update, ctx, receipt)
            try:
                await asyncio.to_thread(fold_update, accumulator, adapter, receipt.num_examples, state.norms,
                                        receipt.client_id)
            except Exception as exc:  # noqa: BLE001 - as at ingest: the round closes without it
                state.fold_failures[receipt.client_id] = f"{type(exc).__name__}: {exc}"
        now = ctx.clock()
        # The devices could not reach us while we were down: give them time to come back.
        fed = ctx.config.federation
        grace = fed.heartbeat_timeout_seconds + fed.straggler_grace_seconds
        record = replace(latest, phase=RoundPhase.TRAINING, deadline=max(latest.deadline, now + grace))
        ctx.store.put_round(record)
        await self._dispatch.prepare_rank_files(ctx.store.list_participants(record.round))
        state.participants = frozenset(p.client_id for p in ctx.store.list_participants(record.round))
        state.open, state.accumulator = record, accumulator
        log.info(
            "resumed round",
            extra={"round": record.round, "updates": len(receipts), "deadline_in": round(record.deadline - now, 1)},
        )

    # ------------------------------------------------------------------ the loop

    async def run(self) -> None:
        ctx, state = self._ctx, self._ctx.state
        try:
            while True:
                if state.open is None:
                    round_no = self._next_round_number()
                    if round_no > ctx.config.federation.rounds or self._controls.stopped:
                        state.done = True
                        log.info("federation done", extra={"rounds": round_no - 1, "global_round": state.global_round})
                        ctx.changes.notify()
                        return
                    if self._controls.paused:
                        await ctx.changes.wait(1.0)
                        continue
                    if not await self._start_round(round_no):
                        continue  # paused or stopped while waiting for clients
                await self._wait_round_end()
                await self._close_round()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("round loop crashed")
            self.fatal = exc  # the server sees it, turns health NOT_SERVING and exits non-zero
            ctx.changes.notify()
            raise

    def _new_accumulator(self) -> Accumulator:
        ctx = self._ctx
        with heap.mapped_blocks():  # its sums are returned to the kernel with it
            return ctx.method.accumulator(ctx.spec, global_rank=ctx.config.lora.max_rank,
                                          previous=ctx.state.global_adapter)

    def _next_round_number(self) -> int:
        latest = self._ctx.store.latest_round()
        if latest is None:
            return 1
        return latest.round if latest.phase is RoundPhase.WAITING_FOR_CLIENTS else latest.round + 1

    async def _start_round(self, round_no: int) -> bool:
        ctx, fed = self._ctx, self._ctx.config.federation
        now = ctx.clock()
        waiting = RoundRecord(
            round=round_no, phase=RoundPhase.WAITING_FOR_CLIENTS, method=fed.method, started_at=now,
            deadline=0.0, min_clients=fed.min_clients, global_rank=ctx.config.lora.max_rank,
        )
        ctx.store.put_round(waiting)
        ctx.changes.notify()
        # validation allocation: the evaluator's scores of the last updates, before they rank anyone.
        await self._evaluations.wait_for_scores(
            round_no, interrupted=lambda: self._controls.paused or self._controls.stopped)
        online = await self._wait_for_clients()
        if online is None:
            return False
        chosen = online
        if fed.clients_per_round and len(online) > fed.clients_per_round:
            # Sampled in device-name order (client ids are random tokens), so a seed picks the
            # same devices in every run of the same federation.
            rng = random.Random(fed.seed * 1_000_003 + round_no)
            names = ctx.store.client_names()  # one read, not a record per online device
            by_name = sorted(online, key=lambda cid: (names[cid], cid))
            chosen = sorted(rng.sample(by_name, fed.clients_per_round))
        participants, reasons = plan_round(ctx, round_no, chosen)
        # Before the round is published: GetTask must never wait for an SVD or an fsync.
        with heap.mapped_blocks():  # the redistributed copies leave no heap behind
            await self._dispatch.prepare_rank_files(participants)
        now = ctx.clock()
        record = replace(waiting, phase=RoundPhase.TRAINING, started_at=now, deadline=now + fed.round_deadline_seconds)
        # The store and the open round change together (no await between): a status that
        # shows the round TRAINING never meets a core that refuses it as not open.
        with ctx.store.transaction():
            for part in participants:
                ctx.store.put_participant(part)
            ctx.store.put_round(record)
        ctx.state.reasons = reasons
        ctx.state.norms, ctx.state.fold_failures = {}, {}
        ctx.state.participants = frozenset(p.client_id for p in participants)
        ctx.state.open, ctx.state.accumulator = record, self._new_accumulator()
        log.info("round started", extra={
            "round": round_no, "participants": len(participants), "ranks": sorted(p.rank for p in participants),
        })
        ctx.changes.notify()
        return True

    async def _wait_for_clients(self) -> list[str] | None:
        """Online clients, once min_clients are and either every active device (or
        clients_per_round) is, or wait_for_clients_seconds have passed since the quorum.
        None when an operator paused or stopped the federation meanwhile."""
        ctx, fed = self._ctx, self._ctx.config.federation
        enough_since: float | None = None
        while True:
            if self._controls.paused or self._controls.stopped:
                return None
            online = self._registry.online_ids()
            now = ctx.clock()
            if len(online) >= fed.min_clients:
                enough_since = now if enough_since is None else enough_since
                # Counts: this runs after every join while devices arrive, and decoding every
                # client's record here held the event loop 0.2-0.4 s each time at 10,000.
                registered, left = ctx.store.count_clients()
                target = fed.clients_per_round or registered - left
                if len(online) >= target or now - enough_since >= fed.wait_for_clients_seconds:
                    return online
            else:
                enough_since = None
            await ctx.changes.wait(0.5)

    async def _wait_round_end(self) -> None:
        ctx, fed = self._ctx, self._ctx.config.federation
        quorum_since: float | None = None
        while True:
            record = ctx.state.open
            assert record is not None
            # Counts, not records: decoding 1,000 participants every 50 ms took a fifth of the
            # event loop during a 1,000-upload round (py-spy, bench/load_bench.py).
            counts = ctx.store.count_participants(record.round)
            uploaded = counts.get(ParticipantState.UPLOADED, 0)
            pending = any(counts.get(state) for state in OPEN_STATES) or any(
                session.round == record.round for session in ctx.state.uploading.values())
            now = ctx.clock()
            if not pending or now >= record.deadline or ctx.state.close_now:
                return
            if uploaded >= fed.min_clients:
                quorum_since = now if quorum_since is None else quorum_since
                if now - quorum_since >= fed.straggler_grace_seconds:
                    return
            wake = record.deadline - now
            if quorum_since is not None:
                wake = min(wake, quorum_since + fed.straggler_grace_seconds - now)
            await ctx.changes.wait(min(wake, 1.0))
            # Every join and heartbeat notifies; re-reading the round's participants after each
            # one took most of the event loop with 10,000 devices joining (bench/load_bench.py):
            # look again at most every ROUND_END_POLL_S seconds.
            await asyncio.sleep(ROUND_END_POLL_S)

    async def _close_round(self) -> None:
        ctx, state = self._ctx, self._ctx.state
        async with state.lock:
            assert state.open is not None
            record = replace(state.open, phase=RoundPhase.AGGREGATING)
            state.open = record
            ctx.store.put_round(record)
            ctx.changes.notify()
            self._mark_late(record.round)
            receipts = ctx.store.list_receipts(record.round)
            metrics = round_metrics(receipts, ctx.store.list_participants(record.round))
            if ctx.personalized:
                metrics.update(personal_metrics(receipts))
            replaced = state.global_round
            with heap.mapped_blocks():  # the result and a refold's accumulator leave no heap behind
                record = await self._aggregate(record, receipts, metrics)
            await asyncio.to_thread(heap.trim)
            await asyncio.to_thread(self._drop_cached, record.round, replaced if state.global_round != replaced else None)
            ctx.store.put_round(record)
            state.open, state.accumulator, state.participants = None, None, frozenset()
            state.fold_failures, state.norms = {}, {}
            state.uploading.clear()
            # Kept bytes of broken uploads can serve no resume once their round is closed.
            await asyncio.to_thread(ctx.staging.drop_rounds)
            state.close_now = False
            state.done = record.round >= ctx.config.federation.rounds or self._controls.stopped
            ctx.changes.notify()
        if self.on_round_closed is not None:
            self.on_round_closed(record)

    def _drop_cached(self, round_no: int, replaced_global: int | None) -> None:
        """Let the kernel reuse the page cache of what this close made cold: the round's
        updates (read again only by a refold or a crash resume) and the global adapter it
        replaced, with its rank files (BlobStore.drop_cached says why)."""
        ctx = self._ctx
        ctx.blobs.drop_cached(f"updates/{round_dir(round_no)}")
        if replaced_global is not None:
            ctx.globals.drop_cached(replaced_global)

    def _mark_late(self, round_no: int) -> None:
        """Participants still owing an update are LATE; everyone who did not upload missed a deadline."""
        store = self._ctx.store
        with store.transaction():
            for part in store.list_participants(round_no):
                if part.state in OPEN_STATES:
                    store.put_participant(replace(part, state=ParticipantState.LATE))
                if part.state is not ParticipantState.UPLOADED:
                    client = store.get_client(part.client_id)
                    if client is not None:
                        store.upsert_client(replace(client, deadlines_missed=client.deadlines_missed + 1))

    async def _aggregate(self, record: RoundRecord, receipts: list[Receipt], metrics: dict[str, float]) -> RoundRecord:
        """The closed round's record: DONE with the new global adapter saved, or FAILED
        (no quorum, or aggregation or saving failed) with the previous global kept."""
        ctx, state, fed = self._ctx, self._ctx.state, self._ctx.config.federation
        now = ctx.clock()
        if len(receipts) < fed.min_clients:
            reason = f"quorum not reached: {len(receipts)} of {fed.min_clients} required updates by the deadline"
            log.warning("round failed", extra={"round": record.round, "reason": reason})
            return replace(record, phase=RoundPhase.FAILED, finished_at=now, metrics=metrics, failure_reason=reason)
        started = time.perf_counter()
        accumulator, state.accumulator = state.accumulator, None
        try:
            rejected = dict(state.fold_failures)
            clip = clip_factors({r.client_id: state.norms[r.client_id] for r in receipts if r.client_id in state.norms},
                                fed.robust_clip_factor)
            if rejected or clip or accumulator is None:
                # An update dominates the round or could not be folded: aggregate again from
                # the stored updates, the large ones scaled to the bound, the failed ones left out.
                accumulator = await asyncio.to_thread(self._refold, receipts, clip, rejected)
                metrics["clipped_updates"] = float(len(clip))
                if rejected:
                    self._reject(record.round, rejected)
                    metrics["rejected_updates"] = float(len(rejected))
                    kept = len(receipts) - len(rejected)
                    if kept < fed.min_clients:
                        raise AggregationError(
                            f"{kept} of {fed.min_clients} required updates could be aggregated "
                            f"(rejected: {'; '.join(f'{k}: {v}' for k, v in sorted(rejected.items()))})"
                        )
            result = await asyncio.to_thread(accumulator.result)
            del accumulator  # its sums are as large as the global adapter: free them before writing
            sha = await asyncio.to_thread(ctx.globals.save, record.round, result)
            del result  # kept as a mapping of the file just written, not in the heap
            new_global = await asyncio.to_thread(ctx.globals.load, record.round)
        except Exception as exc:  # noqa: BLE001 - any aggregation error fails this round, never the daemon
            # e.g. an aggregate that overflows float32, or a full disk: the round fails,
            # the previous global adapter stays, and the federation goes on.
            if not isinstance(exc, AggregationError | AdapterError | StorageError):
                log.exception("unexpected error while aggregating", extra={"round": record.round})
            reason = f"aggregation failed: {exc}; kept the previous global adapter"
            log.error("round failed", extra={"round": record.round, "reason": reason})
            return replace(record, phase=RoundPhase.FAILED, finished_at=now, metrics=metrics, failure_reason=reason)
        metrics["aggregation_seconds"] = time.perf_counter() - started
        state.global_adapter, state.global_round = new_global, record.round
        log.info("round done", extra={"round": record.round, "updates": len(receipts), "metrics": metrics})
        return replace(
            record, phase=RoundPhase.DONE, finished_at=ctx.clock(), metrics=metrics,
            global_sha256=sha, global_rank=new_global.max_rank,
        )

    def _refold(self, receipts: list[Receipt], clip: dict[str, float], rejected: dict[str, str]) -> Accumulator:
        """A fresh aggregate of the stored updates: each in `clip` scaled by its factor, each
        that fails to fold added to `rejected` and left out (runs in a thread)."""
        accumulator = self._new_accumulator()
        for receipt in receipts:
            if receipt.client_id in rejected:
                continue
            adapter = load_update(self._ctx, receipt)
            if receipt.client_id in clip:
                adapter = scale_update(adapter, clip[receipt.client_id])
                log.warning("update clipped", extra={"round": receipt.round, "client_id": receipt.client_id,
                                                     "factor": round(clip[receipt.client_id], 6)})
            try:
                accumulator.fold(adapter, float(receipt.num_examples))
            except Exception as exc:  # noqa: BLE001 - left out; the rest may still make the quorum
                rejected[receipt.client_id] = f"{type(exc).__name__}: {exc}"
        return accumulator

    def _reject(self, round_no: int, rejected: dict[str, str]) -> None:
        """Participants whose stored update could not be aggregated: REJECTED, visible in status."""
        store = self._ctx.store
        with store.transaction():
            for client_id, why in rejected.items():
                part = store.get_participant(round_no, client_id)
                if part is not None:
                    store.put_participant(replace(part, state=ParticipantState.REJECTED))
                log.warning("update rejected at aggregation", extra={"round": round_no, "client_id": client_id,
                                                                     "reason": why})

    async def wait_fatal(self) -> BaseException:
        """Return the exception that stopped the round loop (waits until one does)."""
        while self.fatal is None:
            await self._ctx.changes.wait(1.0)
        return self.fatal


def _common_keys(receipts: list[Receipt]) -> list[str]:
    """The evaluation metrics most devices report, at most MAX_METRICS of them: each device
    may send its own names, and a round's record must stay bounded whatever they send."""
    counts = Counter(key for r in receipts for key in r.metrics.eval)
    return sorted(sorted(counts, key=lambda k: (-counts[k], k))[:MAX_METRICS])


def personal_metrics(receipts: list[Receipt]) -> dict[str, float]:
    """Unweighted mean, spread, min and max across clients of each eval metric: pFedLoRA
    reports each client's accuracy on its own held-out data, every client counting once."""
    out: dict[str, float] = {}
    for key in _common_keys(receipts):
        values = np.array([r.metrics.eval[key] for r in receipts if key in r.metrics.eval], dtype=np.float64)
        out[f"personal_{key}_mean"] = float(values.mean())
        out[f"personal_{key}_std"] = float(values.std())
        out[f"personal_{key}_min"] = float(values.min())
        out[f"personal_{key}_max"] = float(values.max())
        out[f"personal_{key}_clients"] = float(len(values))
    return out


def round_metrics(receipts: list[Receipt], parts: list[Participant]) -> dict[str, float]:
    metrics: dict[str, float] = {
        "participants": float(len(parts)),
        "updates": float(len(receipts)),
        "bytes_up": float(sum(p.bytes_up for p in parts)),
        "bytes_down": float(sum(p.bytes_down for p in parts)),
    }
    total = sum(r.num_examples for r in receipts)
    if total:
        metrics["loss_first"] = sum(r.metrics.loss_first * r.num_examples for r in receipts) / total
        metrics["loss_last"] = sum(r.metrics.loss_last * r.num_examples for r in receipts) / total
        for key in _common_keys(receipts):
            having = [r for r in receipts if key in r.metrics.eval]
            weight = sum(r.num_examples for r in having)
            metrics[f"eval_{key}"] = sum(r.metrics.eval[key] * r.num_examples for r in having) / weight
    return metrics
