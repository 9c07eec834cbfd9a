"""Vectorized local training of a whole cohort of devices with ``torch.func``.

Training devices one by one costs a Python round trip and a handful of tiny
kernel launches per SGD step per device; with thousands of emulated devices
that overhead, not arithmetic, dominates. Here every device's parameters are
stacked along a leading axis and one ``vmap(grad(loss))`` call takes an SGD
step for all of them at once.

Semantics are exactly :func:`devices.training.train_device`'s, device by
device: the same :func:`~devices.training.batch_plan` (same seed, same
batches), the same mean cross entropy per batch, the same plain SGD update.
Differences in batch size are handled with per-sample weights (``1 / batch
length`` for real samples, ``0`` for padding), so a short last batch gives the
same gradient as ``train_device``'s smaller batch. Gradient clipping
(``cfg.max_grad_norm``) is per device: the norm of row ``j`` of every
parameter's gradient together, so one device's clipping never touches another.

"The same" means equal up to float32 summation order (a vmapped grouped
convolution adds in a different order than a single one): ~1e-7 per step.
On a rare long trajectory a ReLU input sits so close to zero that this flips
it, and from then on the two runs drift apart by up to ~1e-3 -- exactly as
``train_device`` does against itself when only the order of the samples in
a batch changes, so neither answer is the more correct one.

To keep padding small, devices are sorted by (steps, samples) and cut into
buckets of at most ``max_cohort``. Within a bucket, step ``s`` only touches the
devices that still have a step ``s`` -- because of the sort they are a
suffix of the bucket, so finished devices cost nothing and their parameters
provably stay put -- and the batch axis is trimmed to the longest batch
actually present at that step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap
from torch.nn import functional as F

from devices.training import (
    LocalTrainingConfig,
    batch_plan,
    check_device_data,
    clip_scale,
    num_steps,
)


@dataclass
class CohortResult:
    """Per-device updates, in the caller's device order."""

    deltas: np.ndarray  # float32 [n_devices, P], trained - global
    num_samples: np.ndarray  # int64 [n]
    steps: np.ndarray  # int64 [n]
    loss: np.ndarray  # float64 [n], mean minibatch loss over steps (0.0 if no steps)


@dataclass
class _Bucket:
    """Everything one bucket's step loop needs, built before the loop starts.

    ``index[s, j, b]`` is the row of ``x`` / ``y`` holding sample ``b`` of
    device ``j``'s batch ``s`` (padding points at a zero row); ``weight`` is
    ``1 / len(batch)`` for real samples and 0 for padding. ``first[s]`` is the
    first device (in bucket order) that still trains at step ``s`` and
    ``width[s]`` the longest batch at that step.
    """

    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor  # int64 [S, m, B]
    weight: torch.Tensor  # float32 [S, m, B]
    first: list[int]
    width: list[int]


