"""Wire dtypes: float32, float16 and bfloat16 to and from float32, in numpy only.

numpy has no bfloat16 and ``safetensors.numpy`` cannot read BF16, so bfloat16 is handled
as its bit pattern: the upper 16 bits of an IEEE float32.
"""

from __future__ import annotations

from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt

__all__ = ["F32Array", "F64Array", "FloatArray", "WireArray", "WIRE_DTYPES", "to_wire", "from_wire", "bf16_bits_from_f32", "f32_from_bf16_bits"]

# our name -> (safetensors header dtype, serialize() dtype name, bytes per element)
WIRE_DTYPES: dict[str, tuple[str, str, int]] = {
    "float32": ("F32", "float32", 4),
    "float16": ("F16", "float16", 2),
    "bfloat16": ("BF16", "bfloat16", 2),
}
HEADER_TO_WIRE = {header: name for name, (header, _, _) in WIRE_DTYPES.items()}

F32Array: TypeAlias = npt.NDArray[np.float32]
"""A float32 array: what every tensor of an adapter is in memory."""
F64Array: TypeAlias = npt.NDArray[np.float64]
"""A float64 array: weights, and factors while they are being combined."""
FloatArray: TypeAlias = npt.NDArray[np.floating[Any]]
"""A float32 or float64 array."""
WireArray: TypeAlias = npt.NDArray[np.float32] | npt.NDArray[np.float16] | npt.NDArray[np.uint16]
"""An encoded tensor: float32, float16, or bfloat16 as its uint16 bit pattern."""


def bf16_bits_from_f32(x: F32Array) -> npt.NDArray[np.uint16]:
    """Round float32 to bfloat16 (round to nearest, ties to even); returns uint16 bits.

    NaN stays NaN (quiet); values that round past the bf16 maximum become ±inf, as in
    torch's ``.to(torch.bfloat16)``.
    """
    bits: npt.NDArray[np.uint32] = np.ascontiguousarray(x, dtype="<f4").view("<u4")
    # Adding 0x7FFF plus the lowest kept bit rounds to nearest-even in integer arithmetic.
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
    out = rounded.astype("<u2")
    nan = np.isnan(x)
    if nan.any():
        out[nan] = ((bits[nan] >> np.uint32(16)) | np.uint32(0x0040)).astype("<u2")
    return out


def f32_from_bf16_bits(bits: npt.NDArray[np.uint16]) -> F32Array:
    """Exact widening of bfloat16 bit patterns (uint16) to float32."""
    return (bits.astype("<u4") << np.uint32(16)).view("<f4").astype(np.float32, copy=False)


def to_wire(x: F32Array, dtype: str) -> WireArray:
    """float32 array -> little-endian array whose bytes are the wire encoding."""
    if dtype == "float32":
        return np.ascontiguousarray(x, dtype="<f4")
    if dtype == "float16":
        with np.errstate(over="ignore"):  # overflow -> inf is reported by the caller, by key
            return np.ascontiguousarray(x, dtype="<f2")
    if dtype == "bfloat16":
        return bf16_bits_from_f32(x)
    raise ValueError(f"unsupported dtype {dtype!r}; expected one of {sorted(WIRE_DTYPES)}")


def from_wire(raw: bytes | bytearray | memoryview, header_dtype: str, shape: tuple[int, ...]) -> F32Array:
    """Raw little-endian bytes of a safetensors tensor -> float32 array of ``shape``."""
    if header_dtype == "F32":
        return np.frombuffer(raw, dtype="<f4").reshape(shape).astype(np.float32, copy=False)
    if header_dtype == "F16":
        return np.frombuffer(raw, dtype="<f2").reshape(shape).astype(np.float32)
    if header_dtype == "BF16":
        return f32_from_bf16_bits(np.frombuffer(raw, dtype="<u2")).reshape(shape)
    raise ValueError(f"unsupported dtype {header_dtype!r}")
