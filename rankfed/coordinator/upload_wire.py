"""The request deserializer of UploadUpdate: a chunk's bytes as a view of the received
message, not a copy.

Why: the generated parser copies a chunk twice (wire bytes into the message, then out
again on `.chunk.data`) before the coordinator writes it once more; at 1 MiB per message
that is most of a bare gRPC server's cost (bench/transfer_bench.py). An UploadMessage
holding a chunk is tiny on the wire: tag 0x12 (field 2, length-delimited), a varint
length, then the Chunk: `offset` (field 1, varint) and `data` (field 2, bytes). Exactly
that shape is read here; anything else (the header, unknown or repeated fields, another
field order than the two handled) goes to the generated parser, so the semantics stay
those of protobuf. Malformed bytes never raise out of the deserializer (gRPC would answer
INTERNAL): they become a `Malformed` message the servicer rejects with INVALID_ARGUMENT.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import DecodeError

from rankfed.v1 import edge_pb2 as ProtoEdge


@dataclass(frozen=True, slots=True)
class RawChunk:
    offset: int
    data: memoryview  # a read-only view of the gRPC message's bytes


@dataclass(frozen=True, slots=True)
class Malformed:
    reason: str


UploadPart = RawChunk | ProtoEdge.UploadMessage | Malformed


def _varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """(value, next position); ValueError past `end` or beyond 64 bits."""
    value = shift = 0
    while pos < end and shift < 64:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise ValueError("bad varint")


def _fast_chunk(buf: bytes) -> RawChunk | None:
    """The chunk, when `buf` is exactly UploadMessage{chunk: Chunk{offset?, data?}} with
    each field at most once; None for any other shape."""
    end = len(buf)
    if end < 2 or buf[0] != 0x12:
        return None
    length, pos = _varint(buf, 1, end)
    if pos + length != end:
        return None  # more top-level fields follow: let protobuf merge them
    offset, data_at, data_len = 0, pos, 0
    seen_offset = seen_data = False
    while pos < end:
        tag = buf[pos]
        pos += 1
        if tag == 0x08 and not seen_offset:
            offset, pos = _varint(buf, pos, end)
            seen_offset = True
        elif tag == 0x12 and not seen_data:
            data_len, pos = _varint(buf, pos, end)
            if pos + data_len > end:
                return None
            data_at, pos = pos, pos + data_len
            seen_data = True
        else:
            return None
    return RawChunk(offset=offset & (2**64 - 1), data=memoryview(buf)[data_at : data_at + data_len])


def upload_message_from_bytes(buf: bytes) -> UploadPart:
    """gRPC request deserializer for UploadUpdate; never raises."""
    try:
        chunk = _fast_chunk(buf)
    except ValueError:
        chunk = None
    if chunk is not None:
        return chunk
    try:
        return ProtoEdge.UploadMessage.FromString(buf)
    except DecodeError as exc:
        return Malformed(f"upload message is not a valid rankfed.v1.UploadMessage: {exc}")
