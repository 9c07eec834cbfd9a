"""FedAvg (McMahan et al. 2017): the new model is the sample-weighted mean of client models."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cloud.strategy.base import ServerOptimizer


@dataclass
class FedAvg(ServerOptimizer):
    """x ← x + η·Δ̄; with η = 1 this is exactly the weighted average of client models."""

    server_lr: float = 1.0
    name: str = "fedavg"

    def __post_init__(self) -> None:
        if not self.server_lr > 0:
            raise ValueError(f"server_lr must be > 0, got {self.server_lr}")

    def step(self, params: np.ndarray, mean_delta: np.ndarray) -> np.ndarray:
        return (params.astype(np.float64) + self.server_lr * mean_delta).astype(params.dtype)
