"""Secure aggregation with real CrypTen parties: one Ray actor process per party, gloo between them.

Two groups serve the whole module (starting parties dominates the run time):
K=3 and K=2, both with a dealer so norm bounding can run on either. The K=2
group is killed mid-round by the last test.
"""

import math

import numpy as np
import pytest

from cloud.secure_aggregator import SecureAggregationError, SecureAggregator
from cloud.smpc import ClipPlan, encode_noise, gaussian_noise
from gateway.secret_sharing import share_vector

# ----------------------------------------------------------------- plain helpers (no Ray)


def test_clip_plan_is_conservative_and_close():
    for c, p, k in [(5.0, 100_000, 3), (1000.0, 1_000_000, 5), (0.5, 10_000, 2)]:
        plan = ClipPlan.make(c, p, k)
        assert 0 <= plan.frac_bits <= 16
        assert plan.delta <= c / 200 or plan.frac_bits == 16
        assert plan.headroom > 100  # a 100x-scaled contribution is still bounded
        # s(nu) (nu + delta) <= C: since ||x|| <= nu + delta, the bound always holds.
        for nu in np.geomspace(plan.thresholds[0] * 0.5, plan.limit * 0.999, 4000):
            s = plan.scale_for(float(nu))
            assert 0 <= s <= 1 and (s > 0 or c / (nu + plan.delta) < 2.0**-15)
            assert s * (nu + plan.delta) <= c * (1 + 1e-12)
            if nu > plan.thresholds[0]:
                assert s * max(nu - plan.delta, 0) >= 0.94 * c - nu * 2.0**-16
        assert plan.scale_for(plan.thresholds[0]) == 1.0
        assert plan.scale_for(plan.limit * 1.01) == 0.0
        assert all(t < 2**62 for t in plan.z_thresholds)
    with pytest.raises(ValueError, match="below the fixed-point resolution"):
        ClipPlan.make(1e-3, 1_000_000, 3)
    with pytest.raises(ValueError, match="too large for the 64-bit ring"):
        ClipPlan.make(1e9, 1000, 3)


def test_party_noise_is_gaussian_and_fresh():
    z = gaussian_noise(200_001, 2.0, b"k" * 32)
    assert z.shape == (200_001,) and abs(z.mean()) < 0.03 and abs(z.std() - 2.0) < 0.02
    assert np.array_equal(z, gaussian_noise(200_001, 2.0, b"k" * 32))
    assert not np.array_equal(z[:10], gaussian_noise(10, 2.0, b"j" * 32))
    np.testing.assert_allclose(encode_noise(z, 16) / 65536.0, z, atol=2.0**-16)
    with pytest.raises(ValueError, match="noise too large"):
        encode_noise(np.array([1e9]), 32)


# ----------------------------------------------------------------- real parties


@pytest.fixture(scope="module")
def backend():
    from hierarchy.backend import RayBackend

    be = RayBackend(num_cpus=2)
    yield be
    be.shutdown()


@pytest.fixture(scope="module")
def agg3(backend):
    a = SecureAggregator(backend, parties=3, norm_bounding=True, timeout_s=60)
    yield a
    a.shutdown()


@pytest.fixture(scope="module")
def agg2(backend):
    a = SecureAggregator(backend, parties=2, norm_bounding=True, timeout_s=60)
    yield a
    a.shutdown()


def _submit(agg, round_, xs, weights=None, skip=()):
    for g, x in enumerate(xs):
        w = 1.0 + g if weights is None else weights[g]
        for sp in share_vector(f"gw{g}", round_, x, w, g + 1, agg.parties):
            if (f"gw{g}", sp.party) not in skip:
                agg.submit(sp)


@pytest.mark.parametrize("k", [2, 3])
def test_revealed_sum_equals_the_plaintext_sum(k, agg2, agg3):
    agg = {2: agg2, 3: agg3}[k]
    rng = np.random.default_rng(k)
    xs = [rng.normal(scale=50.0, size=3000) - 10.0 for _ in range(6)]
    xs[0][:3] = [-20 + 5 / 65536, -1e6, 7.0 / 65536]
    _submit(agg, 10 + k, xs)
    res = agg.aggregate(10 + k)
    plain = np.sum(xs, axis=0)
    err = np.abs(res.values - plain)
    assert err.max() <= 6 * 2.0**-17  # one rounding per gateway
    assert np.linalg.norm(res.values - plain) <= 1e-4 * np.linalg.norm(plain)
    assert res.gateways == tuple(f"gw{g}" for g in range(6)) and res.excluded == {}
    assert res.total_weight == sum(1.0 + g for g in range(6)) and res.count == 21
    assert res.share_bytes_in == k * 6 * 3000 * 8
    assert res.party_bytes >= (k - 1) * 3000 * 8  # at least the reduce of the sum


