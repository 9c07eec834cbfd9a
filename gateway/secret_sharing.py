"""Additive secret sharing of a gateway's partial aggregate (numpy only).

A gateway splits the *sum* it uplinks (``PartialAggregate.weighted_sum``) into
K additive shares over the ring Z_{2^64}, one per cloud aggregator party, so
that no single cloud server learns anything about it: any K-1 shares are
uniformly random and independent of the aggregate.

Encoding is CrypTen's: fixed point with 16 fractional bits in an int64 ring
with wrap-around, so ``crypten.mpc.MPCTensor.from_shares`` on the cloud side
takes these shares unchanged. Numpy's int64 array arithmetic wraps modulo
2^64 silently, which is exactly the ring arithmetic we want.

Randomness: shares 0..K-2 are the output of SHAKE-256 (a standard
extendable-output function, i.e. a CSPRNG) keyed with a 256-bit secret seed
and domain-separated by party index; the last share is the difference. The
same expansion (:func:`expand_mask`) lets a party regenerate a mask from a
seed alone, which the ``device-shares`` mode needs (a device seals a 32-byte
seed to a party instead of shipping a whole share).

Runs on edge servers: numpy and the standard library only (no torch,
CrypTen or Ray).
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gateway.partial_aggregate import PartialAggregate

FRAC_BITS = 16
# Headroom: a ring value must stay below 2^62 after summing up to MAX_TERMS
# encoded vectors (gateways, plus the DP noise shares), leaving one more bit
# for signed comparisons inside SMPC. With 16 fractional bits and 2^16 terms,
# |x| < 2^30 (about 1.07e9) per coordinate.
DEFAULT_MAX_TERMS = 2**16
_DOMAIN = b"tierfl/secret-sharing/v1"


def max_abs(frac_bits: int = FRAC_BITS, max_terms: int = DEFAULT_MAX_TERMS) -> float:
    """The largest |x| :func:`encode_fixed` accepts (exclusive)."""
    return float(2.0 ** (62 - frac_bits) / max_terms)


def encode_fixed(
    x: np.ndarray, frac_bits: int = FRAC_BITS, max_terms: int = DEFAULT_MAX_TERMS
) -> np.ndarray:
    """Float array -> int64 fixed point (round to nearest), refusing what could overflow.

    Values with |x| >= 2^(62 - frac_bits) / max_terms are refused so that a sum
    of up to ``max_terms`` encoded vectors never wraps the ring; NaN/Inf are
    refused too. The error names the first offending index.
    """
    if not 0 <= frac_bits <= 30:
        raise ValueError(f"frac_bits must be in [0, 30], got {frac_bits}")
    if max_terms < 1:
        raise ValueError(f"max_terms must be >= 1, got {max_terms}")
    a = np.asarray(x, dtype=np.float64)
    finite = np.isfinite(a)
    if not finite.all():
        i = int(np.flatnonzero(~finite.ravel())[0])
        raise ValueError(f"cannot encode non-finite value {float(a.ravel()[i])!r} at index {i}")
    bound = max_abs(frac_bits, max_terms)
    big = np.abs(a) >= bound
    if big.any():
        i = int(np.flatnonzero(big.ravel())[0])
        raise ValueError(
            f"value {float(a.ravel()[i])!r} at index {i} is out of range for fixed point with "
            f"{frac_bits} fractional bits: max |x| is {bound:.6g} "
            f"(2^{62 - frac_bits} / {max_terms} summed terms)"
        )
    return np.rint(a * float(2**frac_bits)).astype(np.int64)


def decode_fixed(x: np.ndarray, frac_bits: int = FRAC_BITS) -> np.ndarray:
    """int64 fixed point -> float64, exact for |x| < 2^53 (true division, no floor tricks)."""
    a = np.asarray(x)
    if a.dtype != np.int64:
        raise TypeError(f"decode_fixed expects int64 ring values, got {a.dtype}")
    return a.astype(np.float64) / float(2**frac_bits)


def new_seed() -> bytes:
    """A fresh 256-bit secret from the OS CSPRNG."""
    return secrets.token_bytes(32)


def _seed_bytes(seed: bytes | int) -> bytes:
    if isinstance(seed, bool):
        raise TypeError("seed must be bytes or int, not bool")
    if isinstance(seed, int):
        if not 0 <= seed < 2**256:
            raise ValueError("an integer seed must be in [0, 2^256)")
        # Fine for tests; a real gateway passes new_seed(): a small int is guessable.
        return seed.to_bytes(32, "big")
    if isinstance(seed, bytes | bytearray):
        if len(seed) < 16:
            raise ValueError(f"a bytes seed needs at least 16 bytes (128 bits), got {len(seed)}")
        return bytes(seed)
    raise TypeError(f"seed must be bytes or int, got {type(seed).__name__}")


def expand_mask(seed: bytes | int, index: int, n: int, label: bytes = b"share") -> np.ndarray:
    """n uniform int64 ring elements from SHAKE-256(domain, label, index, seed).

    Deterministic: whoever holds the seed regenerates the same mask. Different
    ``index``/``label`` give independent streams from one seed.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    key = _seed_bytes(seed)
    h = hashlib.shake_256()
    for part in (_DOMAIN, label, index.to_bytes(8, "big", signed=False), key):
        h.update(len(part).to_bytes(4, "big") + part)
    return np.frombuffer(h.digest(8 * n), dtype="<i8").astype(np.int64, copy=True)


