"""Additive secret sharing at the gateway: exactness, range refusal, privacy of single shares."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from gateway.partial_aggregate import PartialAggregate
from gateway.secret_sharing import (
    FRAC_BITS,
    SharedPartial,
    decode_fixed,
    encode_fixed,
    expand_mask,
    max_abs,
    new_seed,
    reconstruct,
    share_partial,
    split_shares,
)

ROOT = Path(__file__).resolve().parents[2]
I64 = np.iinfo(np.int64)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_shares_reconstruct_exactly_over_the_whole_ring(k):
    rng = np.random.default_rng(k)
    x = rng.integers(I64.min, I64.max, size=10_000, dtype=np.int64, endpoint=True)
    x[:4] = [I64.min, I64.max, -1, 0]  # the ring's edges: sums must wrap, not saturate
    shares = split_shares(x, k, seed=new_seed())
    assert len(shares) == k and all(s.dtype == np.int64 and s.shape == x.shape for s in shares)
    np.testing.assert_array_equal(reconstruct(shares), x)
    # Any k-1 shares alone are not the value.
    assert not np.array_equal(reconstruct(shares[:-1]), x)


def test_negative_values_round_trip_exactly_in_float64():
    # CrypTen's own decoder gets -20 + 5/65536 wrong (-21 + 5/65536); ours must not.
    x = np.array([-20 + 5 / 65536, -1 / 65536, -3.25, 1.5, 0.0, -123456.75, 2.0**29])
    fixed = encode_fixed(x)
    assert fixed[0] == -20 * 65536 + 5
    back = decode_fixed(reconstruct(split_shares(fixed, 3, seed=b"\x01" * 32)))
    np.testing.assert_array_equal(back, x)
    y = np.random.default_rng(0).normal(scale=1e3, size=1000)
    np.testing.assert_allclose(decode_fixed(encode_fixed(y)), y, rtol=0, atol=2.0**-17)


def test_shares_are_deterministic_per_seed_and_the_last_is_the_difference():
    x = encode_fixed(np.linspace(-5, 5, 257))
    a = split_shares(x, 3, seed=42)
    b = split_shares(x, 3, seed=42)
    c = split_shares(x, 3, seed=43)
    for s, t in zip(a, b, strict=True):
        np.testing.assert_array_equal(s, t)
    assert not np.array_equal(a[0], c[0])
    np.testing.assert_array_equal(a[0], expand_mask(42, 0, x.size))
    np.testing.assert_array_equal(a[1], expand_mask(42, 1, x.size))
    np.testing.assert_array_equal(a[2], x - a[0] - a[1])
    # Domain separation: another label or index is an independent stream.
    assert not np.array_equal(expand_mask(42, 0, 64), expand_mask(42, 0, 64, label=b"other"))
    assert not np.array_equal(expand_mask(42, 0, 64), expand_mask(42, 1, 64))


def test_out_of_range_and_non_finite_values_are_refused_with_the_bound():
    bound = max_abs()
    assert bound == 2.0 ** (62 - FRAC_BITS) / 2**16
    encode_fixed(np.array([np.nextafter(bound, 0), -np.nextafter(bound, 0)]))
    with pytest.raises(ValueError, match=r"index 1 .*max \|x\| is 1\.07374e\+09"):
        encode_fixed(np.array([0.0, -bound]))
    with pytest.raises(ValueError, match=r"max \|x\| is 1\.67772e\+07"):
        encode_fixed(np.array([2.0**25]), max_terms=2**22)
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(ValueError, match=r"non-finite value .* at index 2"):
            encode_fixed(np.array([1.0, 2.0, bad]))


def test_bad_arguments_are_refused():
    x = encode_fixed(np.ones(4))
    with pytest.raises(ValueError, match="at least 2 shares"):
        split_shares(x, 1)
    with pytest.raises(TypeError, match="int64"):
        split_shares(np.ones(4), 2)
    with pytest.raises(ValueError, match="at least 16 bytes"):
        split_shares(x, 2, seed=b"short")
    with pytest.raises(ValueError, match=r"\[0, 2\^256\)"):
        split_shares(x, 2, seed=-1)
    with pytest.raises(TypeError, match="int64"):
        decode_fixed(np.ones(3))
    with pytest.raises(ValueError, match="share 1 has dtype"):
        reconstruct([x, x[:2]])


def _top_byte(a: np.ndarray) -> np.ndarray:
    return (a.view(np.uint64) >> np.uint64(56)).astype(np.int64)


@pytest.mark.parametrize("which", [0, 2])
def test_a_single_share_is_uniform_and_independent_of_the_value(which):
    """Share 0 (a CSPRNG mask) and share K-1 (value minus masks) each look uniform on the ring.

    Two very different inputs -- all zeros, and large structured values -- give
    top-byte histograms that are uniform (chi-square) and indistinguishable from
    each other (two-sample chi-square), and the share's top bits do not correlate
    with the input.
    """
    n = 1 << 16
    zeros = np.zeros(n, dtype=np.int64)
    rng = np.random.default_rng(7)
    loud = encode_fixed(rng.choice([-1.0, 1.0], size=n) * rng.uniform(1e8, 1e9, size=n))
    s_zero = split_shares(zeros, 3, seed=101)[which]
    s_loud = split_shares(loud, 3, seed=202)[which]
    h_zero = np.bincount(_top_byte(s_zero), minlength=256)
    h_loud = np.bincount(_top_byte(s_loud), minlength=256)
    assert stats.chisquare(h_zero).pvalue > 1e-4
    assert stats.chisquare(h_loud).pvalue > 1e-4
    assert stats.chi2_contingency(np.stack([h_zero, h_loud])).pvalue > 1e-4
    # No linear relation between the secret and the share (|r| ~ 1/sqrt(n) = 0.004).
    r = np.corrcoef(loud.astype(np.float64), s_loud.astype(np.float64))[0, 1]
    assert abs(r) < 0.02
    # Low bits too: the sign/low-order structure of the input must not show.
    low = (s_loud & 0xFF).astype(np.int64)
    assert stats.chisquare(np.bincount(low, minlength=256)).pvalue > 1e-4


def test_share_partial_makes_one_share_per_party_with_public_totals():
    p = PartialAggregate.empty("gw7", 4, 6)
    p.add("d1", np.array([1.0, -2.0, 3.5, 0.0, -0.25, 7.0]), 2.0)
    p.add("d2", np.array([-1.0, 2.0, 0.5, 1.0, 0.25, -7.0]), 3.0)
    parts = share_partial(p, 3, seed=new_seed())
    assert [sp.party for sp in parts] == [0, 1, 2]
    assert all(isinstance(sp, SharedPartial) for sp in parts)
    assert {(sp.gateway, sp.round, sp.total_weight, sp.count) for sp in parts} == {
        ("gw7", 4, 5.0, 2)
    }
    assert parts[0].nbytes == 6 * 8 + 64
    back = decode_fixed(reconstruct([sp.share for sp in parts]))
    np.testing.assert_allclose(back, p.weighted_sum, rtol=0, atol=2.0**-17)
    with pytest.raises(ValueError, match=r"gw7.*round 4.*out of range"):
        q = PartialAggregate("gw7", 4, np.array([1e12]), 1.0, 1)
        share_partial(q, 2)


BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in {'torch', 'crypten', 'ray', 'scipy'}:
            raise ImportError(f'{name} is blocked: the gateway must not need it')
        return None
sys.meta_path.insert(0, Block())
import numpy as np
from gateway.secret_sharing import encode_fixed, split_shares, reconstruct, decode_fixed
x = np.array([-20 + 5 / 65536, 3.0])
assert (decode_fixed(reconstruct(split_shares(encode_fixed(x), 3))) == x).all()
print('ok', sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'ray', 'crypten'}))
"""


