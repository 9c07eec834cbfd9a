"""The signed update envelope a device sends its gateway (CBOR + Ed25519).

Wire format (protocol version 1): one CBOR map with exactly these nine keys::

    "v"        uint   protocol version (1)
    "device"   text   device id (keys.DEVICE_ID_PATTERN)
    "round"    uint   round the update belongs to
    "base"     text   SHA-256 hex (64 lowercase digits) of the model it was trained from
    "nonce"    bytes  16 random bytes, never reused by a device
    "ts"       float  sender's wall-clock time (Unix seconds)
    "samples"  uint   local sample count, >= 1 (the FedAvg weight)
    "tensors"  array  1..max_tensors maps {"codec": text, "shape": [uint...],
                      "data": bytes, "meta": {text: number}} (devices.codecs.Encoded)
    "sig"      bytes  Ed25519 signature (64 bytes) -- always the last entry

The signature covers the *canonical* CBOR encoding (RFC 7049 §3.9: shortest
heads, definite lengths, keys sorted by length then bytewise) of the map of the
other eight fields. A sealed envelope is exactly that encoding with the map
head bumped from 8 to 9 entries and ``"sig"`` appended, so the signed bytes
are a slice of what was received: the gateway verifies without re-encoding,
and it refuses anything whose fields are not in canonical form, so every
envelope has exactly one encoding (no malleability, dedup by bytes is sound).
Tensor payloads are CBOR byte strings, never arrays of floats: 50 KB of f32 is
50 KB on the wire, decoded with one ``np.frombuffer``.

Decoding never trusts a size written by the sender. ``open_envelope`` checks
the total size first, then walks the CBOR heads with a small pure-Python
scanner that refuses, before cbor2 allocates anything, every string whose
declared length exceeds the bytes that are actually left, every array/map
whose declared count could not fit, indefinite lengths, tags, undefined and
simple values, nesting deeper than the schema and more items than the schema
allows. (cbor2 6.x itself reads huge declared strings in 64 KiB chunks and
fails on EOF, but the scanner makes that independent of the cbor2 version.)
Only then does cbor2 build the objects, and a schema check follows for every
field. Every failure is a :class:`~devices.reasons.Rejection`.
"""

from __future__ import annotations

import math
import operator
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import cbor2
import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from devices.codecs import CODECS, Encoded
from devices.keys import DEVICE_ID_PATTERN
from devices.reasons import REASONS, Rejection

__all__ = [
    "FIELDS",
    "NONCE_BYTES",
    "PROTOCOL_VERSION",
    "REASONS",
    "SIGNATURE_BYTES",
    "Envelope",
    "Rejection",
    "open_envelope",
    "seal",
    "signed_size",
    "verify",
]

PROTOCOL_VERSION: Final = 1
NONCE_BYTES: Final = 16
SIGNATURE_BYTES: Final = 64
#: The signed fields, in the order the dataclass lists them (the wire order is canonical).
FIELDS: Final = ("v", "device", "round", "base", "nonce", "ts", "samples", "tensors")
_TENSOR_FIELDS: Final = frozenset({"codec", "shape", "data", "meta"})
_SIG_KEY: Final = b"\x63sig"  # CBOR text string "sig"

_MAX_UINT64: Final = (1 << 64) - 1
_MAX_ROUND: Final = (1 << 63) - 1
_MAX_SAMPLES: Final = (1 << 31) - 1
_MAX_TIMESTAMP: Final = 1e11  # year ~5138; anything beyond is a broken clock or garbage
_MAX_NDIM: Final = 32
_MAX_META: Final = 16
_MAX_NAME: Final = 32
_MAX_DEPTH: Final = 4  # root map > tensors array > tensor map > shape array / meta map
_ITEMS_ROOT: Final = 32
_ITEMS_PER_TENSOR: Final = 1 + 8 + 1 + _MAX_NDIM + 1 + 2 * _MAX_META + 8  # map, keys, values...

_DEVICE_ID = re.compile(DEVICE_ID_PATTERN)
_BASE_HASH = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")


