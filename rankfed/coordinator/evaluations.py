"""The evaluator role's core (EvaluatorService): which adapters still need a score, their
bytes, and the scores an evaluator reports. One call per RPC, plain Python on asyncio; the
scoring itself (torch, the operator's validation set) runs in the evaluator process
(`rankfed edge evaluate`), never here.

What needs a score:
- with rank_policy.allocation = "validation", each registered device's newest accepted
  update (older ones no longer decide its rank), newest round first, as soon as it is
  accepted (the round need not be closed);
- every finished round's global adapter (`rankfed coordinator export --round best` picks the
  best one by these scores), in any allocation mode.

A task handed out is leased for LEASE_SECONDS: it is not handed out again meanwhile, so
several evaluators share the work, and a task whose evaluator died comes back. A score
reported twice replaces the first (scores are per (round, client, source)).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, replace

from rankfed.coordinator.allocation import is_ranking_round
from rankfed.coordinator.context import FederationContext
from rankfed.coordinator.errors import InvalidArgumentError, NotFoundError
from rankfed.coordinator.models import Receipt, RoundRecord, ScoreRecord
from rankfed.protocol import (
    BaseModel,
    EvaluationDone,
    EvaluationDownloadRequest,
    EvaluationKind,
    EvaluationTask,
    EvaluationTaskRequest,
    EvaluationWait,
    EvaluatorTask,
    LoraSettings,
    RoundPhase,
    ScoreReceipt,
    ScoreReport,
    TransferManifest,
    limits,
)

log = logging.getLogger("rankfed.coordinator")

SOURCE = "validation"  # the score source an evaluator writes
LEASE_SECONDS = 120.0  # a task handed out is not handed out again for this long
POLL_S = 0.25  # a held long-poll re-reads what is pending at most this often
MAX_ID_CHARS = 128  # client ids are "c-" and 12 hex digits; anything longer names no client
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class _Source:
    """Where the bytes of one scorable adapter are, and how to load them."""

    relpath: str
    size: int
    sha256: str
    lora: LoraSettings


class Evaluations:
    def __init__(self, ctx: FederationContext) -> None:
        self._ctx = ctx
        self._leases: dict[tuple[EvaluationKind, int, str], float] = {}

    def reset(self) -> None:
        """A new run: no task is leased."""
        self._leases.clear()

    # ------------------------------------------------------------------ GetEvaluationTask

    async def next_task(self, request: EvaluationTaskRequest) -> EvaluatorTask:
        """The next adapter to score (leased to the caller), WAIT after `max_wait_s` (capped
        by server.long_poll_seconds) with nothing pending, or DONE once the federation is done
        and nothing is left to score."""
        ctx = self._ctx
        wait = min(max(request.max_wait_s, 0.0), ctx.config.server.long_poll_seconds)
        deadline = ctx.clock() + wait
        while True:
            task, pending = self._lease_next(request)
            if task is not None:
                return task
            if ctx.state.done and not pending:
                return EvaluationDone(reason="the federation is done and every adapter asked for is scored")
            remaining = deadline - ctx.clock()
            if remaining <= 0:
                what = f"{pending} adapter(s) are being scored by another evaluator" if pending else "nothing to score"
                return EvaluationWait(retry_after_s=0.0, reason=f"{what}; poll again")
            await ctx.changes.wait(min(remaining, 1.0))
            await asyncio.sleep(POLL_S)  # every heartbeat notifies: look again at most this often

    def _lease_next(self, request: EvaluationTaskRequest) -> tuple[EvaluationTask | None, int]:
        """The first pending adapter not leased (now leased), and how many are pending."""
        now = self._ctx.clock()
        self._leases = {key: until for key, until in self._leases.items() if until > now}
        pending = 0
        if request.updates:
            for receipt in self.pending_updates():
                pending += 1
                key = (EvaluationKind.UPDATE, receipt.round, receipt.client_id)
                if key not in self._leases:
                    self._leases[key] = now + LEASE_SECONDS
                    return self._update_task(receipt), pending
        if request.globals:
            for record in self.pending_globals():
                pending += 1
                key = (EvaluationKind.GLOBAL, record.round, "")
                if key not in self._leases:
                    self._leases[key] = now + LEASE_SECONDS
                    return self._global_task(record), pending
        return None, pending

    def pending_updates(self) -> list[Receipt]:
        """Each registered device's newest update that has no validation score yet (only with
        allocation "validation"), newest round first; updates whose file retention deleted
        are left out."""
        ctx = self._ctx
        if ctx.config.rank_policy.allocation != SOURCE:
            return []
        active = {c.client_id for c in ctx.store.list_clients() if not c.left}
        scored = {cid: s.round for cid, s in ctx.store.latest_scores(SOURCE).items()}
        return [
            r for r in ctx.store.latest_receipts()
            if r.client_id in active and scored.get(r.client_id, -1) < r.round and ctx.blobs.exists(r.blob_path)
        ]

    def pending_globals(self) -> list[RoundRecord]:
        """Finished rounds whose global adapter has no validation score, newest first (none in
        a personalized federation)."""
        ctx = self._ctx
        if ctx.personalized:
            return []  # a shared adapter alone is no model: each device's private part completes it
        scored = {s.round for s in ctx.store.list_scores(SOURCE, "")}
        done = [r for r in ctx.store.list_rounds()
                if r.phase is RoundPhase.DONE and r.round not in scored and ctx.globals.exists(r.round)]
        return done[::-1]

    def _base_model(self) -> BaseModel:
        m = self._ctx.manifest
        return BaseModel(id=m.model_id, weights_sha256=m.weights_sha256, task=m.task, num_labels=m.num_labels)

    def _update_task(self, receipt: Receipt) -> EvaluationTask:
        ctx = self._ctx
        client = ctx.store.get_client(receipt.client_id)
        base = [r for r in ctx.store.list_rounds() if r.phase is RoundPhase.DONE and r.round < receipt.round]
        base_round = base[-1].round if base else 0
        base_sha = base[-1].global_sha256 if base else ""
        return EvaluationTask(
            kind=EvaluationKind.UPDATE, round=receipt.round, adapter_sha256=receipt.sha256,
            adapter_bytes=receipt.nbytes, client_id=receipt.client_id,
            device_name=client.device_name if client else "", rank=receipt.rank, base_round=base_round,
            base_sha256=base_sha, base_model=self._base_model(), metric=ctx.config.rank_policy.score_metric,
        )

    def _global_task(self, record: RoundRecord) -> EvaluationTask:
        source = self._global_source(record)
        return EvaluationTask(
            kind=EvaluationKind.GLOBAL, round=record.round, adapter_sha256=source.sha256, adapter_bytes=source.size,
            rank=record.global_rank, base_model=self._base_model(),
        )

    # ------------------------------------------------------------------ DownloadEvaluationAdapter

    async def open_download(
        self, request: EvaluationDownloadRequest
    ) -> tuple[TransferManifest, AsyncGenerator[bytes, None]]:
        """The manifest of the adapter a task names and an iterator over its chunks from `offset`."""
        ctx = self._ctx
        source = self._source(request.kind, request.round, request.client_id)
        if request.offset > source.size:
            raise InvalidArgumentError(
                f"download offset {request.offset} is past the end of the {source.size}-byte adapter"
            )
        chunk = ctx.config.server.max_chunk_bytes
        manifest = TransferManifest(
            round=request.round, rank=source.lora.rank, total_bytes=source.size, sha256=source.sha256,
            chunk_bytes=chunk, lora=source.lora,
        )

        async def chunks() -> AsyncGenerator[bytes, None]:
            with ctx.globals.open(source.relpath) as fh:
                fh.seek(request.offset)
                while data := fh.read(chunk):
                    yield data

        return manifest, chunks()

    def _source(self, kind: EvaluationKind, round_no: int, client_id: str) -> _Source:
        _check_ids(round_no, client_id)
        if kind is EvaluationKind.GLOBAL:
            record = self._ctx.store.get_round(round_no)
            if record is None or record.phase is not RoundPhase.DONE:
                raise NotFoundError(f"round {round_no} has no global adapter (it is not a finished round)")
            return self._global_source(record)
        return self._update_source(self._receipt(round_no, client_id))

    def _receipt(self, round_no: int, client_id: str) -> Receipt:
        if not client_id:
            raise InvalidArgumentError("an UPDATE names the client whose update it is: set client_id")
        receipt = self._ctx.store.get_receipt(round_no, client_id)
        if receipt is None:
            raise NotFoundError(f"no accepted update of client {client_id!r} in round {round_no}")
        return receipt

    def _update_source(self, receipt: Receipt) -> _Source:
        ctx = self._ctx
        if not ctx.blobs.exists(receipt.blob_path):
            raise NotFoundError(
                f"the update of client {receipt.client_id} in round {receipt.round} was deleted "
                "(storage.updates_keep_rounds)"
            )
        part = ctx.store.get_participant(receipt.round, receipt.client_id)
        lora = ctx.lora_for_rank(part.rank, alpha=part.alpha) if part is not None else ctx.lora_for_rank(receipt.rank)
        return _Source(relpath=receipt.blob_path, size=receipt.nbytes, sha256=receipt.sha256, lora=lora)

    def _global_source(self, record: RoundRecord) -> _Source:
        ctx = self._ctx
        relpath = ctx.globals.relpath(record.round)
        if not ctx.blobs.exists(relpath):
            raise NotFoundError(f"the global adapter of round {record.round} is missing from the blob store")
        # The global adapter keeps scaling 1 (alpha = r): see rankfed.aggregation.
        lora = replace(ctx.lora_for_rank(record.global_rank), alpha=float(record.global_rank), use_rslora=False)
        sha = record.global_sha256 or ctx.globals.sha256(record.round)
        return _Source(relpath=relpath, size=ctx.blobs.path(relpath).stat().st_size, sha256=sha, lora=lora)

    # ------------------------------------------------------------------ ReportScores

    def report_scores(self, report: ScoreReport, reporter: str) -> ScoreReceipt:
        """Record an evaluator's scores of one adapter. The adapter must be the one a task
        named (same digest); an update's scores must hold rank_policy.score_metric."""
        ctx = self._ctx
        limits.check_metrics(report.metrics, "metrics")
        limits.check_int(report.num_examples, "num_examples")
        if not report.metrics:
            raise InvalidArgumentError("metrics is empty: report at least the score the coordinator ranks by")
        if not _SHA256_HEX.fullmatch(report.adapter_sha256):
            raise InvalidArgumentError("adapter_sha256 must be the 64 lowercase hex digits of the adapter scored")
        source = self._source(report.kind, report.round, report.client_id)
        if source.sha256 != report.adapter_sha256:
            raise InvalidArgumentError(
                f"adapter_sha256 {report.adapter_sha256} is not the digest of that adapter ({source.sha256}); "
                "score the adapter the task names"
            )
        metric = ctx.config.rank_policy.score_metric
        if report.kind is EvaluationKind.UPDATE and metric not in report.metrics:
            raise InvalidArgumentError(
                f"the scores of an update must hold {metric!r} (rank_policy.score_metric), got {sorted(report.metrics)}"
            )
        client_id = report.client_id if report.kind is EvaluationKind.UPDATE else ""
        ctx.store.put_score(ScoreRecord(
            round=report.round, client_id=client_id, source=SOURCE, metrics=dict(report.metrics),
            recorded_at=ctx.clock(), adapter_sha256=report.adapter_sha256, reporter=reporter[:200],
        ))
        self._leases.pop((report.kind, report.round, client_id), None)
        log.info("scores reported", extra={"kind": report.kind.value, "round": report.round, "client_id": client_id,
                                           "metrics": report.metrics, "reporter": reporter[:200]})
        ctx.changes.notify()
        what = f"update of {client_id}" if client_id else "global adapter"
        return ScoreReceipt(message=f"recorded the scores of round {report.round}'s {what}")

    # ------------------------------------------------------------------ the round loop's wait

    async def wait_for_scores(self, round_no: int, *, interrupted: Callable[[], bool]) -> None:
        """validation allocation: before a re-ranking round's ranks are set, wait up to
        rank_policy.evaluator_wait_seconds for the evaluator to score the pending updates
        (or until `interrupted()`, e.g. an operator paused the federation)."""
        ctx, policy = self._ctx, self._ctx.config.rank_policy
        if (policy.allocation != SOURCE or policy.evaluator_wait_seconds <= 0
                or not is_ranking_round(round_no, warmup_rounds=policy.warmup_rounds, every=policy.reevaluate_every)):
            return
        deadline = ctx.clock() + policy.evaluator_wait_seconds
        pending = len(self.pending_updates())
        if pending:
            log.info("waiting for the evaluator", extra={
                "round": round_no, "pending_updates": pending, "wait_s": policy.evaluator_wait_seconds})
        while pending and not interrupted():
            remaining = deadline - ctx.clock()
            if remaining <= 0:
                log.warning("evaluator too slow: ranking without its scores of some updates", extra={
                    "round": round_no, "unscored_updates": pending})
                return
            await ctx.changes.wait(min(remaining, 1.0))
            await asyncio.sleep(min(POLL_S, max(remaining, 0.0)))
            pending = len(self.pending_updates())


def _check_ids(round_no: int, client_id: str) -> None:
    """Bounds before any lookup: SQLite integers are signed 64-bit, ids are short."""
    limits.check_int(round_no, "round")
    limits.check_text(client_id, "client_id", MAX_ID_CHARS)
