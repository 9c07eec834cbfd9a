"""The server-optimizer interface."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np


def weighted_mean(weighted_sum: np.ndarray, total_weight: float) -> np.ndarray:
    """Divide the revealed sum by the public total weight (done once, in the cloud)."""
    if total_weight <= 0:
        raise ValueError("cannot average: total weight is zero (no device update arrived)")
    return weighted_sum / total_weight


class ServerOptimizer(ABC):
    """Applies the round's mean client delta (trained − global) to the global model."""

    name: str

    @abstractmethod
    def step(self, params: np.ndarray, mean_delta: np.ndarray) -> np.ndarray:
        """Return new parameters; must not modify ``params`` in place."""

    def state_dict(self) -> dict[str, object]:
        return {}
