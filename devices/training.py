"""Local training of one device: plain minibatch SGD on cross entropy.

This is the reference semantics. :mod:`devices.cohort` trains many devices at
once with ``torch.func.vmap`` and must agree with :func:`train_device` device
by device, so both draw their minibatches from the same :func:`batch_plan`.

Nothing here touches torch's thread settings: the process that owns the
cores (a cohort-trainer actor, a benchmark) decides with
``torch.set_num_threads``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from devices.models import get_flat_params, num_params, set_flat_params


@dataclass(frozen=True)
class LocalTrainingConfig:
    """What one round of local training does on a device.

    ``max_steps`` caps the number of SGD steps whatever the data size, which
    bounds the compute a large device spends per round.

    ``max_grad_norm`` clips each SGD step's whole gradient (all parameter
    tensors together) to that L2 norm before the step. Why: with label-skewed
    devices, plain FedAvg on HAPT collapsed to one class at client lr 0.3
    (once even at 0.2), while with every step clipped to norm 1 it trains at
    lr 3.0 and gets within 3 points of centralized training
    (bench/RESULTS.md): a rare huge step can no longer throw the average off.
    This is an optimizer setting, not privacy: DP clipping of the whole
    update is ``PrivacyConfig.clip_norm``. ``None`` = no clipping.
    """

    epochs: int = 1
    batch_size: int = 16
    lr: float = 0.05
    max_steps: int | None = None
    max_grad_norm: float | None = None

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ValueError(f"LocalTrainingConfig.epochs must be >= 0, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"LocalTrainingConfig.batch_size must be >= 1, got {self.batch_size}")
        if not np.isfinite(self.lr) or self.lr < 0:
            raise ValueError(f"LocalTrainingConfig.lr must be finite and >= 0, got {self.lr}")
        if self.max_steps is not None and self.max_steps < 0:
            raise ValueError(
                f"LocalTrainingConfig.max_steps must be None or >= 0, got {self.max_steps}"
            )
        if self.max_grad_norm is not None and not (
            np.isfinite(self.max_grad_norm) and self.max_grad_norm > 0
        ):
            raise ValueError(
                "LocalTrainingConfig.max_grad_norm must be None or finite and > 0, "
                f"got {self.max_grad_norm}"
            )


@dataclass
class LocalResult:
    """One device's update. ``loss`` is the mean minibatch loss over its steps (0.0 if none)."""

    delta: np.ndarray  # float32 flat, trained - global
    num_samples: int
    steps: int
    loss: float


def batch_plan(num_samples: int, cfg: LocalTrainingConfig, seed: int) -> list[np.ndarray]:
    """The minibatch index arrays a device uses, in order.

    Each epoch draws a fresh permutation from ``np.random.default_rng(seed)``
    and cuts it into ``batch_size`` chunks, keeping the last partial chunk (so
    every sample is seen once per epoch). The list is truncated at
    ``max_steps``. Pure function of its arguments: single-device and cohort
    training call it with the same seed and therefore see the same batches.
    """
    if num_samples < 0:
        raise ValueError(f"batch_plan: num_samples must be >= 0, got {num_samples}")
    limit = cfg.max_steps
    if num_samples == 0 or limit == 0:
        return []
    rng = np.random.default_rng(seed)
    plan: list[np.ndarray] = []
    for _ in range(cfg.epochs):
        perm = rng.permutation(num_samples)
        for start in range(0, num_samples, cfg.batch_size):
            plan.append(perm[start : start + cfg.batch_size])
            if limit is not None and len(plan) >= limit:
                return plan
    return plan


def num_steps(num_samples: int, cfg: LocalTrainingConfig) -> int:
    """``len(batch_plan(num_samples, cfg, seed))`` without drawing permutations."""
    if num_samples <= 0:
        return 0
    steps = cfg.epochs * -(-num_samples // cfg.batch_size)
    return steps if cfg.max_steps is None else min(steps, cfg.max_steps)


def check_device_data(x: np.ndarray, y: np.ndarray, where: str) -> None:
    """Reject data whose shapes cannot be trained on, naming the device."""
    if x.ndim < 1 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"{where}: x must be (n, ...) and y (n,) with the same n, "
            f"got x {x.shape} and y {y.shape}"
        )


def clip_scale(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """``min(1, max_norm / norm)``, elementwise: the factor that clips a gradient of ``norm``.

    One formula for :func:`train_device` and the cohort (where ``norm`` holds
    one entry per device), so both clip identically. A zero gradient gets 1.
    """
    return (max_norm / norm.clamp_min(1e-12)).clamp_max(1.0)


def train_device(
    model: nn.Module,
    global_params: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    cfg: LocalTrainingConfig,
    seed: int,
) -> LocalResult:
    """Train ``model`` from ``global_params`` on one device's data; return the update.

    ``model`` is scratch space: its parameters are overwritten with
    ``global_params`` and then trained, so one module can serve many devices
    in turn. Plain SGD without momentum (no optimizer state to carry between
    rounds); the loss of a step is the mean cross entropy over that step's
    batch, so a short last batch counts as much as a full one. With
    ``cfg.max_grad_norm`` set, a step whose gradient norm exceeds it is scaled
    down to exactly that norm (``clip_scale``).
    """
    check_device_data(x, y, "train_device")
    expected = num_params(model)
    if np.shape(global_params) != (expected,):
        raise ValueError(
            f"train_device: global_params must have shape ({expected},), "
            f"got {np.shape(global_params)}"
        )
    global_params = np.asarray(global_params, dtype=np.float32)
    set_flat_params(model, global_params)
    plan = batch_plan(len(y), cfg, seed)
    if not plan:
        return LocalResult(
            delta=np.zeros(expected, dtype=np.float32), num_samples=len(y), steps=0, loss=0.0
        )

    # Batches are gathered in numpy: the gather copies anyway, and it keeps
    # torch away from the (often read-only, shared) dataset arrays.
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    params: list[torch.Tensor] = [p for p in model.parameters() if p.requires_grad]
    total_loss = 0.0
    for idx in plan:
        loss = F.cross_entropy(model(torch.from_numpy(x[idx])), torch.from_numpy(y[idx]))
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            if cfg.max_grad_norm is not None:
                norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
                grads = torch._foreach_mul(grads, clip_scale(norm, cfg.max_grad_norm))
            torch._foreach_add_(params, grads, alpha=-cfg.lr)
        total_loss += float(loss.detach())
    delta = get_flat_params(model) - global_params
    return LocalResult(
        delta=delta.astype(np.float32, copy=False),
        num_samples=len(y),
        steps=len(plan),
        loss=total_loss / len(plan),
    )
