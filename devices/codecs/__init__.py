"""Update and model codecs: the registry devices encode with and gateways decode with.

Numpy only, because ``gateway`` (edge servers without torch) decodes with the
very same registry. ``encode`` turns a float tensor into an :class:`Encoded`
(codec name, shape, wire bytes, a few scalars); ``decode`` turns an
untrusted :class:`Encoded` back into float32, checking every size, count and
value first and raising :class:`CodecError` (with a short ``reason``) on
anything a correct encoder would not have produced.

Codecs (bytes for ``n`` float32 values, chunk = 256):

========== ==========================================================
``f32``    ``4n`` — exact
``f16``    ``2n`` — relative error <= 2^-11
``int8``   ``n + 4*ceil(n/256)`` — per-chunk scale, |error| <= scale
``int4``   ``ceil(n/2) + 4*ceil(n/256)`` — two values per byte
``topk-*`` the ``k`` largest |x| (values as f16 / int8 / int4) plus their
           indices, delta+LEB128 varints or a bitmap, whichever is smaller
========== ==========================================================
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from devices.codecs.base import REASONS, Codec, CodecError, Encoded, MetaValue, check_shape
from devices.codecs.dense import Float16, Float32
from devices.codecs.quantize import Int4, Int8
from devices.codecs.topk import TopK

__all__ = [
    "CODECS",
    "REASONS",
    "Codec",
    "CodecError",
    "Encoded",
    "MetaValue",
    "decode",
    "decode_rows",
    "encode",
    "encode_f32_rows",
    "max_encoded_size",
]

CODECS: dict[str, Codec] = {
    c.name: c
    for c in (
        Float32(),
        Float16(),
        Int8(),
        Int4(),
        TopK("f16"),
        TopK("int8"),
        TopK("int4"),
    )
}


def _codec(name: object) -> Codec:
    if not isinstance(name, str) or name not in CODECS:
        raise CodecError("unknown-codec", f"unknown codec {name!r} (known: {', '.join(CODECS)})")
    return CODECS[name]


def encode(
    codec: str, x: np.ndarray, *, rng: np.random.Generator | None = None, **params: Any
) -> Encoded:
    """Encode a finite real tensor with ``codec``.

    ``rng`` drives stochastic rounding in the quantizing codecs (unbiased:
    the expected decoded value is ``x``); without it rounding is to nearest,
    deterministic. ``params`` are codec options (``chunk`` for int8/int4,
    ``k`` or ``ratio`` for top-k); unknown options are an error, not ignored.
    """
    c = _codec(codec)
    arr = np.asarray(x)
    if arr.dtype.kind not in "biuf":
        raise CodecError("bad-input", f"cannot encode a tensor of dtype {arr.dtype}")
    with np.errstate(over="ignore", invalid="ignore"):  # out-of-range values are refused below
        flat = np.ascontiguousarray(arr, dtype=np.float32).reshape(-1)
    if not np.isfinite(flat).all():
        raise CodecError("non-finite", "input contains NaN or infinity (or exceeds float32 range)")
    opts = dict(params)
    payload, meta = c.encode(flat, rng, opts)
    if opts:
        raise CodecError("bad-params", f"{codec} does not take {', '.join(sorted(opts))}")
    return Encoded(codec, tuple(int(d) for d in arr.shape), payload, meta)


def decode(enc: Encoded, *, max_elements: int) -> np.ndarray:
    """Decode an untrusted :class:`Encoded` to a float32 array of its shape.

    Nothing larger than ``max_elements`` elements (plus the payload's own
    size) is allocated; the result is always finite.
    """
    c = _codec(getattr(enc, "codec", None))
    shape, n = check_shape(getattr(enc, "shape", None), max_elements)
    payload = getattr(enc, "payload", None)
    if isinstance(payload, bytearray | memoryview):
        payload = bytes(payload)
    if not isinstance(payload, bytes):
        raise CodecError("bad-payload", f"payload must be bytes, got {type(payload).__name__}")
    meta = getattr(enc, "meta", None)
    if not isinstance(meta, Mapping):
        raise CodecError("bad-meta", f"meta must be a mapping, got {type(meta).__name__}")
    keys = set(meta)
    if keys != c.meta_keys:
        missing = sorted(c.meta_keys - keys)
        extra = sorted(repr(k) for k in keys - c.meta_keys)
        raise CodecError(
            "bad-meta",
            f"{c.name} meta: missing {missing or 'nothing'}, unexpected {extra or 'nothing'}",
        )
    for k, v in meta.items():
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise CodecError("bad-meta", f"meta[{k!r}] must be a number, got {type(v).__name__}")
    flat = c.decode(payload, n, meta)
    if flat.shape != (n,) or flat.dtype != np.float32:  # a codec bug, never the sender's
        raise AssertionError(f"{c.name} decoded {flat.shape} {flat.dtype}, expected ({n},) float32")
    if not np.isfinite(flat).all():
        raise CodecError("non-finite", f"{c.name} payload decodes to NaN or infinity")
    return flat.reshape(shape)


def max_encoded_size(codec: str, n: int, **params: Any) -> int:
    """Largest payload of ``codec`` for ``n`` elements with ``params`` (worst case for top-k)."""
    c = _codec(codec)
    opts = dict(params)
    size = c.max_size(n, opts)
    if opts:
        raise CodecError("bad-params", f"{codec} does not take {', '.join(sorted(opts))}")
    return size


def encode_f32_rows(x: np.ndarray) -> list[Encoded]:
    """``f32`` for every row of a 2-D block in one pass (a cohort's updates).

    Byte for byte what ``encode("f32", row)`` gives, and what a device sends
    raw when its update is not finite (the gateway refuses that one): f32 is
    lossless, so the only per-row work left is slicing the payload.
    """
    block = np.ascontiguousarray(x, dtype="<f4")
    if block.ndim != 2:
        raise ValueError(f"expected a 2-D block of rows, got shape {block.shape}")
    shape = (int(block.shape[1]),)
    return [Encoded("f32", shape, row.tobytes(), {}) for row in block]


def _plain_f32(enc: Any, n: int) -> bool:
    """An exact-size f32 update of shape ``(n,)``: safe to decode as part of a block."""
    return (
        type(enc) is Encoded
        and enc.codec == "f32"
        and enc.shape == (n,)
        and type(enc.payload) is bytes
        and len(enc.payload) == 4 * n
        and isinstance(enc.meta, Mapping)
        and not enc.meta
    )


def decode_rows(
    encs: Sequence[Any], n: int
) -> tuple[np.ndarray, list[int], list[tuple[int, CodecError]]]:
    """Decode many untrusted updates of ``n`` values each: ``(rows, kept, errors)``.

    ``rows[j]`` is update ``kept[j]`` (input order kept); ``errors`` names each
    refused index with the :class:`CodecError` that :func:`decode` raises for
    it. Plain f32 updates (the uncompressed default) are checked and converted
    as one block, the rest one by one through :func:`decode`, so the result is
    the same as decoding each alone.
    """
    fast = [i for i, e in enumerate(encs) if _plain_f32(e, n)]
    out = np.empty((len(encs), n), dtype=np.float32)
    ok = np.zeros(len(encs), dtype=bool)
    errors: list[tuple[int, CodecError]] = []
    if fast:
        block = np.frombuffer(b"".join(encs[i].payload for i in fast), dtype="<f4")
        block = block.reshape(len(fast), n)
        finite = np.isfinite(block).all(axis=1)
        out[fast] = block
        ok[fast] = finite
        for i in np.asarray(fast)[~finite]:
            err = CodecError("non-finite", "f32 payload contains NaN or infinity")
            errors.append((int(i), err))
    fast_set = set(fast)
    for i, e in enumerate(encs):
        if i in fast_set:
            continue
        try:
            row = decode(e, max_elements=n)
            if row.shape != (n,):
                raise CodecError("bad-shape", f"update has shape {row.shape}")
        except CodecError as err:
            errors.append((i, err))
            continue
        out[i] = row
        ok[i] = True
    kept = [int(i) for i in np.flatnonzero(ok)]
    errors.sort(key=lambda ie: ie[0])
    return out[ok], kept, errors
