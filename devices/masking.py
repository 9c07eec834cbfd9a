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
4. seal each ``s_ik`` to party k's X25519 public key (:func:`seal_seed`,
   X25519 + ChaCha20-Poly1305) and send the 92-byte boxes along with it; only
   party k can open its box, so the gateway forwards them blind.

``gateway.masked_sum`` sums the masked updates and forwards per party the
list of included devices with their boxes; ``cloud.unmask`` turns those into
each party's additive share of the sum. The algebra is there.

Box (:func:`seal_seed`): the ChaCha20-Poly1305 key is HKDF-SHA256 of the
X25519 shared secret between the sender's key and the party's, with both
public keys in the HKDF info (so a box is bound to its sender and recipient);
each box has a fresh random 96-bit nonce. The associated data binds the
device id, the round and the party index: a box moved to another device,
round or party fails to open. Wire form: sender public key (32 bytes) ||
nonce (12) || ciphertext (32) || tag (16) = 92 bytes.

The sender key is a device's long-term :class:`SealingKey` (like its Ed25519
signing key), so the X25519 exchange runs once per (device, party) and both
sides cache the derived AEAD key: a round then costs a device one random seed,
one mask expansion and one ~2 us encryption per party, instead of a key
generation and an exchange (about 0.15 ms) per box. This is NaCl's
``crypto_box`` pattern (static-static DH, random nonce), not an anonymous
sealed box. What it changes: nothing for the gateway (it holds neither
private key); a party's key leaking opens every box ever sealed to it, as
with ephemeral senders; a device's key leaking opens that device's own boxes
(whoever has it has the device). Random 96-bit nonces stay safe far beyond
the 2^32 boxes per (device, party) pair a deployment could ever produce.
Without a ``sender``, :func:`seal_seed` and :func:`mask_update` use a fresh
throwaway key, which the same format and :func:`open_seed` accept.

What the box does *not* do: prove that a device id owns its sender key
(anyone can make a key; parties do not check a registry). The envelope
signature authenticates a device to its gateway; a gateway
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
import os
from collections.abc import Iterator, Mapping, Sequence
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
    "MaskedBatch",
    "MaskedUpdate",
    "PartyPublicKeys",
    "SealError",
    "SealingKey",
    "SeedOpener",
    "associated_data",
    "clip_l2",
    "device_mask",
    "mask_cohort",
    "mask_update",
    "masked_update_bytes",
    "open_seed",
    "seal_seed",
    "seeded_parties",
]

SEED_BYTES = 32
KEY_BYTES = 32
TAG_BYTES = 16
NONCE_BYTES = 12
SEALED_BYTES = KEY_BYTES + NONCE_BYTES + SEED_BYTES + TAG_BYTES  # 92
MASK_LABEL = b"device-mask"
_AD_DOMAIN = b"tierfl/device-shares/v1"
_CHUNK_ROWS = 32
_HKDF_INFO = b"tierfl/device-shares/seal/v2"


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


def _box_aead(shared: bytes, sender_pub: bytes, recipient_pub: bytes) -> ChaCha20Poly1305:
    key = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=None,
        info=_HKDF_INFO + sender_pub + recipient_pub,
    ).derive(shared)
    return ChaCha20Poly1305(key)


def _raw(pub: X25519PublicKey) -> bytes:
    return pub.public_bytes_raw()


class _BoxKeys:
    """Box keys one X25519 private key shares with its peers, by peer public key.

    Bounded (oldest dropped first): the exchange runs once per peer while it
    stays in the cache. A low-order peer key raises ``ValueError``.
    """

    def __init__(self, private_key: X25519PrivateKey, max_peers: int) -> None:
        self._key = private_key
        self.public_raw = _raw(private_key.public_key())
        self._aead: dict[bytes, ChaCha20Poly1305] = {}
        self._max = max_peers

    def get(self, peer: bytes, *, sending: bool) -> ChaCha20Poly1305:
        box = self._aead.get(peer)
        if box is None:
            shared = self._key.exchange(X25519PublicKey.from_public_bytes(peer))
            sender, recipient = (self.public_raw, peer) if sending else (peer, self.public_raw)
            box = _box_aead(shared, sender, recipient)
            if len(self._aead) >= self._max:
                del self._aead[next(iter(self._aead))]  # dicts keep insertion order
            self._aead[peer] = box
        return box

    def __len__(self) -> int:
        return len(self._aead)


