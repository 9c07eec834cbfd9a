"""Partial aggregation at the edge: a weighted sum, its total weight and count.

A gateway never divides: it forwards the *sum* of its devices' updates plus
the public total weight, so the cloud can add partial aggregates from many
gateways (or their secret shares) and divide once. Keeping the sum un-normalized
is what makes the partial aggregate additive and therefore secret-shareable.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class PartialAggregate:
    """What one gateway uplinks for one round."""

    gateway: str
    round: int
    weighted_sum: np.ndarray  # float64 [P]: sum_i w_i * delta_i
    total_weight: float  # sum_i w_i (public)
    count: int  # number of device updates folded in (public)
    devices: list[str] = field(default_factory=list)

    @classmethod
    def empty(cls, gateway: str, round_: int, num_params: int) -> PartialAggregate:
        return cls(gateway, round_, np.zeros(num_params, dtype=np.float64), 0.0, 0, [])

    def add(self, device: str, delta: np.ndarray, weight: float) -> None:
        """Fold one validated device update in (weight = its sample count for FedAvg)."""
        if delta.ndim != 1 or delta.shape[0] != self.weighted_sum.shape[0]:
            raise ValueError(
                f"update from {device!r} has shape {delta.shape}, "
                f"expected ({self.weighted_sum.shape[0]},)"
            )
        if not np.isfinite(weight) or weight < 0:
            raise ValueError(f"update from {device!r} has invalid weight {weight!r}")
        self.weighted_sum += weight * delta.astype(np.float64, copy=False)
        self.total_weight += float(weight)
        self.count += 1
        self.devices.append(device)

    def add_batch(self, devices: Sequence[str], deltas: np.ndarray, weights: np.ndarray) -> None:
        """Fold a stacked batch [n, P] at once (one BLAS call instead of n axpys)."""
        if deltas.ndim != 2 or deltas.shape[0] != len(devices):
            raise ValueError(f"deltas shape {deltas.shape} does not match {len(devices)} devices")
        if deltas.shape[1] != self.weighted_sum.shape[0]:
            raise ValueError(
                f"deltas have {deltas.shape[1]} parameters, expected {self.weighted_sum.shape[0]}"
            )
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (len(devices),) or not np.all(np.isfinite(w)) or np.any(w < 0):
            raise ValueError("weights must be finite, non-negative, one per device")
        self.weighted_sum += w @ deltas.astype(np.float64, copy=False)
        self.total_weight += float(w.sum())
        self.count += len(devices)
        self.devices.extend(devices)

    @property
    def nbytes(self) -> int:
        """Uplink payload size: the sum as float32 plus a small header of public scalars."""
        return int(self.weighted_sum.shape[0]) * 4 + 64


def combine(partials: Iterable[PartialAggregate], num_params: int) -> tuple[np.ndarray, float, int]:
    """Sum partial aggregates: (weighted_sum, total_weight, count). Order-independent up to fp."""
    total = np.zeros(num_params, dtype=np.float64)
    weight = 0.0
    count = 0
    for p in partials:
        if p.weighted_sum.shape != (num_params,):
            raise ValueError(
                f"partial aggregate of {p.gateway!r} has shape {p.weighted_sum.shape}, "
                f"expected ({num_params},)"
            )
        total += p.weighted_sum
        weight += p.total_weight
        count += p.count
    return total, weight, count
