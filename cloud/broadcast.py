"""Server-side compression of the global update, with error feedback.

With ``--downlink delta`` the cloud does not publish the server optimizer's
output ``target`` as is: it compresses the step ``target - old`` with a codec
from the registry and *defines* the new version as
``devices.delta_chain.apply_step(old, Q(step))`` -- so every device can rebuild
it bit for bit from the compressed bytes and verify its hash.

What the compression (and the float32 addition) loses is kept here as a
float64 residual and added to the next step (error feedback, as on the
devices' uplink): with ``x_t`` the published versions and ``target_t`` what
the optimizer asked for from ``x_{t-1}``,

    x_T - x_0 == sum_t (target_t - x_{t-1}) - residual_T

(to float64 rounding), so nothing is lost over rounds, only delayed. Pure numpy.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from devices.codecs import Encoded, encode
from devices.delta_chain import DELTA_CODECS, apply_step

__all__ = ["BroadcastCompressor", "step_params"]


def step_params(codec: str, n: int, *, topk_ratio: float, chunk: int) -> dict[str, Any]:
    """Codec options for a broadcast step of ``n`` parameters."""
    if codec not in DELTA_CODECS:
        raise ValueError(
            f"unknown downlink codec {codec!r}; choose one of {', '.join(DELTA_CODECS)}"
        )
    out: dict[str, Any] = {}
    if codec.startswith("topk-"):
        out["k"] = min(n, max(1, math.ceil(topk_ratio * n))) if n else 0
    if codec.endswith(("int8", "int4")):
        out["chunk"] = chunk
    return out


class BroadcastCompressor:
    """The cloud's error-feedback memory for the model it broadcasts (one per model)."""

    def __init__(self, codec: str, *, topk_ratio: float = 0.1, chunk: int = 256) -> None:
        step_params(codec, 1, topk_ratio=topk_ratio, chunk=chunk)  # validates the codec
        self.codec = codec
        self.topk_ratio = topk_ratio
        self.chunk = chunk
        self.residual: np.ndarray | None = None  # float64, what has not been broadcast yet

    def step(self, old: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, Encoded]:
        """Compress ``target - old`` (plus the residual); return the new version and its step.

        Round to nearest, no randomness: error feedback already removes the
        bias, and a deterministic encoder makes the emulation reproducible.
        """
        o = np.ascontiguousarray(old, dtype=np.float32).reshape(-1)
        t = np.asarray(target, dtype=np.float64).reshape(-1)
        if t.size != o.size:
            raise ValueError(f"target has {t.size} parameters, the model {o.size}")
        if self.residual is not None and self.residual.size != o.size:
            raise ValueError(
                f"model has {o.size} parameters but the residual {self.residual.size}; "
                "a new architecture needs a new compressor"
            )
        corrected = t - o.astype(np.float64)
        if self.residual is not None:
            corrected += self.residual
        params = step_params(self.codec, o.size, topk_ratio=self.topk_ratio, chunk=self.chunk)
        enc = encode(self.codec, corrected, **params)
        new = apply_step(o, enc)
        # Against what was really applied (after float32 rounding of the sum), not the
        # decoded step: then the identity in the module docstring holds to float64 rounding.
        self.residual = corrected - (new.astype(np.float64) - o.astype(np.float64))
        return new, enc