def test_secret_sharing_imports_without_torch_crypten_or_ray():
    proc = subprocess.run(
        [sys.executable, "-c", BLOCKER], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok []"


@pytest.mark.parametrize("k", [2, 3, 5])
def test_compact_shares_send_seeds_and_still_add_up(k):
    """Parties 0..K-2 get a 32-byte seed each (fresh, distinct); the last the difference."""
    from gateway.secret_sharing import SeedShare, share_vector_compact

    rng = np.random.default_rng(k)
    x = rng.normal(scale=100.0, size=5000) - 30.0
    x[:2] = [-20 + 5 / 65536, -1e6]
    msgs = share_vector_compact("gw1", 3, x, 12.0, 4, k)
    assert [m.party for m in msgs] == list(range(k))
    seeds = [m for m in msgs if isinstance(m, SeedShare)]
    assert len(seeds) == k - 1 and len({m.seed for m in seeds}) == k - 1
    assert all(m.nbytes < 100 for m in seeds) and msgs[-1].nbytes == 5000 * 8 + 64
    expanded = [m.expand() if isinstance(m, SeedShare) else m for m in msgs]
    assert all((e.total_weight, e.count, e.round) == (12.0, 4, 3) for e in expanded)
    back = decode_fixed(reconstruct([e.share for e in expanded]))
    np.testing.assert_allclose(back, x, atol=2.0**-16)
    assert back[0] == -20 + 5 / 65536  # exact for a negative value CrypTen's decoder gets wrong
    # A party's seed expands only its own share: party 0's seed under party 1's index is noise.
    other = expand_mask(seeds[0].seed, 1, 5000)
    assert not np.array_equal(other, expanded[1].share)


def test_compact_last_share_is_uniform_whatever_the_value():
    from gateway.secret_sharing import share_vector_compact

    n = 1 << 16
    rng = np.random.default_rng(3)
    loud = rng.choice([-1.0, 1.0], size=n) * rng.uniform(1e8, 1e9, size=n)
    h = [
        np.bincount(_top_byte(share_vector_compact("g", 1, v, 1.0, 1, 3)[-1].share), minlength=256)
        for v in (np.zeros(n), loud)
    ]
    assert stats.chisquare(h[0]).pvalue > 1e-4 and stats.chisquare(h[1]).pvalue > 1e-4
    assert stats.chi2_contingency(np.stack(h)).pvalue > 1e-4
