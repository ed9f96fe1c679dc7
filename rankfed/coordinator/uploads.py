"""One client-streamed upload: header checks, ordered chunks to a temporary blob, digest
and content validation. Nothing becomes visible (no receipt, no final file) until the
ingest (`rankfed.coordinator.ingest`) commits it; an aborted session removes its file.

Writing and hashing happen on a shared pool of writer threads, a few chunks behind the
network, never on the event loop: `os.write` and `hashlib` release the GIL on large
buffers, so the loop keeps receiving (and serving every other device) while a second core
writes and hashes. Each session is a *strand* on that pool: at most one thread works on
it at a time, so its chunks reach the file in order, and a thousand concurrent uploads
need a handful of threads, not a thousand.

Per chunk the event loop only appends a buffer to a deque; it suspends (one wake-up from
the writer thread) only when more than `WINDOW` chunks wait to be written. That bounds a
stream's memory to `WINDOW` chunks plus the one gRPC is receiving.

A session moves STREAMING -> SEALED (every byte arrived; being verified, fsynced, folded)
-> DONE, or to ABORTED from anywhere before DONE, or from STREAMING to PARKED: its stream
broke (or a retry of the same device replaced it, `supersede`), and `park()` keeps the
bytes written so far on disk for a resume (rankfed.coordinator.staging). A retry may
replace a STREAMING session only: once sealed, the first stream's bytes are complete and
it finishes, so exactly one of the two ever counts (see `rankfed.coordinator.ingest`).
A resumed session starts at `start` bytes: its first chunk's offset.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
import math
import mmap
import os
import re
import threading
from concurrent.futures import Executor
from pathlib import Path

from rankfed.aggregation import Adapter, AdapterError, AdapterSpec, decode_adapter
from rankfed.aggregation.adapter import lora_scaling
from rankfed.coordinator.errors import (
    InvalidArgumentError,
    PreconditionError,
    TooLargeError,
)
from rankfed.coordinator.models import Participant
from rankfed.coordinator.store import BlobWriter
from rankfed.protocol import LoraSettings, UploadHeader
from rankfed.protocol.limits import MAX_NUM_EXAMPLES

log = logging.getLogger("rankfed.coordinator")

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
WINDOW = 2  # chunks queued for the writer per stream before the stream waits
# An honest alpha differs from the expected one only by float rounding: the edge client
# reads it back from peft (a Python float) or recomputes it when pruning (s * r).
_ALPHA_RTOL = 1e-6


def check_header(
    header: UploadHeader, participant: Participant, *, max_upload_bytes: int, homogeneous: bool = False
) -> None:
    """Reject a header that cannot describe an acceptable update, before any byte is stored.

    `homogeneous`: the rule averages A and B as they are (fedit, personalized mode), so the
    update must be at exactly the assigned rank, not below it."""
    if header.rank < 1:
        raise InvalidArgumentError(f"upload header declares rank {header.rank}; ranks start at 1")
    if homogeneous and header.rank != participant.rank:
        raise InvalidArgumentError(
            f"upload declares rank {header.rank}; this federation averages adapters of one rank, "
            f"so upload at the assigned rank {participant.rank} (no pruning)"
        )
    if header.rank > participant.rank:
        raise InvalidArgumentError(
            f"upload declares rank {header.rank} but this client was assigned rank {participant.rank} "
            f"for round {participant.round}; train at the assigned rank"
        )
    if header.total_bytes == 0:
        raise InvalidArgumentError("upload header declares total_bytes 0; send the size of the safetensors file")
    if header.total_bytes > max_upload_bytes:
        raise TooLargeError(
            f"upload of {header.total_bytes} bytes exceeds the coordinator's cap of {max_upload_bytes} bytes "
            "(server.max_upload_bytes)"
        )
    if not _SHA256_HEX.fullmatch(header.sha256):
        raise InvalidArgumentError("upload header sha256 must be 64 lowercase hex digits of the whole file")
    if not 1 <= header.num_examples <= MAX_NUM_EXAMPLES:
        raise InvalidArgumentError(
            f"upload header num_examples must be between 1 and {MAX_NUM_EXAMPLES} (the size of the local "
            f"training set), got {header.num_examples}"
        )


def check_lora_config(adapter: Adapter, assigned: LoraSettings) -> None:
    """Refuse an update whose LoRA configuration is not the one this client was assigned.

    The aggregation weighs every module by its scaling (alpha / r, or alpha / sqrt(r) with
    rsLoRA), so a client that declares another alpha multiplies its own update, e.g. by 1000.
    What an honest client uploads: the downloaded adapter has every module at the assigned
    rank R with the assigned alpha; it trains that adapter as is, and HetLoRA's self-pruning
    (`rankfed.aggregation.redistribute.truncate`, called by the edge client's
    GlobalStrategy) keeps the first r < R components *and the scaling*, setting alpha to
    s * r (s * sqrt(r) with rsLoRA). So per module, at whatever rank r ≤ R it has, alpha must
    be s_assigned * r (resp. * sqrt(r)) with s_assigned = alpha_R / R (resp. / sqrt(R)):
    at r = R that is the assigned alpha itself. use_rslora must be the assignment's: it
    changes how the same alpha scales. (Module set, dense tensors, shapes and wire dtypes
    are checked by the decoder and the manifest's AdapterSpec before this.)"""
    if adapter.use_rslora != assigned.use_rslora:
        raise InvalidArgumentError(
            f"update metadata use_rslora is {str(adapter.use_rslora).lower()} but this client was assigned "
            f"use_rslora={str(assigned.use_rslora).lower()} (alpha rule {assigned.alpha_rule.value}); "
            "train with the LoRA settings of the task's assignment"
        )
    scaling = lora_scaling(assigned.alpha, assigned.rank, assigned.use_rslora)
    for name, module in adapter.modules.items():
        expected = scaling * (math.sqrt(module.rank) if assigned.use_rslora else module.rank)
        if not math.isclose(module.alpha, expected, rel_tol=_ALPHA_RTOL):
            pruned = (
                f"; at rank {module.rank} (pruned from {assigned.rank}) the scaling "
                f"{'alpha/sqrt(r)' if assigned.use_rslora else 'alpha/r'} = {scaling:g} is kept"
                if module.rank != assigned.rank else ""
            )
            raise InvalidArgumentError(
                f"{name}: lora_alpha {module.alpha:g} at rank {module.rank} does not match the assignment "
                f"(rank {assigned.rank}, lora_alpha {assigned.alpha:g}), which gives lora_alpha {expected:g}"
                f"{pruned}; train with the assigned alpha"
            )


class SessionState(enum.Enum):
    STREAMING = "streaming"  # chunks are arriving
    SEALED = "sealed"  # the stream ended: verify, commit, receipt and fold are under way
    DONE = "done"  # committed: the file is the update's, a receipt exists or is being written
    PARKED = "parked"  # the stream broke or was replaced: the bytes written so far are kept
    ABORTED = "aborted"  # rejected (or broken with nothing to keep): the temporary file is gone


class UploadSession:
    def __init__(
        self, header: UploadHeader, participant: Participant, writer: BlobWriter, *,
        max_chunk_bytes: int, pool: Executor, start: int = 0,
    ) -> None:
        self.header = header
        self.participant = participant
        self._writer = writer
        self._max_chunk = max_chunk_bytes
        self._pool = pool
        self._loop = asyncio.get_running_loop()
        self.start = start  # bytes kept from an earlier stream of this upload (a resume)
        self.received = start
        self._committed: Path | None = None  # the published file, after commit()
        self.state = SessionState.STREAMING
        self.superseded = False  # a retry from the same client replaced this stream
        # Shared with the writer thread, under _lock: chunks not yet written, whether a
        # thread is draining them, the first write error, and the loop's wait for room.
        self._lock = threading.Lock()
        self._queue: collections.deque[memoryview] = collections.deque()
        self._running = False
        self._closed = False  # aborted: the draining thread drops the rest and the file
        self._error: BaseException | None = None
        self._room: asyncio.Future[None] | None = None
        self._room_at = 0  # _room resolves once at most this many chunks are queued
        self._parking: asyncio.Future[int] | None = None  # park()'s outcome, shared by its callers

    @property
    def client_id(self) -> str:
        return self.participant.client_id

    @property
    def round(self) -> int:
        return self.header.round

    # ---------------------------------------------------------------- event loop side

    async def add_chunk(self, offset: int, data: bytes | memoryview) -> None:
        if self.superseded:
            raise PreconditionError("this upload was replaced by a newer one from the same client")
        if self.state is not SessionState.STREAMING:
            raise PreconditionError(f"this upload is {self.state.value}; it takes no more chunks")
        size = len(data)
        if offset != self.received:
            raise InvalidArgumentError(
                f"chunk at offset {offset} does not follow the {self.received} bytes received so far; "
                "send chunks in order without gaps"
            )
        if size > self._max_chunk:
            raise TooLargeError(f"chunk of {size} bytes exceeds max_chunk_bytes {self._max_chunk}")
        if not size:
            raise InvalidArgumentError(f"empty chunk at offset {offset}")
        if self.received + size > self.header.total_bytes:
            raise InvalidArgumentError(
                f"upload is longer than the {self.header.total_bytes} bytes declared in its header"
            )
        self._raise_write_error()
        view = data if isinstance(data, memoryview) else memoryview(data)  # no copy: the writer reads it
        with self._lock:
            self._queue.append(view)
            start, self._running = not self._running, True
            backlog = len(self._queue)
        if start:
            self._pool.submit(self._drain)
        self.received += size
        if backlog > WINDOW:
            await self._wait_backlog(WINDOW)
            if self.superseded:
                raise PreconditionError("this upload was replaced by a newer one from the same client")

    async def seal(self) -> None:
        """The stream ended: wait until every chunk is on the file (the writer's error,
        e.g. disk full, is raised here). From now on no retry can replace this upload."""
        if self.superseded:
            raise PreconditionError("this upload was replaced by a newer one from the same client")
        if self.state is not SessionState.STREAMING:
            raise PreconditionError(f"this upload is {self.state.value}")
        self.state = SessionState.SEALED
        await self._wait_backlog(0)
        self._raise_write_error()
        if self.state is SessionState.ABORTED:
            raise PreconditionError("this upload was aborted while its last chunks were written")

    async def _wait_backlog(self, most: int) -> None:
        """Until at most `most` chunks wait for the writer (0: and it is idle). Two may wait
        at once (the stream's handler, and park() from a retry): they share one future at
        the lower mark and each looks again when it resolves."""
        while True:
            with self._lock:
                if self._error is not None or (len(self._queue) <= most and (most or not self._running)):
                    return
                if self._room is None or self._room.done():
                    self._room, self._room_at = self._loop.create_future(), most
                else:
                    self._room_at = min(self._room_at, most)
                room = self._room
            await room

    def _raise_write_error(self) -> None:
        if self._error is not None:
            raise self._error

    # ---------------------------------------------------------------- writer thread side

    def _drain(self) -> None:
        """Write and hash queued chunks in order until the queue is empty (a pool thread)."""
        while True:
            with self._lock:
                if not self._queue or self._closed or self._error is not None:
                    self._running = False
                    self._queue.clear()
                    closed = self._closed
                    self._wake_locked()
                    break
                data = self._queue[0]
            try:
                self._writer.write(data)
            except BaseException as exc:  # noqa: BLE001 - StorageError, or a writer aborted under us
                with self._lock:
                    self._error = exc
                continue
            with self._lock:
                if self._queue and self._queue[0] is data:  # abort() may have emptied the queue meanwhile
                    self._queue.popleft()
                if self._room is not None and len(self._queue) <= self._room_at and self._room_at:
                    self._wake_locked()
        if closed:
            self._writer.abort()  # after the last write: never close the file under a write

    def _wake_locked(self) -> None:
        room, self._room = self._room, None
        if room is not None:
            self._loop.call_soon_threadsafe(_resolve, room)

    # ---------------------------------------------------------------- verify, commit, abort

    def verify(self, spec: AdapterSpec, *, assigned: LoraSettings, homogeneous: bool = False) -> Adapter:
        """Check completeness, digest and content (after seal()); return the decoded adapter.

        `assigned`: the LoRA settings of this client's assignment (`check_lora_config`).

        The adapter is decoded from a read-only mapping of the staged file, populated in one
        call (MAP_POPULATE: one fault per page costs more than the copy it avoids on this
        kind of VM): float32 tensors are views of the page cache, not copies. The mapping
        lives as long as they do."""
        if self.received != self.header.total_bytes:
            raise InvalidArgumentError(
                f"upload ended after {self.received} of {self.header.total_bytes} declared bytes (truncated)"
            )
        digest = self._writer.sha256_hex()
        if digest != self.header.sha256:
            raise InvalidArgumentError(
                f"sha256 of the received bytes is {digest}, header declared {self.header.sha256}; "
                "the file was corrupted in transit or the header is wrong"
            )
        with open(self._writer.temp_path, "rb") as fh:
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            view = mmap.mmap(fh.fileno(), 0, flags=flags, prot=mmap.PROT_READ)
        try:
            adapter = decode_adapter(memoryview(view), spec=spec, max_rank=self.participant.rank)
        except AdapterError as exc:
            raise InvalidArgumentError(f"update rejected: {exc}") from exc
        ranks = adapter.ranks
        if max(ranks.values()) != self.header.rank:
            raise InvalidArgumentError(
                f"upload header declares rank {self.header.rank} but the adapter's largest rank is {max(ranks.values())}"
            )
        if homogeneous:
            for name, rank in ranks.items():
                if rank != self.header.rank:
                    raise InvalidArgumentError(
                        f"{name} has rank {rank}; this federation averages adapters of one rank: "
                        f"every module must have rank {self.header.rank}"
                    )
        check_lora_config(adapter, assigned)
        return adapter

    def sync(self) -> None:
        """fsync the verified bytes (after seal()) before commit() takes the round's lock;
        commit() fsyncs again, so the receipt still follows a complete fsync."""
        self._writer.sync()

    def commit(self) -> str:
        """fsync and publish the blob (after seal()); returns its path relative to the blob root."""
        self._committed = self._writer.commit()
        self.state = SessionState.DONE
        return self._writer.relpath

    def drop_cache(self) -> None:
        """Once folded, nothing reads the update again (only a crash resume would): let the
        kernel take back its page-cache pages now. Writing into pages just freed costs
        ~0.3 ms/MiB on the benchmark VM, into never-used ones ~1.8 ms/MiB (a fault per page
        in the hypervisor); it also keeps the coordinator's memory flat across rounds."""
        if self._committed is None:
            return
        try:
            fd = os.open(self._committed, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        except (OSError, AttributeError):  # gone already, or no posix_fadvise on this platform
            pass

    def supersede(self) -> None:
        """Give way to a newer stream of the same client (STREAMING only): its next chunk or
        its end fails with FAILED_PRECONDITION. The caller parks it (its bytes are kept)."""
        assert self.state is SessionState.STREAMING, self.state
        self.superseded = True

    async def park(self) -> int:
        """Stop taking chunks and keep what arrived: wait until the queued chunks are
        written, fsync and close the file (kept in place). Returns the bytes kept, every
        one on disk; 0 when nothing can be kept (none arrived, a write failed, aborted):
        then the file is gone. Idempotent; callers share one outcome. Only a STREAMING
        session parks; any other answers 0 (and keeps its course)."""
        if self._parking is None:
            if self.state is not SessionState.STREAMING:
                return 0
            self.state = SessionState.PARKED
            self._parking = asyncio.ensure_future(self._park())
        return await asyncio.shield(self._parking)

    async def _park(self) -> int:
        await self._wait_backlog(0)
        if self._error is not None or self._closed or self.received == self.start == 0:
            self._drop_file()
            return 0
        try:
            return await asyncio.to_thread(self._writer.suspend)
        except Exception:  # noqa: BLE001 - a failed fsync (the writer removed the file) or a closed writer
            log.warning("could not keep a broken upload's bytes", exc_info=True,
                        extra={"client_id": self.client_id, "round": self.round})
            self._drop_file()
            return 0

    def _drop_file(self) -> None:
        self.state = SessionState.ABORTED
        with self._lock:
            self._closed = True
            self._queue.clear()
            busy = self._running
        if not busy:
            self._writer.abort()

    def abort(self) -> None:
        """Drop the chunks not yet written and the temporary file. Idempotent; a no-op once
        committed or parked. Never blocks: a write in progress finishes on its thread,
        which then removes the file."""
        if self.state in (SessionState.DONE, SessionState.PARKED):
            return
        self.state = SessionState.ABORTED
        with self._lock:
            self._closed = True
            self._queue.clear()
            busy = self._running
            self._wake_locked()
        if not busy:
            self._writer.abort()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
