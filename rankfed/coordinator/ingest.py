"""Upload ingest: the one core call behind UploadUpdate, used by the gRPC servicer and the
in-process simulation transport alike.

    receipt = await federation.upload(client_id, header, chunks)

`chunks` is an async iterator of `(offset, data)`; the call checks the header, streams
the chunks to a temporary blob (written and hashed on writer threads, see `uploads`),
verifies size, sha256 and content, and then, as one shielded step under the round lock,
commits (fsync), records the receipt and folds the update into the round's accumulator.
Only then does it return the receipt. Whatever ends the call early (a rejected chunk, a
broken or cancelled stream, a timeout raised by the iterator) removes the temporary file
and puts the participant back to TRAINING; nothing else needs cleaning up by the caller.

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
from collections.abc import AsyncIterable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from rankfed.aggregation import Accumulator, Adapter, AdapterSpec
from rankfed.coordinator.config import ServerConfig
from rankfed.coordinator.errors import DuplicateError, PreconditionError, RetryLaterError
from rankfed.coordinator.models import ClientRecord, Participant, ParticipantState, Receipt, UploadHeader
from rankfed.coordinator.store import BlobStore, StateStore
from rankfed.coordinator.store.blobs import update_relpath
from rankfed.coordinator.uploads import SessionState, UploadSession, check_header

log = logging.getLogger("rankfed.coordinator")

Chunks = AsyncIterable[tuple[int, bytes | memoryview]]

# Participants that have downloaded the round's adapter (so may upload).
_DOWNLOADED_STATES = (ParticipantState.TRAINING, ParticipantState.UPLOADING, ParticipantState.DROPPED)


@dataclass(frozen=True)
class RoundHooks:
    """What ingest needs from the round logic, as named callables (no private reach-in)."""

    round_lock: asyncio.Lock  # held by round close: an update folds before or after, never during
    participant: Callable[[str, int], Participant]  # the open round's participant or PreconditionError
    accumulator: Callable[[], Accumulator | None]  # the open round's running aggregate
    client: Callable[[str], ClientRecord]
    fold_failed: Callable[[str], None]  # an accepted update could not be folded (a bug): fail the round
    notify: Callable[[], None]  # wake long-polls and the round loop
    clock: Callable[[], float]


class Ingest:
    def __init__(
        self, *, server: ServerConfig, store: StateStore, blobs: BlobStore, spec: AdapterSpec,
        homogeneous: bool, hooks: RoundHooks, uploading: dict[str, UploadSession],
    ) -> None:
        self._server = server
        self._store = store
        self._blobs = blobs
        self._spec = spec
        self._homogeneous = homogeneous
        self._hooks = hooks
        # Open streams by client. The round logic reads it too (an uploading client is
        # alive and pending), and clears it when a round closes.
        self._uploading = uploading
        # Bounds the transient memory of concurrent decodes (each maps a whole update).
        self._decode_slots = asyncio.Semaphore(2)
        self._pool: ThreadPoolExecutor | None = None

    def close(self) -> None:
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

    # ------------------------------------------------------------------ the core call

    async def upload(self, client_id: str, header: UploadHeader, chunks: Chunks) -> Receipt:
        """Receive, verify, persist and fold one update; returns its receipt."""
        session = self.begin(client_id, header)
        try:
            async for offset, data in chunks:
                await session.add_chunk(offset, data)
            await session.seal()
            async with self._decode_slots:
                adapter = await asyncio.to_thread(session.verify, self._spec, homogeneous=self._homogeneous)
        except BaseException:
            # Broken stream, cancelled call, timeout or rejected content: leave no trace.
            self._abort(session)
            raise
        # From here the update is complete and valid: commit, receipt and fold run as one
        # shielded task, so a caller that goes away now cannot leave a receipt whose update
        # was never folded (or an fsynced file without a receipt).
        return await asyncio.shield(asyncio.ensure_future(self._accept(session, adapter)))

    def begin(self, client_id: str, header: UploadHeader) -> UploadSession:
        # Checked first, even for a closed round: a client whose receipt was lost retries, and
        # ALREADY_EXISTS (with the digest we hold) tells it the update counted.
        self._reject_duplicate(client_id, header.round)
        part = self._hooks.participant(client_id, header.round)
        if part.bytes_down == 0 or part.state not in _DOWNLOADED_STATES:
            raise PreconditionError(
                f"upload before download: download the round {header.round} global adapter first (state {part.state.value})"
            )
        check_header(header, part, max_upload_bytes=self._server.max_upload_bytes, homogeneous=self._homogeneous)
        previous = self._uploading.get(client_id)
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
        writer = self._blobs.open_writer(update_relpath(header.round, client_id))
        session = UploadSession(header, part, writer, max_chunk_bytes=self._server.max_chunk_bytes, pool=self._writers())
        self._uploading[client_id] = session
        if part.state is not ParticipantState.UPLOADING:
            self._store.put_participant(replace(part, state=ParticipantState.UPLOADING))
            self._hooks.notify()
        return session

    def _reject_duplicate(self, client_id: str, round_no: int) -> None:
        if round_no >= 2**63:
            return  # no such round (SQLite integers are signed 64-bit); the round check refuses it
        receipt = self._store.get_receipt(round_no, client_id)
        if receipt is not None:
            raise DuplicateError(
                f"an update for round {round_no} was already accepted from this client "
                f"(receipt {receipt.receipt_id}, sha256 {receipt.sha256})"
            )

    def _abort(self, session: UploadSession) -> None:
        session.abort()
        if self._uploading.get(session.client_id) is session:
            del self._uploading[session.client_id]
            self._revert_uploading(session)

    def _revert_uploading(self, session: UploadSession) -> None:
        part = self._store.get_participant(session.round, session.client_id)
        if (
            part is not None
            and part.state is ParticipantState.UPLOADING
            and self._store.get_receipt(session.round, session.client_id) is None
        ):
            self._store.put_participant(replace(part, state=ParticipantState.TRAINING))
            self._hooks.notify()

    async def _accept(self, session: UploadSession, adapter: Adapter) -> Receipt:
        header = session.header
        try:
            async with self._hooks.round_lock:
                self._reject_duplicate(session.client_id, session.round)
                part = self._hooks.participant(session.client_id, session.round)
                relpath = await asyncio.to_thread(session.commit)
                receipt = Receipt(
                    round=session.round, client_id=session.client_id, receipt_id="r-" + secrets.token_hex(8),
                    rank=header.rank, num_examples=header.num_examples, nbytes=session.received,
                    sha256=header.sha256, blob_path=relpath, accepted_at=self._hooks.clock(), metrics=header.metrics,
                )
                client = self._hooks.client(session.client_id)
                try:
                    self._record_receipt(receipt, part, client, session)
                except BaseException:
                    self._blobs.delete(relpath)  # no receipt, so no file either
                    raise
                accumulator = self._hooks.accumulator()
                if accumulator is None:
                    raise RuntimeError(f"round {session.round} is open but has no accumulator")
                try:
                    await asyncio.to_thread(accumulator.fold, adapter, float(header.num_examples))
                except Exception as exc:  # validated input should always fold: a bug, not a client error
                    log.exception("could not fold an accepted update", extra={"round": session.round})
                    self._hooks.fold_failed(f"{session.client_id}: {exc}")
        except BaseException:
            session.abort()  # a no-op once committed
            self._revert_uploading(session)
            raise
        finally:
            if self._uploading.get(session.client_id) is session:
                del self._uploading[session.client_id]
        log.info("update accepted", extra={
            "round": session.round, "client_id": session.client_id, "rank": header.rank, "bytes": session.received,
        })
        self._hooks.notify()
        return receipt

    def _record_receipt(self, receipt: Receipt, part: Participant, client: ClientRecord, session: UploadSession) -> None:
        header = session.header
        with self._store.transaction():
            self._store.add_receipt(receipt)
            self._store.put_participant(replace(
                part, state=ParticipantState.UPLOADED, bytes_up=part.bytes_up + session.received,
                num_examples=header.num_examples, metrics=header.metrics,
            ))
            self._store.upsert_client(replace(
                client, rounds_completed=client.rounds_completed + 1, deadlines_missed=0,
                last_seen_at=self._hooks.clock(),
            ))
