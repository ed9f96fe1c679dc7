"""UploadUpdate's own deserializer agrees with the generated parser on every message and
never raises (a raising deserializer would make gRPC answer INTERNAL)."""

from __future__ import annotations

import random

import pytest

from rankfed.coordinator.upload_wire import Malformed, RawChunk, upload_message_from_bytes
from rankfed.v1 import common_pb2 as ProtoCommon
from rankfed.v1 import edge_pb2 as ProtoEdge


def _as_chunk(part) -> tuple[int, bytes]:
    if isinstance(part, RawChunk):
        return part.offset, bytes(part.data)
    assert isinstance(part, ProtoEdge.UploadMessage) and part.WhichOneof("kind") == "chunk"
    return part.chunk.offset, part.chunk.data


@pytest.mark.parametrize("offset", [0, 1, 127, 128, 2**32, 2**64 - 1])
@pytest.mark.parametrize("size", [0, 1, 127, 128, 70_000, 1 << 20])
def test_chunks_parse_as_views_with_the_generated_values(offset, size):
    data = random.Random(size).randbytes(size)
    wire = ProtoEdge.UploadMessage(chunk=ProtoCommon.Chunk(offset=offset, data=data)).SerializeToString()
    part = upload_message_from_bytes(wire)
    assert _as_chunk(part) == (offset, data)
    if size:
        assert isinstance(part, RawChunk)  # the fast path, not a copy through protobuf


def test_other_field_orders_and_extra_fields_fall_back_to_protobuf():
    data = b"x" * 300
    # data before offset
    inner = b"\x12" + bytes([0xAC, 0x02]) + data + b"\x08\x05"
    wire = b"\x12" + bytes([len(inner) & 0x7F | 0x80, len(inner) >> 7]) + inner
    assert _as_chunk(upload_message_from_bytes(wire)) == (5, data)
    # a repeated offset: protobuf keeps the last
    inner = b"\x08\x01\x08\x07\x12\x01z"
    assert _as_chunk(upload_message_from_bytes(b"\x12" + bytes([len(inner)]) + inner)) == (7, b"z")
    # an unknown field inside the chunk is skipped, as protobuf does
    inner = b"\x08\x03\x12\x01z\x18\x09"
    assert _as_chunk(upload_message_from_bytes(b"\x12" + bytes([len(inner)]) + inner)) == (3, b"z")


def test_header_goes_through_protobuf():
    header = ProtoEdge.UploadHeader(round=3, rank=4, num_examples=5, total_bytes=6, sha256="ab" * 32)
    part = upload_message_from_bytes(ProtoEdge.UploadMessage(header=header).SerializeToString())
    assert isinstance(part, ProtoEdge.UploadMessage) and part.header == header


@pytest.mark.parametrize("seed", range(200))
def test_garbage_never_raises(seed):
    rng = random.Random(seed)
    valid = ProtoEdge.UploadMessage(chunk=ProtoCommon.Chunk(offset=rng.randrange(2**40), data=rng.randbytes(40)))
    wire = bytearray(valid.SerializeToString())
    for _ in range(rng.randrange(1, 4)):
        wire[rng.randrange(len(wire))] = rng.randrange(256)
    wire = bytes(wire[: rng.randrange(len(wire) + 1)])
    part = upload_message_from_bytes(wire)
    assert isinstance(part, (RawChunk, ProtoEdge.UploadMessage, Malformed))
    if isinstance(part, RawChunk):  # whatever the fast path accepts, protobuf reads the same way
        assert _as_chunk(ProtoEdge.UploadMessage.FromString(wire)) == _as_chunk(part)