@dataclass(frozen=True)
class Envelope:
    """One device's update for one round, before signing / after verification."""

    version: int
    device: str
    round: int
    base: str  # SHA-256 hex of the model version the update was computed from
    nonce: bytes  # NONCE_BYTES random bytes
    timestamp: float  # Unix seconds at the sender
    samples: int  # FedAvg weight
    tensors: list[Encoded]  # one per model tensor, or one flat

    @classmethod
    def new(
        cls,
        device: str,
        round: int,
        base: str,
        samples: int,
        tensors: Sequence[Encoded],
        *,
        clock: Callable[[], float] = time.time,
    ) -> Envelope:
        """A fresh envelope: current protocol version, a random nonce, the clock's time now."""
        return cls(
            PROTOCOL_VERSION,
            device,
            round,
            base,
            os.urandom(NONCE_BYTES),
            float(clock()),
            samples,
            list(tensors),
        )

    def fields(self) -> dict[str, Any]:
        """The eight signed fields as the CBOR map's Python form."""
        return {
            "v": self.version,
            "device": self.device,
            "round": self.round,
            "base": self.base,
            "nonce": self.nonce,
            "ts": self.timestamp,
            "samples": self.samples,
            "tensors": [
                {
                    "codec": t.codec,
                    "shape": [operator.index(d) for d in t.shape],
                    "data": t.payload if type(t.payload) is bytes else bytes(t.payload),
                    "meta": {k: _scalar(v) for k, v in t.meta.items()},
                }
                for t in self.tensors
            ],
        }


def _scalar(v: object) -> object:
    """A numpy scalar (codec arithmetic may leave one in meta) as the Python number CBOR needs."""
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating):
        return float(v)
    return v


# --- sealing ------------------------------------------------------------------------


def seal(env: Envelope, key: Ed25519PrivateKey) -> bytes:
    """Sign ``env`` with the device's key and return the wire bytes.

    The envelope is schema-checked first (with generous limits; ``ValueError``
    says what is wrong), so a device cannot sign something every gateway
    would refuse as malformed.
    """
    fields = env.fields()
    try:
        _check_fields(fields, max_tensors=1 << 16, max_elements=1 << 40, where="seal")
    except Rejection as e:
        raise ValueError(f"cannot seal an invalid envelope: {e.detail}") from None
    signed = cbor2.dumps(fields, canonical=True)
    sig = key.sign(signed)
    # canonical head of an 8-entry map is the single byte 0xa8; 9 entries is 0xa9
    return b"\xa9" + signed[1:] + _SIG_KEY + b"\x58\x40" + sig


def signed_size(env: Envelope) -> int:
    """Bytes ``seal(env, key)`` will produce (for budgeting uplink time without a key)."""
    return len(cbor2.dumps(env.fields(), canonical=True)) + len(_SIG_KEY) + 2 + SIGNATURE_BYTES


def verify(signed: bytes, sig: bytes, key: Ed25519PublicKey) -> bool:
    """True if ``sig`` is ``key``'s Ed25519 signature over ``signed``."""
    try:
        key.verify(sig, signed)
    except InvalidSignature:
        return False
    return True


# --- opening ------------------------------------------------------------------------


def _bad(detail: str) -> Rejection:
    return Rejection("malformed", detail)


def _head(data: bytes, pos: int) -> tuple[int, int, int, int]:
    """Decode one CBOR head at ``pos``: (major type, additional info, argument, next pos)."""
    n = len(data)
    if pos >= n:
        raise _bad(f"CBOR truncated at byte {pos}")
    ib = data[pos]
    major, ai = ib >> 5, ib & 0x1F
    pos += 1
    if ai < 24:
        return major, ai, ai, pos
    if ai <= 27:
        size = 1 << (ai - 24)
        if pos + size > n:
            raise _bad(f"CBOR truncated at byte {pos} (head needs {size} more bytes)")
        return major, ai, int.from_bytes(data[pos : pos + size], "big"), pos + size
    if ai == 31:
        raise _bad(f"indefinite-length or break item at byte {pos - 1} (only definite lengths)")
    raise _bad(f"reserved CBOR head 0x{ib:02x} at byte {pos - 1}")


def _scan(data: bytes, pos: int, budget: int, max_depth: int) -> tuple[int, int]:
    """Walk one data item starting at ``pos`` without building it; return (end, items used).

    Refuses declared lengths and counts that cannot fit in the bytes left (so a
    head claiming 2^60 bytes fails here, in O(1)), more than ``budget`` items,
    more than ``max_depth`` nested containers, tags and non-float simple values.
    """
    n = len(data)
    stack: list[int] = []  # items still to read in each open container
    items = 0
    while True:
        start = pos
        items += 1
        if items > budget:
            raise _bad(f"too many CBOR items (more than {budget})")
        major, ai, value, pos = _head(data, pos)
        if major in (2, 3):  # byte / text string
            if value > n - pos:
                raise _bad(
                    f"string at byte {start} declares {value} bytes but only {n - pos} remain"
                )
            pos += value
        elif major in (4, 5):  # array / map
            count = 2 * value if major == 5 else value
            if count > n - pos:
                raise _bad(
                    f"container at byte {start} declares {value} entries but only {n - pos} "
                    "bytes remain"
                )
            if count > budget - items:
                raise _bad(f"container at byte {start} declares {value} entries (too many)")
            if count:
                if len(stack) >= max_depth:
                    raise _bad(f"CBOR nested deeper than {max_depth} at byte {start}")
                stack.append(count)
                continue
        elif major == 6:
            raise _bad(f"CBOR tag at byte {start} (tags are not allowed)")
        elif major == 7 and ai not in (20, 21, 22, 25, 26, 27):
            raise _bad(f"CBOR simple value 0x{data[start]:02x} at byte {start} is not allowed")
        # the item at `start` is complete: close every container it completes
        while stack:
            stack[-1] -= 1
            if stack[-1]:
                break
            stack.pop()
        if not stack:
            return pos, items