def split_shares(x_fixed: np.ndarray, k: int, seed: bytes | int | None = None) -> list[np.ndarray]:
    """Split int64 ring values into k additive shares (sum mod 2^64 == x_fixed).

    Shares 0..k-2 are CSPRNG masks expanded from ``seed`` (a fresh 256-bit
    secret when None); share k-1 is x minus their sum, with wrap-around.
    """
    a = np.asarray(x_fixed)
    if a.dtype != np.int64:
        raise TypeError(f"split_shares expects int64 fixed-point values, got {a.dtype}")
    if k < 2:
        raise ValueError(f"need at least 2 shares, got k={k}")
    if seed is None:
        seed = new_seed()
    flat = a.ravel()
    shares = [expand_mask(seed, i, flat.size).reshape(a.shape) for i in range(k - 1)]
    last = a.copy()
    for s in shares:
        last -= s  # int64 array arithmetic wraps modulo 2^64
    shares.append(last)
    return shares


def reconstruct(shares: Sequence[np.ndarray]) -> np.ndarray:
    """Sum shares modulo 2^64."""
    if not shares:
        raise ValueError("no shares to reconstruct from")
    out = np.array(shares[0], dtype=np.int64, copy=True)
    for i, s in enumerate(shares[1:], start=1):
        s = np.asarray(s)
        if s.dtype != np.int64 or s.shape != out.shape:
            raise ValueError(
                f"share {i} has dtype {s.dtype} shape {s.shape}, expected int64 {out.shape}"
            )
        out += s
    return out


@dataclass(frozen=True)
class SharedPartial:
    """One party's share of one gateway's partial aggregate for one round.

    ``share`` is int64 ring values (fixed point, ``frac_bits`` fractional
    bits). ``total_weight`` and ``count`` are public: the coordinator divides
    the revealed sum by the total weight, and they let the cloud parties check
    that a gateway told every party the same thing.
    """

    gateway: str
    round: int
    party: int
    share: np.ndarray
    total_weight: float
    count: int
    frac_bits: int = FRAC_BITS

    @property
    def nbytes(self) -> int:
        """Uplink payload to one party: the int64 share plus a small header of public scalars."""
        return int(self.share.size) * 8 + 64


def share_vector(
    gateway: str,
    round_: int,
    values: np.ndarray,
    total_weight: float,
    count: int,
    parties: int,
    seed: bytes | int | None = None,
    max_terms: int = DEFAULT_MAX_TERMS,
) -> list[SharedPartial]:
    """Encode a gateway's weighted sum and split it: one SharedPartial per party."""
    v = np.asarray(values)
    if v.ndim != 1:
        raise ValueError(f"gateway {gateway!r}: expected a flat vector, got shape {v.shape}")
    if not np.isfinite(total_weight) or total_weight < 0:
        raise ValueError(f"gateway {gateway!r}: invalid total weight {total_weight!r}")
    try:
        fixed = encode_fixed(v, FRAC_BITS, max_terms)
    except ValueError as exc:
        raise ValueError(f"gateway {gateway!r}, round {round_}: {exc}") from None
    return [
        SharedPartial(gateway, round_, p, s, float(total_weight), int(count))
        for p, s in enumerate(split_shares(fixed, parties, seed))
    ]


def share_partial(
    partial: PartialAggregate, parties: int, seed: bytes | int | None = None
) -> list[SharedPartial]:
    """Split a gateway's ``PartialAggregate`` into one SharedPartial per cloud party."""
    return share_vector(
        partial.gateway,
        partial.round,
        partial.weighted_sum,
        partial.total_weight,
        partial.count,
        parties,
        seed,
    )
