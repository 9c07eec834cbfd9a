"""Top-k sparsification: send only the ``k`` entries of largest magnitude.

Most of an update's energy sits in few coordinates; sending those (and,
with error feedback, carrying the rest to the next round) cuts uplink bytes
by orders of magnitude at little accuracy cost. Values go as ``f16``, or
quantized ``int8`` / ``int4`` with per-chunk scales over the kept values
(in index order), using the same quantizers as the dense codecs.

Ties at the k-th magnitude are broken towards lower indices, so the choice
is deterministic. Options: ``k`` (count) or ``ratio`` (fraction of ``n``,
at least one entry when ``n > 0``); ``chunk`` for quantized values.

Wire layout: index section (see :mod:`devices.codecs.indices`; meta ``idx``
says varint or bitmap), then the value section, whose size follows from
``k`` alone — so the index section's length is implied, not trusted.
Meta: ``k``, ``idx`` and, for quantized values, ``chunk``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from devices.codecs.base import MAX_CHUNK, Codec, CodecError, MetaValue, meta_int, param_int
from devices.codecs.dense import decode_f16, encode_f16
from devices.codecs.indices import (
    BITMAP,
    VARINT,
    bitmap_size,
    decode_indices,
    encode_indices,
    index_size_bound,
    max_varint_len,
)
from devices.codecs.quantize import (
    DEFAULT_CHUNK,
    decode_quantized,
    encode_quantized,
    quantized_size,
)

__all__ = ["TopK", "select_topk"]

_BITS = {"int8": 8, "int4": 4}


def select_topk(x: np.ndarray, k: int) -> np.ndarray:
    """Sorted indices of the ``k`` largest ``|x|``; ties go to the lower index."""
    n = x.size
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    if k >= n:
        return np.arange(n, dtype=np.int64)
    a = np.abs(x)
    threshold = a[np.argpartition(a, n - k)[n - k]]
    above = np.flatnonzero(a > threshold)
    ties = np.flatnonzero(a == threshold)[: k - above.size]
    return np.sort(np.concatenate([above, ties])).astype(np.int64)


def _k_from_params(n: int, params: dict[str, Any]) -> int:
    has_k, has_ratio = "k" in params, "ratio" in params
    if has_k == has_ratio:
        raise CodecError("bad-params", "top-k takes exactly one of k (count) or ratio (fraction)")
    if has_k:
        return param_int(params, "k", 0, 0, n)
    ratio = params.pop("ratio")
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 < ratio <= 1:
        raise CodecError("bad-params", f"ratio must be a number in (0, 1], got {ratio!r}")
    return min(n, max(1, math.ceil(ratio * n))) if n else 0


class TopK(Codec):
    def __init__(self, values: str) -> None:
        if values not in ("f16", *_BITS):
            raise ValueError(f"top-k values must be f16, int8 or int4, got {values!r}")
        self.values = values
        self.name = f"topk-{values}"
        self.meta_keys = frozenset({"k", "idx", "chunk"} if values in _BITS else {"k", "idx"})

    def _value_size(self, k: int, chunk: int) -> int:
        if self.values == "f16":
            return 2 * k
        return quantized_size(k, _BITS[self.values], chunk)

    def encode(
        self, x: np.ndarray, rng: np.random.Generator | None, params: dict[str, Any]
    ) -> tuple[bytes, dict[str, MetaValue]]:
        n = x.size
        k = _k_from_params(n, params)
        idx = select_topk(x, k)
        index_bytes, mode = encode_indices(idx, n)
        meta: dict[str, MetaValue] = {"k": k, "idx": mode}
        if self.values == "f16":
            value_bytes = encode_f16(x[idx])
        else:
            chunk = param_int(params, "chunk", DEFAULT_CHUNK, 1, MAX_CHUNK)
            value_bytes = encode_quantized(x[idx], _BITS[self.values], chunk, rng)
            meta["chunk"] = chunk
        return index_bytes + value_bytes, meta

    def decode(self, payload: bytes, n: int, meta: Mapping[str, MetaValue]) -> np.ndarray:
        what = f"{self.name} payload"
        k = meta_int(meta, "k", 0, n)
        mode = meta_int(meta, "idx", VARINT, BITMAP)
        chunk = meta_int(meta, "chunk", 1, MAX_CHUNK) if self.values in _BITS else 0
        vlen = self._value_size(k, chunk)
        ilen = len(payload) - vlen
        if ilen < 0:
            raise CodecError(
                "bad-length",
                f"{what} has {len(payload)} bytes, less than the {vlen} value bytes of k = {k}",
            )
        if mode == BITMAP:
            lo = hi = bitmap_size(n)
        else:
            lo, hi = k, k * max_varint_len(n)
        if not lo <= ilen <= hi:
            raise CodecError(
                "bad-length",
                f"{what} has {len(payload)} bytes: {ilen} index bytes, "
                f"expected {lo}..{hi} for k = {k}",
            )
        vbytes = payload[ilen:]
        if self.values == "f16":
            vals = decode_f16(vbytes, k, what)
        else:
            vals = decode_quantized(vbytes, k, _BITS[self.values], chunk, what)
        idx = decode_indices(payload[:ilen], n, k, mode, what)
        out = np.zeros(n, dtype=np.float32)
        out[idx] = vals
        return out

    def max_size(self, n: int, params: dict[str, Any]) -> int:
        k = _k_from_params(n, params)
        chunk = (
            param_int(params, "chunk", DEFAULT_CHUNK, 1, MAX_CHUNK) if self.values in _BITS else 0
        )
        return index_size_bound(n, k) + self._value_size(k, chunk)
