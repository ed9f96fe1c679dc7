"""One client-streamed upload: header checks, ordered chunks to a temporary blob, digest
and content validation. Nothing becomes visible (no receipt, no final file) until
`Federation.finish_upload` commits it; an aborted session removes its temporary file.

Writing and hashing a chunk happen on a thread of the session's own, a few chunks behind
the network: both release the GIL on large buffers, so the event loop keeps serving other
calls and the second core does the hashing. At most `WINDOW` chunks are in flight, which
bounds the memory of a stream.
"""

from __future__ import annotations

import asyncio
import collections
import mmap
import re
from concurrent.futures import Future, ThreadPoolExecutor

from rankfed.aggregation import Adapter, AdapterError, AdapterSpec, decode_adapter
from rankfed.coordinator.errors import (
    InvalidArgumentError,
    PreconditionError,
    TooLargeError,
)
from rankfed.coordinator.models import Participant
from rankfed.coordinator.store import BlobWriter
from rankfed.protocol import UploadHeader
from rankfed.protocol.limits import MAX_NUM_EXAMPLES

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
WINDOW = 2  # chunks written behind the network, per stream




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


class UploadSession:
    def __init__(self, header: UploadHeader, participant: Participant, writer: BlobWriter, *, max_chunk_bytes: int) -> None:
        self.header = header
        self.participant = participant
        self._writer = writer
        self._max_chunk = max_chunk_bytes
        self._pool: ThreadPoolExecutor | None = None
        self._pending: collections.deque[Future[None]] = collections.deque()
        self.received = 0
        self.accepting = False  # set once the core has taken over commit, receipt and fold
        self.superseded = False  # a retry from the same client replaced this stream

    @property
    def client_id(self) -> str:
        return self.participant.client_id

    @property
    def round(self) -> int:
        return self.header.round

    def supersede(self) -> None:
        """Give way to a newer stream of the same client: its next chunk fails, the file goes."""
        self.superseded = True
        self.abort()

    async def add_chunk(self, offset: int, data: bytes) -> None:
        if self.superseded:
            raise PreconditionError("this upload was replaced by a newer one from the same client")
        if offset != self.received:
            raise InvalidArgumentError(
                f"chunk at offset {offset} does not follow the {self.received} bytes received so far; "
                "send chunks in order without gaps"
            )
        if len(data) > self._max_chunk:
            raise TooLargeError(f"chunk of {len(data)} bytes exceeds max_chunk_bytes {self._max_chunk}")
        if not data:
            raise InvalidArgumentError(f"empty chunk at offset {offset}")
        if self.received + len(data) > self.header.total_bytes:
            raise InvalidArgumentError(
                f"upload is longer than the {self.header.total_bytes} bytes declared in its header"
            )
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rankfed-upload")
        self._pending.append(self._pool.submit(self._writer.write, data))  # one worker: in order
        self.received += len(data)
        while len(self._pending) > WINDOW:
            await asyncio.wrap_future(self._pending.popleft())

    async def drain(self) -> None:
        """Wait until every chunk is on the file (raises the writer's error, e.g. disk full)."""
        while self._pending:
            await asyncio.wrap_future(self._pending.popleft())

    def verify(self, spec: AdapterSpec, *, homogeneous: bool = False) -> Adapter:
        """Check completeness, digest and content (after drain()); return the decoded adapter.

        The adapter is decoded from a read-only mapping of the staged file: float32 tensors
        are views of the page cache, not copies. The mapping lives as long as they do."""
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
            view = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
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
        return adapter

    def commit(self) -> str:
        """fsync and publish the blob; returns its path relative to the blob root."""
        self._writer.commit()
        self._close_pool()
        return self._writer.relpath

    def abort(self) -> None:
        for future in self._pending:
            future.cancel()
        self._pending.clear()
        self._close_pool()  # waits for a write in progress, so the temp file can be removed
        self._writer.abort()

    def _close_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
