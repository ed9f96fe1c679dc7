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

Resuming (rankfed.coordinator.staging). A stream that breaks before its end keeps what it
wrote: the session is *parked* (its bytes fsynced, then described on disk) in a task of
its own, since the handler may be cancelled. The device asks `upload_status` (it ends a
stream of the device still streaming, like a retry does, and waits for its park), then
sends the same header with `resume_offset` and the chunks from there. A new upload
(resume_offset 0) replaces kept bytes; a resume from more than is kept of that very
upload (same round, digest and size) is FAILED_PRECONDITION with the typed detail
UPLOAD_NOT_RESUMABLE naming what is kept. A stream that ends cleanly but short, or whose
content is rejected, keeps nothing. Either way exactly one receipt, and one fold, counts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from collections.abc import AsyncIterable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from rankfed.aggregation import Accumulator, Adapter, decode_adapter
from rankfed.aggregation.robust import update_norm
from rankfed.coordinator.context import FederationContext
from rankfed.coordinator.dispatch import TaskDispatcher
from rankfed.coordinator.errors import (
    DuplicateError,
    InvalidArgumentError,
    PreconditionError,
    RetryLaterError,
    TooLargeError,
)
from rankfed.coordinator.models import ClientRecord, Participant, Receipt, ScoreRecord
from rankfed.coordinator.staging import StagedUpload, Staging, part_relpath
from rankfed.coordinator.store.blobs import update_relpath
from rankfed.coordinator.uploads import SessionState, UploadSession, check_header
from rankfed.protocol import (
    Chunk,
    ErrorDetail,
    ErrorReason,
    LoraSettings,
    ParticipantState,
    UploadHeader,
    UploadStatusRequest,
    UploadStatusResult,
    limits,
)

log = logging.getLogger("rankfed.coordinator")

# A device may upload only after downloading its round's adapter (it trains from it).
_DOWNLOADED_STATES = (ParticipantState.TRAINING, ParticipantState.UPLOADING, ParticipantState.DROPPED)


