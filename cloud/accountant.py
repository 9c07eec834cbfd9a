"""Differential-privacy accounting for the revealed noisy sums (Google's ``dp-accounting``).

The mechanism, per round: each device's contribution is bounded in L2 norm by
C (clipped on the device, or by the per-device norm bound in SMPC), the
cloud parties reveal the *sum* of the included contributions plus Gaussian
noise N(0, sigma^2 C^2) per coordinate, and each device takes part with
probability q (``sampling_rate``). That is the Poisson-subsampled Gaussian
mechanism with noise multiplier sigma under add/remove-one-device adjacency
(user-level DP, as in DP-FedAvg), composed over the rounds; the accountant
is ``dp_accounting.rdp.RdpAccountant`` (Rényi DP, converted to (eps, delta)
with the library's conversion). No privacy math is written here.

The noise: :func:`aggregate_noise_std` = sigma C is what
``SecureAggregator.aggregate(noise_std=...)`` takes; inside, each of the K
parties adds N(0, sigma^2 C^2 / K) (:func:`party_noise_std`), so the revealed
sum carries N(0, sigma^2 C^2) and no single party knows it.

Assumptions to keep in mind:
- the bound C must hold per *device* (a per-gateway bound gives gateway-level
  DP instead: then q is the probability a gateway takes part and adjacency is
  one gateway's whole data);
- selection is modelled as Poisson sampling with rate q (participation x
  availability); fixed-size sampling without replacement would need another
  event;
- the public count and total weight released with the sum are not noised; an
  analysis that must hide participation too uses a fixed denominator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import dp_accounting
import numpy as np
from dp_accounting import rdp

__all__ = ["PrivacyAccountant", "aggregate_noise_std", "party_noise_std"]


def aggregate_noise_std(noise_multiplier: float, clip_norm: float) -> float:
    """Total noise std per coordinate of the revealed sum: sigma * C."""
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier!r}")
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ValueError(f"clip_norm must be positive and finite, got {clip_norm!r}")
    return float(noise_multiplier * clip_norm)


def party_noise_std(noise_multiplier: float, clip_norm: float, parties: int) -> float:
    """Each of K parties' noise std: sigma * C / sqrt(K) (their sum has std sigma * C)."""
    if parties < 1:
        raise ValueError(f"parties must be >= 1, got {parties}")
    return aggregate_noise_std(noise_multiplier, clip_norm) / math.sqrt(parties)


class PrivacyAccountant:
    """(eps, delta) spent after some rounds of the Poisson-subsampled Gaussian sum.

    ``step`` records rounds that happened; ``would_exceed(budget)`` answers
    whether running one more round would push eps past the budget, so a
    driver checks it *before* a round and stops with eps <= budget.
    """

    def __init__(
        self,
        noise_multiplier: float,
        sampling_rate: float,
        delta: float,
        orders: Sequence[float] | None = None,
    ) -> None:
        if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
            raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier!r}")
        if not (0.0 < sampling_rate <= 1.0):
            raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate!r}")
        if not (0.0 < delta < 1.0):
            raise ValueError(f"delta must be in (0, 1), got {delta!r}")
        self.noise_multiplier = float(noise_multiplier)
        self.sampling_rate = float(sampling_rate)
        self.delta = float(delta)
        self.orders = None if orders is None else tuple(float(o) for o in orders)
        self.rounds = 0
        self._cache: dict[int, float] = {}
        self._one: tuple[np.ndarray, np.ndarray] | None = None

    def _event(self) -> dp_accounting.DpEvent:
        gaussian = dp_accounting.GaussianDpEvent(self.noise_multiplier)
        if self.sampling_rate == 1.0:
            return gaussian
        return dp_accounting.PoissonSampledDpEvent(self.sampling_rate, gaussian)

    def _per_round(self) -> tuple[np.ndarray, np.ndarray]:
        """(orders, RDP of one round) from the library, computed once."""
        if self._one is None:
            acc = rdp.RdpAccountant(orders=self.orders)
            acc.compose(self._event())
            self._one = (acc.orders, acc.rdp)
        return self._one

    def epsilon_after(self, rounds: int) -> float:
        """eps after ``rounds`` rounds in total (0 for none; inf without noise).

        RDP composes additively, so T rounds are T times the one-round RDP
        vector (what the library's ``compose(event, count=T)`` does too),
        converted with the library's ``compute_epsilon``: no per-round replay.
        """
        if rounds < 0:
            raise ValueError(f"rounds must be >= 0, got {rounds}")
        if rounds == 0:
            return 0.0
        if rounds not in self._cache:
            orders, one = self._per_round()
            eps = rdp.rdp_privacy_accountant.compute_epsilon(orders, one * rounds, self.delta)[0]
            self._cache[rounds] = float(eps)
        return self._cache[rounds]

    def step(self, rounds: int = 1) -> float:
        """Record ``rounds`` more rounds; returns eps so far."""
        if rounds < 0:
            raise ValueError(f"rounds must be >= 0, got {rounds}")
        self.rounds += rounds
        return self.epsilon()

    def epsilon(self) -> float:
        """eps spent so far (at this accountant's delta)."""
        return self.epsilon_after(self.rounds)

    def would_exceed(self, budget_eps: float) -> bool:
        """True if one more round would make eps exceed ``budget_eps``."""
        return self.epsilon_after(self.rounds + 1) > budget_eps

    def max_rounds(self, budget_eps: float, limit: int = 1_000_000) -> int:
        """The most rounds (from zero, up to ``limit``) whose eps stays <= ``budget_eps``."""
        if self.epsilon_after(1) > budget_eps:
            return 0
        if self.epsilon_after(limit) <= budget_eps:
            return limit
        lo, hi = 1, limit  # eps(lo) <= budget < eps(hi); eps grows with rounds
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.epsilon_after(mid) <= budget_eps:
                lo = mid
            else:
                hi = mid
        return lo
