"""Model versions as chains of compressed deltas, and how a device rebuilds them bit for bit.

An exact delta of a dense FedAvg step is never smaller than the model (every
float32 changes), so the cloud compresses the step itself: it broadcasts
``Q(delta)`` (int8 per-chunk, top-k ...) and *defines* the new global model as
``old + decode(Q(delta))`` added in float32 (:func:`apply_step`). IEEE float32
addition is exactly rounded, so a device holding ``old`` that applies the
same bytes with the same function gets the same bits, hence the same SHA-256,
and the version hash stays the model's identity. What the compression drops
is kept by the cloud as an error-feedback residual (``cloud.broadcast``).

A device that sat out rounds holds an older version; it receives the chain of
steps from its version to the current one (:class:`DeltaChain`) and applies
them in order. The cloud sends the full model instead when the device's
version is unknown, too old, or the chain would be bigger.

Wire form of a chain: one canonical CBOR map::

    "v"      uint   format version (1)
    "kind"   text   "chain"
    "base"   text   SHA-256 hex of the model the chain applies to
    "hash"   text   SHA-256 hex of the model it produces
    "size"   uint   number of float32 parameters
    "steps"  array  one [codec, meta, payload] per version step, oldest first
                    (a devices.codecs encoding of a flat vector of ``size``)

Decoding never trusts it: the map's schema, the hashes' form, codec names,
and then every step's payload through the codec registry's checks; the
reconstruction must hash to ``hash`` or it is refused. Numpy + cbor2 only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Final

import cbor2
import numpy as np

from devices.codecs import CodecError, Encoded, decode
from devices.downlink import Downlink, DownlinkError, apply_downlink, model_hash

__all__ = [
    "CHAIN_WIRE_VERSION",
    "DELTA_CODECS",
    "FRAME_BYTES",
    "DeltaChain",
    "apply_chain",
    "apply_step",
    "download_nbytes",
    "reconstruct",
]

CHAIN_WIRE_VERSION: Final = 1
#: Bytes a model download adds around what it carries (version hash, length, ETag):
#: charged for a full model and, conservatively, for a chain too (which repeats the hash).
FRAME_BYTES: Final = 96
#: Codecs a broadcast step may use. ``f32`` is refused: a dense float32 step is
#: never smaller than the full model, so it would only ever cost more.
DELTA_CODECS: Final = ("f16", "int8", "int4", "topk-f16", "topk-int8", "topk-int4")
_KEYS: Final = frozenset({"v", "kind", "base", "hash", "size", "steps"})
_HEX64 = re.compile(r"[0-9a-f]{64}")


def _flat32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).reshape(-1)


def apply_step(params: np.ndarray, step: Encoded) -> np.ndarray:
    """The next version: ``params + decode(step)``, added in float32.

    The one definition of a version step, used by the cloud to make the model
    and by every device to rebuild it, so both get the same bits. Raises
    :class:`DownlinkError` for a step of the wrong size or one that decodes or
    adds up to NaN/infinity.
    """
    old = _flat32(params)
    try:
        d = decode(step, max_elements=old.size)
    except CodecError as e:
        raise DownlinkError(e.reason, e.detail) from None
    if d.shape != (old.size,):
        raise DownlinkError(
            "wrong-base", f"step has shape {d.shape}, the model has {old.size} parameters"
        )
    with np.errstate(over="ignore", invalid="ignore"):
        new = np.add(old, d, dtype=np.float32)
    if not np.isfinite(new).all():
        raise DownlinkError("non-finite", "applying the step overflows float32")
    return new


@dataclass(frozen=True)
class DeltaChain:
    """The steps taking the model ``base`` to the model ``hash`` (empty if they are equal)."""

    base: str
    hash: str
    size: int
    steps: tuple[Encoded, ...]

    @cached_property
    def wire(self) -> bytes:
        """Canonical CBOR (see the module docstring), built once."""
        doc = {
            "v": CHAIN_WIRE_VERSION,
            "kind": "chain",
            "base": self.base,
            "hash": self.hash,
            "size": int(self.size),
            "steps": [[s.codec, dict(s.meta), s.payload] for s in self.steps],
        }
        return cbor2.dumps(doc, canonical=True)

    @property
    def nbytes(self) -> int:
        return len(self.wire)

    @classmethod
    def from_bytes(
        cls, data: bytes, *, max_elements: int, max_steps: int, max_bytes: int = 64 << 20
    ) -> DeltaChain:
        """Parse an untrusted chain; raises :class:`DownlinkError` naming what is wrong.

        Only the structure is checked here; step payloads are checked when
        applied (:func:`apply_chain`), by the codec registry.
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise DownlinkError("bad-payload", f"chain must be bytes, got {type(data).__name__}")
        if len(data) > max_bytes:
            raise DownlinkError("bad-length", f"chain of {len(data)} bytes exceeds {max_bytes}")
        try:
            doc: Any = cbor2.loads(bytes(data), max_depth=5, allow_indefinite=False)
        except Exception as e:  # the decoder's own failures on bad input
            raise DownlinkError("bad-payload", f"chain is not valid CBOR: {e}") from None
        if not isinstance(doc, dict) or set(doc) != _KEYS:
            got = sorted(map(str, doc)) if isinstance(doc, dict) else type(doc).__name__
            raise DownlinkError(
                "bad-payload", f"chain must be a map with {sorted(_KEYS)}, got {got}"
            )
        if doc["v"] != CHAIN_WIRE_VERSION or doc["kind"] != "chain":
            raise DownlinkError(
                "bad-payload", f"unsupported chain v={doc['v']!r} kind={doc['kind']!r}"
            )
        for key in ("base", "hash"):
            if not isinstance(doc[key], str) or not _HEX64.fullmatch(doc[key]):
                raise DownlinkError("bad-payload", f"chain {key!r} must be 64 lowercase hex digits")
        size, steps = doc["size"], doc["steps"]
        if type(size) is not int or not 0 <= size <= max_elements:
            raise DownlinkError(
                "too-many-elements", f"chain size must be an integer in [0, {max_elements}]"
            )
        if not isinstance(steps, list) or len(steps) > max_steps:
            raise DownlinkError(
                "bad-payload", f"chain steps must be an array of at most {max_steps}"
            )
        out = []
        for i, s in enumerate(steps):
            if not (
                isinstance(s, list)
                and len(s) == 3
                and isinstance(s[0], str)
                and isinstance(s[1], Mapping)
                and isinstance(s[2], bytes)
            ):
                raise DownlinkError(
                    "bad-payload", f"chain step {i} must be [codec, meta map, payload bytes]"
                )
            if s[0] not in DELTA_CODECS:
                raise DownlinkError(
                    "unknown-codec",
                    f"chain step {i} uses {s[0]!r}; steps use {', '.join(DELTA_CODECS)}",
                )
            out.append(Encoded(s[0], (size,), s[2], dict(s[1])))
        return cls(doc["base"], doc["hash"], size, tuple(out))


