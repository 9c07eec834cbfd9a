"""What each device sends up: codec choice (fixed or adaptive to its link) and local work caps.

Pure functions of the device's link and the model size; the cohort trainers
call them per device per round.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from devices.codecs import CODECS
from devices.compression import fit_budget
from hierarchy.timeline import TRAIN_FLOPS_PER_FORWARD
from hierarchy.topology import DeviceNode

MAX_UPDATE_BYTES = 50_000  # the field's target for one device update, envelope included
ENVELOPE_OVERHEAD_BYTES = 320  # CBOR framing, ids, hashes, nonce, meta, signature (upper bound)
CODEC_CHOICES = (*sorted(CODECS), "adaptive")


@dataclass(frozen=True)
class UplinkConfig:
    codec: str = "f32"  # a registered codec, or "adaptive"
    topk_ratio: float = 0.1  # for fixed top-k codecs: share of entries kept
    error_feedback: bool = True  # keep what compression lost on the device for next round
    upload_budget_s: float = 0.5  # adaptive: seconds of uplink an update may take
    chunk: int = 256  # quantization chunk (one scale per chunk)

    def validate(self) -> None:
        if self.codec not in CODEC_CHOICES:
            raise ValueError(
                f"unknown codec {self.codec!r}; choose one of {', '.join(CODEC_CHOICES)}"
            )
        if not 0 < self.topk_ratio <= 1:
            raise ValueError(f"topk-ratio must be in (0, 1], got {self.topk_ratio}")
        if not self.upload_budget_s > 0:
            raise ValueError(f"upload-budget-s must be > 0, got {self.upload_budget_s}")
        if self.chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {self.chunk}")


def byte_budget(device: DeviceNode, cfg: UplinkConfig) -> int:
    """Payload bytes a device may send: uplink bandwidth x time budget, capped at 50 KB."""
    link_bytes = device.link.up_mbps * 1e6 / 8 * cfg.upload_budget_s
    return int(min(MAX_UPDATE_BYTES, link_bytes)) - ENVELOPE_OVERHEAD_BYTES


def choose_codec(
    device: DeviceNode, num_params: int, cfg: UplinkConfig
) -> tuple[str, dict[str, int]]:
    """The codec and its parameters this device uses this round."""
    quant = {"chunk": cfg.chunk}
    if cfg.codec == "adaptive":
        budget = max(byte_budget(device, cfg), 64)
        return fit_budget(num_params, budget, chunk=cfg.chunk)
    if cfg.codec.startswith("topk-"):
        k = max(1, math.ceil(cfg.topk_ratio * num_params))
        return cfg.codec, ({"k": k} | (quant if not cfg.codec.endswith("f16") else {}))
    if cfg.codec in ("int8", "int4"):
        return cfg.codec, quant
    return cfg.codec, {}


def step_cap(
    device: DeviceNode,
    *,
    start_s: float,
    deadline_s: float,
    forward_flops: float,
    batch_size: int,
    comm_s: float,
    safety: float = 0.9,
) -> int:
    """Local SGD steps a slow device can afford so its update still makes the deadline.

    ``comm_s`` is the nominal download + upload time (latency + bytes / bandwidth);
    at least one step is always allowed, so every selected device contributes.
    """
    budget = (deadline_s - start_s - comm_s) * safety
    step_s = TRAIN_FLOPS_PER_FORWARD * forward_flops * batch_size / device.flops
    return max(1, int(budget / step_s)) if budget > 0 else 1
