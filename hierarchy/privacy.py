"""The emulation's privacy tier: which SMPC mode, the DP noise and budget, and the cloud phase.

Three modes (``../shared/DESIGN.md``, "Gateway → cloud"):

- ``gateway-trusted`` (the default on Ray): each gateway splits its partial
  aggregate into K additive shares, one per cloud party
  (``gateway.secret_sharing``); the K CrypTen parties (``cloud.smpc``, one
  process each) agree on the gateways that delivered, sum, add the DP noise
  jointly and reveal only the noisy sum;
- ``device-shares``: devices mask their updates with seed-expanded masks and
  seal the seeds to the parties; gateways sum blind and forward per-party
  device lists (``gateway.masked_sum``, ``cloud.unmask``);
- ``none`` (``--no-smpc``): the gateways' plaintext partial aggregates go to
  the coordinator, for comparison. DP noise, if asked for, is then added by
  the coordinator itself (central DP: the cloud sees the sums).

``auto`` resolves to ``gateway-trusted`` on the Ray backend and to ``none``
where SMPC cannot run (the in-process backend has no separate party
processes; asynchronous flushes reveal one gateway's buffer at a time).

The virtual clock charges the real bytes of every share/forward on the
gateway→cloud links (in the gateway hosts) and the parties' own traffic
(CrypTen's communication counters: rounds and bytes) on the links between
the cloud parties (:func:`smpc_seconds`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

PRIVACY_MODES = ("auto", "none", "gateway-trusted", "device-shares")
SECURE_MODES = ("gateway-trusted", "device-shares")
# The gateway accepts a device update up to this much above the clip norm (quantization
# of a clipped update may overshoot a little) and clips it to C; beyond it, "norm-bound".
CLIP_TOLERANCE = 0.05


@dataclass(frozen=True)
class PrivacyConfig:
    """Privacy settings of one emulation (CLI: ``--privacy``, ``--smpc-parties`` ...)."""

    mode: str = "auto"
    parties: int = 3  # K cloud aggregator parties (2-7)
    noise_multiplier: float = 0.0  # sigma: the revealed sum carries N(0, sigma^2 C^2)
    clip_norm: float | None = None  # C: device updates clipped to it (device + gateway check)
    secure_clip: float | None = None  # per-unit L2 bound enforced inside SMPC (CrypTen)
    epsilon_budget: float | None = None  # stop before a round would exceed it
    delta: float = 1e-5
    retries: int = 1  # fresh party groups tried for a round whose SMPC failed
    party_latency_ms: float = 0.5  # between cloud parties (one data centre / region)
    party_mbps: float = 10_000.0
    seal_to_party0: bool = False  # device-shares: one more seed per device, to party 0

    def validate(self) -> None:
        if self.mode not in PRIVACY_MODES:
            raise ValueError(
                f"unknown privacy mode {self.mode!r}; choose one of {', '.join(PRIVACY_MODES)}"
            )
        if not 2 <= self.parties <= 7:
            raise ValueError(f"smpc-parties must be in 2..7, got {self.parties}")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ValueError(f"noise-multiplier must be >= 0, got {self.noise_multiplier}")
        for name in ("clip_norm", "secure_clip", "epsilon_budget"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name.replace('_', '-')} must be > 0, got {v}")
        if self.noise_multiplier > 0 and self.clip_norm is None:
            raise ValueError("noise-multiplier needs a clip norm (--clip-norm C): noise is sigma*C")
        if self.epsilon_budget is not None and self.noise_multiplier == 0:
            raise ValueError("an epsilon budget needs DP noise (--noise-multiplier > 0)")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        if self.retries < 0:
            raise ValueError(f"smpc-retries must be >= 0, got {self.retries}")
        if not (self.party_latency_ms >= 0 and self.party_mbps > 0):
            raise ValueError("party-latency-ms must be >= 0 and party-mbps > 0")
        if self.mode == "none" and self.secure_clip is not None:
            raise ValueError("secure-clip bounds contributions inside SMPC; not with --no-smpc")

    @property
    def dp(self) -> bool:
        return self.noise_multiplier > 0

    @property
    def noise_std(self) -> float:
        """Total noise std per coordinate of the revealed sum: sigma * C."""
        return self.noise_multiplier * self.clip_norm if self.clip_norm is not None else 0.0


def resolve_mode(cfg: PrivacyConfig, backend: str, async_mode: bool) -> tuple[str, str | None]:
    """The mode a run uses, and why when ``auto`` picked ``none``; refuse impossible choices."""
    if cfg.mode == "auto":
        if backend != "ray":
            return "none", "the in-process backend has no separate cloud party processes"
        if async_mode:
            return "none", "asynchronous flushes reveal one gateway's buffer at a time"
        return "gateway-trusted", None
    if cfg.mode in SECURE_MODES:
        if backend != "ray":
            raise ValueError(
                f"--privacy {cfg.mode} runs K CrypTen parties as separate processes: "
                "use --backend ray (or --no-smpc with --backend local)"
            )
        if async_mode:
            raise ValueError(
                f"--privacy {cfg.mode} applies to synchronous rounds; use --no-smpc with --mode "
                "async (each flush would reveal one gateway's buffer)"
            )
    return cfg.mode, None


@dataclass(frozen=True)
class DevicePrivacy:
    """What a device must do with its update this run (passed to the cohort trainers)."""

    mode: str  # "none", "gateway-trusted" or "device-shares"
    clip_norm: float | None = None
    uniform_weights: bool = False  # DP: every device weighs 1 (sensitivity C, not C x samples)
    party_keys: tuple[str, ...] = ()  # device-shares: the parties' X25519 public keys, hex
    seal_to_party0: bool = False


@dataclass(frozen=True)
class GatewayPrivacy:
    """What a gateway does at round close: where its shares/forwards go, what it checks."""

    mode: str
    parties: tuple[Any, ...] = ()  # party handles (rank order)
    clip_norm: float | None = None
    uniform_weights: bool = False
    per_device_units: bool = False  # device-shares + secure clip: every device its own unit
    seal_to_party0: bool = False


def clip_check(delta: np.ndarray, clip_norm: float) -> np.ndarray | None:
    """The gateway's re-check of a device's clipping: clipped copy, or None if far above C."""
    n = float(np.linalg.norm(delta))
    if n > clip_norm * (1 + CLIP_TOLERANCE):
        return None
    return delta * (clip_norm / n) if n > clip_norm else delta


def smpc_seconds(comm_rounds: int, party_bytes: int, latency_ms: float, mbps: float) -> float:
    """Virtual time of the parties' protocol: one link latency per round + bytes at the rate."""
    return comm_rounds * latency_ms / 1e3 + party_bytes * 8 / (mbps * 1e6)


def sampling_rate(participation: float, over_select: bool, mean_availability: float) -> float:
    """The accountant's q: the probability a device is asked in a round.

    Availability is not counted as amplification (a device's absence is not
    random from the adversary's view); over-selection raises q.
    """
    q = participation
    if over_select:
        q /= max(mean_availability, 1e-6)
    return float(min(1.0, q))
