"""The round's last step: combine gateway partial aggregates, step the server optimizer, version.

Pure logic (numpy); the Ray actor in ``hierarchy.actors`` is a thin shell around it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cloud.downlink import DownlinkConfig, plan_downlink
from cloud.model_store import ModelStore, ModelVersion
from cloud.strategy import ServerOptimizer
from cloud.strategy.base import weighted_mean
from devices.held_model import RoundDownlink
from gateway.partial_aggregate import PartialAggregate, combine


@dataclass(frozen=True)
class AppliedRound:
    round: int
    version: ModelVersion
    devices: int  # device updates folded in across all gateways
    gateways: int  # gateways that delivered a non-empty aggregate
    total_weight: float
    update_norm: float  # L2 norm of the mean client delta


class Coordinator:
    """Applies rounds and publishes versions.

    With a ``delta`` downlink the server optimizer's output is not published
    as is: its step is compressed (with error feedback) and the published
    version is exactly what devices rebuild from the compressed bytes. Without
    a ``downlink`` it publishes as is and serves only full models (``full``).
    """

    def __init__(
        self,
        initial_params: np.ndarray,
        strategy: ServerOptimizer,
        keep: int = 8,
        downlink: DownlinkConfig | None = None,
    ):
        if initial_params.ndim != 1:
            raise ValueError("initial_params must be a flat vector")
        self.strategy = strategy
        self.downlink = downlink or DownlinkConfig(mode="full")
        self.downlink.validate()
        self._compressor = self.downlink.compressor()
        self.store = ModelStore(keep=keep, keep_steps=self.downlink.keep_steps)
        self.store.commit(initial_params, round_=0)

    @property
    def params(self) -> np.ndarray:
        return self.store.params()

    @property
    def version(self) -> ModelVersion:
        return self.store.current

    def apply(
        self,
        round_: int,
        partials: Sequence[PartialAggregate],
        noise_std: float = 0.0,
        noise_seed: int = 0,
    ) -> AppliedRound:
        """Apply one round. A round where no device delivered keeps the model unchanged.

        ``noise_std``: central DP without SMPC (``--no-smpc``): the coordinator itself
        adds N(0, noise_std^2) per coordinate to the sum, from a stream seeded by
        (``noise_seed``, round); it sees the plaintext sums, unlike the secure path.
        """
        delivered = [p for p in partials if p.count > 0]
        total, weight, count = combine(delivered, self.params.shape[0])
        if noise_std > 0 and count > 0:
            rng = np.random.default_rng([noise_seed, round_, 0xD9])
            total = total + rng.normal(0.0, noise_std, size=total.shape)
        return self.apply_sum(round_, total, weight, count, len(delivered))

    def apply_sum(
        self, round_: int, total: np.ndarray, weight: float, count: int, gateways: int
    ) -> AppliedRound:
        """Apply a (possibly revealed, noisy) sum of weighted updates with its public totals.

        The secure path: the cloud parties reveal only ``total``; ``weight`` and
        ``count`` are the gateways' public totals.
        """
        params = self.params
        if total.shape != params.shape:
            raise ValueError(f"round {round_}: sum has shape {total.shape}, model {params.shape}")
        if count == 0 or weight <= 0:
            return AppliedRound(round_, self.version, 0, 0, 0.0, 0.0)
        mean_delta = weighted_mean(total, weight)
        if not np.all(np.isfinite(mean_delta)):
            raise FloatingPointError(f"round {round_}: aggregate contains NaN/Inf; not applied")
        target = self.strategy.step(params, mean_delta)
        if self._compressor is None:
            version = self.store.commit(target, round_)
        else:
            new, step = self._compressor.step(params, target)
            version = self.store.commit(new, round_, step=step)
        return AppliedRound(
            round_, version, count, gateways, weight, float(np.linalg.norm(mean_delta))
        )

    def downloads(self, bases: Sequence[str | None]) -> RoundDownlink:
        """The current version's downloads for holders of ``bases`` (None: holds nothing)."""
        return plan_downlink(self.store, bases, self.downlink)