def test_a_gateway_missing_at_one_party_is_excluded_everywhere(agg3):
    rng = np.random.default_rng(5)
    xs = [rng.normal(size=500) for _ in range(4)]
    _submit(agg3, 20, xs, skip={("gw1", 2)})  # gw1 missed party 2's deadline
    # gw3 told party 0 a different public weight than the others.
    bad = share_vector("gw3", 20, xs[3], 99.0, 4, 3)[0]
    agg3.submit(bad)
    res = agg3.aggregate(20)
    assert res.gateways == ("gw0", "gw2")
    assert set(res.excluded) == {"gw1", "gw3"}
    assert "party 2" in res.excluded["gw1"] and "weight" in res.excluded["gw3"]
    np.testing.assert_allclose(res.values, xs[0] + xs[2], atol=2 * 2.0**-17)
    assert res.total_weight == 1.0 + 3.0 and res.count == 1 + 3


def test_distributed_noise_has_the_requested_std(agg3):
    rng = np.random.default_rng(6)
    p, sigma = 20_000, 0.5
    xs = [rng.normal(scale=3.0, size=p) for _ in range(3)]
    plain = np.sum(xs, axis=0)
    diffs = []
    for r in (30, 31):
        _submit(agg3, r, xs)
        diffs.append(agg3.aggregate(r, noise_std=sigma).values - plain)
    for d in diffs:
        assert abs(d.mean()) < 5 * sigma / math.sqrt(p)
        assert abs(d.std() / sigma - 1) < 0.05
    # Fresh noise every round (each party draws a new secret seed).
    assert abs(np.corrcoef(diffs[0], diffs[1])[0, 1]) < 0.05


@pytest.mark.parametrize("k", [2, 3])
def test_norm_bounding_clips_a_malicious_gateway_to_c(k, agg2, agg3):
    agg = {2: agg2, 3: agg3}[k]
    rng = np.random.default_rng(40 + k)
    p, clip = 4000, 10.0
    honest = [rng.normal(size=p) * rng.uniform(2, 8) / math.sqrt(p) for _ in range(5)]
    evil = 100.0 * honest[0]  # a gateway that scales its contribution 100x
    xs = [*honest, -evil]
    _submit(agg, 40 + k, xs)
    res = agg.aggregate(40 + k, clip_norm=clip)
    honest_sum = np.sum(honest, axis=0)
    # Honest contributions (norm < C) pass untouched; what is left is the bounded evil one.
    evil_part = res.values - honest_sum
    assert res.clip is not None and res.clip["headroom"] > 100
    n = np.linalg.norm(evil_part)
    assert 0.94 * clip <= n <= clip * (1 + 1e-6), n
    cos = evil_part @ -evil / (n * np.linalg.norm(evil))
    assert cos > 0.999999  # scaled, not distorted
    plan = ClipPlan.make(clip, p, k)
    s = plan.scale_for(float(np.linalg.norm(evil)))
    np.testing.assert_allclose(evil_part, -s * evil, atol=1e-4)
    # Without the bound, the 100x gateway dominates the plain sum.
    assert np.linalg.norm(np.sum(xs, axis=0)) > 10 * np.linalg.norm(res.values)


