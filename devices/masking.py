"""Device-side masking for the ``device-shares`` privacy mode (numpy + cryptography, no torch).

In ``device-shares`` mode the gateway learns nothing about any device's
update: each device turns its update into additive shares itself, ships the
bulky one to its gateway and a 32-byte seed per cloud party for the rest.

For device i in round r, with K cloud parties and the seeded parties
S = {1, ..., K-1} (or {0, ..., K-1} with ``seal_to_party0=True``):

1. encode ``x_i = encode_fixed(w_i * clip(delta_i))`` in the int64 ring
   (CrypTen's 16-bit fixed point, :mod:`devices.fixed_point`);
2. draw a fresh 256-bit seed ``s_ik`` per k in S and expand it into a ring
   mask ``m_ik = expand_mask(s_ik, k, P, MASK_LABEL)`` (AES-256-CTR);
3. send the gateway ``masked_i = x_i - sum_{k in S} m_ik`` (int64, wrapping
   mod 2^64), which is uniform on the ring whatever x_i is, as long as one
   seed stays secret;
4. seal each ``s_ik`` to party k's X25519 public key (:func:`seal_seed`, an
   ECIES-style sealed box) and send the 80-byte boxes along with it; only
   party k can open its box, so the gateway forwards them blind.

``gateway.masked_sum`` sums the masked updates and forwards per party the
list of included devices with their boxes; ``cloud.unmask`` turns those into
each party's additive share of the sum. The algebra is there.

Sealed box (:func:`seal_seed`): a fresh ephemeral X25519 key per box; the
ChaCha20-Poly1305 key is HKDF-SHA256 of the X25519 shared secret with both
public keys in the HKDF info (so a box is bound to its recipient); the key is
used for exactly one encryption, so a fixed zero nonce is safe. The
associated data binds the device id, the round and the party index: a box
moved to another device, round or party fails to open. Wire form: ephemeral
public key (32 bytes) || ciphertext (32) || tag (16) = 80 bytes.

What the box does *not* do: prove who sealed it (anyone can seal to a public
key). The envelope signature authenticates a device to its gateway; a gateway
that swaps a device's box for one of its own does not learn the update (the
device's own mask still hides it) but makes the revealed sum garbage, which
is the integrity a dishonest gateway can always break in either mode.

Weights: ``weight`` (public, e.g. the sample count) multiplies the update
before encoding, like ``PartialAggregate.add`` does, so the revealed sum is the
FedAvg numerator. With differential privacy and per-device norm bounds use
``weight=1``: the bound (local ``clip_norm`` or in SMPC) applies to ``w_i
delta_i``, the contribution the noise has to hide.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from devices.fixed_point import DEFAULT_MAX_TERMS, FRAC_BITS, encode_fixed, expand_mask, new_seed
from devices.keys import check_device_id

__all__ = [
    "MASK_LABEL",
    "SEALED_BYTES",
    "SEED_BYTES",
    "MaskedUpdate",
    "PartyPublicKeys",
    "SealError",
    "associated_data",
    "clip_l2",
    "device_mask",
    "mask_update",
    "open_seed",
    "seal_seed",
    "seeded_parties",
]

SEED_BYTES = 32
KEY_BYTES = 32
TAG_BYTES = 16
SEALED_BYTES = KEY_BYTES + SEED_BYTES + TAG_BYTES  # 80
MASK_LABEL = b"device-mask"
_AD_DOMAIN = b"tierfl/device-shares/v1"
_HKDF_INFO = b"tierfl/device-shares/seal/v1"
_NONCE = bytes(12)  # each derived key encrypts exactly one message


class SealError(ValueError):
    """A sealed seed does not open: tampered, truncated, or sealed for another recipient."""


# --------------------------------------------------------------------------- party keys


@dataclass(frozen=True)
class PartyPublicKeys:
    """The cloud parties' X25519 public keys, index = party rank; shipped with the model.

    ``fingerprint`` (SHA-256 of the concatenated raw keys) is what a device can
    compare with the one announced alongside the model version.
    """

    keys: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if len(self.keys) < 2:
            raise ValueError(f"device-shares needs at least 2 parties' keys, got {len(self.keys)}")
        for k, raw in enumerate(self.keys):
            if not isinstance(raw, bytes) or len(raw) != KEY_BYTES:
                raise ValueError(f"party {k}: an X25519 public key is {KEY_BYTES} raw bytes")
        if len(set(self.keys)) != len(self.keys):
            raise ValueError("two parties have the same public key")

    @property
    def parties(self) -> int:
        return len(self.keys)

    def key(self, party: int) -> X25519PublicKey:
        return X25519PublicKey.from_public_bytes(self.keys[party])

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(b"".join(self.keys)).hexdigest()

    def to_json(self) -> str:
        return json.dumps(
            {"parties": [k.hex() for k in self.keys], "fingerprint": self.fingerprint}, indent=1
        )

    @classmethod
    def from_hex(cls, keys: Sequence[str]) -> PartyPublicKeys:
        out = []
        for k, h in enumerate(keys):
            try:
                out.append(bytes.fromhex(h))
            except (TypeError, ValueError):
                raise ValueError(f"party {k}: public key is not hex: {h!r}") from None
        return cls(tuple(out))

    @classmethod
    def from_json(cls, text: str | bytes) -> PartyPublicKeys:
        """Parse ``{"parties": [hex, ...], "fingerprint": hex?}``; a fingerprint must match."""
        try:
            doc: Any = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"party keys: not JSON ({exc})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("parties"), list):
            raise ValueError('party keys: expected {"parties": [hex, ...]}')
        pub = cls.from_hex(doc["parties"])
        fp = doc.get("fingerprint")
        if fp is not None and fp != pub.fingerprint:
            raise ValueError(
                f"party keys: fingerprint {fp!r} does not match the keys ({pub.fingerprint})"
            )
        return pub


def seeded_parties(parties: int, seal_to_party0: bool = False) -> tuple[int, ...]:
    """The parties that receive a sealed seed from every device.

    Default {1..K-1}: party 0's share is the gateway's masked sum. With
    ``seal_to_party0`` every party gets a seed (one more expansion and box per
    device), so even the gateway colluding with K-1 parties learns nothing.
    """
    if parties < 2:
        raise ValueError(f"need at least 2 parties, got {parties}")
    return tuple(range(0 if seal_to_party0 else 1, parties))


# --------------------------------------------------------------------------- sealed box


def associated_data(device: str, round_: int, party: int) -> bytes:
    """What a box is bound to: length-prefixed domain and device id, round (u64), party (u32)."""
    dev = device.encode()
    return b"".join(
        (
            len(_AD_DOMAIN).to_bytes(2, "big"),
            _AD_DOMAIN,
            len(dev).to_bytes(2, "big"),
            dev,
            int(round_).to_bytes(8, "big"),
            int(party).to_bytes(4, "big"),
        )
    )


def _box_key(shared: bytes, eph_pub: bytes, recipient_pub: bytes) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=None,
        info=_HKDF_INFO + eph_pub + recipient_pub,
    ).derive(shared)


def _raw(pub: X25519PublicKey) -> bytes:
    return pub.public_bytes_raw()


def seal_seed(
    seed: bytes,
    party_key: X25519PublicKey,
    device: str,
    round_: int,
    party: int,
    ephemeral: X25519PrivateKey | None = None,
) -> bytes:
    """Seal a 32-byte seed to one party: 80 bytes only that party's private key opens.

    ``ephemeral``: a fresh key this device uses for all its boxes of one round
    (one key generation instead of one per party). Each box still derives its
    own key from the recipient's public key, is bound to its party by the
    associated data, and carries the ephemeral public key, so the format and
    :func:`open_seed` are unchanged. Never reuse it across rounds or devices.
    """
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a seed is {SEED_BYTES} bytes, got {len(seed)}")
    eph = ephemeral if ephemeral is not None else X25519PrivateKey.generate()
    eph_pub = _raw(eph.public_key())
    recipient = _raw(party_key)
    try:
        shared = eph.exchange(party_key)
    except ValueError:
        raise ValueError(f"party {party}: public key is a low-order point, refusing") from None
    key = _box_key(shared, eph_pub, recipient)
    ct = ChaCha20Poly1305(key).encrypt(_NONCE, seed, associated_data(device, round_, party))
    return eph_pub + ct


def open_seed(
    sealed: bytes,
    private_key: X25519PrivateKey,
    device: str,
    round_: int,
    party: int,
    public_raw: bytes | None = None,
) -> bytes:
    """Open a box sealed by :func:`seal_seed`; :class:`SealError` names device, round and party.

    ``public_raw``: ``private_key``'s raw public key, when the caller opens many
    boxes (deriving it is a scalar multiplication, ~50 us each time).
    """
    where = f"sealed seed of device {device!r} for party {party}, round {round_}"
    if not isinstance(sealed, bytes | bytearray) or len(sealed) != SEALED_BYTES:
        n = len(sealed) if isinstance(sealed, bytes | bytearray) else type(sealed).__name__
        raise SealError(f"{where}: expected {SEALED_BYTES} bytes, got {n}")
    eph_pub = bytes(sealed[:KEY_BYTES])
    try:
        shared = private_key.exchange(X25519PublicKey.from_public_bytes(eph_pub))
    except ValueError:
        raise SealError(f"{where}: invalid ephemeral key (tampered)") from None
    mine = public_raw if public_raw is not None else _raw(private_key.public_key())
    key = _box_key(shared, eph_pub, mine)
    try:
        seed = ChaCha20Poly1305(key).decrypt(
            _NONCE, bytes(sealed[KEY_BYTES:]), associated_data(device, round_, party)
        )
    except InvalidTag:
        raise SealError(
            f"{where}: authentication failed (tampered, or sealed for another "
            "device, round or party)"
        ) from None
    return seed


# --------------------------------------------------------------------------- masking


def device_mask(seed: bytes, party: int, n: int) -> np.ndarray:
    """Party ``party``'s ring mask from a device seed (the same on device and party)."""
    return expand_mask(seed, party, n, MASK_LABEL)