class Ingest:
    def __init__(self, ctx: FederationContext, dispatch: TaskDispatcher) -> None:
        self._ctx = ctx
        self._dispatch = dispatch
        self._decode_slots = asyncio.Semaphore(2)  # updates mapped at once (decoded, not yet folded)
        self._pool: ThreadPoolExecutor | None = None
        # Parks under way (a broken stream's bytes being kept), by session: a retry waits for its own.
        self._parks: dict[UploadSession, asyncio.Task[int]] = {}
        # Seconds each accepted upload spent per phase: begin (header checks, its state
        # recorded), receive (to the stream's end), drain (the writer catching up), verify,
        # sync (the update's fsync), commit (the round's lock, publish, the receipt row),
        # receipt_sync (the state store's sync: the upload is answered at its end) and fold
        # (beside that sync and after it). Metrics wire it.
        self.on_phase: Callable[[str, float], None] | None = None

    @property
    def staging(self) -> Staging:
        return self._ctx.staging

    async def drain(self) -> None:
        """Let every park under way finish (at shutdown, after the server stopped)."""
        while self._parks:
            await asyncio.gather(*self._parks.values(), return_exceptions=True)

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
        called = time.perf_counter()
        session = await self._begin(client_id, header)
        phase = _Phases(self.on_phase, called)
        phase("begin")
        try:
            async for chunk in chunks:
                await session.add_chunk(chunk.offset, chunk.data)
        except BaseException:
            # The stream broke (a cut link, a cancelled call, a timeout, a newer stream of this
            # device) or sent a bad chunk: keep what arrived for a resume, in a task of its own
            # (this one may be cancelled).
            self._park_later(session)
            raise
        if session.received < header.total_bytes:
            # Ended short: a peer that went away can look like a clean end to the server, so
            # this too keeps its bytes for a resume.
            self._park_later(session)
            if session.superseded:
                raise PreconditionError("this upload was replaced by a newer one from the same client")
            raise InvalidArgumentError(
                f"upload ended after {session.received} of {header.total_bytes} declared bytes (truncated); "
                "resume it (UploadStatus) or send it again"
            )
        phase("receive")
        slot = False
        try:
            await session.seal()
            phase("drain")
            # A decoded update is a mapping of its whole file: a slot bounds how many are
            # mapped at once, from the decode to the end of its fold (not only the decode:
            # with 32 streams ending together, the verified ones waited for the fold mapped).
            await self._decode_slots.acquire()
            slot = True
            adapter = await asyncio.to_thread(
                session.verify, self._ctx.spec, assigned=self._assigned(session.participant),
                homogeneous=self._ctx.homogeneous,
            )
            phase("verify")
        except BaseException:
            # Rejected content (digest, shapes, rank...), or cancelled while verified: no trace.
            if slot:
                self._decode_slots.release()
            self._abort(session)
            raise
        # From here the update is complete and valid: commit, receipt and fold run as one
        # shielded task, so a caller that goes away now cannot leave a receipt whose update
        # was never folded (or an fsynced file without a receipt). The receipt is answered
        # once it is recorded; the fold goes on under the round's lock, which the round's
        # close takes first, and a crash before it ends refolds the update from its receipt.
        recorded: asyncio.Future[Receipt] = asyncio.get_running_loop().create_future()
        recorded.add_done_callback(_retrieved)  # a caller that went away never reads it
        accept = asyncio.ensure_future(self._accept(session, adapter, recorded, phase))
        accept.add_done_callback(lambda task: self._accepted(task, session))
        del adapter  # the task holds the last views of the mapped update: unmapped when it ends
        return await asyncio.shield(recorded)

    def _accepted(self, task: asyncio.Task[None], session: UploadSession) -> None:
        """The accept task ended (after the fold, or with the error its receipt carried)."""
        self._decode_slots.release()
        if not task.cancelled() and task.exception() is None:  # exception(): retrieved, never "unhandled"
            try:
                self._writers().submit(session.drop_cache)
            except RuntimeError:  # the pool is shut down: the coordinator is stopping
                pass

    def _assigned(self, part: Participant) -> LoraSettings:
        """The LoRA settings this participant was told to train with (what it downloaded)."""
        return self._ctx.lora_for_rank(part.rank, alpha=part.alpha)

    async def upload_status(self, client_id: str, request: UploadStatusRequest) -> UploadStatusResult:
        """How many bytes of this upload are kept for a resume (0: none). Ends a stream of this
        device still open here first, as a retry does: a device asks only once its stream broke."""
        if not _is_sha256(request.sha256):
            raise InvalidArgumentError("sha256 must be 64 lowercase hex digits of the whole file")
        max_bytes = self._ctx.config.server.max_upload_bytes
        if request.total_bytes == 0:
            raise InvalidArgumentError("total_bytes 0: send the size of the safetensors file")
        if request.total_bytes > max_bytes:
            raise TooLargeError(f"total_bytes {request.total_bytes} exceeds the coordinator's cap of {max_bytes} bytes "
                                "(server.max_upload_bytes)")
        await self._settle(client_id, request.round)
        staged = self.staging.get(request.round, client_id) if self.staging.enabled else None
        if staged is None or not staged.matches(request.sha256, request.total_bytes):
            return UploadStatusResult(resume_offset=0)
        return UploadStatusResult(resume_offset=staged.staged_bytes, expires_at=self.staging.expires_at(staged))

    async def _begin(self, client_id: str, header: UploadHeader) -> UploadSession:
        ctx = self._ctx
        # Checked first, even for a closed round: a client whose receipt was lost retries, and
        # ALREADY_EXISTS (with the digest we hold) tells it the update counted.
        self._reject_duplicate(client_id, header.round)
        part = self._dispatch.training_participant(client_id, header.round, action="upload")
        _check_downloaded(part, header.round)
        check_header(header, part, max_upload_bytes=ctx.config.server.max_upload_bytes, homogeneous=ctx.homogeneous)
        # Metrics are stored and shown to operators: bounded before anything is written.
        limits.check_metrics(header.metrics.eval)
        if header.resume_offset > header.total_bytes:
            raise InvalidArgumentError(
                f"resume_offset {header.resume_offset} is past the {header.total_bytes} bytes the header declares"
            )
        part = await self._settle(client_id, header.round)
        _check_downloaded(part, header.round)
        # From here to the registration below nothing awaits: no other stream of this device
        # can start in between.
        start = self._resume_point(client_id, header)
        staged = part_relpath(header.round, client_id) if self.staging.enabled else None
        writer = ctx.blobs.open_writer(update_relpath(header.round, client_id), staged=staged, resume_at=start)
        session = UploadSession(
            header, part, writer, max_chunk_bytes=ctx.config.server.max_chunk_bytes, pool=self._writers(), start=start,
        )
        ctx.state.uploading[client_id] = session
        if start:
            log.info("upload resumed", extra={"client_id": client_id, "round": header.round, "offset": start})
        if part.state is not ParticipantState.UPLOADING:
            ctx.store.put_participant(replace(part, state=ParticipantState.UPLOADING))
            ctx.changes.notify()
        return session

    async def _settle(self, client_id: str, round_no: int) -> Participant:
        """The checks UploadUpdate and UploadStatus share, once no stream of this device is
        open: a streaming one is replaced (a device only retries or asks when its stream
        broke, perhaps before we noticed) and parked, a parking one waited for. Returns the
        device's participant record."""
        uploading = self._ctx.state.uploading
        while True:
            self._reject_duplicate(client_id, round_no)
            part = self._dispatch.training_participant(client_id, round_no, action="upload")
            previous = uploading.get(client_id)
            if previous is None:
                return part
            if previous.state is SessionState.STREAMING:
                # Its handler stops at its next chunk; its bytes are kept for us.
                previous.supersede()
                log.info("upload replaced by a retry", extra={"client_id": client_id, "round": previous.round})
            elif previous not in self._parks:
                raise RetryLaterError(
                    f"this client's previous upload for round {previous.round} arrived completely and is being "
                    "verified and stored; retry in a moment (a retry of the same update will then be answered "
                    "ALREADY_EXISTS)"
                )
            await asyncio.shield(self._park_later(previous))

    def _resume_point(self, client_id: str, header: UploadHeader) -> int:
        """The byte this stream starts at: 0 for a new upload (kept bytes of this device and
        round go), else `resume_offset` if that much of this very upload is kept."""
        offset = header.resume_offset
        if not offset:
            self.staging.drop(header.round, client_id)
            return 0
        staged = self.staging.get(header.round, client_id) if self.staging.enabled else None
        same = staged is not None and staged.matches(header.sha256, header.total_bytes)
        held = staged.staged_bytes if staged is not None and same else 0
        if offset <= held:
            return offset
        if not self.staging.enabled:
            why = "this coordinator keeps no bytes of broken uploads (server.upload_resume_ttl_seconds = 0)"
        elif staged is None:
            why = "no bytes of an upload of this client are kept for this round (none arrived, or they expired)"
        elif not same:
            why = "the bytes kept for this round are of another upload (another sha256 or total_bytes)"
        else:
            why = f"only {held} bytes of this upload are kept"
        raise PreconditionError(
            f"cannot resume at byte {offset}: {why}; resume from resume_offset {held} (UploadStatus)"
            + (" or send the update from the start" if held else ", i.e. send the update from the start"),
            detail=ErrorDetail(ErrorReason.UPLOAD_NOT_RESUMABLE, {
                "round": str(header.round), "resume_offset": str(held),
            }),
        )

    def _park_later(self, session: UploadSession) -> asyncio.Future[int]:
        """Park a broken stream's session in a task of its own, once; see `_park`. (Its
        handler may call this after a retry's park of it finished: that is a no-op, the file
        may be the retry's by then.)"""
        task = self._parks.get(session)
        if task is not None:
            return task
        if session.state is not SessionState.STREAMING:  # parked (or dropped) already
            done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            done.set_result(0)
            return done
        task = asyncio.ensure_future(self._park(session))
        self._parks[session] = task
        task.add_done_callback(lambda _: self._parks.pop(session, None))
        self._revert_uploading(session)  # at once: the device is back to owing its update
        return task

    async def _park(self, session: UploadSession) -> int:
        """Keep a broken stream's bytes for a resume (fsynced, then described on disk) if
        resuming is on and its round is still open; else drop them. Then forget the stream."""
        ctx, round_no, client_id = self._ctx, session.round, session.client_id
        kept = 0
        try:
            if self.staging.enabled:
                kept = await session.park()
            else:
                session.abort()
            if kept and self._round_open(round_no):
                header = session.header
                staged = StagedUpload(round=round_no, client_id=client_id, sha256=header.sha256,
                                      total_bytes=header.total_bytes, staged_bytes=kept, parked_at=ctx.clock())
                try:
                    await asyncio.to_thread(self.staging.record, staged)
                except OSError as exc:  # e.g. the round closed meanwhile and took the directory
                    log.info("could not keep a broken upload", extra={
                        "client_id": client_id, "round": round_no, "error": repr(exc)})
                    kept = 0
            else:
                kept = 0
            if not kept:
                self.staging.drop(round_no, client_id)
            else:
                log.info("broken upload kept for a resume", extra={
                    "client_id": client_id, "round": round_no, "bytes": kept})
        finally:
            self._forget(session)
        return kept

    def _round_open(self, round_no: int) -> bool:
        record = self._ctx.state.open
        return record is not None and record.round == round_no

    async def expire_staged(self) -> None:
        """Drop kept uploads past server.upload_resume_ttl_seconds, now and then (they go when
        their round closes anyway); runs until cancelled."""
        ctx = self._ctx
        period = min(max(self.staging.ttl_s / 4, 1.0), 300.0)
        while True:
            await asyncio.sleep(period)
            record = ctx.state.open
            if record is None:
                continue
            for client_id in await asyncio.to_thread(self.staging.expired, record.round):
                # A stream of that device may be resuming it right now: its own park renews it.
                if client_id not in ctx.state.uploading and self._round_open(record.round):
                    self.staging.drop(record.round, client_id)
                    log.info("kept upload expired", extra={"client_id": client_id, "round": record.round})

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
        """A sealed session failed (short, rejected, cancelled while verified): its file and
        any description of it go. A parked one is its park's business."""
        if session.state is SessionState.PARKED or session in self._parks:
            return
        session.abort()
        self.staging.forget(session.round, session.client_id)
        if self._forget(session):
            self._revert_uploading(session)

    def _forget(self, session: UploadSession) -> bool:
        """Take a session out of the uploads in flight. The round loop waits for them before
        it closes a round, so it is told: otherwise a round whose last update was still being
        folded when the loop looked closed only at the loop's next 1 s timeout."""
        if self._ctx.state.uploading.get(session.client_id) is not session:
            return False
        del self._ctx.state.uploading[session.client_id]
        self._ctx.changes.notify()
        return True

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

    async def _accept(self, session: UploadSession, adapter: Adapter, recorded: asyncio.Future[Receipt],
                      phase: _Phases) -> None:
        """Commit, record the receipt (then `recorded` resolves: the upload is answered) and
        fold. An error before the receipt goes to `recorded`; a failed fold is the round's."""
        ctx, state, header = self._ctx, self._ctx.state, session.header
        counted = False
        try:
            # The data's fsync outside the round's lock: uploads ending together sync in
            # parallel, and only the rename and the receipt are serialised.
            await asyncio.to_thread(session.sync)
            phase("sync")
            async with state.lock:
                self._reject_duplicate(session.client_id, session.round)
                part = self._dispatch.training_participant(session.client_id, session.round, action="upload")
                relpath = await asyncio.to_thread(self._commit, session)
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
                counted = True
                phase("commit")
                ctx.changes.notify()
                # The receipt row is committed (a crash keeps it); it is answered once the
                # state store has synced it, off the loop and beside the fold below.
                synced = asyncio.ensure_future(asyncio.to_thread(ctx.store.sync))
                synced.add_done_callback(lambda done: self._answer(recorded, receipt, done, session, phase))
                if state.accumulator is None:
                    raise RuntimeError(f"round {session.round} is open but has no accumulator")
                folding = time.perf_counter()
                try:
                    await asyncio.to_thread(fold_update, state.accumulator, adapter, header.num_examples,
                                            state.norms, session.client_id)
                except Exception as exc:  # noqa: BLE001 - e.g. an overflow: the round closes without it
                    log.warning("could not fold an accepted update", extra={
                        "round": session.round, "client_id": session.client_id, "error": repr(exc)})
                    state.fold_failures[session.client_id] = f"{type(exc).__name__}: {exc}"
                phase.span("fold", time.perf_counter() - folding)
        except BaseException as exc:
            if counted:  # the update counts (its sync answers it); only its fold was cut short
                log.warning("an accepted update was not folded; a restart refolds it from its receipt",
                            extra={"round": session.round, "client_id": session.client_id, "error": repr(exc)})
                raise
            if session.state is not SessionState.DONE:
                session.abort()
                self.staging.forget(session.round, session.client_id)
            self._revert_uploading(session)
            if isinstance(exc, asyncio.CancelledError):
                recorded.cancel()
            else:
                recorded.set_exception(exc)
            raise  # retrieved by _accepted; the caller gets it through `recorded`
        finally:
            self._forget(session)

    @staticmethod
    def _answer(recorded: asyncio.Future[Receipt], receipt: Receipt, synced: asyncio.Future[None],
                session: UploadSession, phase: _Phases) -> None:
        """The receipt's sync ended: answer the upload (its receipt, or why it is not sure).
        Only this answers once the receipt is counted (`_accept` answers before it)."""
        if synced.cancelled():  # the loop is stopping
            recorded.cancel()
            return
        error = synced.exception()
        if error is not None:
            # The row exists, so a retry is answered ALREADY_EXISTS once the disk recovers.
            recorded.set_exception(error)
            return
        phase("receipt_sync")
        phase.accept()
        log.info("update accepted", extra={
            "round": session.round, "client_id": session.client_id, "rank": receipt.rank, "bytes": receipt.nbytes,
        })
        recorded.set_result(receipt)

    def _commit(self, session: UploadSession) -> str:
        """fsync and publish the update (its staged file becomes the update's): no bytes are
        kept for a resume any more. Blocking: a worker thread."""
        relpath = session.commit()
        self.staging.forget(session.round, session.client_id)
        return relpath

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


