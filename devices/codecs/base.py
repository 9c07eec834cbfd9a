"""What every codec shares: the wire record, the error type, and payload checks.

The gateway decodes updates sent by devices it does not trust, so every
decoder here treats the payload and its meta as hostile: sizes are checked
against the shape and the caller's ``max_elements`` *before* anything is
allocated, and any violation is one :class:`CodecError` whose ``reason`` is a
short machine code (the gateway turns it into a rejection) and whose message
names what is wrong. Numpy only: edge servers have no torch.
"""

from __future__ import annotations

import math
import operator
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "F32_MAX",
    "MAX_CHUNK",
    "MAX_NDIM",
    "REASONS",
    "Codec",
    "CodecError",
    "Encoded",
    "MetaValue",
    "check_shape",
    "meta_int",
    "param_int",
]

MetaValue = int | float

#: Largest float32; decoders refuse scales whose products could overflow it.
F32_MAX = float(np.finfo(np.float32).max)
#: Upper bound on a chunk size a decoder accepts (a chunk is a quantization block).
MAX_CHUNK = 1 << 20
#: Upper bound on tensor rank (numpy itself stops at 64).
MAX_NDIM = 32


#: Every ``CodecError.reason`` the codecs use (the gateway maps them to rejection codes).
REASONS: tuple[str, ...] = (
    "unknown-codec",  # codec name not in the registry
    "bad-shape",  # shape not a short tuple of non-negative ints
    "too-many-elements",  # shape larger than the caller's max_elements
    "bad-payload",  # payload is not bytes
    "bad-meta",  # meta keys/values missing, extra, mistyped or out of range
    "bad-chunk",  # quantization chunk size out of range
    "bad-length",  # payload length does not match shape and meta exactly
    "bad-scale",  # a scale is NaN, infinite, negative or would overflow float32
    "bad-value",  # a quantized level outside the symmetric range
    "bad-padding",  # int4 padding nibble not zero
    "bad-indices",  # top-k indices malformed, out of range or not strictly increasing
    "non-finite",  # NaN/infinity in the input (encode) or in decoded values
    "bad-input",  # encode: not a real numeric tensor
    "bad-params",  # encode: unknown or invalid codec option
)


class CodecError(ValueError):
    """A payload, its meta or an encoder argument is invalid.

    ``reason`` is a short code for metrics and protocol replies
    (``"truncated"``, ``"bad-indices"``, ``"too-many-elements"`` ...); the
    message says exactly what is wrong.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.detail = message


@dataclass(frozen=True)
class Encoded:
    """One tensor as it travels: codec name, logical shape, wire bytes, small scalars."""

    codec: str
    shape: tuple[int, ...]
    payload: bytes
    meta: dict[str, MetaValue] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes of the payload itself (meta and framing are the envelope's business)."""
        return len(self.payload)


class Codec(ABC):
    """A codec family member: encodes a flat float32 vector, decodes it back.

    Subclasses work on flat vectors; the registry (``devices.codecs``) handles
    shapes, input checks and the generic meta/size checks around them.
    """

    name: str
    #: Meta keys a valid payload carries, exactly (extra or missing keys are rejected).
    meta_keys: frozenset[str] = frozenset()

    @abstractmethod
    def encode(
        self, x: np.ndarray, rng: np.random.Generator | None, params: dict[str, Any]
    ) -> tuple[bytes, dict[str, MetaValue]]:
        """Encode a finite flat float32 vector; ``params`` are codec options (consume them)."""

    @abstractmethod
    def decode(self, payload: bytes, n: int, meta: Mapping[str, MetaValue]) -> np.ndarray:
        """Decode ``n`` elements (already checked against max_elements) as flat float32."""

    @abstractmethod
    def max_size(self, n: int, params: dict[str, Any]) -> int:
        """Largest payload this codec can produce for ``n`` elements with ``params``.

        Exact for fixed-size codecs, a worst case for top-k (whose index bytes
        depend on where the kept entries are); budget fitting relies on it.
        """


def _as_int(value: object) -> int | None:
    if isinstance(value, bool | np.bool_):
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return None


def check_shape(shape: object, max_elements: int) -> tuple[tuple[int, ...], int]:
    """Validate a claimed shape; return it as a tuple and its element count.

    The count is computed with Python integers and compared with
    ``max_elements`` dimension by dimension, so a hostile shape can neither
    overflow nor make anyone allocate.
    """
    if not isinstance(shape, tuple | list):
        raise CodecError("bad-shape", f"shape must be a tuple of ints, got {type(shape).__name__}")
    if len(shape) > MAX_NDIM:
        raise CodecError("bad-shape", f"shape has {len(shape)} dimensions (at most {MAX_NDIM})")
    dims: list[int] = []
    for i, d in enumerate(shape):
        v = _as_int(d)
        if v is None:
            raise CodecError("bad-shape", f"shape[{i}] is not an integer: {d!r}")
        if v < 0:
            raise CodecError("bad-shape", f"shape[{i}] is negative: {v}")
        if v > max_elements:
            raise CodecError(
                "too-many-elements", f"shape[{i}] = {v} exceeds max_elements = {max_elements}"
            )
        dims.append(v)
    n = math.prod(dims)
    if n > max_elements:
        raise CodecError(
            "too-many-elements",
            f"shape {tuple(dims)} has {n} elements > max_elements = {max_elements}",
        )
    return tuple(dims), n


def meta_int(meta: Mapping[str, MetaValue], key: str, lo: int, hi: int) -> int:
    """An integer meta field within ``[lo, hi]``; floats and bools are refused."""
    v = _as_int(meta[key])
    if v is None:
        raise CodecError("bad-meta", f"meta[{key!r}] must be an integer, got {meta[key]!r}")
    if not lo <= v <= hi:
        reason = "bad-chunk" if key == "chunk" else "bad-meta"
        raise CodecError(reason, f"meta[{key!r}] = {v} is outside [{lo}, {hi}]")
    return v


def param_int(params: dict[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    """Pop an integer encoder option and check its range."""
    raw = params.pop(key, default)
    v = _as_int(raw)
    if v is None or not lo <= v <= hi:
        raise CodecError("bad-params", f"{key} must be an integer in [{lo}, {hi}], got {raw!r}")
    return v
