"""DP accountant (dp-accounting's RDP accountant): known values, bounds, monotonicity, budgets."""

import itertools
import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting import pld, rdp
from scipy import optimize, stats

from cloud.accountant import PrivacyAccountant, aggregate_noise_std, party_noise_std


def test_the_librarys_own_example_one_gaussian_round_is_1_1e6_dp():
    # dp-accounting's test suite: noise multiplier 4.530877117 gives exactly (1, 1e-6)-DP
    # for one unsampled Gaussian round (RDP bound, dense orders); default orders agree to 1e-6.
    acc = PrivacyAccountant(4.530877117, 1.0, 1e-6)
    assert acc.epsilon() == 0.0
    assert acc.step() == pytest.approx(1.0, abs=1e-6)
    assert acc.rounds == 1


def _exact_gaussian_eps(sigma: float, delta: float) -> float:
    """Tight eps of the Gaussian mechanism, sensitivity 1 (Balle & Wang 2018, Thm 8).

    delta(eps) = Phi(1/(2s) - eps s) - e^eps Phi(-1/(2s) - eps s); written out
    here with scipy, independently of the library, as a lower reference.
    """

    def gap(eps: float) -> float:
        d = stats.norm.cdf(0.5 / sigma - eps * sigma) - math.exp(eps) * stats.norm.cdf(
            -0.5 / sigma - eps * sigma
        )
        return d - delta

    return float(optimize.brentq(gap, 1e-9, 100.0))


@pytest.mark.parametrize("sigma,rounds", [(1.0, 1), (2.0, 10), (5.0, 100), (0.8, 4)])
def test_unsampled_rounds_lie_between_the_tight_gaussian_and_a_loose_rdp_bound(sigma, rounds):
    # T Gaussian rounds with multiplier sigma are one Gaussian with sigma / sqrt(T).
    delta = 1e-5
    eps = PrivacyAccountant(sigma, 1.0, delta).epsilon_after(rounds)
    tight = _exact_gaussian_eps(sigma / math.sqrt(rounds), delta)
    # The classic RDP conversion (Mironov 2017), minimised over alpha: never tighter.
    alphas = np.linspace(1.01, 512, 200_000)
    classic = float(np.min(rounds * alphas / (2 * sigma**2) + math.log(1 / delta) / (alphas - 1)))
    assert tight <= eps <= classic * (1 + 1e-9)
    assert eps <= 1.35 * tight  # RDP is close to tight for the Gaussian


def test_subsampled_rounds_upper_bound_the_pld_accountant():
    # PLD accounting is near-exact; RDP must be above it, and not by much.
    q, sigma, rounds, delta = 0.01, 1.0, 1000, 1e-5
    acc = pld.PLDAccountant(value_discretization_interval=1e-3)
    acc.compose(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), rounds
    )
    tight = acc.get_epsilon(delta)
    eps = PrivacyAccountant(sigma, q, delta).epsilon_after(rounds)
    assert tight <= eps <= 1.3 * tight


def test_scaling_one_round_equals_the_librarys_own_composition():
    q, sigma, delta = 0.05, 1.3, 1e-6
    for t in (1, 7, 250):
        ref = rdp.RdpAccountant()
        ref.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), t)
        assert PrivacyAccountant(sigma, q, delta).epsilon_after(t) == pytest.approx(
            ref.get_epsilon(delta), rel=1e-12
        )


def test_epsilon_grows_with_rounds_and_sampling_and_shrinks_with_noise():
    eps_r = [PrivacyAccountant(1.0, 0.02, 1e-5).epsilon_after(t) for t in (1, 10, 100, 1000)]
    assert all(a < b for a, b in itertools.pairwise(eps_r))
    eps_s = [PrivacyAccountant(s, 0.02, 1e-5).epsilon_after(100) for s in (0.7, 1.0, 2.0, 4.0)]
    assert all(a > b for a, b in itertools.pairwise(eps_s))
    eps_q = [PrivacyAccountant(1.0, q, 1e-5).epsilon_after(100) for q in (0.001, 0.01, 0.1, 1.0)]
    assert all(a < b for a, b in itertools.pairwise(eps_q))
    assert PrivacyAccountant(0.0, 0.5, 1e-5).epsilon_after(1) == math.inf


def test_a_budget_check_stops_exactly_at_the_last_round_that_fits():
    budget = 2.0
    acc = PrivacyAccountant(2.0, 0.1, 1e-5)
    while not acc.would_exceed(budget):
        acc.step()  # ... one real round would run here ...
    assert acc.epsilon() <= budget < acc.epsilon_after(acc.rounds + 1)
    # The same round found by brute force, and by the accountant's own search.
    ref = PrivacyAccountant(2.0, 0.1, 1e-5)
    n = 0
    while ref.epsilon_after(n + 1) <= budget:
        n += 1
    assert acc.rounds == n == PrivacyAccountant(2.0, 0.1, 1e-5).max_rounds(budget) > 5
    assert acc.step(3) > budget and acc.rounds == n + 3  # step(k) records k rounds
    assert PrivacyAccountant(0.5, 1.0, 1e-5).max_rounds(0.1) == 0


def test_noise_std_for_the_aggregate_and_each_party():
    assert aggregate_noise_std(1.1, 2.0) == pytest.approx(2.2)
    for k in (2, 3, 5):
        per = party_noise_std(1.1, 2.0, k)
        assert per == pytest.approx(2.2 / math.sqrt(k))
        # K independent party shares of the noise add up to N(0, (sigma C)^2).
        z = np.random.default_rng(k).normal(scale=per, size=(k, 200_000)).sum(axis=0)
        assert abs(z.std() / 2.2 - 1) < 0.01
    with pytest.raises(ValueError, match="clip_norm"):
        aggregate_noise_std(1.0, 0.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        aggregate_noise_std(-1.0, 1.0)
    with pytest.raises(ValueError, match="parties"):
        party_noise_std(1.0, 1.0, 0)


@pytest.mark.parametrize(
    "args,match",
    [
        ((1.0, 0.0, 1e-5), "sampling_rate"),
        ((1.0, 1.5, 1e-5), "sampling_rate"),
        ((1.0, 0.1, 0.0), "delta"),
        ((1.0, 0.1, 1.0), "delta"),
        ((float("nan"), 0.1, 1e-5), "noise_multiplier"),
    ],
)
def test_bad_parameters_are_refused(args, match):
    with pytest.raises(ValueError, match=match):
        PrivacyAccountant(*args)
