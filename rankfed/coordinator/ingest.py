"""Uploads: one core call takes an update's header and its chunks, stores and verifies them,
fsyncs the file, commits the receipt and folds the update into the round's running
aggregate; only then does it return the receipt. A broken, cancelled, late or rejected
stream leaves no trace. Every transport (gRPC, in-process) drives `Ingest.upload`.

The chunks are written and hashed on a small shared pool of writer threads, each upload
one in-order strand on it (`rankfed.coordinator.uploads`); the event loop only queues
them and waits when a stream is more than two chunks ahead of its disk.

Retries. A device whose stream broke retries with a new stream, perhaps before the old one
is noticed dead. The outcome, for the two streams of one device and round:

* old stream still receiving chunks: the retry replaces it; the old stream's next step
  fails with FAILED_PRECONDITION ("replaced by a newer one").
* old stream complete (sealed: verifying, fsyncing or folding): the retry is refused with
  UNAVAILABLE (RetryLaterError, "retry in a moment"); the old stream finishes normally.
* old stream accepted: the retry gets ALREADY_EXISTS with the digest held (the device
  learns that its update counted).

So exactly one update counts, and no interleaving produces INTERNAL.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from collections.abc import AsyncIterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from rankfed.aggregation import Accumulator, Adapter, decode_adapter
from rankfed.aggregation.robust import update_norm
from rankfed.coordinator.context import FederationContext
from rankfed.coordinator.dispatch import TaskDispatcher
from rankfed.coordinator.errors import (
    DuplicateError,
    PreconditionError,
    RetryLaterError,
)
from rankfed.coordinator.models import ClientRecord, Participant, Receipt, ScoreRecord
from rankfed.coordinator.store.blobs import update_relpath
from rankfed.coordinator.uploads import SessionState, UploadSession, check_header
from rankfed.protocol import (
    Chunk,
    ErrorDetail,
    ErrorReason,
    LoraSettings,
    ParticipantState,
    UploadHeader,
    limits,
)

log = logging.getLogger("rankfed.coordinator")

# A device may upload only after downloading its round's adapter (it trains from it).
_DOWNLOADED_STATES = (ParticipantState.TRAINING, ParticipantState.UPLOADING, ParticipantState.DROPPED)


class Ingest:
    def __init__(self, ctx: FederationContext, dispatch: TaskDispatcher) -> None:
        self._ctx = ctx
        self._dispatch = dispatch
        self._decode_slots = asyncio.Semaphore(2)  # bounds transient memory of concurrent decodes
        self._pool: ThreadPoolExecutor | None = None

    def close(self) -> None:
        """Stop the writer threads (after the server stopped: no stream is open)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _writers(self) -> ThreadPoolExecutor:
        if self._pool is None:
            # Writes and hashes release the GIL: a few threads keep the disk and the spare
            # cores busy; more only add contention (each stream is one strand on them).
            workers = min(4, max(2, os.cpu_count() or 2))
            self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rankfed-upload")
        return self._pool

    async def upload(self, client_id: str, header: UploadHeader, chunks: AsyncIterable[Chunk]) -> Receipt:
        """Store, verify, persist and fold one update; the receipt means it counts.

        A chunk's `data` may be any bytes-like object (the gRPC path passes a memoryview of
        the received message); it must not change until the call returns."""
        session = self._begin(client_id, header)
        try:
            async for chunk in chunks:
                await session.add_chunk(chunk.offset, chunk.data)
            await session.seal()
            async with self._decode_slots:
                adapter = await asyncio.to_thread(
                    session.verify, self._ctx.spec, assigned=self._assigned(session.participant),
                    homogeneous=self._ctx.homogeneous,
                )
        except BaseException:
            # Broken stream, cancelled call, timeout or rejected content: leave no trace.
            self._abort(session)
            raise
        # From here the update is complete and valid: commit, receipt and fold run as one
        # shielded task, so a caller that goes away now cannot leave a receipt whose update
        # was never folded (or an fsynced file without a receipt).
        receipt = await asyncio.shield(asyncio.ensure_future(self._accept(session, adapter)))
        del adapter  # the last views of the mapped update: it is unmapped, its pages can go
        try:
            self._writers().submit(session.drop_cache)
        except RuntimeError:  # the pool is shut down: the coordinator is stopping
            pass
        return receipt

    def _assigned(self, part: Participant) -> LoraSettings:
        """The LoRA settings this participant was told to train with (what it downloaded)."""
        return self._ctx.lora_for_rank(part.rank, alpha=part.alpha)

    def _begin(self, client_id: str, header: UploadHeader) -> UploadSession:
        ctx = self._ctx
        # Checked first, even for a closed round: a client whose receipt was lost retries, and
        # ALREADY_EXISTS (with the digest we hold) tells it the update counted.
        self._reject_duplicate(client_id, header.round)
        part = self._dispatch.training_participant(client_id, header.round, action="upload")
        if part.bytes_down == 0 or part.state not in _DOWNLOADED_STATES:
            raise PreconditionError(
                f"upload before download: download the round {header.round} global adapter first "
                f"(state {part.state.value})"
            )
        check_header(header, part, max_upload_bytes=ctx.config.server.max_upload_bytes, homogeneous=ctx.homogeneous)
        # Metrics are stored and shown to operators: bounded before anything is written.
        limits.check_metrics(header.metrics.eval)
        uploading = ctx.state.uploading
        previous = uploading.get(client_id)
        if previous is not None:
            if previous.state is not SessionState.STREAMING:
                raise RetryLaterError(
                    f"this client's previous upload for round {previous.round} arrived completely and is being "
                    "verified and stored; retry in a moment (a retry of the same update will then be answered "
                    "ALREADY_EXISTS)"
                )
            # A client only retries when its stream broke, perhaps before we noticed: the new
            # stream replaces the old one, whose handler stops at its next chunk.
            previous.supersede()
            log.info("upload replaced by a retry", extra={"client_id": client_id, "round": previous.round})
        writer = ctx.blobs.open_writer(update_relpath(header.round, client_id))
        session = UploadSession(
            header, part, writer, max_chunk_bytes=ctx.config.server.max_chunk_bytes, pool=self._writers(),
        )
        uploading[client_id] = session
        if part.state is not ParticipantState.UPLOADING:
            ctx.store.put_participant(replace(part, state=ParticipantState.UPLOADING))
            ctx.changes.notify()
        return session

    def _reject_duplicate(self, client_id: str, round_no: int) -> None:
        if round_no >= 2**63:
            return  # no such round (SQLite integers are signed 64-bit); the round check refuses it
        receipt = self._ctx.store.get_receipt(round_no, client_id)
        if receipt is not None:
            raise DuplicateError(
                f"an update for round {round_no} was already accepted from this client "
                f"(receipt {receipt.receipt_id}, sha256 {receipt.sha256})",
                detail=ErrorDetail(ErrorReason.UPDATE_ALREADY_ACCEPTED, {
                    "round": str(round_no), "sha256": receipt.sha256, "receipt_id": receipt.receipt_id,
                }),
            )

    def _abort(self, session: UploadSession) -> None:
        session.abort()
        if self._ctx.state.uploading.get(session.client_id) is session:
            del self._ctx.state.uploading[session.client_id]
            self._revert_uploading(session)

    def _forget(self, session: UploadSession) -> None:
        if self._ctx.state.uploading.get(session.client_id) is session:
            del self._ctx.state.uploading[session.client_id]

    def _revert_uploading(self, session: UploadSession) -> None:
        store = self._ctx.store
        part = store.get_participant(session.round, session.client_id)
        if (
            part is not None
            and part.state is ParticipantState.UPLOADING
            and store.get_receipt(session.round, session.client_id) is None
        ):
            store.put_participant(replace(part, state=ParticipantState.TRAINING))
            self._ctx.changes.notify()

    async def _accept(self, session: UploadSession, adapter: Adapter) -> Receipt:
        ctx, state, header = self._ctx, self._ctx.state, session.header
        try:
            async with state.lock:
                self._reject_duplicate(session.client_id, session.round)
                part = self._dispatch.training_participant(session.client_id, session.round, action="upload")
                relpath = await asyncio.to_thread(session.commit)
                receipt = Receipt(
                    round=session.round, client_id=session.client_id, receipt_id="r-" + secrets.token_hex(8),
                    rank=header.rank, num_examples=header.num_examples, nbytes=session.received,
                    sha256=header.sha256, blob_path=relpath, accepted_at=ctx.clock(), metrics=header.metrics,
                )
                client = ctx.require_client(session.client_id)
                try:
                    self._record_receipt(receipt, part, client, session)
                except BaseException:
                    ctx.blobs.delete(relpath)  # no receipt, so no file either
                    raise
                if state.accumulator is None:
                    raise RuntimeError(f"round {session.round} is open but has no accumulator")
                try:
                    await asyncio.to_thread(fold_update, state.accumulator, adapter, header.num_examples,
                                            state.norms, session.client_id)
                except Exception as exc:  # noqa: BLE001 - e.g. an overflow: the round closes without it
                    log.warning("could not fold an accepted update", extra={
                        "round": session.round, "client_id": session.client_id, "error": repr(exc)})
                    state.fold_failures[session.client_id] = f"{type(exc).__name__}: {exc}"
        except BaseException:
            session.abort()  # a no-op once committed
            self._revert_uploading(session)
            raise
        finally:
            self._forget(session)
        log.info("update accepted", extra={
            "round": session.round, "client_id": session.client_id, "rank": header.rank, "bytes": session.received,
        })
        ctx.changes.notify()
        return receipt

    def _record_receipt(self, receipt: Receipt, part: Participant, client: ClientRecord, session: UploadSession) -> None:
        ctx, header = self._ctx, session.header
        with ctx.store.transaction():
            ctx.store.add_receipt(receipt)
            ctx.store.put_participant(replace(
                part, state=ParticipantState.UPLOADED, bytes_up=part.bytes_up + session.received,
                num_examples=header.num_examples, metrics=header.metrics,
            ))
            ctx.store.upsert_client(replace(
                client, rounds_completed=client.rounds_completed + 1, deadlines_missed=0, last_seen_at=ctx.clock()
            ))
            if ctx.config.rank_policy.allocation == "reported" and header.metrics.eval:
                # The device's score of its own update on its held-out split: what ranks it.
                ctx.store.put_score(ScoreRecord(
                    round=receipt.round, client_id=receipt.client_id, source="reported",
                    metrics=dict(header.metrics.eval), recorded_at=receipt.accepted_at,
                    adapter_sha256=receipt.sha256, reporter=client.device_name,
                ))


def fold_update(accumulator: Accumulator, adapter: Adapter, num_examples: int, norms: dict[str, float],
                client_id: str) -> None:
    """Fold an update into the round's running aggregate and note its norm (robust clipping
    at close compares every update with the round's median)."""
    norms[client_id] = update_norm(adapter)
    accumulator.fold(adapter, float(num_examples))


def load_update(ctx: FederationContext, receipt: Receipt) -> Adapter:
    """An acknowledged update, decoded from its blob (crash resume refolds these)."""
    return decode_adapter(ctx.blobs.read_bytes(receipt.blob_path), spec=ctx.spec)
