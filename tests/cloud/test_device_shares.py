"""device-shares mode end to end: devices mask, gateways sum blind, real CrypTen parties unmask.

The plain tests check the algebra (shares reconstruct the exact ring sum) and
privacy of one party's share without Ray; the rest run real parties (one Ray
actor process each, gloo between them): K=3 with the dealer (for per-device
norm bounding) and K=2 without.
"""

import dataclasses

import numpy as np
import pytest
from scipy import stats

from cloud.party_keys import generate_party_keys, public_keys
from cloud.secure_aggregator import SecureAggregationError
from cloud.unmask import DeviceSharesAggregator, SealError, party_share, unit_base
from devices.fixed_point import decode_fixed, encode_fixed
from devices.masking import mask_update
from gateway.masked_sum import MaskedSum
from gateway.secret_sharing import reconstruct

# ----------------------------------------------------------------- helpers


def _fleet(pub, round_, gateways, per_gw, p, rng, drop=0.3, parties=None, party0=False):
    """Masked updates of every selected device; a random 30 % never reach their gateway.

    Returns the gateways' MaskedSums and the plaintext contributions that did arrive.
    """
    k = pub.parties if parties is None else parties
    sums, arrived = [], {}
    for g in range(gateways):
        ms = MaskedSum(f"gw{g}", round_, p, k, seal_to_party0=party0)
        for i in range(per_gw):
            dev = f"gw{g}-d{i:03d}"
            delta = rng.normal(scale=0.5, size=p)
            w = float(rng.integers(1, 50))
            u = mask_update(dev, round_, delta, pub, weight=w, seal_to_party0=party0)
            if rng.random() >= drop:  # dropped out after selection: never delivered
                ms.add(u)
                arrived[dev] = (w * delta, w)
        sums.append(ms)
    return sums, arrived


@pytest.mark.parametrize("k,party0", [(2, False), (3, False), (3, True)])
def test_party_shares_reconstruct_the_exact_ring_sum_of_the_arrived_devices(k, party0):
    priv = generate_party_keys(k)
    pub = public_keys(priv)
    rng = np.random.default_rng(k)
    sums, arrived = _fleet(pub, 3, 2, 10, 300, rng, party0=party0)
    seeded = [r != 0 or party0 for r in range(k)]
    total = np.zeros(300, dtype=np.int64)
    for ms in sums:
        fw = ms.forwards()
        shares = [party_share(f, priv[f.party], seeded[f.party]) for f in fw]
        assert len({s.gateway for s in shares}) == 1  # same unit name at every party
        assert unit_base(shares[0].gateway) == ms.gateway
        total += reconstruct([s.share for s in shares])
    expect = np.zeros(300, dtype=np.int64)
    for contribution, _ in arrived.values():
        expect += encode_fixed(contribution)
    np.testing.assert_array_equal(total, expect)  # exact: same encoding, ring arithmetic
    assert 0 < len(arrived) < 20  # some devices did drop out


def _top_byte(a):
    return (a.view(np.uint64) >> np.uint64(56)).astype(np.int64)


@pytest.mark.parametrize("party", [0, 1])
def test_a_single_partys_share_is_uniform_and_independent_of_the_sum(party):
    """Party 0 holds the gateway's masked sum, party 1 a sum of masks: both look uniform."""
    priv = generate_party_keys(3)
    pub = public_keys(priv)
    n = 1 << 16
    rng = np.random.default_rng(3)
    hists, shares = [], []
    for name, scale in (("quiet", 0.0), ("loud", 1.0)):
        ms = MaskedSum(name, 1, n, 3)
        loud = scale * rng.choice([-1.0, 1.0], size=n) * rng.uniform(1e7, 1e8, size=n)
        for i in range(4):
            ms.add(mask_update(f"{name}-d{i}", 1, loud, pub))
        f = ms.forwards()[party]
        s = party_share(f, priv[party], party != 0).share
        hists.append(np.bincount(_top_byte(s), minlength=256))
        shares.append((s, encode_fixed(4 * loud)))
    for h in hists:
        assert stats.chisquare(h).pvalue > 1e-4
    assert stats.chi2_contingency(np.stack(hists)).pvalue > 1e-4
    s, x = shares[1]
    assert abs(np.corrcoef(s.astype(np.float64), x.astype(np.float64))[0, 1]) < 0.02


