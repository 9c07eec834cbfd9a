"""Fixed-point ring encoding and seeded masks, shared by devices, gateways and the cloud.

CrypTen's encoding: fixed point with 16 fractional bits in an int64 ring with
wrap-around, so ``crypten.mpc.MPCTensor.from_shares`` on the cloud side takes
numpy-made shares unchanged. Numpy's int64 array arithmetic wraps modulo 2^64
silently, which is exactly the ring arithmetic we want.

Masks: :func:`expand_mask` derives a 256-bit key with SHAKE-256 from the
secret seed, domain-separated by a label and an index, and expands it with
AES-256 in counter mode (a standard PRG; 4-5x faster here than squeezing
SHAKE-256 for the whole mask, and masks are expanded once per device and party
per round in ``device-shares`` mode). Whoever holds the seed regenerates
the same mask, so a 32-byte seed can stand in for a whole share: a gateway
splits its aggregate with it (``gateway.secret_sharing``), and in
``device-shares`` mode a device seals one seed per cloud party instead of
shipping shares (``devices.masking``).

It lives in ``devices`` (not ``gateway``) because devices need it and must not
import the gateway tier; ``gateway.secret_sharing`` re-exports every name.
numpy, the standard library and ``cryptography`` (already needed for the
envelope signatures): it runs on devices and edge servers.
"""

from __future__ import annotations

import hashlib
import secrets

import numpy as np

__all__ = [
    "DEFAULT_MAX_TERMS",
    "FRAC_BITS",
    "decode_fixed",
    "encode_fixed",
    "expand_mask",
    "max_abs",
    "new_seed",
]

FRAC_BITS = 16
# Headroom: a ring value must stay below 2^62 after summing up to MAX_TERMS
# encoded vectors (gateways or devices, plus the DP noise shares), leaving one
# more bit for signed comparisons inside SMPC. With 16 fractional bits and 2^16
# terms, |x| < 2^30 (about 1.07e9) per coordinate.
DEFAULT_MAX_TERMS = 2**16
# v2: AES-256-CTR expansion (v1 squeezed SHAKE-256 for the whole mask). Parties and
# gateways must agree on it, so it is versioned.
_DOMAIN = b"tierfl/secret-sharing/v2"
_ZERO_IV = bytes(16)


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
    bound = max_abs(frac_bits, max_terms)
    # Fast path, no temporaries: min and max inside (-bound, bound) means every
    # value is finite and in range (NaN propagates through min/max and fails).
    if a.size and not (-bound < float(a.min()) and float(a.max()) < bound):
        finite = np.isfinite(a)
        if not finite.all():
            i = int(np.flatnonzero(~finite.ravel())[0])
            raise ValueError(f"cannot encode non-finite value {float(a.ravel()[i])!r} at index {i}")
        big = np.abs(a) >= bound
        i = int(np.flatnonzero(big.ravel())[0])
        raise ValueError(
            f"value {float(a.ravel()[i])!r} at index {i} is out of range for fixed point with "
            f"{frac_bits} fractional bits: max |x| is {bound:.6g} "
            f"(2^{62 - frac_bits} / {max_terms} summed terms)"
        )
    scaled = a * float(2**frac_bits)
    np.rint(scaled, out=scaled)
    return scaled.astype(np.int64)


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


def expand_mask(
    seed: bytes | int,
    index: int,
    n: int,
    label: bytes = b"share",
    out: np.ndarray | None = None,
) -> np.ndarray:
    """n uniform int64 ring elements: AES-256-CTR keyed by SHAKE-256(domain, label, index, seed).

    Deterministic: whoever holds the seed regenerates the same mask. Different
    ``index``/``label`` give independent keys, hence independent streams; each
    key encrypts one stream from counter 0 (never reused for another stream).
    ``out``: a contiguous int64 array of length n to write into (and return).
    """
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    seed_b = _seed_bytes(seed)
    h = hashlib.shake_256()
    for part in (_DOMAIN, label, index.to_bytes(8, "big", signed=False), seed_b):
        h.update(len(part).to_bytes(4, "big") + part)
    stream = Cipher(algorithms.AES(h.digest(32)), modes.CTR(_ZERO_IV)).encryptor()
    # Encrypt zeros straight into the array's own buffer: no intermediate bytes
    # objects, no copy (this runs once per device and party every round).
    if out is None:
        out = np.empty(n, dtype="<i8")
    elif out.dtype != np.int64 or out.shape != (n,) or not out.flags.c_contiguous:
        raise ValueError(f"out must be a contiguous int64 array of shape ({n},)")
    if n:
        written = stream.update_into(_zeros(8 * n), out.data.cast("B"))
        if written != 8 * n:  # CTR is a stream mode: all bytes come out at once
            raise RuntimeError(f"AES-CTR wrote {written} of {8 * n} bytes")
    stream.finalize()
    return out.view(np.int64)


_ZERO_BUF = bytearray()


def _zeros(nbytes: int) -> memoryview:
    """A read-only view of ``nbytes`` zero bytes (one shared buffer, grown on demand)."""
    global _ZERO_BUF
    if len(_ZERO_BUF) < nbytes:
        _ZERO_BUF = bytearray(nbytes)
    return memoryview(_ZERO_BUF)[:nbytes].toreadonly()
