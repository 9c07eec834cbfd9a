"""Device-side masking (device-shares mode): sealed boxes, masks, and what the gateway sees."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from scipy import stats

from devices.fixed_point import decode_fixed, encode_fixed
from devices.masking import (
    SEALED_BYTES,
    PartyPublicKeys,
    SealError,
    SealingKey,
    SeedOpener,
    clip_l2,
    device_mask,
    mask_cohort,
    mask_update,
    open_seed,
    seal_seed,
    seeded_parties,
)

ROOT = Path(__file__).resolve().parents[2]


def _keys(k: int) -> tuple[list[X25519PrivateKey], PartyPublicKeys]:
    priv = [X25519PrivateKey.generate() for _ in range(k)]
    return priv, PartyPublicKeys(tuple(p.public_key().public_bytes_raw() for p in priv))


def test_a_sealed_seed_opens_only_for_its_party_device_and_round():
    priv, pub = _keys(3)
    seed = bytes(range(32))
    box = seal_seed(seed, pub.key(1), "gw0-d001", 7, 1)
    assert len(box) == SEALED_BYTES == 92
    assert open_seed(box, priv[1], "gw0-d001", 7, 1) == seed
    # A throwaway sender key per box without a SealingKey: unrelated bytes each time.
    again = seal_seed(seed, pub.key(1), "gw0-d001", 7, 1)
    assert again[:32] != box[:32] and again[44:] != box[44:]
    for args in [
        (priv[1], "gw0-d002", 7, 1),  # another device
        (priv[1], "gw0-d001", 8, 1),  # another round
        (priv[1], "gw0-d001", 7, 2),  # another party index
        (priv[2], "gw0-d001", 7, 1),  # another party's key
    ]:
        with pytest.raises(SealError, match="authentication failed"):
            open_seed(box, *args)
    # Any flipped bit anywhere (sender key, nonce, ciphertext, tag) is refused, naming the device.
    for i in (0, 31, 32, 43, 44, 62, 75, 76, 91):
        bad = bytearray(box)
        bad[i] ^= 0x10
        with pytest.raises(SealError, match=r"device 'gw0-d001' for party 1, round 7"):
            open_seed(bytes(bad), priv[1], "gw0-d001", 7, 1)
    with pytest.raises(SealError, match="expected 92 bytes, got 91"):
        open_seed(box[:-1], priv[1], "gw0-d001", 7, 1)


def test_a_long_term_sealing_key_reuses_its_box_key_but_never_a_nonce():
    priv, pub = _keys(3)
    dev = SealingKey()
    opener = SeedOpener(priv[2])
    seed = bytes(range(32))
    boxes = [seal_seed(seed, pub.keys[2], "gw0-d001", r, 2, sender=dev) for r in (3, 3, 4)]
    # The box names its sender's public key; each box has its own random nonce,
    # so even the same seed sealed twice in one round gives different ciphertexts.
    assert {b[:32] for b in boxes} == {dev.public_raw}
    assert len({b[32:44] for b in boxes}) == 3 and len({b[44:] for b in boxes}) == 3
    opened = [opener.open(b, "gw0-d001", r, 2) for b, r in zip(boxes, (3, 3, 4), strict=True)]
    assert opened == [seed] * 3
    # The cached box key is still bound to device, round and party by the associated data.
    with pytest.raises(SealError, match="authentication failed"):
        opener.open(boxes[0], "gw0-d001", 4, 2)
    with pytest.raises(SealError, match="authentication failed"):
        opener.open(boxes[0], "gw0-d009", 3, 2)
    # Another party's opener (its own key) cannot open it, cached or not.
    with pytest.raises(SealError, match="authentication failed"):
        SeedOpener(priv[1]).open(boxes[0], "gw0-d001", 3, 2)
    # A box whose sender key was swapped for another device's key fails too.
    other = SealingKey()
    forged = other.public_raw + boxes[0][32:]
    with pytest.raises(SealError, match="authentication failed"):
        opener.open(forged, "gw0-d001", 3, 2)


def test_the_openers_cache_is_bounded():
    priv, pub = _keys(2)
    opener = SeedOpener(priv[1], max_senders=4)
    senders = [SealingKey() for _ in range(10)]
    for i, s in enumerate(senders):
        box = seal_seed(bytes(32), pub.keys[1], f"d{i}", 1, 1, sender=s)
        assert opener.open(box, f"d{i}", 1, 1) == bytes(32)
    assert len(opener._boxes) == 4  # the oldest senders were dropped
    # A dropped sender still opens (its key is derived again).
    box = seal_seed(b"z" * 32, pub.keys[1], "d0", 2, 1, sender=senders[0])
    assert opener.open(box, "d0", 2, 1) == b"z" * 32


def test_a_low_order_party_key_is_refused_by_the_sender():
    with pytest.raises(ValueError, match="party 1: public key is a low-order point"):
        seal_seed(bytes(32), bytes(32), "d", 1, 1, sender=SealingKey())


def test_party_public_keys_round_trip_and_check_their_fingerprint():
    _, pub = _keys(3)
    again = PartyPublicKeys.from_json(pub.to_json())
    assert again == pub and again.parties == 3
    doc = json.loads(pub.to_json())
    doc["parties"][0], doc["parties"][1] = doc["parties"][1], doc["parties"][0]
    with pytest.raises(ValueError, match=r"fingerprint .* does not match"):
        PartyPublicKeys.from_json(json.dumps(doc))
    with pytest.raises(ValueError, match="at least 2 parties"):
        PartyPublicKeys((pub.keys[0],))
    with pytest.raises(ValueError, match="same public key"):
        PartyPublicKeys((pub.keys[0], pub.keys[0]))
    with pytest.raises(ValueError, match="32 raw bytes"):
        PartyPublicKeys((pub.keys[0], b"x" * 31))
    with pytest.raises(ValueError, match="not hex"):
        PartyPublicKeys.from_hex(["zz", pub.keys[0].hex()])


@pytest.mark.parametrize("k,party0", [(2, False), (3, False), (3, True)])
def test_masked_update_plus_the_parties_masks_is_the_encoded_update(k, party0):
    priv, pub = _keys(k)
    rng = np.random.default_rng(k)
    delta = rng.normal(size=1000)
    u = mask_update("gw1-d007", 3, delta, pub, weight=5.0, seal_to_party0=party0)
    assert set(u.sealed) == set(seeded_parties(k, party0))
    assert u.masked.dtype == np.int64 and u.weight == 5.0
    total = u.masked.copy()
    for p, box in u.sealed.items():
        total += device_mask(open_seed(box, priv[p], "gw1-d007", 3, p), p, 1000)
    np.testing.assert_array_equal(total, encode_fixed(5.0 * delta))
    assert u.nbytes == 1000 * 8 + len(u.sealed) * 92 + len("gw1-d007") + 32


def test_local_clipping_and_refusals():
    _, pub = _keys(2)
    big = np.full(100, 3.0)  # norm 30
    np.testing.assert_allclose(np.linalg.norm(clip_l2(big, 2.0)), 2.0)
    np.testing.assert_array_equal(clip_l2(np.ones(4) * 0.1, 2.0), np.ones(4) * 0.1)
    # A float32 update stays float32 (what a device sends), clipped to C within float32.
    f32 = clip_l2(big.astype(np.float32), 2.0)
    assert f32.dtype == np.float32
    assert abs(float(np.linalg.norm(f32.astype(np.float64))) - 2.0) < 1e-5
    assert clip_l2(np.arange(3), 10.0).dtype == np.float64
    priv, pub = _keys(2)
    u = mask_update("d1", 0, big, pub, clip_norm=2.0)
    seed = open_seed(u.sealed[1], priv[1], "d1", 0, 1)
    x = decode_fixed(u.masked + device_mask(seed, 1, 100))
    assert abs(np.linalg.norm(x) - 2.0) < 1e-3
    with pytest.raises(ValueError, match=r"device 'd1', round 0: cannot encode non-finite"):
        mask_update("d1", 0, np.array([1.0, np.nan]), pub)
    with pytest.raises(ValueError, match="out of range"):
        mask_update("d1", 0, np.array([2.0**31]), pub)
    with pytest.raises(ValueError, match="invalid device id"):
        mask_update("bad id!", 0, np.ones(3), pub)
    with pytest.raises(ValueError, match="flat update"):
        mask_update("d1", 0, np.ones((2, 2)), pub)
    with pytest.raises(ValueError, match="need 1 seeds"):
        mask_update("d1", 0, np.ones(2), pub, seeds=[b"a" * 32, b"b" * 32])


def _top_byte(a: np.ndarray) -> np.ndarray:
    return (a.view(np.uint64) >> np.uint64(56)).astype(np.int64)


@pytest.mark.parametrize("k", [2, 3])
def test_what_the_gateway_receives_is_uniform_and_uncorrelated_with_the_update(k):
    """The masked vector of one device looks the same whatever the device trained.

    Same statistics as the gateway-trusted share test: an all-zero update and
    a large structured one give top-byte histograms that are uniform
    (chi-square) and indistinguishable from each other (two-sample
    chi-square); the masked values do not correlate with the update; the low
    byte is uniform too. K=2 is the weakest case: a single mask.
    """
    _, pub = _keys(k)
    n = 1 << 16
    rng = np.random.default_rng(11)
    loud = rng.choice([-1.0, 1.0], size=n) * rng.uniform(1e8, 1e9, size=n)
    m_zero = mask_update("d-zero", 1, np.zeros(n), pub).masked
    m_loud = mask_update("d-loud", 1, loud, pub).masked
    h_zero = np.bincount(_top_byte(m_zero), minlength=256)
    h_loud = np.bincount(_top_byte(m_loud), minlength=256)
    assert stats.chisquare(h_zero).pvalue > 1e-4
    assert stats.chisquare(h_loud).pvalue > 1e-4
    assert stats.chi2_contingency(np.stack([h_zero, h_loud])).pvalue > 1e-4
    r = np.corrcoef(encode_fixed(loud).astype(np.float64), m_loud.astype(np.float64))[0, 1]
    assert abs(r) < 0.02
    low = (m_loud & 0xFF).astype(np.int64)
    assert stats.chisquare(np.bincount(low, minlength=256)).pvalue > 1e-4
    # Fresh seeds: the same update masked twice shares nothing.
    again = mask_update("d-loud", 1, loud, pub).masked
    assert np.mean(again == m_loud) < 1e-3


def test_the_same_update_in_another_round_is_masked_afresh():
    _, pub = _keys(3)
    x = np.linspace(-1, 1, 4096)
    a = mask_update("d", 1, x, pub)
    b = mask_update("d", 2, x, pub)
    r = np.corrcoef(a.masked.astype(np.float64), b.masked.astype(np.float64))[0, 1]
    assert abs(r) < 0.06


BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in {'torch', 'crypten', 'ray', 'scipy', 'gateway', 'cloud'}:
            raise ImportError(f'{name} is blocked: devices.masking must not need it')
        return None
sys.meta_path.insert(0, Block())
import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from devices.masking import PartyPublicKeys, mask_update
keys = [X25519PrivateKey.generate() for _ in range(3)]
pub = PartyPublicKeys(tuple(k.public_key().public_bytes_raw() for k in keys))
u = mask_update('d1', 0, np.ones(8), pub)
assert len(u.sealed) == 2
print('ok', sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'ray', 'gateway'}))
"""


