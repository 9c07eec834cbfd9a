"""Dense float codecs: ``f32`` (exact) and ``f16`` (half the bytes, ~3 decimal digits).

``f16`` saturates values beyond the half-precision range (±65504) instead of
sending infinities: an update that large is already pathological (the
gateway's norm bound rejects it), and with error feedback the clipped part
is carried to the next round rather than lost.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from devices.codecs.base import Codec, CodecError, MetaValue

__all__ = ["F16_MAX", "Float16", "Float32", "decode_f16", "encode_f16"]

F16_MAX = float(np.finfo(np.float16).max)


def encode_f16(x: np.ndarray) -> bytes:
    """Little-endian half floats, saturated to ±65504."""
    return np.clip(x, -F16_MAX, F16_MAX).astype("<f2").tobytes()


def decode_f16(payload: bytes, n: int, what: str = "f16 payload") -> np.ndarray:
    """``n`` half floats from exactly ``2 * n`` bytes, as float32; infinities/NaN refused."""
    if len(payload) != 2 * n:
        raise CodecError("bad-length", f"{what} has {len(payload)} bytes, expected {2 * n}")
    out = np.frombuffer(payload, dtype="<f2", count=n).astype(np.float32)
    if not np.isfinite(out).all():
        raise CodecError("non-finite", f"{what} contains NaN or infinity")
    return out


class Float32(Codec):
    name = "f32"

    def encode(
        self, x: np.ndarray, rng: np.random.Generator | None, params: dict[str, Any]
    ) -> tuple[bytes, dict[str, MetaValue]]:
        return x.astype("<f4").tobytes(), {}

    def decode(self, payload: bytes, n: int, meta: Mapping[str, MetaValue]) -> np.ndarray:
        if len(payload) != 4 * n:
            raise CodecError(
                "bad-length", f"f32 payload has {len(payload)} bytes, expected {4 * n}"
            )
        out = np.frombuffer(payload, dtype="<f4", count=n).astype(np.float32)
        if not np.isfinite(out).all():
            raise CodecError("non-finite", "f32 payload contains NaN or infinity")
        return out

    def max_size(self, n: int, params: dict[str, Any]) -> int:
        return 4 * n


class Float16(Codec):
    name = "f16"

    def encode(
        self, x: np.ndarray, rng: np.random.Generator | None, params: dict[str, Any]
    ) -> tuple[bytes, dict[str, MetaValue]]:
        return encode_f16(x), {}

    def decode(self, payload: bytes, n: int, meta: Mapping[str, MetaValue]) -> np.ndarray:
        return decode_f16(payload, n)

    def max_size(self, n: int, params: dict[str, Any]) -> int:
        return 2 * n