def apply_chain(chain: DeltaChain, held: np.ndarray | None) -> np.ndarray:
    """Rebuild the chain's target from the model a device holds, and verify its hash.

    Raises :class:`DownlinkError` if the device holds nothing or another
    version (``wrong-base``), a step is malformed, or the result does not
    hash to ``chain.hash`` (``hash-mismatch``): a device never trains on a
    model it cannot prove is the announced one.
    """
    if held is None:
        raise DownlinkError("wrong-base", "a delta chain needs the model it applies to")
    params = _flat32(held)
    if chain.size != params.size:
        raise DownlinkError(
            "wrong-base", f"chain is for a {chain.size}-parameter model, device holds {params.size}"
        )
    base = model_hash(params)
    if base != chain.base:
        raise DownlinkError(
            "wrong-base", f"chain applies to {chain.base[:12]}..., device holds {base[:12]}..."
        )
    for step in chain.steps:
        params = apply_step(params, step)
    got = model_hash(params)
    if got != chain.hash:
        raise DownlinkError(
            "hash-mismatch",
            f"reconstructed model hashes to {got[:12]}..., announced {chain.hash[:12]}...",
        )
    return params.copy() if params is held else params


def reconstruct(download: Downlink | DeltaChain, held: np.ndarray | None) -> np.ndarray:
    """What a device does with any download: rebuild the model and verify its hash."""
    if isinstance(download, DeltaChain):
        return apply_chain(download, held)
    return apply_downlink(download, held)


def download_nbytes(download: Downlink | DeltaChain | bytes) -> int:
    """Bytes a download costs on the link: the frame plus the full model or the CBOR chain.

    ``bytes`` is a chain in its wire form.
    """
    if isinstance(download, bytes):
        return FRAME_BYTES + len(download)
    if isinstance(download, DeltaChain):
        return FRAME_BYTES + download.nbytes
    if download.kind != "full":
        raise ValueError(f"no wire size defined for a {download.kind!r} downlink")
    return FRAME_BYTES + download.nbytes
