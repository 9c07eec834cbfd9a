"""Model downlink as an exact delta against the version a device already holds.

Between consecutive rounds only some parameters change bit for bit (top-k
aggregates, frozen layers, rounding), so sending "these positions now hold
these float32 values" is often far smaller than the whole model. Unlike the
update codecs this must be lossless: the device identifies its model by the
SHA-256 of its float32 bytes, reports that hash as the base of its next
update, and the cloud checks it. So the reconstruction is verified against
the announced hash and anything else is refused.

Representations (the encoder picks the smallest):

- ``full``: the model's little-endian float32 bytes (when the device holds nothing);
- ``delta``: the changed positions (compared bit for bit, so ``-0.0`` vs
  ``0.0`` counts) coded like top-k indices (varint gaps or a bitmap, see
  :mod:`devices.codecs.indices`), then their new float32 values.

Numpy only. ``model_hash`` is the same function as ``cloud.model_store.model_hash``,
repeated here because ``devices`` must not import the cloud tier.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from devices.codecs.base import CodecError
from devices.codecs.indices import BITMAP, VARINT, bitmap_size, decode_indices, encode_indices

__all__ = ["Downlink", "DownlinkError", "apply_downlink", "encode_model_update", "model_hash"]


class DownlinkError(CodecError):
    """A downlink that cannot be built within bounds, or does not reproduce its hash."""


def model_hash(params: np.ndarray) -> str:
    """SHA-256 of the float32 little-endian bytes: the model's identity on the wire."""
    flat = np.ascontiguousarray(params, dtype="<f4")
    return hashlib.sha256(flat.tobytes()).hexdigest()


@dataclass(frozen=True)
class Downlink:
    """A model version on its way to a device."""

    kind: str  # "full" | "delta"
    hash: str  # SHA-256 of the new model (what the device must end up with)
    base: str | None  # hash of the model the delta applies to; None for "full"
    size: int  # number of float32 parameters
    payload: bytes
    meta: dict[str, int] = field(default_factory=dict)  # delta: {"k": changed, "idx": coding}

    @property
    def nbytes(self) -> int:
        return len(self.payload)


def _flat32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype="<f4").reshape(-1)


def encode_model_update(
    new: np.ndarray, old: np.ndarray | None, new_hash: str, max_bytes: int | None = None
) -> Downlink:
    """The smallest exact downlink taking a device from ``old`` (or nothing) to ``new``.

    ``new_hash`` must be ``model_hash(new)`` (checked: a wrong announcement
    would make every device refuse the update). An ``old`` of another size
    (the architecture changed) gets the full model. If even the smallest
    representation exceeds ``max_bytes``, raises :class:`DownlinkError`
    (``too-large``) so the caller can decide what to do with that device.
    """
    n32 = _flat32(new)
    if model_hash(n32) != new_hash:
        raise ValueError(f"new_hash {new_hash[:12]}... is not the SHA-256 of the new model")
    full = Downlink("full", new_hash, None, n32.size, n32.tobytes())
    best = full
    if old is not None:
        o32 = _flat32(old)
        if o32.size == n32.size:
            changed = np.flatnonzero(n32.view(np.uint32) != o32.view(np.uint32))
            if 4 * changed.size < full.nbytes:  # cheap pre-check before coding indices
                index_bytes, mode = encode_indices(changed, n32.size)
                payload = index_bytes + n32[changed].tobytes()
                if len(payload) < full.nbytes:
                    best = Downlink(
                        "delta",
                        new_hash,
                        model_hash(o32),
                        n32.size,
                        payload,
                        {"k": int(changed.size), "idx": mode},
                    )
    if max_bytes is not None and best.nbytes > max_bytes:
        raise DownlinkError(
            "too-large", f"smallest exact downlink ({best.kind}) is {best.nbytes} B > {max_bytes} B"
        )
    return best


def _check_int(value: object, what: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise DownlinkError("bad-meta", f"{what} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def apply_downlink(dl: Downlink, old: np.ndarray | None) -> np.ndarray:
    """Reconstruct the new model (flat float32) and verify its hash; raises DownlinkError.

    Sizes come from the downlink, so they are checked against the payload
    (and the held model) before anything is allocated.
    """
    payload = dl.payload
    if not isinstance(payload, bytes):
        raise DownlinkError("bad-payload", f"payload must be bytes, got {type(payload).__name__}")
    if dl.kind == "full":
        size = _check_int(dl.size, "size", 0, len(payload) // 4)
        if len(payload) != 4 * size:
            raise DownlinkError(
                "bad-length", f"full model payload has {len(payload)} bytes, expected {4 * size}"
            )
        out = np.frombuffer(payload, dtype="<f4").astype(np.float32)
    elif dl.kind == "delta":
        if old is None:
            raise DownlinkError("wrong-base", "a delta downlink needs the model it applies to")
        o32 = _flat32(old)
        size = _check_int(dl.size, "size", 0, 1 << 62)
        if size != o32.size:
            raise DownlinkError(
                "wrong-base", f"delta is for a {size}-parameter model, device holds {o32.size}"
            )
        base = model_hash(o32)
        if dl.base != base:
            raise DownlinkError(
                "wrong-base",
                f"delta applies to {str(dl.base)[:12]}..., device holds {base[:12]}...",
            )
        meta = dl.meta if isinstance(dl.meta, dict) else {}
        if set(meta) != {"k", "idx"}:
            raise DownlinkError("bad-meta", f"delta meta must have exactly k and idx, got {meta!r}")
        k = _check_int(meta["k"], "meta['k']", 0, size)
        mode = _check_int(meta["idx"], "meta['idx']", VARINT, BITMAP)
        ilen = len(payload) - 4 * k
        if ilen < 0 or (mode == BITMAP and ilen != bitmap_size(size)):
            raise DownlinkError(
                "bad-length", f"delta payload of {len(payload)} bytes does not fit k = {k} changes"
            )
        try:
            idx = decode_indices(payload[:ilen], size, k, mode, "delta indices")
        except CodecError as e:
            raise DownlinkError(e.reason, e.detail) from None
        out = o32.astype(np.float32, copy=True)
        out[idx] = np.frombuffer(payload, dtype="<f4", offset=ilen, count=k)
    else:
        raise DownlinkError("bad-kind", f"unknown downlink kind {dl.kind!r} (full or delta)")
    got = model_hash(out)
    if dl.hash != got:
        raise DownlinkError(
            "hash-mismatch",
            f"reconstructed model hashes to {got[:12]}..., announced {str(dl.hash)[:12]}...",
        )
    return out
