"""The wire format: an adapter as safetensors bytes with peft key names and RankFed metadata.

Keys are what ``peft.get_peft_model_state_dict`` produces, so the bytes saved as
``adapter_model.safetensors`` load with ``PeftModel.from_pretrained``:

* ``base_model.model.{module}.lora_A.weight`` (r, d_in) and ``...lora_B.weight`` (d_out, r)
* ``base_model.model.{dense name}`` for non-LoRA trainables (e.g. a classifier head)

Metadata (safetensors allows only ``str -> str``): ``format`` = ``rankfed-adapter/1``,
``ranks`` and ``alphas`` (JSON objects keyed by module), ``use_rslora`` (``true``/``false``),
plus whatever the caller adds (base-model id and hash, round, client).

Decoding reads the 8-byte header length first and refuses oversize headers before any
JSON is parsed; the header is then checked the way safetensors itself does (offsets tile
the data exactly), so that the tensors can be read straight out of ``data`` without a copy.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from .adapter import Adapter, AdapterSpec, LoraModule
from .dtypes import HEADER_TO_WIRE, WIRE_DTYPES, F32Array, from_wire, to_wire
from .errors import AdapterFormatError, AdapterValidationError

__all__ = [
    "FORMAT",
    "PREFIX",
    "encode_adapter",
    "write_adapter",
    "decode_adapter",
    "read_adapter_metadata",
    "lora_keys",
]

FORMAT = "rankfed-adapter/1"
PREFIX = "base_model.model."
_RESERVED = ("format", "ranks", "alphas", "use_rslora")
_A_SUFFIX = ".lora_A.weight"
_B_SUFFIX = ".lora_B.weight"
_HEADER_LEN = struct.Struct("<Q")


def lora_keys(name: str) -> tuple[str, str]:
    """The safetensors keys of module ``name``'s A and B."""
    return f"{PREFIX}{name}{_A_SUFFIX}", f"{PREFIX}{name}{_B_SUFFIX}"


def encode_adapter(
    adapter: Adapter, *, dtype: str = "float32", metadata: Mapping[str, str] | None = None
) -> bytes:
    """Serialise ``adapter`` to safetensors bytes in ``dtype`` (float32, float16, bfloat16).

    The bytes are what :func:`write_adapter` streams, joined. Raises
    :class:`AdapterValidationError` naming the key when a value is non-finite or overflows
    ``dtype`` (float16 tops out at 65504), and ``ValueError`` when the caller's metadata
    collides with a reserved key.
    """
    parts: list[bytes] = []
    write_adapter(adapter, lambda data: parts.append(bytes(data)), dtype=dtype, metadata=metadata)
    return b"".join(parts)