class SealingKey:
    """A device's X25519 key for sealing seeds, with its box key per party cached.

    Keep one per device for its lifetime (the cache is what makes sealing
    cheap). ``max_parties`` bounds the cache: a device talks to K parties,
    and a fresh party group (new keys) pushes the old entries out.
    """

    def __init__(self, private_key: X25519PrivateKey | None = None, max_parties: int = 64):
        key = private_key if private_key is not None else X25519PrivateKey.generate()
        self._boxes = _BoxKeys(key, max_parties)
        self.public_raw = self._boxes.public_raw

    def aead_for(self, party_pub: bytes, party: int) -> ChaCha20Poly1305:
        try:
            return self._boxes.get(party_pub, sending=True)
        except ValueError:
            raise ValueError(f"party {party}: public key is a low-order point, refusing") from None


def seal_seed(
    seed: bytes,
    party_key: X25519PublicKey | bytes,
    device: str,
    round_: int,
    party: int,
    sender: SealingKey | None = None,
) -> bytes:
    """Seal a 32-byte seed to one party: 92 bytes only that party's private key opens.

    ``sender``: the device's :class:`SealingKey` (cached box keys); without
    one a throwaway key is made for this box. ``party_key`` is the party's
    public key, as an object or its 32 raw bytes.
    """
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a seed is {SEED_BYTES} bytes, got {len(seed)}")
    recipient = party_key if isinstance(party_key, bytes) else _raw(party_key)
    me = sender if sender is not None else SealingKey()
    nonce = os.urandom(NONCE_BYTES)
    ct = me.aead_for(recipient, party).encrypt(nonce, seed, associated_data(device, round_, party))
    return me.public_raw + nonce + ct


class SeedOpener:
    """A party's side of the boxes: its private key and a cache of box keys by sender.

    The cache (bounded by ``max_senders``, oldest dropped first) turns the
    ~50 us X25519 exchange per box into one per device for the life of the
    party key.
    """

    def __init__(self, private_key: X25519PrivateKey, max_senders: int = 1 << 17):
        self._boxes = _BoxKeys(private_key, max_senders)
        self.public_raw = self._boxes.public_raw

    def open(self, sealed: bytes, device: str, round_: int, party: int) -> bytes:
        """Open a box sealed by :func:`seal_seed`; :class:`SealError` names device, round, party."""
        where = f"sealed seed of device {device!r} for party {party}, round {round_}"
        if not isinstance(sealed, bytes | bytearray) or len(sealed) != SEALED_BYTES:
            n = len(sealed) if isinstance(sealed, bytes | bytearray) else type(sealed).__name__
            raise SealError(f"{where}: expected {SEALED_BYTES} bytes, got {n}")
        try:
            box = self._boxes.get(bytes(sealed[:KEY_BYTES]), sending=False)
        except ValueError:
            raise SealError(f"{where}: invalid sender key (tampered)") from None
        nonce = bytes(sealed[KEY_BYTES : KEY_BYTES + NONCE_BYTES])
        try:
            ad = associated_data(device, round_, party)
            return box.decrypt(nonce, bytes(sealed[KEY_BYTES + NONCE_BYTES :]), ad)
        except InvalidTag:
            raise SealError(
                f"{where}: authentication failed (tampered, or sealed for another "
                "device, round or party)"
            ) from None


def open_seed(
    sealed: bytes,
    private_key: X25519PrivateKey,
    device: str,
    round_: int,
    party: int,
) -> bytes:
    """Open one box (no cache: a party opening many uses :class:`SeedOpener`)."""
    return SeedOpener(private_key).open(sealed, device, round_, party)


# --------------------------------------------------------------------------- masking


