"""The safetensors codec: round trips in three dtypes and every malformed input named."""

import json
import struct

import numpy as np
import pytest
import safetensors.numpy

from rankfed.aggregation import (
    AdapterError,
    AdapterFormatError,
    AdapterValidationError,
    decode_adapter,
    encode_adapter,
    read_adapter_metadata,
    write_adapter,
)
from rankfed.aggregation.dtypes import bf16_bits_from_f32, f32_from_bf16_bits
from tests.aggregation.helpers import SPEC, random_adapter

KEY_A = "base_model.model.enc.q.lora_A.weight"


def raw_file(header: dict, data: bytes = b"") -> bytes:
    body = json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + data


def tampered(adapter, edit):
    """Re-serialise with safetensors itself after ``edit(tensors, metadata)``."""
    blob = encode_adapter(adapter)
    tensors = safetensors.numpy.load(blob)
    meta = read_adapter_metadata(blob)
    edit(tensors, meta)
    return safetensors.numpy.save(tensors, metadata=meta)


@pytest.mark.parametrize("dtype,tol", [("float32", 0), ("float16", 1e-3), ("bfloat16", 8e-3)])
def test_round_trip(dtype, tol):
    adapter = random_adapter(SPEC, {"enc.q": 2, "enc.v": 4, "dec.o": 1}, alpha=16.0, use_rslora=True, seed=3)
    blob = encode_adapter(adapter, dtype=dtype, metadata={"base_model": "tiny", "round": "3"})
    back = decode_adapter(blob, spec=SPEC, max_rank=4)
    assert back.ranks == adapter.ranks and back.alphas == adapter.alphas and back.use_rslora
    for name, m in adapter.modules.items():
        assert back.modules[name].a.dtype == np.float32
        np.testing.assert_allclose(back.modules[name].a, m.a, rtol=tol, atol=tol)
        np.testing.assert_allclose(back.modules[name].b, m.b, rtol=tol, atol=tol)
    for name, v in adapter.dense.items():
        np.testing.assert_allclose(back.dense[name], v, rtol=tol, atol=tol)
    meta = read_adapter_metadata(blob)
    assert meta["format"] == "rankfed-adapter/1" and meta["base_model"] == "tiny"
    assert json.loads(meta["ranks"]) == adapter.ranks
    assert json.loads(meta["alphas"]) == adapter.alphas and meta["use_rslora"] == "true"


def test_keys_are_peft_keys_and_readable_by_safetensors():
    adapter = random_adapter(SPEC, 2)
    tensors = safetensors.numpy.load(encode_adapter(adapter))
    assert KEY_A in tensors and "base_model.model.enc.q.lora_B.weight" in tensors
    assert "base_model.model.classifier.bias" in tensors
    assert tensors[KEY_A].shape == (2, 5)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_streamed_bytes_are_encode_adapters_and_safetensors_reads_them(dtype):
    """write_adapter streams exactly encode_adapter's bytes; safetensors reads them and finds
    the tensors and metadata its own serializer writes (whose metadata order varies)."""
    adapter = random_adapter(SPEC, {"enc.q": 2, "enc.v": 4, "dec.o": 1}, alpha=16.0, seed=5)
    meta = {"round": "7", "base_model_id": "tiny-ü", "z": "last", "a": "first"}
    chunks: list[bytes] = []
    n = write_adapter(adapter, lambda view: chunks.append(bytes(view)), dtype=dtype, metadata=meta)
    blob = encode_adapter(adapter, dtype=dtype, metadata=meta)
    assert b"".join(chunks) == blob and n == len(blob)
    assert blob == encode_adapter(adapter, dtype=dtype, metadata=dict(reversed(meta.items())))  # deterministic
    assert len(chunks) == 1 + 2 * len(adapter.modules) + len(adapter.dense)  # header, then tensor by tensor
    (header_len,) = struct.unpack("<Q", blob[:8])
    assert header_len % 8 == 0
    ours = safetensors.deserialize(blob)
    buffers = {key: np.frombuffer(t["data"], np.uint8) for key, t in ours}
    theirs_blob = bytes(safetensors.serialize(
        {key: safetensors.TensorSpec(dtype=dtype, shape=list(t["shape"]), data_ptr=buffers[key].ctypes.data,
                                     data_len=buffers[key].nbytes) for key, t in ours},
        metadata=read_adapter_metadata(blob),
    ))
    assert dict(safetensors.deserialize(theirs_blob)) == dict(ours)
    assert read_adapter_metadata(theirs_blob) == read_adapter_metadata(blob)
    (theirs_len,) = struct.unpack("<Q", theirs_blob[:8])
    assert theirs_blob[8 + theirs_len:] == blob[8 + header_len:]  # the same data section
    if dtype == "float32":
        tensors = safetensors.numpy.load(blob)
        np.testing.assert_array_equal(tensors[KEY_A], adapter.modules["enc.q"].a)


