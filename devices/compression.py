"""Error feedback and byte-budget fitting for compressed device updates.

Lossy codecs drop information every round; error feedback (Seide et al.
2014; Karimireddy et al. 2019) keeps what was dropped on the device and adds
it to the next update, so nothing is lost for good: after ``T`` rounds the
decoded updates sum to the true updates minus one residual, whatever the
codec. That is what makes aggressive top-k safe to use.

``fit_budget`` picks the densest codec whose worst-case payload fits a byte
budget (uplink bandwidth x time budget, capped at 50 KB by the caller), so a
device on a good link sends f32 and one on a poor link sends top-k.
Numpy only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from devices.codecs import CODECS, Encoded, decode, encode, max_encoded_size
from devices.codecs.quantize import DEFAULT_CHUNK

__all__ = ["DEFAULT_PREFERENCE", "ErrorFeedback", "fit_budget"]

#: Densest first. Dense codecs are tried in this order; a top-k entry then
#: takes as many values as the budget allows. int8 values are the usual
#: sweet spot for top-k: a quarter of f32's bytes, error <= max/127 per chunk.
DEFAULT_PREFERENCE: tuple[str, ...] = ("f32", "f16", "int8", "int4", "topk-int8")


class ErrorFeedback:
    """One device's error-feedback memory (keep one instance per device).

    ``compress`` encodes ``update + residual``, decodes it exactly as the
    gateway will, and keeps ``residual = corrected - decoded``. Hence, with
    ``d_t`` the decoded updates, ``sum(u_t) - sum(d_t) == residual`` after any
    number of rounds. The residual is float64 by default so that identity
    holds to rounding; ``dtype=np.float32`` halves the memory for emulations
    holding thousands of devices.
    """

    def __init__(self, dtype: type[np.floating[Any]] = np.float64) -> None:
        self.dtype = np.dtype(dtype)
        self.residual: np.ndarray | None = None

    def reset(self) -> None:
        """Forget the residual (e.g. when the device is re-enrolled or the model changes size)."""
        self.residual = None

    def step(
        self,
        update: np.ndarray,
        codec: str,
        *,
        rng: np.random.Generator | None = None,
        **params: Any,
    ) -> tuple[Encoded, np.ndarray]:
        """Compress ``update`` with feedback; return the encoding and what the gateway decodes."""
        u = np.asarray(update, dtype=np.float64)
        if self.residual is not None and self.residual.size != u.size:
            raise ValueError(
                f"update has {u.size} elements but the residual has {self.residual.size}; "
                "call reset() when the model changes"
            )
        corrected = u if self.residual is None else u + self.residual.reshape(u.shape)
        enc = encode(codec, corrected, rng=rng, **params)
        decoded = decode(enc, max_elements=max(u.size, 1))
        self.residual = (corrected - decoded).astype(self.dtype).reshape(-1)
        return enc, decoded

    def compress(
        self,
        update: np.ndarray,
        codec: str,
        *,
        rng: np.random.Generator | None = None,
        **params: Any,
    ) -> Encoded:
        """Encode ``update + residual`` with ``codec`` and keep what the encoding lost."""
        return self.step(update, codec, rng=rng, **params)[0]


def _max_k(codec: str, n: int, budget: int, chunk: int) -> int:
    """Largest k whose worst-case top-k payload fits ``budget`` (0 if none)."""
    if max_encoded_size(codec, n, k=min(1, n), **_chunk(codec, chunk)) > budget:
        return 0
    lo, hi = min(1, n), n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if max_encoded_size(codec, n, k=mid, **_chunk(codec, chunk)) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _chunk(codec: str, chunk: int) -> dict[str, int]:
    return {"chunk": chunk} if codec.endswith(("int8", "int4")) else {}


def fit_budget(
    update_size: int,
    budget_bytes: int,
    *,
    preference: Sequence[str] = DEFAULT_PREFERENCE,
    chunk: int = DEFAULT_CHUNK,
) -> tuple[str, dict[str, int]]:
    """The densest ``(codec, params)`` whose payload is guaranteed to fit ``budget_bytes``.

    Dense codecs in ``preference`` are taken in order if their exact size
    fits; a top-k codec gets the largest ``k`` whose *worst-case* size fits
    (index bytes depend on where the large entries fall, so the actual
    payload is usually a little smaller). The budget covers the payload only;
    subtract envelope overhead before calling. Raises ``ValueError`` if not
    even one top-k entry fits.
    """
    if update_size < 0:
        raise ValueError(f"update_size must be >= 0, got {update_size}")
    if budget_bytes < 0:
        raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
    for codec in preference:
        if codec not in CODECS:
            raise ValueError(f"unknown codec {codec!r} in preference")
        if codec.startswith("topk-"):
            k = _max_k(codec, update_size, budget_bytes, chunk)
            if k >= 1 or update_size == 0:
                return codec, {"k": k, **_chunk(codec, chunk)}
        else:
            params = _chunk(codec, chunk)
            if max_encoded_size(codec, update_size, **params) <= budget_bytes:
                return codec, params
    raise ValueError(
        f"no codec in {list(preference)} fits {update_size} values into {budget_bytes} bytes"
    )
