"""Server optimizers: how the coordinator turns a mean update into a new model.

One strategy per module (as in Flower's ``serverapp/strategy``); each is pure
numpy so it is tested without Ray.
"""

from __future__ import annotations

from cloud.strategy.base import ServerOptimizer
from cloud.strategy.fedavg import FedAvg
from cloud.strategy.fedavgm import FedAvgM

STRATEGIES = ("fedavg", "fedavgm")


def make_strategy(name: str, *, server_lr: float = 1.0, momentum: float = 0.9) -> ServerOptimizer:
    """Build a server optimizer by name; unknown names get an error listing valid ones."""
    if name == "fedavg":
        return FedAvg(server_lr=server_lr)
    if name == "fedavgm":
        return FedAvgM(server_lr=server_lr, momentum=momentum)
    raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")


__all__ = ["STRATEGIES", "FedAvg", "FedAvgM", "ServerOptimizer", "make_strategy"]