def test_bf16_bits_match_torch():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).normal(size=10_000).astype(np.float32) * 1e3
    x[:4] = [0.0, -0.0, 1.00390625, 1.01171875]  # exact ties round to even
    ours = bf16_bits_from_f32(x)
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(
        f32_from_bf16_bits(ours), torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    )


def test_decode_reads_bf16_written_by_torch():
    torch = pytest.importorskip("torch")
    import safetensors.torch

    adapter = random_adapter(SPEC, 3)
    tensors = {k: torch.from_numpy(v.copy()).to(torch.bfloat16) for k, v in safetensors.numpy.load(encode_adapter(adapter)).items()}
    blob = safetensors.torch.save(tensors, metadata=read_adapter_metadata(encode_adapter(adapter)))
    back = decode_adapter(blob, spec=SPEC)
    for k, t in tensors.items():
        if k == KEY_A:
            np.testing.assert_array_equal(back.modules["enc.q"].a, t.float().numpy())


@pytest.mark.parametrize(
    "blob,match",
    [
        (b"", "truncated"),
        (b"\x01" * 7, "truncated"),
        (struct.pack("<Q", 2**63) + b"{}", "exceeds the limit"),
        (struct.pack("<Q", 100) + b"{}", "truncated"),
        (raw_file({"a": 1})[:-1] + b"!", "not valid JSON"),
        (raw_file([1, 2]), "not a JSON object"),
    ],
)
def test_malformed_headers(blob, match):
    with pytest.raises(AdapterFormatError, match=match) as info:
        decode_adapter(blob)
    assert info.value.key is None


def test_header_limit_is_checked_before_parsing():
    blob = encode_adapter(random_adapter(SPEC, 2))
    with pytest.raises(AdapterFormatError, match="exceeds the limit"):
        decode_adapter(blob, max_header_bytes=64)
    with pytest.raises(AdapterFormatError, match="exceeds the limit"):
        read_adapter_metadata(blob, max_header_bytes=64)


def test_truncated_and_trailing_data():
    blob = encode_adapter(random_adapter(SPEC, 2))
    with pytest.raises(AdapterFormatError, match="truncated"):
        decode_adapter(blob[:-1])
    with pytest.raises(AdapterFormatError, match="trailing"):
        decode_adapter(blob + b"\0")