def test_a_tampered_box_or_a_bad_forward_is_refused_naming_the_device():
    priv = generate_party_keys(3)
    pub = public_keys(priv)
    ms = MaskedSum("gw0", 2, 40, 3)
    for i in range(3):
        ms.add(mask_update(f"gw0-d{i}", 2, np.ones(40), pub))
    f1 = ms.forwards()[1]
    boxes = list(f1.sealed)
    boxes[1] = boxes[1][:40] + bytes([boxes[1][40] ^ 1]) + boxes[1][41:]
    bad = dataclasses.replace(f1, sealed=tuple(boxes))
    with pytest.raises(SealError, match=r"device 'gw0-d1' for party 1, round 2: authentication"):
        party_share(bad, priv[1], True)
    with pytest.raises(ValueError, match="2 sealed seeds for 3 devices"):
        party_share(dataclasses.replace(f1, sealed=f1.sealed[:2]), priv[1], True)
    with pytest.raises(ValueError, match="duplicates"):
        party_share(dataclasses.replace(f1, devices=("gw0-d0",) * 3), priv[1], True)
    with pytest.raises(ValueError, match="only to party 0"):
        party_share(dataclasses.replace(f1, masked_sum=np.zeros(40, np.int64)), priv[1], True)
    with pytest.raises(ValueError, match="no private key"):
        party_share(f1, None, True)
    with pytest.raises(ValueError, match="do not seal to"):
        party_share(dataclasses.replace(ms.forwards()[0], sealed=f1.sealed), priv[0], False)


# ----------------------------------------------------------------- real parties


@pytest.fixture(scope="module")
def backend():
    from hierarchy.backend import RayBackend

    be = RayBackend(num_cpus=2)
    yield be
    be.shutdown()


@pytest.fixture(scope="module")
def keys3():
    return generate_party_keys(3)


@pytest.fixture(scope="module")
def agg3(backend, keys3):
    a = DeviceSharesAggregator(backend, 3, keys=keys3, norm_bounding=True, timeout_s=60)
    yield a
    a.shutdown()


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory):
    from cloud.party_keys import write_party_keys

    d = tmp_path_factory.mktemp("party-keys")
    write_party_keys(d, 2)
    return d


@pytest.fixture(scope="module")
def agg2(backend, key_dir):
    # Each party loads its own key file (what a deployment does), instead of being handed it.
    a = DeviceSharesAggregator(backend, 2, key_dir=key_dir, timeout_s=60)
    yield a
    a.shutdown()


@pytest.mark.parametrize("k", [2, 3])
def test_revealed_sum_equals_the_plaintext_sum_with_30_percent_dropouts(
    k, agg2, agg3, key_dir, keys3
):
    from cloud.party_keys import load_public_keys

    agg = {2: agg2, 3: agg3}[k]
    pub = load_public_keys(key_dir) if k == 2 else public_keys(keys3)
    rng = np.random.default_rng(100 + k)
    p = 2000
    sums, arrived = _fleet(pub, 10 + k, 3, 10, p, rng)
    res = agg.secure_sum_masked(10 + k, sums)
    plain = np.sum([c for c, _ in arrived.values()], axis=0)
    assert np.abs(res.values - plain).max() <= len(arrived) * 2.0**-17  # one rounding each
    assert res.gateways == ("gw0", "gw1", "gw2") and res.excluded == {}
    assert res.count == len(arrived) == sum(ms.count for ms in sums) < 30
    assert res.total_weight == sum(w for _, w in arrived.values())
    # Party 0 holds one P-vector per gateway; the seeded parties got no vector at all.
    assert sum(u["boxes"] for u in agg.last_unmask) == (k - 1) * len(arrived)