def _is_int(x: object) -> bool:
    return type(x) is int


def _is_number(x: object) -> bool:
    return type(x) is int or type(x) is float


def _int_in(fields: dict[str, Any], key: str, lo: int, hi: int, where: str) -> int:
    v = fields[key]
    if not _is_int(v):
        raise _bad(f"{where}: {key!r} must be an integer, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise _bad(f"{where}: {key!r} = {v} is outside [{lo}, {hi}]")
    return int(v)


def _names(keys: Any) -> str:
    """A few unexpected keys for an error message, each cut short (keys are attacker-chosen)."""
    shown = sorted(f"{k!r:.40}" for k in list(keys)[:24])
    return ", ".join(shown[:5]) + (" ..." if len(shown) > 5 else "")


def _check_fields(fields: Any, *, max_tensors: int, max_elements: int, where: str) -> Envelope:
    """Schema-check the eight signed fields and build the Envelope."""
    if not isinstance(fields, dict):
        raise _bad(f"{where}: expected a CBOR map, got {type(fields).__name__}")
    keys = set(fields)
    if keys != set(FIELDS):
        missing = sorted(set(FIELDS) - keys)
        extra = _names(keys - set(FIELDS))
        raise _bad(f"{where}: fields missing {missing or 'none'}, unexpected {extra or 'none'}")
    version = _int_in(fields, "v", 0, _MAX_UINT64, where)
    if version != PROTOCOL_VERSION:
        raise _bad(f"{where}: unsupported protocol version {version} (this side speaks 1)")
    device = fields["device"]
    if not isinstance(device, str) or _DEVICE_ID.fullmatch(device) is None:
        raise _bad(f"{where}: 'device' must match {DEVICE_ID_PATTERN}, got {device!r:.80}")
    round_ = _int_in(fields, "round", 0, _MAX_ROUND, where)
    base = fields["base"]
    if not isinstance(base, str) or _BASE_HASH.fullmatch(base) is None:
        raise _bad(f"{where}: 'base' must be 64 lowercase hex digits (SHA-256), got {base!r:.80}")
    nonce = fields["nonce"]
    if not isinstance(nonce, bytes) or len(nonce) != NONCE_BYTES:
        got = f"{len(nonce)} bytes" if isinstance(nonce, bytes) else type(nonce).__name__
        raise _bad(f"{where}: 'nonce' must be {NONCE_BYTES} bytes, got {got}")
    ts = fields["ts"]
    if not _is_number(ts) or not math.isfinite(ts) or not 0 <= ts <= _MAX_TIMESTAMP:
        raise _bad(f"{where}: 'ts' must be a finite number of Unix seconds, got {ts!r:.40}")
    samples = _int_in(fields, "samples", 1, _MAX_SAMPLES, where)
    raw_tensors = fields["tensors"]
    if not isinstance(raw_tensors, list):
        raise _bad(f"{where}: 'tensors' must be an array, got {type(raw_tensors).__name__}")
    if not 1 <= len(raw_tensors) <= max_tensors:
        raise _bad(f"{where}: {len(raw_tensors)} tensors, expected 1..{max_tensors}")
    tensors: list[Encoded] = []
    total = 0
    for i, t in enumerate(raw_tensors):
        enc = _check_tensor(t, f"{where}: tensors[{i}]", max_elements - total)
        total += math.prod(enc.shape)
        tensors.append(enc)
    return Envelope(version, device, round_, base, nonce, float(ts), samples, tensors)


def _check_tensor(t: Any, where: str, max_elements: int) -> Encoded:
    if not isinstance(t, dict) or set(t) != _TENSOR_FIELDS:
        got = _names(t) if isinstance(t, dict) else type(t).__name__
        raise _bad(f"{where}: expected a map with keys {sorted(_TENSOR_FIELDS)}, got {got}")
    codec = t["codec"]
    if not isinstance(codec, str) or codec not in CODECS:
        raise _bad(f"{where}: unknown codec {codec!r:.40} (known: {', '.join(CODECS)})")
    shape = t["shape"]
    if not isinstance(shape, list) or len(shape) > _MAX_NDIM:
        raise _bad(f"{where}: 'shape' must be an array of at most {_MAX_NDIM} integers")
    n = 1
    for d, dim in enumerate(shape):
        if not _is_int(dim) or dim < 0:
            raise _bad(f"{where}: shape[{d}] must be a non-negative integer, got {dim!r:.40}")
        n *= dim
        if n > max_elements:  # checked as we go: the product never grows past the limit much
            raise _bad(f"{where}: shape {shape} exceeds the element limit ({max_elements} left)")
    data = t["data"]
    if not isinstance(data, bytes):
        raise _bad(f"{where}: 'data' must be a byte string, got {type(data).__name__}")
    meta = t["meta"]
    if not isinstance(meta, dict) or len(meta) > _MAX_META:
        raise _bad(f"{where}: 'meta' must be a map of at most {_MAX_META} numbers")
    for k, v in meta.items():
        if not isinstance(k, str) or _NAME.fullmatch(k) is None:
            raise _bad(f"{where}: meta key {k!r:.40} is not a short name")
        if not _is_number(v) or (type(v) is float and not math.isfinite(v)):
            raise _bad(f"{where}: meta[{k!r}] must be a finite number, got {v!r:.40}")
        if type(v) is int and abs(v) > _MAX_UINT64:
            raise _bad(f"{where}: meta[{k!r}] = {v} is out of range")
    return Encoded(codec, tuple(shape), data, dict(meta))


def open_envelope(
    data: bytes, *, max_bytes: int, max_tensors: int, max_elements: int
) -> tuple[Envelope, bytes, bytes]:
    """Parse and schema-check untrusted wire bytes; return (envelope, signature, signed bytes).

    The signature is *not* verified here (the caller knows the device's key:
    ``verify(signed, sig, registry[env.device])``), so a gateway can refuse an
    unknown device before spending a verification on it. Raises
    :class:`Rejection` with ``too-large`` or ``malformed``.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise _bad(f"expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise Rejection("too-large", f"{len(data)} bytes exceeds the limit of {max_bytes}")
    data = bytes(data)
    # 1. structure, without allocating anything the sender declared
    major, ai, count, pos = _head(data, 0)
    if major != 5:
        raise _bad("expected a CBOR map at byte 0")
    if ai >= 24 or count < 2:  # heads of maps with 24+ entries take 2+ bytes; we have 9
        raise _bad(f"expected a map of {len(FIELDS) + 1} fields, got {count}")
    budget = _ITEMS_ROOT + max_tensors * _ITEMS_PER_TENSOR
    sig_key_at = pos
    for i in range(2 * count):
        if i == 2 * count - 2:
            sig_key_at = pos
        pos, used = _scan(data, pos, budget, _MAX_DEPTH - 1)
        budget -= used
    if pos != len(data):
        raise _bad(f"{len(data) - pos} trailing bytes after the envelope")
    if data[sig_key_at : sig_key_at + len(_SIG_KEY)] != _SIG_KEY:
        raise _bad("the last field must be 'sig'")
    # 2. objects (cbor2), now that every size is known to be backed by real bytes
    try:
        obj = cbor2.loads(
            data, max_depth=_MAX_DEPTH + 1, allow_indefinite=False, allow_duplicate_keys=False
        )
    except Exception as e:  # any decoder failure on hostile input is the sender's fault
        raise _bad(f"CBOR: {e}") from None
    if not isinstance(obj, dict):  # the scanner saw a map; cbor2 must agree
        raise _bad("expected a CBOR map")
    sig = obj.pop("sig", None)
    if not isinstance(sig, bytes) or len(sig) != SIGNATURE_BYTES:
        raise _bad(f"'sig' must be {SIGNATURE_BYTES} bytes")
    if data[sig_key_at + len(_SIG_KEY) :] != b"\x58\x40" + sig:
        raise _bad("'sig' is not in canonical CBOR form")
    env = _check_fields(obj, max_tensors=max_tensors, max_elements=max_elements, where="envelope")
    # 3. the signed bytes are a slice of the input; insist they are the canonical form
    signed = bytes([0xA0 | (count - 1)]) + data[1:sig_key_at]
    if cbor2.dumps(obj, canonical=True) != signed:
        raise _bad("fields are not in canonical CBOR form (RFC 7049 §3.9)")
    return env, sig, signed
