"""FedAvgM (Hsu et al. 2019): server momentum over rounds damps non-IID client drift."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cloud.strategy.base import ServerOptimizer


@dataclass
class FedAvgM(ServerOptimizer):
    """v ← β·v + Δ̄;  x ← x + η·v."""

    server_lr: float = 1.0
    momentum: float = 0.9
    name: str = "fedavgm"
    _velocity: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.server_lr > 0:
            raise ValueError(f"server_lr must be > 0, got {self.server_lr}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")

    def step(self, params: np.ndarray, mean_delta: np.ndarray) -> np.ndarray:
        if self._velocity is None:
            self._velocity = np.zeros_like(mean_delta, dtype=np.float64)
        self._velocity = self.momentum * self._velocity + mean_delta
        return (params.astype(np.float64) + self.server_lr * self._velocity).astype(params.dtype)

    def state_dict(self) -> dict[str, object]:
        return {"velocity": None if self._velocity is None else self._velocity.copy()}