class CohortTrainer:
    """Trains many devices of one model architecture at once.

    ``model`` only provides the architecture (through ``functional_call``); it
    is never modified. ``max_cohort`` bounds how many devices are stacked in
    one vmapped call, i.e. peak memory.
    """

    def __init__(self, model: nn.Module, max_cohort: int = 256) -> None:
        if max_cohort < 1:
            raise ValueError(f"CohortTrainer: max_cohort must be >= 1, got {max_cohort}")
        self.model = model
        self.max_cohort = max_cohort
        named = list(model.named_parameters())
        self._names = tuple(name for name, _ in named)
        self._shapes = tuple(tuple(p.shape) for _, p in named)
        self._sizes = tuple(p.numel() for _, p in named)
        self.num_params = sum(self._sizes)
        buffers = dict(model.named_buffers())
        names = self._names

        def batch_loss(
            params: tuple[torch.Tensor, ...], x: torch.Tensor, y: torch.Tensor, w: torch.Tensor
        ) -> torch.Tensor:
            # Weighted sum == mean over the real samples (weights are 1/len or 0).
            state = {**dict(zip(names, params, strict=True)), **buffers}
            logits = functional_call(model, state, (x,))
            return (F.cross_entropy(logits, y, reduction="none") * w).sum()

        # Built once: re-wrapping vmap/grad every step costs measurable time.
        self._step: Callable[..., Any] = vmap(grad_and_value(batch_loss))

    def train(
        self,
        global_params: np.ndarray,
        data: Sequence[tuple[np.ndarray, np.ndarray]],
        cfg: LocalTrainingConfig,
        seeds: Sequence[int],
        max_steps: Sequence[int | None] | None = None,
    ) -> CohortResult:
        """Train device ``i`` on ``data[i]`` with plan seed ``seeds[i]``, from ``global_params``.

        ``data[i]`` is ``(x, y)`` as for ``train_device``; results come back in
        the same order, whatever order the buckets ran in. ``max_steps[i]``
        optionally caps device ``i``'s steps below ``cfg`` (adaptive local work
        for slow devices): it trains exactly the first steps of its batch plan,
        as ``train_device`` with ``cfg.max_steps`` set to that cap would.
        """
        n = len(data)
        if len(seeds) != n:
            raise ValueError(f"CohortTrainer.train: {n} devices but {len(seeds)} seeds")
        if max_steps is not None and len(max_steps) != n:
            raise ValueError(f"CohortTrainer.train: {n} devices but {len(max_steps)} step caps")
        if np.shape(global_params) != (self.num_params,):
            raise ValueError(
                f"CohortTrainer.train: global_params must have shape ({self.num_params},), "
                f"got {np.shape(global_params)}"
            )
        global_params = np.asarray(global_params, dtype=np.float32)
        for i, (x, y) in enumerate(data):
            check_device_data(np.asarray(x), np.asarray(y), f"CohortTrainer.train device {i}")

        counts = np.array([len(y) for _, y in data], dtype=np.int64)
        steps = np.array([num_steps(int(c), cfg) for c in counts], dtype=np.int64)
        if max_steps is not None:
            caps = np.array([-1 if m is None else m for m in max_steps], dtype=np.int64)
            if np.any((caps < 0) & (caps != -1)):
                raise ValueError("CohortTrainer.train: step caps must be None or >= 0")
            steps = np.where(caps >= 0, np.minimum(steps, caps), steps)
        deltas = np.zeros((n, self.num_params), dtype=np.float32)
        losses = np.zeros(n, dtype=np.float64)

        active = np.flatnonzero(steps > 0)
        # Sort by steps (so finished devices form a prefix), then by size (so
        # a bucket's last batches have similar lengths and pad little).
        order = active[np.lexsort((counts[active], steps[active]))]
        for start in range(0, len(order), self.max_cohort):
            ids = order[start : start + self.max_cohort]
            bucket = self._build_bucket(
                [data[i] for i in ids], [int(seeds[i]) for i in ids], steps[ids], cfg
            )
            deltas[ids], losses[ids] = self._train_bucket(
                global_params, bucket, cfg.lr, cfg.max_grad_norm
            )
        losses[active] /= steps[active]
        return CohortResult(deltas=deltas, num_samples=counts, steps=steps, loss=losses)

    def _build_bucket(
        self,
        data: list[tuple[np.ndarray, np.ndarray]],
        seeds: list[int],
        steps: np.ndarray,
        cfg: LocalTrainingConfig,
    ) -> _Bucket:
        m = len(data)
        total_steps = int(steps.max())
        sample_shape = np.asarray(data[0][0]).shape[1:]
        for x, _ in data:
            if np.asarray(x).shape[1:] != sample_shape:
                raise ValueError(
                    f"CohortTrainer.train: devices have different sample shapes "
                    f"{sample_shape} and {np.asarray(x).shape[1:]}"
                )
        # All devices' samples back to back plus one zero row that padding points to.
        sizes = [len(y) for _, y in data]
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        pad_row = int(offsets[-1])
        xs = np.concatenate(
            [np.asarray(x, dtype=np.float32) for x, _ in data]
            + [np.zeros((1, *sample_shape), dtype=np.float32)]
        )
        ys = np.concatenate(
            [np.asarray(y, dtype=np.int64) for _, y in data] + [np.zeros(1, dtype=np.int64)]
        )

        index = np.full((total_steps, m, cfg.batch_size), pad_row, dtype=np.int64)
        weight = np.zeros((total_steps, m, cfg.batch_size), dtype=np.float32)
        width = np.zeros(total_steps, dtype=np.int64)
        for j, (size, seed) in enumerate(zip(sizes, seeds, strict=True)):
            if size <= cfg.batch_size:
                # Every batch is the whole device, only its order is random, and
                # a mean does not care about order: skip the RNG (most of the
                # set-up cost when devices are tiny). Differs from train_device
                # only in floating-point summation order.
                index[: steps[j], j, :size] = np.arange(offsets[j], offsets[j] + size)
                weight[: steps[j], j, :size] = 1.0 / size
                width[: steps[j]] = np.maximum(width[: steps[j]], size)
                continue
            for s, idx in enumerate(batch_plan(size, cfg, seed)[: steps[j]]):
                k = len(idx)
                index[s, j, :k] = idx + offsets[j]
                weight[s, j, :k] = 1.0 / k
                width[s] = max(width[s], k)
        # Devices are sorted by steps: those with steps <= s form a prefix.
        first = np.searchsorted(steps, np.arange(total_steps), side="right")
        return _Bucket(
            x=torch.from_numpy(xs),
            y=torch.from_numpy(ys),
            index=torch.from_numpy(index),
            weight=torch.from_numpy(weight),
            first=[int(v) for v in first],
            width=[int(v) for v in width],
        )

    def _train_bucket(
        self, global_params: np.ndarray, bucket: _Bucket, lr: float, max_grad_norm: float | None
    ) -> tuple[np.ndarray, np.ndarray]:
        m = bucket.index.shape[1]
        g = torch.from_numpy(global_params)
        params: list[torch.Tensor] = []
        offset = 0
        for shape, size in zip(self._shapes, self._sizes, strict=True):
            p = g[offset : offset + size].view(shape)
            params.append(p.unsqueeze(0).expand(m, *shape).clone())
            offset += size
        loss_sum = torch.zeros(m, dtype=torch.float64)
        x, y = bucket.x, bucket.y
        sample_shape = x.shape[1:]

        with torch.no_grad():
            for s, (k, width) in enumerate(zip(bucket.first, bucket.width, strict=True)):
                rows = m - k
                idx = bucket.index[s, k:, :width]
                flat_idx = idx.reshape(-1)
                xb = x.index_select(0, flat_idx).view(rows, width, *sample_shape)
                yb = y.index_select(0, flat_idx).view(rows, width)
                wb = bucket.weight[s, k:, :width]
                # Row-slices of contiguous tensors are contiguous views: the
                # in-place update below writes straight into ``params``.
                live = [p[k:] for p in params]
                grads, loss = self._step(tuple(live), xb, yb, wb)
                grads = list(grads)
                if max_grad_norm is not None:
                    # Per device row: the norm over all of that row's parameter gradients.
                    sq = sum(g.reshape(rows, -1).pow(2).sum(dim=1) for g in grads)
                    scale = clip_scale(torch.as_tensor(sq).sqrt(), max_grad_norm)
                    grads = [g * scale.view(rows, *([1] * (g.dim() - 1))) for g in grads]
                torch._foreach_add_(live, grads, alpha=-lr)
                loss_sum[k:] += loss
        trained = torch.cat([p.reshape(m, -1) for p in params], dim=1)
        delta = (trained - g).numpy()
        return delta, loss_sum.numpy()