def _retrieved(future: asyncio.Future[Receipt]) -> None:
    if not future.cancelled():
        future.exception()


class _Phases:
    """Seconds one upload spent per phase, for `Ingest.on_phase`: `phase(name)` ends a phase
    begun when the previous one ended, `span(name, s)` notes one that overlapped others.
    Nothing is reported until `accept()` (only accepted uploads count); after it, at once."""

    def __init__(self, on_phase: Callable[[str, float], None] | None, since: float) -> None:
        self._on_phase, self._last = on_phase, since
        self._pending: list[tuple[str, float]] | None = []

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.span(name, now - self._last)
        self._last = now

    def span(self, name: str, seconds: float) -> None:
        if self._pending is not None:
            self._pending.append((name, seconds))
        elif self._on_phase is not None:
            self._on_phase(name, seconds)

    def accept(self) -> None:
        pending, self._pending = self._pending or [], None
        for name, seconds in pending:
            self.span(name, seconds)


def _check_downloaded(part: Participant, round_no: int) -> None:
    if part.bytes_down == 0 or part.state not in _DOWNLOADED_STATES:
        raise PreconditionError(
            f"upload before download: download the round {round_no} global adapter first "
            f"(state {part.state.value})"
        )


def _is_sha256(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def fold_update(accumulator: Accumulator, adapter: Adapter, num_examples: int, norms: dict[str, float],
                client_id: str) -> None:
    """Fold an update into the round's running aggregate and note its norm (robust clipping
    at close compares every update with the round's median)."""
    norms[client_id] = update_norm(adapter)
    accumulator.fold(adapter, float(num_examples))


def load_update(ctx: FederationContext, receipt: Receipt) -> Adapter:
    """An acknowledged update, decoded from its blob (crash resume refolds these)."""
    return decode_adapter(ctx.blobs.read_bytes(receipt.blob_path), spec=ctx.spec)
