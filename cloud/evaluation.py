"""Global evaluation of a flat parameter vector on a held-out set."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from devices.models import set_flat_params


@dataclass(frozen=True)
class Evaluation:
    accuracy: float
    loss: float
    samples: int


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, params: np.ndarray, x: np.ndarray, y: np.ndarray, batch: int = 2048
) -> Evaluation:
    if len(x) == 0:
        return Evaluation(float("nan"), float("nan"), 0)
    set_flat_params(model, params)
    model.eval()
    correct = 0
    loss_sum = 0.0
    for i in range(0, len(x), batch):
        xb = torch.from_numpy(np.ascontiguousarray(x[i : i + batch]))
        yb = torch.from_numpy(np.ascontiguousarray(y[i : i + batch]))
        logits = model(xb)
        loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
    return Evaluation(correct / len(x), loss_sum / len(x), len(x))