def device_mask(seed: bytes, party: int, n: int, out: np.ndarray | None = None) -> np.ndarray:
    """Party ``party``'s ring mask from a device seed (the same on device and party).

    ``out``: an int64 scratch array of length n to expand into (and return).
    """
    return expand_mask(seed, party, n, MASK_LABEL, out=out)


def _check_clip_norm(clip_norm: float) -> None:
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ValueError(f"clip_norm must be positive and finite, got {clip_norm!r}")


def _clip_rows(block: np.ndarray, clip_norm: float) -> None:
    """Scale each row of ``block`` longer than ``clip_norm`` down to that L2 norm (in place)."""
    norms = np.linalg.norm(block, axis=1)
    long = norms > clip_norm
    block[long] *= (clip_norm / norms[long]).astype(block.dtype)[:, None]


def clip_l2(update: np.ndarray, clip_norm: float) -> np.ndarray:
    """Scale ``update`` down to L2 norm ``clip_norm`` if it is longer (a copy).

    The device's DP clipping, wherever it runs (:func:`mask_cohort` does the
    same row by row). A float32 update stays float32 (what the device would
    send); anything else comes back as float64.
    """
    _check_clip_norm(clip_norm)
    u = np.asarray(update)
    u = np.array(u, dtype=np.float32 if u.dtype == np.float32 else np.float64, copy=True)
    _clip_rows(u.reshape(1, -1), clip_norm)
    return u


def masked_update_bytes(device: str, num_params: int, boxes: int) -> int:
    """Uplink payload of a masked update: the ring vector, the boxes, the id and a header."""
    return int(num_params) * 8 + boxes * SEALED_BYTES + len(device.encode()) + 32