@pytest.mark.parametrize("stage", ["reveal", "kill"])
def test_a_party_lost_mid_round_fails_cleanly_without_a_reveal(stage, agg2):
    rng = np.random.default_rng(9)
    xs = [rng.normal(size=2000) * 0.01 for _ in range(4)]
    r = {"reveal": 60, "kill": 70}[stage]
    _submit(agg2, r, xs)
    if stage == "kill":
        agg2.kill_party(1)  # its process is killed from outside after the shares arrived
    else:
        # Party 1's process crashes inside the round, after the whole secure computation, just
        # before the reveal (inject_fault(1, "agreed") crashes it as the computation starts).
        agg2.inject_fault(1, stage)
    with pytest.raises(SecureAggregationError) as err:
        agg2.aggregate(r, clip_norm=1.0)
    msg = str(err.value)
    assert f"round {r}" in msg and "party 1 died" in msg and "no sum revealed" in msg
    if stage != "kill":
        assert "party 0 failed" in msg and "Connection" in msg  # its gloo peer vanished
    with pytest.raises(SecureAggregationError, match="call restart"):
        agg2.aggregate(r + 1)
    agg2.restart()
    _submit(agg2, r + 2, xs[:2])
    np.testing.assert_allclose(agg2.aggregate(r + 2).values, xs[0] + xs[1], atol=2 * 2.0**-17)


def test_parties_take_seed_shares_and_reveal_the_same_sum(agg3):
    agg = agg3
    """Compact uplink: parties 0..K-2 expand their seed; the revealed sum is unchanged."""
    from gateway.secret_sharing import SeedShare, share_vector_compact
    from hierarchy.backend import gather

    rng = np.random.default_rng(9)
    xs = [rng.normal(scale=20.0, size=2000) - 5.0 for _ in range(4)]
    for g, x in enumerate(xs):
        for m in share_vector_compact(f"gw{g}", 40, x, 2.0, 3, 3):
            if isinstance(m, SeedShare):
                ref = agg.party_handles[m.party].call("submit_seed", m)
                assert gather([ref]) == [2000]
            else:
                agg.submit(m)
    res = agg.aggregate(40)
    np.testing.assert_allclose(res.values, np.sum(xs, axis=0), atol=4 * 2.0**-16)
    assert res.count == 12 and res.total_weight == 8.0
    # What a gateway host does: everything for one party in one submit_batch call.
    by_party: dict[int, list] = {}
    for g, x in enumerate(xs):
        for m in share_vector_compact(f"gw{g}", 41, x, 2.0, 3, 3):
            by_party.setdefault(m.party, []).append(m)
    refs = [agg.party_handles[k].call("submit_batch", ms) for k, ms in by_party.items()]
    assert gather(refs) == [4, 4, 4]
    np.testing.assert_allclose(agg.aggregate(41).values, res.values, atol=8 * 2.0**-16)


def test_five_parties_reveal_the_sum_of_many_gateways(backend):
    """K = 5 (no dealer), 40 gateways with negative values: relative error <= 1e-4."""
    with SecureAggregator(backend, parties=5, timeout_s=60) as agg:
        rng = np.random.default_rng(5)
        xs = [rng.normal(scale=30.0, size=1500) - 12.0 for _ in range(40)]
        xs[3][:2] = [-20 + 5 / 65536, -7.5]
        _submit(agg, 1, xs)
        res = agg.aggregate(1)
        plain = np.sum(xs, axis=0)
        assert np.linalg.norm(res.values - plain) <= 1e-4 * np.linalg.norm(plain)
        assert np.abs(res.values - plain).max() <= 40 * 2.0**-17
        assert len(res.gateways) == 40 and res.share_bytes_in == 5 * 40 * 1500 * 8


def test_a_rendezvous_port_taken_before_rank_0_listens_is_retried(backend, monkeypatch):
    import socket

    import cloud.secure_aggregator as sa

    # Another process holds the port free_port() hands out first (the race a real
    # run hit: the port was free when picked, taken when rank 0 came to listen).
    squatter = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    squatter.bind(("127.0.0.1", 0))
    squatter.listen(1)
    taken = squatter.getsockname()[1]
    real = sa.free_port
    ports = iter([taken])
    monkeypatch.setattr(sa, "free_port", lambda host="127.0.0.1": next(ports, None) or real(host))
    try:
        agg = SecureAggregator(backend, parties=2, timeout_s=60, start_timeout_s=60)
        try:
            assert agg.port != taken
            xs = [np.full(10, 1.5), np.full(10, -0.25)]
            _submit(agg, 1, xs)
            np.testing.assert_allclose(agg.aggregate(1).values, np.full(10, 1.25), atol=1e-4)
        finally:
            agg.shutdown()
    finally:
        squatter.close()
