"""One client-streamed upload: header checks, ordered chunks to a temporary blob, digest
and content validation. Nothing becomes visible (no receipt, no final file) until
`Federation.finish_upload` commits it; an aborted session removes its temporary file.
"""

from __future__ import annotations

import hashlib
import re

from rankfed.aggregation import Adapter, AdapterError, AdapterSpec, decode_adapter
from rankfed.coordinator.errors import InvalidUpdateError, TooLargeError
from rankfed.coordinator.models import Participant, UploadHeader
from rankfed.coordinator.store import BlobWriter

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def check_header(header: UploadHeader, participant: Participant, *, max_upload_bytes: int) -> None:
    """Reject a header that cannot describe an acceptable update, before any byte is stored."""
    if header.rank < 1:
        raise InvalidUpdateError(f"upload header declares rank {header.rank}; ranks start at 1")
    if header.rank > participant.rank:
        raise InvalidUpdateError(
            f"upload declares rank {header.rank} but this client was assigned rank {participant.rank} "
            f"for round {participant.round}; train at the assigned rank"
        )
    if header.total_bytes == 0:
        raise InvalidUpdateError("upload header declares total_bytes 0; send the size of the safetensors file")
    if header.total_bytes > max_upload_bytes:
        raise TooLargeError(
            f"upload of {header.total_bytes} bytes exceeds the coordinator's cap of {max_upload_bytes} bytes "
            "(server.max_upload_bytes)"
        )
    if not _SHA256_HEX.fullmatch(header.sha256):
        raise InvalidUpdateError("upload header sha256 must be 64 lowercase hex digits of the whole file")
    if header.num_examples < 1:
        raise InvalidUpdateError("upload header num_examples must be at least 1 (the size of the local training set)")


class UploadSession:
    def __init__(self, header: UploadHeader, participant: Participant, writer: BlobWriter, *, max_chunk_bytes: int) -> None:
        self.header = header
        self.participant = participant
        self._writer = writer
        self._max_chunk = max_chunk_bytes
        self._hash = hashlib.sha256()
        self.received = 0

    @property
    def client_id(self) -> str:
        return self.participant.client_id

    @property
    def round(self) -> int:
        return self.header.round

    def add_chunk(self, offset: int, data: bytes) -> None:
        if offset != self.received:
            raise InvalidUpdateError(
                f"chunk at offset {offset} does not follow the {self.received} bytes received so far; "
                "send chunks in order without gaps"
            )
        if len(data) > self._max_chunk:
            raise TooLargeError(f"chunk of {len(data)} bytes exceeds max_chunk_bytes {self._max_chunk}")
        if not data:
            raise InvalidUpdateError(f"empty chunk at offset {offset}")
        if self.received + len(data) > self.header.total_bytes:
            raise InvalidUpdateError(
                f"upload is longer than the {self.header.total_bytes} bytes declared in its header"
            )
        self._writer.write(data)
        self._hash.update(data)
        self.received += len(data)

    def verify(self, spec: AdapterSpec) -> Adapter:
        """Check completeness, digest and content; return the decoded adapter."""
        if self.received != self.header.total_bytes:
            raise InvalidUpdateError(
                f"upload ended after {self.received} of {self.header.total_bytes} declared bytes (truncated)"
            )
        digest = self._hash.hexdigest()
        if digest != self.header.sha256:
            raise InvalidUpdateError(
                f"sha256 of the received bytes is {digest}, header declared {self.header.sha256}; "
                "the file was corrupted in transit or the header is wrong"
            )
        # Read back what was written: the stream itself kept only one chunk in memory.
        data = self._writer.temp_path.read_bytes()
        try:
            adapter = decode_adapter(data, spec=spec, max_rank=self.participant.rank)
        except AdapterError as exc:
            raise InvalidUpdateError(f"update rejected: {exc}") from exc
        ranks = set(adapter.ranks.values())
        if max(ranks) != self.header.rank:
            raise InvalidUpdateError(
                f"upload header declares rank {self.header.rank} but the adapter's largest rank is {max(ranks)}"
            )
        return adapter

    def commit(self) -> str:
        """fsync and publish the blob; returns its path relative to the blob root."""
        self._writer.commit()
        return self._writer.relpath

    def abort(self) -> None:
        self._writer.abort()