@dataclass(frozen=True)
class MaskedUpdate:
    """What a device sends its gateway in ``device-shares`` mode for one round.

    ``masked`` is uniform on the ring; ``weight`` is public (the FedAvg
    weight); ``sealed`` maps each seeded party to its 92-byte box.
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
        return masked_update_bytes(self.device, int(self.masked.size), len(self.sealed))


class MaskedBatch:
    """Many devices' masked updates as one [n, P] int64 block (row j = device j).

    What an emulated cohort hands a gateway host: one buffer to serialize
    instead of n arrays (69 KB each for the HAPT CNN). Iterating yields the
    :class:`MaskedUpdate` of each row (rows are views, not copies).
    """

    def __init__(
        self,
        devices: Sequence[str],
        rounds: Sequence[int],
        masked: np.ndarray,
        weights: Sequence[float],
        sealed: Sequence[Mapping[int, bytes]],
    ) -> None:
        n = len(devices)
        if not (len(rounds) == len(weights) == len(sealed) == n) or masked.shape[:1] != (n,):
            raise ValueError(f"MaskedBatch: {n} devices but rows/rounds/weights/boxes differ")
        if masked.dtype != np.int64 or masked.ndim != 2:
            raise ValueError(f"MaskedBatch: masked must be int64 [n, P], got {masked.dtype}")
        self.devices = list(devices)
        self.rounds = [int(r) for r in rounds]
        self.masked = masked
        self.weights = [float(w) for w in weights]
        self.sealed = [dict(b) for b in sealed]

    def __len__(self) -> int:
        return len(self.devices)

    def __iter__(self) -> Iterator[MaskedUpdate]:
        for j, d in enumerate(self.devices):
            yield MaskedUpdate(d, self.rounds[j], self.masked[j], self.weights[j], self.sealed[j])


def mask_cohort(
    devices: Sequence[str],
    round_: int,
    updates: np.ndarray,
    keys: PartyPublicKeys,
    *,
    weights: Sequence[float] | np.ndarray | None = None,
    clip_norm: float | None = None,
    seal_to_party0: bool = False,
    max_terms: int = DEFAULT_MAX_TERMS,
    senders: Sequence[SealingKey | None] | None = None,
    seeds: Sequence[Sequence[bytes]] | None = None,
) -> MaskedBatch:
    """Clip (optionally), weight, encode, mask and seal many devices' updates (rows).

    The same per-device arithmetic as :func:`mask_update`, with the clipping,
    weighting and encoding done on the whole [n, P] block at once and the
    masks expanded into the block in place: an emulated cohort pays one numpy
    pass per step instead of n. ``senders[j]``: device j's long-term
    :class:`SealingKey` (a throwaway key when None or omitted). ``seeds[j]``
    (one per seeded party) is for tests only; by default every seed is fresh
    from the OS CSPRNG, and must be: a reused seed reuses a mask.
    """
    n = len(devices)
    for d in devices:
        check_device_id(d)
    if round_ < 0:
        raise ValueError(f"round must be >= 0, got {round_}")
    block = np.asarray(updates)
    if block.ndim != 2 or block.shape[0] != n:
        raise ValueError(f"expected {n} flat updates as an [n, P] array, got shape {block.shape}")
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (n,):
        raise ValueError(f"{n} devices but {w.shape} weights")
    for d, wj in zip(devices, w, strict=True):
        if not (math.isfinite(wj) and wj >= 0):
            raise ValueError(f"device {d!r}: invalid weight {float(wj)!r}")
    if senders is not None and len(senders) != n:
        raise ValueError(f"{n} devices but {len(senders)} sealing keys")
    targets = seeded_parties(keys.parties, seal_to_party0)
    if seeds is not None and (len(seeds) != n or any(len(s) != len(targets) for s in seeds)):
        raise ValueError(f"need {len(targets)} seeds (parties {targets}) for each of {n} devices")
    if clip_norm is not None:
        _check_clip_norm(clip_norm)
    x = np.empty(block.shape, dtype=np.int64)
    # Float work in chunks of rows: the temporaries stay small (cache-sized, no
    # fresh pages to fault in each round); only the int64 block is full size.
    for lo in range(0, n, _CHUNK_ROWS):
        u = np.array(block[lo : lo + _CHUNK_ROWS], dtype=np.float64, copy=True)
        if clip_norm is not None:
            _clip_rows(u, clip_norm)
        u *= w[lo : lo + _CHUNK_ROWS, None]
        try:
            x[lo : lo + _CHUNK_ROWS] = encode_fixed(u, FRAC_BITS, max_terms)
        except ValueError:
            for d, row in zip(devices[lo : lo + _CHUNK_ROWS], u, strict=True):
                try:  # name the first device that fails
                    encode_fixed(row, FRAC_BITS, max_terms)
                except ValueError as exc:
                    raise ValueError(f"device {d!r}, round {round_}: {exc}") from None
            raise
    mask = np.empty(block.shape[1], dtype=np.int64)  # scratch: each mask is expanded here
    sealed: list[dict[int, bytes]] = []
    for j, d in enumerate(devices):
        given = senders[j] if senders is not None else None
        me = given if given is not None else SealingKey()
        boxes: dict[int, bytes] = {}
        for t, k in enumerate(targets):
            seed = seeds[j][t] if seeds is not None else new_seed()
            device_mask(seed, k, mask.size, out=mask)
            np.subtract(x[j], mask, out=x[j])  # int64 wrap-around: ring subtraction
            boxes[k] = seal_seed(seed, keys.keys[k], d, round_, k, sender=me)
        sealed.append(boxes)
    return MaskedBatch(list(devices), [int(round_)] * n, x, w.tolist(), sealed)


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
    sender: SealingKey | None = None,
) -> MaskedUpdate:
    """Clip (optionally), weight, encode, mask and seal one device's update.

    :func:`mask_cohort` for one device. ``seeds`` (one per seeded party) is
    for tests only. ``sender``: the device's long-term :class:`SealingKey` (a
    throwaway key for this update when omitted).
    """
    u = np.asarray(update)
    if u.ndim != 1:
        raise ValueError(f"device {device!r}: expected a flat update, got shape {u.shape}")
    batch = mask_cohort(
        [device],
        round_,
        u[None, :],
        keys,
        weights=[weight],
        clip_norm=clip_norm,
        seal_to_party0=seal_to_party0,
        max_terms=max_terms,
        senders=[sender],
        seeds=None if seeds is None else [seeds],
    )
    return next(iter(batch))