def clip_l2(update: np.ndarray, clip_norm: float) -> np.ndarray:
    """Scale ``update`` down to L2 norm ``clip_norm`` if it is longer (float64 copy)."""
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ValueError(f"clip_norm must be positive and finite, got {clip_norm!r}")
    u = np.array(update, dtype=np.float64, copy=True)
    n = float(np.linalg.norm(u))
    if n > clip_norm:
        u *= clip_norm / n
    return u


@dataclass(frozen=True)
class MaskedUpdate:
    """What a device sends its gateway in ``device-shares`` mode for one round.

    ``masked`` is uniform on the ring; ``weight`` is public (the FedAvg
    weight); ``sealed`` maps each seeded party to its 80-byte box.
    """

    device: str
    round: int
    masked: np.ndarray  # int64 [P]: x_i - sum_k m_ik
    weight: float
    sealed: Mapping[int, bytes] = field(default_factory=dict)
    frac_bits: int = FRAC_BITS

    @property
    def nbytes(self) -> int:
        """Uplink payload: the masked ring vector, the boxes, the device id and a small header."""
        return (
            int(self.masked.size) * 8
            + sum(len(b) for b in self.sealed.values())
            + len(self.device.encode())
            + 32
        )


def mask_update(
    device: str,
    round_: int,
    update: np.ndarray,
    keys: PartyPublicKeys,
    *,
    weight: float = 1.0,
    clip_norm: float | None = None,
    seal_to_party0: bool = False,
    max_terms: int = DEFAULT_MAX_TERMS,
    seeds: Sequence[bytes] | None = None,
) -> MaskedUpdate:
    """Clip (optionally), weight, encode, mask and seal one device's update.

    ``seeds`` (one per seeded party) is for tests only; by default every seed
    is fresh from the OS CSPRNG, and must be: a reused seed reuses a mask.
    """
    check_device_id(device)
    if round_ < 0:
        raise ValueError(f"round must be >= 0, got {round_}")
    if not (math.isfinite(weight) and weight >= 0):
        raise ValueError(f"device {device!r}: invalid weight {weight!r}")
    u = np.asarray(update)
    if u.ndim != 1:
        raise ValueError(f"device {device!r}: expected a flat update, got shape {u.shape}")
    if clip_norm is not None:
        u = clip_l2(u, clip_norm)
    try:
        x = encode_fixed(u * float(weight), FRAC_BITS, max_terms)
    except ValueError as exc:
        raise ValueError(f"device {device!r}, round {round_}: {exc}") from None
    targets = seeded_parties(keys.parties, seal_to_party0)
    if seeds is None:
        seeds = [new_seed() for _ in targets]
    if len(seeds) != len(targets):
        raise ValueError(f"need {len(targets)} seeds (parties {targets}), got {len(seeds)}")
    sealed: dict[int, bytes] = {}
    eph = X25519PrivateKey.generate()  # one per device and round, for all its boxes
    for k, seed in zip(targets, seeds, strict=True):
        x -= device_mask(seed, k, x.size)  # int64 wrap-around: ring subtraction
        sealed[k] = seal_seed(seed, keys.key(k), device, round_, k, ephemeral=eph)
    return MaskedUpdate(device, int(round_), x, float(weight), sealed)