def write_adapter(
    adapter: Adapter,
    write: Callable[[memoryview], object],
    *,
    dtype: str = "float32",
    metadata: Mapping[str, str] | None = None,
) -> int:
    """Stream ``adapter`` as safetensors to ``write``: the header, then one tensor at a time.

    Memory beyond the adapter is one encoded tensor (none for float32, whose arrays are
    written as they are), never the whole file. Returns the number of bytes written. The
    bytes are deterministic: metadata keys sorted, tensors in safetensors' order (by name,
    all of one dtype), the header padded with spaces to 8 bytes as safetensors pads it.
    A tensor that is non-finite or overflows ``dtype`` raises
    :class:`AdapterValidationError` after the tensors before it were written: a caller
    streaming to a file discards it (``BlobStore.open_writer`` does on an exception).
    """
    if dtype not in WIRE_DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; expected one of {sorted(WIRE_DTYPES)}")
    meta: dict[str, str] = {}
    for key, text in (metadata or {}).items():
        if key in _RESERVED or key == "__metadata__":
            raise ValueError(f"metadata key {key!r} is reserved by {FORMAT}")
        if not isinstance(key, str) or not isinstance(text, str):
            raise TypeError(f"metadata must map str to str, got {key!r}: {type(text).__name__}")
        meta[key] = text
    meta["format"] = FORMAT
    meta["ranks"] = json.dumps(adapter.ranks, sort_keys=True)
    meta["alphas"] = json.dumps(adapter.alphas, sort_keys=True)
    meta["use_rslora"] = "true" if adapter.use_rslora else "false"

    tensors: dict[str, F32Array] = {}
    for name, module in adapter.modules.items():
        key_a, key_b = lora_keys(name)
        tensors[key_a] = module.a
        tensors[key_b] = module.b
    for name, value in adapter.dense.items():
        tensors[PREFIX + name] = value

    header_dtype, _, itemsize = WIRE_DTYPES[dtype]
    header: dict[str, Any] = {"__metadata__": dict(sorted(meta.items()))}
    order = sorted(tensors)  # safetensors' order for tensors of one dtype
    offset = 0
    for key in order:
        shape = [int(d) for d in tensors[key].shape]
        nbytes = math.prod(shape) * itemsize
        header[key] = {"dtype": header_dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    head += b" " * (-len(head) % 8)
    write(memoryview(_HEADER_LEN.pack(len(head)) + head))
    for key in order:
        value = tensors[key]
        if not np.isfinite(value).all():
            raise AdapterValidationError(f"{key}: non-finite values", key=key)
        encoded = to_wire(value, dtype)
        if dtype == "float16" and not np.isfinite(encoded).all():
            raise AdapterValidationError(f"{key}: values overflow float16", key=key)
        if dtype == "bfloat16" and ((encoded.view(np.uint16) & 0x7F80) == 0x7F80).any():
            raise AdapterValidationError(f"{key}: values overflow bfloat16", key=key)
        if encoded.nbytes:
            write(memoryview(encoded.data).cast("B"))  # (to_wire: C-contiguous)
    return 8 + len(head) + offset


def _parse_header(view: memoryview, max_header_bytes: int) -> tuple[dict[str, Any], int]:
    """Header JSON and the offset where the data starts, checked before anything else."""
    if len(view) < 8:
        raise AdapterFormatError(f"truncated: {len(view)} bytes, need 8 for the header length")
    (n,) = _HEADER_LEN.unpack(view[:8])
    if n > max_header_bytes:
        raise AdapterFormatError(f"header of {n} bytes exceeds the limit of {max_header_bytes}")
    if 8 + n > len(view):
        raise AdapterFormatError(f"truncated: header of {n} bytes, only {len(view) - 8} present")
    try:
        header = json.loads(bytes(view[8 : 8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterFormatError(f"header is not valid JSON: {exc}") from None
    # Hostile headers: nesting deep enough to exhaust the parser's recursion, or integers
    # longer than Python converts (4,300 digits). A header never needs either.
    except RecursionError:
        raise AdapterFormatError("header nests too deeply to be a safetensors header") from None
    except ValueError as exc:
        raise AdapterFormatError(f"header is not a valid safetensors header: {exc}") from None
    if not isinstance(header, dict):
        raise AdapterFormatError("header is not a JSON object")
    return header, 8 + n


def _metadata(header: Mapping[str, Any]) -> dict[str, str]:
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise AdapterFormatError("__metadata__ must map strings to strings", key="__metadata__")
    return dict(meta)


def read_adapter_metadata(
    data: bytes | bytearray | memoryview, *, max_header_bytes: int = 16 * 2**20
) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob, reading only its header."""
    header, _ = _parse_header(memoryview(data).cast("B"), max_header_bytes)
    return _metadata(header)


def _tensor_views(
    header: Mapping[str, Any], view: memoryview, start: int
) -> dict[str, tuple[str, tuple[int, ...], memoryview]]:
    """key -> (header dtype, shape, raw bytes), with the offsets checked like safetensors does:
    each tensor's byte range matches its shape and dtype, and the ranges tile the data
    exactly (no gap, no overlap, nothing after the last tensor)."""
    entries = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise AdapterFormatError(f"{key}: header entry is not an object", key=key)
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in HEADER_TO_WIRE:
            raise AdapterFormatError(
                f"{key}: unsupported dtype {dtype!r}; expected F32, F16 or BF16", key=key
            )
        if not (
            isinstance(shape, list)
            and all(type(d) is int and d >= 0 for d in shape)
            and isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(o) is int and o >= 0 for o in offsets)
        ):
            raise AdapterFormatError(f"{key}: malformed shape or data_offsets", key=key)
        begin, end = offsets
        itemsize = WIRE_DTYPES[HEADER_TO_WIRE[dtype]][2]
        if end - begin != math.prod(shape) * itemsize:
            raise AdapterFormatError(
                f"{key}: data_offsets {offsets} do not match shape {shape} and dtype {dtype}", key=key
            )
        entries.append((begin, end, key, dtype, tuple(shape)))
    entries.sort()
    position = 0
    out = {}
    for begin, end, key, dtype, shape in entries:
        if begin != position:
            raise AdapterFormatError(f"{key}: data_offsets leave a gap or overlap", key=key)
        position = end
        out[key] = (dtype, shape, view[start + begin : start + end])
    if start + position != len(view):
        raise AdapterFormatError(
            f"truncated or trailing bytes: data is {len(view) - start} bytes, tensors cover {position}"
        )
    return out


def _json_object(meta: Mapping[str, str], field: str) -> dict[str, Any]:
    if field not in meta:
        raise AdapterFormatError(f"metadata {field!r} is missing", key=field)
    try:
        value = json.loads(meta[field])
    except json.JSONDecodeError as exc:
        raise AdapterFormatError(f"metadata {field!r} is not valid JSON: {exc}", key=field) from None
    except (RecursionError, ValueError) as exc:  # deep nesting, over-long integers
        raise AdapterFormatError(f"metadata {field!r} is not a valid value: {type(exc).__name__}", key=field) from None
    if not isinstance(value, dict):
        raise AdapterFormatError(f"metadata {field!r} is not a JSON object", key=field)
    return value


def decode_adapter(
    data: bytes | bytearray | memoryview,
    *,
    spec: AdapterSpec | None = None,
    max_rank: int | None = None,
    max_header_bytes: int = 16 * 2**20,
) -> Adapter:
    """Parse safetensors bytes into an :class:`Adapter` of float32 arrays.

    Raises :class:`AdapterFormatError` for anything that is not a well-formed
    ``rankfed-adapter/1`` blob and :class:`AdapterValidationError` when ``spec`` or
    ``max_rank`` is given and violated. float32 tensors read from immutable ``bytes`` are
    read-only views into ``data`` (no copy); from a mutable buffer they are copied.
    """
    view = memoryview(data).cast("B")
    header, start = _parse_header(view, max_header_bytes)
    meta = _metadata(header)
    if meta.get("format") != FORMAT:
        raise AdapterFormatError(
            f"metadata format is {meta.get('format')!r}, expected {FORMAT!r}", key="format"
        )
    ranks = _json_object(meta, "ranks")
    alphas = _json_object(meta, "alphas")
    rslora = meta.get("use_rslora")
    if rslora not in ("true", "false"):
        raise AdapterFormatError(f"metadata use_rslora is {rslora!r}, expected true/false", key="use_rslora")

    tensors: dict[str, F32Array] = {}
    for key, (dtype, shape, raw) in _tensor_views(header, view, start).items():
        if not key.startswith(PREFIX):
            raise AdapterFormatError(f"{key}: key does not start with {PREFIX!r}", key=key)
        array = from_wire(raw, dtype, shape)
        if not view.readonly and dtype == "F32":
            array = array.copy()  # a mutable buffer could change under a zero-copy view
        if not np.isfinite(array).all():
            raise AdapterFormatError(f"{key}: non-finite values", key=key)
        tensors[key] = array

    modules: dict[str, LoraModule] = {}
    dense: dict[str, F32Array] = {}
    for key, array in tensors.items():
        if key.endswith(_B_SUFFIX):
            name = key[len(PREFIX) : -len(_B_SUFFIX)]
            if lora_keys(name)[0] not in tensors:
                raise AdapterFormatError(f"{key}: lora_B without lora_A", key=key)
            continue
        if not key.endswith(_A_SUFFIX):
            if ".lora_" in key:
                raise AdapterFormatError(
                    f"{key}: unexpected LoRA key (adapter-named keys such as "
                    "'.lora_A.default.weight' are not accepted)", key=key,
                )
            dense[key[len(PREFIX) :]] = array
            continue
        name = key[len(PREFIX) : -len(_A_SUFFIX)]
        key_b = lora_keys(name)[1]
        if key_b not in tensors:
            raise AdapterFormatError(f"{key}: lora_A without lora_B", key=key)
        if name not in alphas:
            raise AdapterFormatError(f"{name}: no alpha in metadata 'alphas'", key=name)
        alpha = alphas[name]
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise AdapterFormatError(f"{name}: alpha {alpha!r} is not a positive number", key=name)
        a, b = array, tensors[key_b]
        if a.ndim != 2 or b.ndim != 2:
            raise AdapterFormatError(f"{name}: lora_A/lora_B must be 2-D, got {a.shape}, {b.shape}", key=name)
        if a.shape[0] != b.shape[1]:
            raise AdapterFormatError(
                f"{name}: lora_A rank {a.shape[0]} != lora_B rank {b.shape[1]}", key=name
            )
        if name in ranks and ranks[name] != a.shape[0]:
            raise AdapterFormatError(
                f"{name}: metadata rank {ranks[name]!r} != tensor rank {a.shape[0]}", key=name
            )
        modules[name] = LoraModule(a=a, b=b, alpha=float(alpha))

    for name in ranks:
        if name not in modules:
            raise AdapterFormatError(f"{name}: listed in metadata 'ranks' but has no tensors", key=name)
    adapter = Adapter(modules=modules, dense=dense, use_rslora=rslora == "true")
    if spec is not None:
        spec.validate(adapter, max_rank=max_rank)
    elif max_rank is not None:
        for name, module in adapter.modules.items():
            if module.rank == 0 or module.rank > max_rank:
                raise AdapterValidationError(
                    f"{name}: rank {module.rank} outside 1..{max_rank}", key=name
                )
    return adapter
