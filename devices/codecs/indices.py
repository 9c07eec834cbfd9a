"""Compact sets of positions: sorted indices as delta varints, or a bitmap.

Top-k updates and sparse model deltas both send "these ``k`` of ``n``
positions". Sorted, the gaps are small, so ``idx[0], idx[1] - idx[0], ...``
as LEB128 varints (7 bits per byte, high bit = more follows) costs about one
or two bytes per index when sparse; past roughly one index in eight a plain
bitmap (``ceil(n / 8)`` bytes, bit ``i`` = position ``i``, little bit order)
is smaller. The encoder picks the smaller and says which (``VARINT`` or
``BITMAP``).

Decoding never trusts the bytes: the varint count must be exactly ``k``
with no trailing or over-long (non-canonical) bytes, every gap after the
first must be >= 1 (strictly increasing), the last index must be < ``n``;
a bitmap must be exactly ``ceil(n / 8)`` bytes, zero past ``n``, with
exactly ``k`` bits set. All work is vectorized numpy, and nothing is
allocated beyond a small multiple of the bytes received.
"""

from __future__ import annotations

import numpy as np

from devices.codecs.base import CodecError

__all__ = [
    "BITMAP",
    "VARINT",
    "bitmap_size",
    "decode_indices",
    "encode_indices",
    "index_size_bound",
    "max_varint_len",
]

VARINT = 0
BITMAP = 1


def bitmap_size(n: int) -> int:
    return (n + 7) // 8


def max_varint_len(n: int) -> int:
    """Bytes of the longest varint a valid index set over ``n`` positions needs (value < n)."""
    return max(1, -(-max(n - 1, 0).bit_length() // 7))


def _varint_lengths(v: np.ndarray) -> np.ndarray:
    lengths = np.ones(v.size, dtype=np.int64)
    for j in range(1, 10):
        lengths += v >= (np.uint64(1) << np.uint64(7 * j))
    return lengths


def _encode_varints(v: np.ndarray) -> bytes:
    v = v.astype(np.uint64)
    lengths = _varint_lengths(v)
    out = np.zeros(int(lengths.sum()), dtype=np.uint8)
    starts = np.cumsum(lengths) - lengths
    for j in range(int(lengths.max()) if v.size else 0):
        sel = lengths > j
        byte = (v[sel] >> np.uint64(7 * j)) & np.uint64(0x7F)
        more = (lengths[sel] > j + 1).astype(np.uint64) << np.uint64(7)
        out[starts[sel] + j] = (byte | more).astype(np.uint8)
    return out.tobytes()


def encode_indices(idx: np.ndarray, n: int) -> tuple[bytes, int]:
    """Encode strictly increasing indices in ``[0, n)``; returns (bytes, VARINT | BITMAP)."""
    idx = np.asarray(idx, dtype=np.int64)
    gaps = np.diff(idx, prepend=0) if idx.size else idx
    varint_bytes = int(_varint_lengths(gaps.astype(np.uint64)).sum())
    if varint_bytes <= bitmap_size(n):
        return _encode_varints(gaps), VARINT
    bits = np.zeros(bitmap_size(n) * 8, dtype=np.uint8)
    bits[idx] = 1
    return np.packbits(bits, bitorder="little").tobytes(), BITMAP


def index_size_bound(n: int, k: int) -> int:
    """Most bytes :func:`encode_indices` can take for any ``k`` of ``n`` positions.

    The varint worst case spreads the ``k`` gaps evenly: with the gaps (plus
    one for the first) summing to at most ``n``, greedily lift as many
    varints as the sum allows to 2 bytes (value >= 128), then 3 bytes, ...
    Costs per extra byte grow, so the greedy count is the maximum.
    """
    if k <= 0:
        return 0
    total, slack, count = k, n - k, k
    for level in range(1, 10):
        cost = (1 << (7 * level)) - (1 << (7 * (level - 1)))
        count = min(count, slack // cost)
        if count == 0:
            break
        total += count
        slack -= count * cost
    return min(total, bitmap_size(n))


def _decode_varints(buf: bytes, n: int, k: int, what: str) -> np.ndarray:
    max_len = max_varint_len(n)
    if not k <= len(buf) <= k * max_len:
        raise CodecError(
            "bad-indices",
            f"{what}: {len(buf)} index bytes cannot hold {k} varints of at most {max_len} bytes",
        )
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    b = np.frombuffer(buf, dtype=np.uint8)
    ends = np.flatnonzero(b < 0x80)
    if ends.size != k or ends[-1] != b.size - 1:
        raise CodecError(
            "bad-indices",
            f"{what}: found {ends.size} complete varints, expected {k} and no trailing bytes",
        )
    starts = np.empty(k, dtype=np.int64)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lengths = ends - starts + 1
    if lengths.max() > max_len:
        raise CodecError("bad-indices", f"{what}: a varint is longer than {max_len} bytes")
    if ((lengths > 1) & (b[ends] == 0)).any():
        raise CodecError("bad-indices", f"{what}: non-canonical (zero-padded) varint")
    values = np.zeros(k, dtype=np.int64)
    for j in range(int(lengths.max())):
        sel = lengths > j
        values[sel] |= (b[starts[sel] + j].astype(np.int64) & 0x7F) << (7 * j)
    if (values >= n).any():
        raise CodecError("bad-indices", f"{what}: an index gap is >= n = {n} (index out of range)")
    if k > 1 and (values[1:] < 1).any():
        at = int(np.flatnonzero(values[1:] < 1)[0]) + 1
        raise CodecError("bad-indices", f"{what}: indices not strictly increasing at entry {at}")
    idx = np.cumsum(values)
    if idx[-1] >= n:
        raise CodecError("bad-indices", f"{what}: index {int(idx[-1])} out of range (n = {n})")
    return idx


def _decode_bitmap(buf: bytes, n: int, k: int, what: str) -> np.ndarray:
    if len(buf) != bitmap_size(n):
        raise CodecError(
            "bad-indices",
            f"{what}: bitmap has {len(buf)} bytes, expected {bitmap_size(n)} for n = {n}",
        )
    bits = np.unpackbits(np.frombuffer(buf, dtype=np.uint8), bitorder="little")
    if bits[n:].any():
        raise CodecError("bad-indices", f"{what}: bitmap has bits set at or beyond n = {n}")
    idx = np.flatnonzero(bits)
    if idx.size != k:
        raise CodecError("bad-indices", f"{what}: bitmap has {idx.size} bits set, expected k = {k}")
    return idx.astype(np.int64)


def decode_indices(buf: bytes, n: int, k: int, mode: int, what: str = "indices") -> np.ndarray:
    """Strictly increasing int64 indices in ``[0, n)``, exactly ``k`` of them, or CodecError."""
    if mode == VARINT:
        return _decode_varints(buf, n, k, what)
    if mode == BITMAP:
        return _decode_bitmap(buf, n, k, what)
    raise CodecError(
        "bad-meta", f"{what}: unknown index encoding {mode!r} (0 = varint, 1 = bitmap)"
    )