def test_offsets_must_tile_the_data():
    meta = {"format": "rankfed-adapter/1", "ranks": "{}", "alphas": "{}", "use_rslora": "false"}
    gap = {"__metadata__": meta, "base_model.model.x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}
    with pytest.raises(AdapterFormatError, match="gap") as info:
        decode_adapter(raw_file(gap, b"\0" * 8))
    assert info.value.key == "base_model.model.x"
    bad = {"__metadata__": meta, "base_model.model.x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}
    with pytest.raises(AdapterFormatError, match="do not match shape"):
        decode_adapter(raw_file(bad, b"\0" * 8))


def test_unsupported_dtype_names_the_key():
    meta = {"format": "rankfed-adapter/1", "ranks": "{}", "alphas": "{}", "use_rslora": "false"}
    header = {"__metadata__": meta, "base_model.model.x": {"dtype": "F64", "shape": [1], "data_offsets": [0, 8]}}
    with pytest.raises(AdapterFormatError, match="unsupported dtype") as info:
        decode_adapter(raw_file(header, b"\0" * 8))
    assert info.value.key == "base_model.model.x"


def test_non_finite_values_name_the_key():
    def poison(tensors, meta):
        tensors[KEY_A][0, 0] = np.nan

    with pytest.raises(AdapterFormatError, match="non-finite") as info:
        decode_adapter(tampered(random_adapter(SPEC, 2), poison))
    assert info.value.key == KEY_A


@pytest.mark.parametrize(
    "edit,match,key",
    [
        (lambda t, m: t.pop("base_model.model.enc.q.lora_B.weight"), "lora_A without lora_B", KEY_A),
        (lambda t, m: t.pop(KEY_A), "lora_B without lora_A", "base_model.model.enc.q.lora_B.weight"),
        (lambda t, m: m.pop("alphas"), "'alphas' is missing", "alphas"),
        (lambda t, m: m.update(alphas=json.dumps({"enc.v": 8.0, "dec.o": 8.0})), "no alpha", "enc.q"),
        (lambda t, m: m.update(alphas="{oops"), "not valid JSON", "alphas"),
        (lambda t, m: m.update(format="other/2"), "format", "format"),
        (lambda t, m: m.update(use_rslora="yes"), "use_rslora", "use_rslora"),
        (lambda t, m: m.update(ranks=json.dumps({"enc.q": 3, "enc.v": 2, "dec.o": 2})), "metadata rank", "enc.q"),
        (lambda t, m: t.update({"enc.q.lora_A.weight": t.pop(KEY_A)}), "does not start with", "enc.q.lora_A.weight"),
        (
            lambda t, m: t.update({"base_model.model.enc.q.lora_A.default.weight": t.pop(KEY_A)}),
            "unexpected LoRA key",
            "base_model.model.enc.q.lora_A.default.weight",
        ),
        (
            lambda t, m: t.update({KEY_A: t[KEY_A][:1]}),
            "lora_A rank 1 != lora_B rank 2",
            "enc.q",
        ),
    ],
)
def test_format_errors_name_the_key(edit, match, key):
    with pytest.raises(AdapterFormatError, match=match) as info:
        decode_adapter(tampered(random_adapter(SPEC, 2), edit))
    assert info.value.key == key


def test_validation_against_spec_and_max_rank():
    blob = encode_adapter(random_adapter(SPEC, 4))
    with pytest.raises(AdapterValidationError, match="exceeds max_rank") as info:
        decode_adapter(blob, spec=SPEC, max_rank=3)
    assert info.value.key in SPEC.modules
    with pytest.raises(AdapterValidationError, match="outside 1..3"):
        decode_adapter(blob, max_rank=3)
    other = type(SPEC)(modules={**SPEC.modules, "extra.m": (2, 2)}, dense=SPEC.dense)
    with pytest.raises(AdapterValidationError, match="missing LoRA module 'extra.m'"):
        decode_adapter(blob, spec=other)


def test_encode_refuses_non_finite_and_overflow():
    adapter = random_adapter(SPEC, 2)
    big = type(adapter)(
        modules={**adapter.modules, "enc.q": type(adapter.modules["enc.q"])(
            a=adapter.modules["enc.q"].a * 1e5, b=adapter.modules["enc.q"].b, alpha=8.0)},
        dense=adapter.dense,
    )
    with pytest.raises(AdapterValidationError, match="overflow float16") as info:
        encode_adapter(big, dtype="float16")
    assert info.value.key == KEY_A
    encode_adapter(big, dtype="bfloat16")  # bf16 has float32's range
    with pytest.raises(ValueError, match="reserved"):
        encode_adapter(adapter, metadata={"ranks": "x"})
    with pytest.raises(ValueError, match="unsupported dtype"):
        encode_adapter(adapter, dtype="float64")


def test_decode_accepts_memoryview_and_copies_mutable_buffers():
    adapter = random_adapter(SPEC, 2)
    buffer = bytearray(encode_adapter(adapter))
    back = decode_adapter(memoryview(buffer))
    before = back.modules["enc.q"].a.copy()
    buffer[-200:] = b"\0" * 200
    np.testing.assert_array_equal(back.modules["enc.q"].a, before)


@pytest.mark.parametrize("header", [
    b"[" * 100_000 + b"]" * 100_000,  # nesting that exhausts the JSON parser's recursion
    b'{"a": ' + b"1" * 6000 + b"}",  # an integer longer than Python converts
    json.dumps({"__metadata__": {"format": "rankfed-adapter/1", "ranks": "[" * 50_000 + "]" * 50_000}}).encode(),
    json.dumps({"__metadata__": {"format": "rankfed-adapter/1", "ranks": '{"x": ' + "7" * 6000 + "}"}}).encode(),
], ids=["deep-header", "long-integer", "deep-metadata", "long-integer-metadata"])
def test_hostile_headers_are_adapter_errors(header: bytes) -> None:
    """Found by a hostile client: these escaped the decoder as RecursionError/ValueError (INTERNAL)."""
    import struct

    with pytest.raises(AdapterError):
        decode_adapter(struct.pack("<Q", len(header)) + header + b"\0" * 8)
