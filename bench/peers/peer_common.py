"""What every peer script shares: the workload file, the model, local SGD, the result file.

Runs inside the peers' own venvs (numpy + torch only, no tierfl import), so the
three frameworks train the very same clients with the very same model and
hyper-parameters; only the orchestration around it differs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn


class Workload:
    """The partitioned digits split written by ``bench_vs_peers.py`` (one .npz)."""

    def __init__(self, path: str | Path) -> None:
        z = np.load(path)
        self.x_train = torch.from_numpy(z["x_train"])
        self.y_train = torch.from_numpy(z["y_train"])
        self.x_test = torch.from_numpy(z["x_test"])
        self.y_test = torch.from_numpy(z["y_test"])
        # Ragged client index arrays stored flat: client i owns idx[off[i]:off[i+1]].
        self._idx = torch.from_numpy(z["client_idx"])
        self._off = z["client_offsets"]
        self.num_clients = len(self._off) - 1
        self.lr = float(z["lr"])
        self.batch_size = int(z["batch_size"])
        self.epochs = int(z["epochs"])

    def client(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self._idx[self._off[i] : self._off[i + 1]]
        return self.x_train[idx], self.y_train[idx]


def build_mlp() -> nn.Sequential:
    """The benchmark model, 64-64-10, with the initial weights every framework starts from."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def train_local(model: nn.Module, x: torch.Tensor, y: torch.Tensor, w: Workload, seed: int) -> int:
    """Plain SGD, mean cross-entropy, a fresh shuffle per epoch; returns the sample count."""
    opt = torch.optim.SGD(model.parameters(), lr=w.lr)
    rng = np.random.default_rng(seed)
    model.train()
    for _ in range(w.epochs):
        perm = torch.from_numpy(rng.permutation(len(y)))
        for s in range(0, len(y), w.batch_size):
            b = perm[s : s + w.batch_size]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[b]), y[b]).backward()
            opt.step()
    return len(y)


@torch.no_grad()
def accuracy(model: nn.Module, w: Workload) -> float:
    model.eval()
    return float((model(w.x_test).argmax(1) == w.y_test).float().mean())


class RoundLog:
    """Wall-clock stamps at the end of each round (after aggregation + central evaluation)."""

    def __init__(self) -> None:
        self.round_end: list[float] = []
        self.accuracy: list[float] = []

    def stamp(self, acc: float) -> None:
        self.round_end.append(time.time())
        self.accuracy.append(acc)

    def write(
        self,
        path: str | Path,
        framework: str,
        version: str,
        config: str,
        extra: dict[str, Any] | None = None,
    ) -> None:
        Path(path).write_text(
            json.dumps(
                {
                    "framework": framework,
                    "version": version,
                    "config": config,
                    "round_end_unix": self.round_end,
                    "accuracy": self.accuracy,
                    **(extra or {}),
                },
                indent=1,
            )
        )
