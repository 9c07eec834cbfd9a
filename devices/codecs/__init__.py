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

from collections.abc import Mapping
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
    "encode",
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