def test_a_tampered_box_fails_the_submission_naming_the_device_and_the_gateway_recovers(
    agg3, keys3
):
    pub = public_keys(keys3)
    rng = np.random.default_rng(7)
    sums, arrived = _fleet(pub, 20, 2, 6, 500, rng, drop=0.0)
    victim = "gw1-d004"
    u = sums[1]._updates[victim]
    box = bytearray(u.sealed[2])
    box[70] ^= 0x80  # a bit flipped on the way (or by the gateway)
    sums[1]._updates[victim] = dataclasses.replace(u, sealed={**u.sealed, 2: bytes(box)})
    with pytest.raises(SecureAggregationError) as err:
        agg3.secure_sum_masked(20, sums)
    msg = str(err.value)
    assert "party 2 failed" in msg and f"device {victim!r} for party 2, round 20" in msg
    assert "authentication failed" in msg and "no sum revealed" not in msg  # group stays up
    # The gateway drops the device and forwards again; its resend replaces the old unit.
    sums[1].drop(victim)
    agg3.submit_forwards(sums[1].forwards())
    res = agg3.aggregate(20)
    plain = np.sum([c for d, (c, _) in arrived.items() if d != victim], axis=0)
    np.testing.assert_allclose(res.values, plain, atol=12 * 2.0**-17)
    assert res.gateways == ("gw0", "gw1") and res.count == 11 and res.excluded == {}


def test_parties_told_different_device_lists_exclude_that_gateway(agg3, keys3):
    pub = public_keys(keys3)
    rng = np.random.default_rng(8)
    sums, arrived = _fleet(pub, 30, 2, 4, 300, rng, drop=0.0)
    fw = sums[1].forwards()
    # The gateway tells party 2 a list without its last device (so party 2's masks differ).
    short = sums[1].devices[:-1]
    fw[2] = dataclasses.replace(fw[2], devices=short, sealed=fw[2].sealed[:-1], count=3)
    agg3.submit_forwards([*sums[0].forwards(), *fw])
    res = agg3.aggregate(30)
    assert res.gateways == ("gw0",)
    assert res.excluded == {"gw1": "the parties were given different device lists for it"}
    plain = np.sum([c for d, (c, _) in arrived.items() if d.startswith("gw0-")], axis=0)
    np.testing.assert_allclose(res.values, plain, atol=4 * 2.0**-17)


def test_per_device_units_let_the_smpc_norm_bound_clip_each_device(agg3, keys3):
    """With devices as units, ``clip_norm`` bounds every device, not just every gateway."""
    from cloud.smpc import ClipPlan

    pub = public_keys(keys3)
    rng = np.random.default_rng(9)
    p, clip = 2000, 4.0
    sums = [MaskedSum(f"gw{g}", 40, p, 3) for g in range(2)]
    honest = {}
    for g, ms in enumerate(sums):
        for i in range(3):
            dev = f"gw{g}-d{i}"
            honest[dev] = rng.normal(size=p) * rng.uniform(0.5, 3.0) / np.sqrt(p)
            ms.add(mask_update(dev, 40, honest[dev], pub))
    evil = 100.0 * honest["gw1-d1"]  # one device scales its update 100x
    sums[0].add(mask_update("gw0-evil", 40, evil, pub))
    res = agg3.secure_sum_masked(40, sums, clip_norm=clip, per_device=True)
    assert len(res.gateways) == 7 and "gw0-evil" in res.gateways
    part = res.values - np.sum(list(honest.values()), axis=0)
    s = ClipPlan.make(clip, p, 3).scale_for(float(np.linalg.norm(evil)))
    np.testing.assert_allclose(part, s * evil, atol=1e-3)  # honest devices untouched
    assert 0.94 * clip <= np.linalg.norm(part) <= clip * (1 + 1e-6)
    # Without per-device units the same device hides inside gw0's sum, bounded only with it.
    plain_gw0 = decode_fixed(encode_fixed(evil)) + sum(honest[f"gw0-d{i}"] for i in range(3))
    assert np.linalg.norm(plain_gw0) > 10 * clip


def test_the_aggregator_needs_the_keys_one_way_or_the_other(backend):
    with pytest.raises(ValueError, match="either as keys"):
        DeviceSharesAggregator(backend, 2)
    with pytest.raises(ValueError, match="3 private keys for 2 parties"):
        DeviceSharesAggregator(backend, 2, keys=generate_party_keys(3))
