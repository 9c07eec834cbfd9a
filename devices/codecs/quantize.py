"""Per-chunk symmetric quantization: ``int8`` (levels -127..127) and ``int4`` (-7..7).

Each chunk of ``chunk`` consecutive values (default 256) gets its own scale
``s = max|x| / qmax``, so one large coordinate only coarsens its own chunk.
Values are ``x / s`` rounded either stochastically (``floor(q) + Bernoulli(frac q)``,
drawn from the caller's generator: unbiased, ``E[decoded] = x``, which is
what keeps averaged updates unbiased) or, without a generator, to nearest.
Either way ``|x - decoded| <= s`` (``s / 2`` when rounding to nearest).

Wire layout: ``ceil(n / chunk)`` little-endian float32 scales, then the
levels: one signed byte each (int8; -128 is never produced and is refused),
or two per byte (int4; element ``2i`` in the low nibble, ``2i + 1`` in the
high one, stored as ``level + 8`` in 1..15; a padding nibble for odd ``n`` is 0).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from devices.codecs.base import (
    F32_MAX,
    MAX_CHUNK,
    Codec,
    CodecError,
    MetaValue,
    meta_int,
    param_int,
)

__all__ = [
    "DEFAULT_CHUNK",
    "Int4",
    "Int8",
    "decode_quantized",
    "dequantize",
    "encode_quantized",
    "quantize",
    "quantized_size",
]

DEFAULT_CHUNK = 256
_QMAX = {8: 127, 4: 7}
_TINY = float(np.finfo(np.float32).smallest_subnormal)


def _scale_limit(qmax: int) -> np.float32:
    """Largest float32 scale whose ``qmax`` multiple is still a finite float32."""
    lim = np.float32(F32_MAX / qmax)
    while float(lim) * qmax > F32_MAX:
        lim = np.nextafter(lim, np.float32(0))
    return lim


_LIMIT = {bits: _scale_limit(q) for bits, q in _QMAX.items()}


def _num_chunks(n: int, chunk: int) -> int:
    return -(-n // chunk)


def quantized_size(n: int, bits: int, chunk: int) -> int:
    """Exact payload bytes of ``n`` values quantized to ``bits`` with chunk size ``chunk``."""
    levels = n if bits == 8 else (n + 1) // 2
    return 4 * _num_chunks(n, chunk) + levels


def quantize(
    x: np.ndarray, bits: int, chunk: int, rng: np.random.Generator | None
) -> tuple[np.ndarray, np.ndarray]:
    """Scales (float32, one per chunk) and levels (int8 in [-qmax, qmax]) for a flat vector."""
    qmax = _QMAX[bits]
    n = x.size
    a = np.abs(x.astype(np.float64))
    amax = np.maximum.reduceat(a, np.arange(0, n, chunk)) if n else np.zeros(0)
    scales = (amax / qmax).astype(np.float32)
    # Keep every non-zero chunk representable (a subnormal amax must not give
    # scale 0) and every scale decodable (scale * qmax finite in float32).
    scales = np.where(amax > 0, np.maximum(scales, np.float32(_TINY)), np.float32(0))
    scales = np.minimum(scales, _LIMIT[bits]).astype(np.float32)
    s = scales.astype(np.float64)[np.arange(n) // chunk]
    q = np.divide(x.astype(np.float64), s, out=np.zeros(n), where=s > 0)
    if rng is None:
        q = np.rint(q)
    else:
        lo = np.floor(q)
        q = lo + (rng.random(n) < (q - lo))
    levels = np.clip(q, -qmax, qmax).astype(np.int8)
    return scales, levels


def dequantize(levels: np.ndarray, scales: np.ndarray, chunk: int) -> np.ndarray:
    """``levels * scale`` chunk by chunk, in float32, without materializing per-element scales."""
    out = levels.astype(np.float32)
    n = out.size
    full = n // chunk
    if full:
        out[: full * chunk].reshape(full, chunk)[...] *= scales[:full, None]
    if n > full * chunk:
        out[full * chunk :] *= scales[full]
    return out


def _pack_int4(levels: np.ndarray) -> bytes:
    nib = (levels.astype(np.int16) + 8).astype(np.uint8)
    if nib.size % 2:
        nib = np.append(nib, np.uint8(0))
    return (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8).tobytes()


def _unpack_int4(buf: bytes, n: int, what: str) -> np.ndarray:
    b = np.frombuffer(buf, dtype=np.uint8)
    nib = np.empty(2 * b.size, dtype=np.uint8)
    nib[0::2] = b & 0x0F
    nib[1::2] = b >> 4
    if nib.size > n and nib[n] != 0:
        raise CodecError("bad-padding", f"{what}: padding nibble after element {n - 1} is not 0")
    data = nib[:n]
    if (data == 0).any():
        at = int(np.flatnonzero(data == 0)[0])
        raise CodecError("bad-value", f"{what}: element {at} has the invalid 4-bit level -8")
    return data.astype(np.int8) - np.int8(8)


def encode_quantized(
    x: np.ndarray, bits: int, chunk: int, rng: np.random.Generator | None
) -> bytes:
    """Wire bytes (scales, then levels) of a flat vector."""
    scales, levels = quantize(x, bits, chunk, rng)
    body = levels.tobytes() if bits == 8 else _pack_int4(levels)
    return scales.astype("<f4").tobytes() + body


def decode_quantized(payload: bytes, n: int, bits: int, chunk: int, what: str) -> np.ndarray:
    """Check and decode ``n`` quantized values; the payload length must match exactly."""
    expected = quantized_size(n, bits, chunk)
    if len(payload) != expected:
        raise CodecError(
            "bad-length",
            f"{what} has {len(payload)} bytes, expected {expected} for {n} values, chunk {chunk}",
        )
    m = _num_chunks(n, chunk)
    scales = np.frombuffer(payload, dtype="<f4", count=m).astype(np.float32)
    bad = ~(np.isfinite(scales) & (scales >= 0) & (scales <= _LIMIT[bits]))
    if bad.any():
        at = int(np.flatnonzero(bad)[0])
        raise CodecError(
            "bad-scale",
            f"{what}: scale of chunk {at} is {float(scales[at])!r} "
            f"(must be finite, >= 0 and <= {float(_LIMIT[bits]):.3e})",
        )
    body = payload[4 * m :]
    if bits == 8:
        levels = np.frombuffer(body, dtype=np.int8, count=n)
        if (levels == -128).any():
            at = int(np.flatnonzero(levels == -128)[0])
            raise CodecError("bad-value", f"{what}: element {at} has the invalid 8-bit level -128")
    else:
        levels = _unpack_int4(body, n, what)
    return dequantize(levels, scales, chunk)


class _Quantized(Codec):
    bits: int
    meta_keys = frozenset({"chunk"})

    def encode(
        self, x: np.ndarray, rng: np.random.Generator | None, params: dict[str, Any]
    ) -> tuple[bytes, dict[str, MetaValue]]:
        chunk = param_int(params, "chunk", DEFAULT_CHUNK, 1, MAX_CHUNK)
        return encode_quantized(x, self.bits, chunk, rng), {"chunk": chunk}

    def decode(self, payload: bytes, n: int, meta: Mapping[str, MetaValue]) -> np.ndarray:
        chunk = meta_int(meta, "chunk", 1, MAX_CHUNK)
        return decode_quantized(payload, n, self.bits, chunk, f"{self.name} payload")

    def max_size(self, n: int, params: dict[str, Any]) -> int:
        chunk = param_int(params, "chunk", DEFAULT_CHUNK, 1, MAX_CHUNK)
        return quantized_size(n, self.bits, chunk)


class Int8(_Quantized):
    name = "int8"
    bits = 8


class Int4(_Quantized):
    name = "int4"
    bits = 4
