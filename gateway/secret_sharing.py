"""Additive secret sharing of a gateway's partial aggregate (numpy only).

A gateway splits the *sum* it uplinks (``PartialAggregate.weighted_sum``) into
K additive shares over the ring Z_{2^64}, one per cloud aggregator party, so
that no single cloud server learns anything about it: any K-1 shares are
uniformly random and independent of the aggregate.

Encoding is CrypTen's: fixed point with 16 fractional bits in an int64 ring
with wrap-around, so ``crypten.mpc.MPCTensor.from_shares`` on the cloud side
takes these shares unchanged. Numpy's int64 array arithmetic wraps modulo
2^64 silently, which is exactly the ring arithmetic we want.

Randomness: shares 0..K-2 are CSPRNG output (AES-256-CTR under a key derived
with SHAKE-256 from a 256-bit secret seed, domain-separated by party index:
``devices.fixed_point.expand_mask``); the last share is the difference. The
same expansion (:func:`expand_mask`) lets a party regenerate a mask from a
seed alone, which the ``device-shares`` mode needs (a device seals a 32-byte
seed to a party instead of shipping a whole share).

Runs on edge servers: numpy and the standard library only (no torch,
CrypTen or Ray). The fixed-point encoding and :func:`expand_mask` are defined in
``devices.fixed_point`` and re-exported here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# The encoding and mask expansion live in devices.fixed_point (device-shares mode needs
# them on devices, which must not import the gateway); re-exported here unchanged.
from devices.fixed_point import (
    DEFAULT_MAX_TERMS,
    FRAC_BITS,
    decode_fixed,
    encode_fixed,
    expand_mask,
    max_abs,
    new_seed,
)
from gateway.partial_aggregate import PartialAggregate

__all__ = [
    "DEFAULT_MAX_TERMS",
    "FRAC_BITS",
    "SeedShare",
    "SharedPartial",
    "decode_fixed",
    "encode_fixed",
    "expand_mask",
    "max_abs",
    "new_seed",
    "reconstruct",
    "share_partial",
    "share_partial_compact",
    "share_vector",
    "share_vector_compact",
    "split_shares",
]


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


def _encode_sum(
    gateway: str, round_: int, values: np.ndarray, total_weight: float, max_terms: int
) -> np.ndarray:
    """Check a gateway's flat sum and public weight, and encode the sum in the ring."""
    v = np.asarray(values)
    if v.ndim != 1:
        raise ValueError(f"gateway {gateway!r}: expected a flat vector, got shape {v.shape}")
    if not np.isfinite(total_weight) or total_weight < 0:
        raise ValueError(f"gateway {gateway!r}: invalid total weight {total_weight!r}")
    try:
        return encode_fixed(v, FRAC_BITS, max_terms)
    except ValueError as exc:
        raise ValueError(f"gateway {gateway!r}, round {round_}: {exc}") from None


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
    fixed = _encode_sum(gateway, round_, values, total_weight, max_terms)
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


@dataclass(frozen=True)
class SeedShare:
    """A party's share sent as the 32-byte seed it expands from, not as P int64 values.

    Shares 0..K-2 are pseudo-random, so a gateway can send party k the seed
    of its share instead of the share (``expand_mask(seed, k, length)``
    regenerates it on the party). Each party gets its *own* fresh seed: a
    party learns exactly its share and nothing about the others'. Only the
    last party needs the full difference vector, so the gateway's uplink is
    P*8 bytes instead of K*P*8.
    """

    gateway: str
    round: int
    party: int
    seed: bytes
    length: int
    total_weight: float
    count: int
    frac_bits: int = FRAC_BITS

    @property
    def nbytes(self) -> int:
        return len(self.seed) + 64

    def expand(self) -> SharedPartial:
        share = expand_mask(self.seed, self.party, self.length)
        return SharedPartial(
            self.gateway, self.round, self.party, share, self.total_weight, self.count
        )


def share_vector_compact(
    gateway: str,
    round_: int,
    values: np.ndarray,
    total_weight: float,
    count: int,
    parties: int,
    max_terms: int = DEFAULT_MAX_TERMS,
) -> list[SeedShare | SharedPartial]:
    """Like :func:`share_vector`, but parties 0..K-2 get a fresh seed each instead of a vector."""
    if parties < 2:
        raise ValueError(f"need at least 2 shares, got k={parties}")
    last = _encode_sum(gateway, round_, values, total_weight, max_terms)
    out: list[SeedShare | SharedPartial] = []
    for p in range(parties - 1):
        seed = new_seed()
        last -= expand_mask(seed, p, last.size)  # ring subtraction (wraps mod 2^64)
        out.append(
            SeedShare(gateway, round_, p, seed, int(last.size), float(total_weight), int(count))
        )
    out.append(SharedPartial(gateway, round_, parties - 1, last, float(total_weight), int(count)))
    return out


def share_partial_compact(
    partial: PartialAggregate, parties: int
) -> list[SeedShare | SharedPartial]:
    """:func:`share_vector_compact` of a gateway's ``PartialAggregate``."""
    return share_vector_compact(
        partial.gateway,
        partial.round,
        partial.weighted_sum,
        partial.total_weight,
        partial.count,
        parties,
    )