def test_masking_imports_without_torch_or_the_gateway():
    proc = subprocess.run(
        [sys.executable, "-c", BLOCKER], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok []"


def test_masked_update_is_a_frozen_record():
    _, pub = _keys(2)
    u = mask_update("d", 0, np.ones(3), pub)
    with pytest.raises(dataclasses.FrozenInstanceError):
        u.weight = 2.0  # type: ignore[misc]


def test_a_cohort_is_masked_exactly_as_its_devices_one_by_one():
    priv, pub = _keys(3)
    rng = np.random.default_rng(3)
    ids = [f"gw0-d{i:02d}" for i in range(5)]
    deltas = rng.normal(size=(5, 300)).astype(np.float32)
    deltas[1] *= 50  # longer than the clip bound
    weights = [1.0, 2.0, 0.5, 3.0, 1.0]
    seeds = [[bytes([j, t]) * 16 for t in range(2)] for j in range(5)]
    senders = [SealingKey() for _ in ids]
    batch = mask_cohort(
        ids, 9, deltas, pub, weights=weights, clip_norm=3.0, senders=senders, seeds=seeds
    )
    assert len(batch) == 5 and batch.masked.shape == (5, 300)
    for j, u in enumerate(batch):
        one = mask_update(
            ids[j], 9, deltas[j], pub, weight=weights[j], clip_norm=3.0, seeds=seeds[j]
        )
        np.testing.assert_array_equal(u.masked, one.masked)
        assert u.weight == weights[j] and u.device == ids[j] and u.round == 9
        # Each box opens with the party's key to the seed the row was masked with.
        assert [SeedOpener(priv[k]).open(u.sealed[k], ids[j], 9, k) for k in (1, 2)] == seeds[j]
        assert {b[:32] for b in u.sealed.values()} == {senders[j].public_raw}
    # The parties' masks take every row back to its clipped, weighted encoding.
    total = batch.masked.sum(axis=0)
    for j in range(5):
        for k in (1, 2):
            total += device_mask(seeds[j][k - 1], k, 300)
    clipped = np.stack([clip_l2(d.astype(np.float64), 3.0) for d in deltas])
    expect = encode_fixed((clipped * np.asarray(weights)[:, None]).sum(axis=0))
    assert np.max(np.abs(total - expect)) <= 5  # one rounding per device and coordinate


def test_a_cohort_names_the_device_that_cannot_be_encoded():
    _, pub = _keys(2)
    deltas = np.zeros((3, 4))
    deltas[2, 1] = np.inf
    with pytest.raises(ValueError, match=r"device 'd2', round 1: cannot encode non-finite"):
        mask_cohort(["d0", "d1", "d2"], 1, deltas, pub)
    with pytest.raises(ValueError, match=r"device 'd1': invalid weight -1.0"):
        mask_cohort(["d0", "d1", "d2"], 1, np.zeros((3, 4)), pub, weights=[1, -1, 1])
    with pytest.raises(ValueError, match=r"expected 2 flat updates"):
        mask_cohort(["d0", "d1"], 1, np.zeros((3, 4)), pub)
    with pytest.raises(ValueError, match="need 1 seeds"):
        mask_cohort(["d0"], 1, np.zeros((1, 4)), pub, seeds=[[b"a" * 32, b"b" * 32]])
