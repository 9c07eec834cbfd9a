"""The signed update envelope: round trip, and every way a hostile payload is refused."""

from __future__ import annotations

import math
import time
import tracemalloc
from typing import Any

import cbor2
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from devices.codecs import Encoded, encode
from devices.envelope import (
    FIELDS,
    PROTOCOL_VERSION,
    Envelope,
    open_envelope,
    seal,
    signed_size,
    verify,
)
from devices.reasons import REASONS, Rejection

BASE = "ab" * 32
LIMITS = {"max_bytes": 1 << 16, "max_tensors": 4, "max_elements": 1000}
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))


def make_env(**over: Any) -> Envelope:
    x = np.linspace(-1, 1, 24, dtype=np.float32)
    fields: dict[str, Any] = {
        "version": PROTOCOL_VERSION,
        "device": "gw00-d003",
        "round": 7,
        "base": BASE,
        "nonce": bytes(range(16)),
        "timestamp": 1_700_000_000.25,
        "samples": 120,
        "tensors": [encode("f32", x.reshape(4, 6)), encode("int8", x)],
    }
    fields.update(over)
    return Envelope(**fields)


def raw_seal(fields: dict[str, Any], key: Ed25519PrivateKey = KEY) -> bytes:
    """Seal arbitrary field values the way ``seal`` does, but without its schema check."""
    signed = cbor2.dumps(fields, canonical=True)
    head = cbor2.dumps({f"k{i}": 0 for i in range(len(fields) + 1)})[:1]  # map head of n+1
    return head + signed[1:] + cbor2.dumps("sig") + cbor2.dumps(key.sign(signed))


def reject(data: bytes, reason: str = "malformed", **limits: int) -> Rejection:
    with pytest.raises(Rejection) as info:
        open_envelope(data, **{**LIMITS, **limits})
    assert info.value.reason == reason, info.value
    return info.value


def test_round_trip_and_signature() -> None:
    env = make_env()
    data = seal(env, KEY)
    assert len(data) == signed_size(env)
    got, sig, signed = open_envelope(data, **LIMITS)
    assert got == env
    assert verify(signed, sig, KEY.public_key())
    assert not verify(signed, sig, Ed25519PrivateKey.generate().public_key())
    # the wire form: a CBOR map whose last entry is the signature over the other fields
    obj = cbor2.loads(data)
    assert list(obj)[-1] == "sig" and set(obj) == {*FIELDS, "sig"}
    assert signed == cbor2.dumps({k: v for k, v in obj.items() if k != "sig"}, canonical=True)
    # payloads travel as byte strings, not arrays of floats
    assert isinstance(obj["tensors"][0]["data"], bytes)
    assert len(obj["tensors"][0]["data"]) == 4 * 24


def test_new_fills_version_nonce_and_time() -> None:
    a = Envelope.new("d1", 3, BASE, 10, [encode("f16", np.ones(5))], clock=lambda: 42.5)
    b = Envelope.new("d1", 3, BASE, 10, [encode("f16", np.ones(5))], clock=lambda: 42.5)
    assert a.version == PROTOCOL_VERSION and a.timestamp == 42.5 and len(a.nonce) == 16
    assert a.nonce != b.nonce


def test_tampered_payload_fails_verification() -> None:
    env = make_env()
    data = bytearray(seal(env, KEY))
    data[bytes(data).index(env.tensors[1].payload) + 3] ^= 1  # well-formed, no longer authentic
    _, sig, signed = open_envelope(bytes(data), **LIMITS)
    assert not verify(signed, sig, KEY.public_key())


def test_seal_refuses_invalid_envelopes() -> None:
    with pytest.raises(ValueError, match="samples"):
        seal(make_env(samples=-1), KEY)
    with pytest.raises(ValueError, match="nonce"):
        seal(make_env(nonce=b"short"), KEY)


def test_oversized_payload_refused_before_decoding() -> None:
    data = seal(make_env(), KEY)
    r = reject(data, "too-large", max_bytes=len(data) - 1)
    assert str(len(data)) in r.detail
    reject(b"\xff" * 100, "too-large", max_bytes=99)  # garbage, but size comes first


def test_every_truncation_is_malformed() -> None:
    data = seal(make_env(), KEY)
    for cut in range(len(data)):
        reject(data[:cut])


def test_garbage_is_malformed() -> None:
    rng = np.random.default_rng(0)
    good = seal(make_env(), KEY)
    for i in range(300):
        if i % 2:
            data = rng.bytes(int(rng.integers(0, 400)))
        else:  # mostly-valid bytes with a few flips: exercises deeper paths
            buf = bytearray(good)
            for pos in rng.integers(0, len(buf), size=3):
                buf[pos] = int(rng.integers(0, 256))
            data = bytes(buf)
        try:
            open_envelope(data, **LIMITS)
        except Rejection as r:
            assert r.reason == "malformed"


def _fails_fast(data: bytes) -> Rejection:
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        r = reject(data)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert time.perf_counter() - t0 < 0.05
    assert peak < 256 * 1024, peak
    return r


@pytest.mark.parametrize(
    "head",
    [
        b"\x5b" + (1 << 60).to_bytes(8, "big"),  # byte string of 2^60 bytes
        b"\x7b" + (1 << 60).to_bytes(8, "big"),  # text string
        b"\x9b" + (1 << 60).to_bytes(8, "big"),  # array of 2^60 items
        b"\xbb" + (1 << 60).to_bytes(8, "big"),  # map of 2^60 pairs
        b"\x5a\xff\xff\xff\xff",  # 4 GiB byte string
    ],
)
def test_huge_declared_lengths_fail_fast_without_allocating(head: bytes) -> None:
    # at top level, and in place of a tensor payload inside an otherwise valid envelope
    _fails_fast(head + b"abc")
    data = seal(make_env(), KEY)
    payload = make_env().tensors[0].payload
    at = data.index(b"\x58\x60" + payload)  # 0x58 0x60: head of the 96-byte f32 payload
    r = _fails_fast(data[:at] + head + data[at + 2 :])
    assert "declares" in r.detail


def test_cbor2_itself_does_not_preallocate_huge_strings() -> None:
    """Belt and braces: even without our scanner, cbor2 fails on EOF in small chunks."""
    tracemalloc.start()
    try:
        with pytest.raises(cbor2.CBORDecodeError):
            cbor2.loads(b"\x5b" + (1 << 60).to_bytes(8, "big") + b"abc")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"", "truncated"),
        (b"\xa9", "truncated"),
        (b"\x80", "CBOR map"),
        (b"\xb8\x09", "map of 9"),  # non-shortest map head
        (b"\xa1\x63sig\x40", "map of 9"),
        (b"\xa9\x5f\x41\x00\xff", "indefinite"),
        (b"\xa9\xc1\x00", "tag"),
        (b"\xa9\xf7", "simple"),  # undefined
        (b"\xa9\xfc", "reserved"),
    ],
)
def test_structural_garbage(data: bytes, needle: str) -> None:
    assert needle in reject(data).detail


def _fields(**over: Any) -> dict[str, Any]:
    f = make_env().fields()
    f.update(over)
    return f


def _tensor(**over: Any) -> dict[str, Any]:
    t: dict[str, Any] = {"codec": "f32", "shape": [2], "data": b"\x00" * 8, "meta": {}}
    t.update(over)
    return t


WRONG: list[tuple[str, dict[str, Any]]] = [
    ("version", {"v": 2}),
    ("'v'", {"v": "1"}),
    ("device", {"device": ""}),
    ("device", {"device": "has space"}),
    ("device", {"device": 5}),
    ("device", {"device": "x" * 65}),
    ("round", {"round": -1}),
    ("round", {"round": 1.5}),
    ("round", {"round": True}),
    ("round", {"round": 1 << 63}),
    ("base", {"base": "AB" * 32}),
    ("base", {"base": "ab" * 31}),
    ("base", {"base": bytes(32)}),
    ("nonce", {"nonce": bytes(15)}),
    ("nonce", {"nonce": "0" * 16}),
    ("ts", {"ts": math.nan}),
    ("ts", {"ts": math.inf}),
    ("ts", {"ts": -1.0}),
    ("ts", {"ts": "now"}),
    ("samples", {"samples": 0}),
    ("samples", {"samples": -5}),
    ("samples", {"samples": 1 << 40}),
    ("samples", {"samples": 12.0}),
    ("tensors", {"tensors": []}),
    ("tensors", {"tensors": {"0": _tensor()}}),
    ("5 tensors", {"tensors": [_tensor()] * 5}),
    ("tensors[0]", {"tensors": [{"codec": "f32", "shape": [2], "data": b""}]}),
    ("tensors[0]", {"tensors": [_tensor(extra=1)]}),
    ("unknown codec", {"tensors": [_tensor(codec="f64")]}),
    ("shape[0]", {"tensors": [_tensor(shape=[-2])]}),
    ("shape[0]", {"tensors": [_tensor(shape=[2.0])]}),
    ("element limit", {"tensors": [_tensor(shape=[1 << 40, 1 << 40])]}),
    ("element limit", {"tensors": [_tensor(shape=[600]), _tensor(shape=[600])]}),
    ("'data'", {"tensors": [_tensor(data=[0.0, 1.0])]}),  # floats as a CBOR array
    ("meta", {"tensors": [_tensor(meta={"scale": "x"})]}),
    ("meta", {"tensors": [_tensor(meta={"scale": math.nan})]}),
    ("meta key", {"tensors": [_tensor(meta={"": 1})]}),
    ("unexpected", {"extra": 1}),
]


@pytest.mark.parametrize(
    ("needle", "over"), WRONG, ids=[f"{n}-{i}" for i, (n, _) in enumerate(WRONG)]
)
def test_schema_violations(needle: str, over: dict[str, Any]) -> None:
    data = raw_seal(_fields(**over))
    assert needle in reject(data).detail


def test_missing_field() -> None:
    f = _fields()
    del f["samples"]
    assert "missing ['samples']" in reject(raw_seal(f)).detail


def test_signature_must_be_last_64_bytes_and_canonical() -> None:
    good = seal(make_env(), KEY)
    assert "64 bytes" in reject(good[:-66] + b"\x58\x3f" + good[-63:]).detail
    assert "canonical" in reject(good[:-66] + b"\x59\x00\x40" + good[-64:]).detail
    # sig first instead of last
    f = _fields()
    signed = cbor2.dumps(f, canonical=True)
    moved = b"\xa9" + cbor2.dumps("sig") + cbor2.dumps(KEY.sign(signed)) + signed[1:]
    assert "last field" in reject(moved).detail


def test_non_canonical_encodings_are_refused() -> None:
    f = _fields()
    # keys in insertion order (not canonical), valid CBOR otherwise
    plain = cbor2.dumps(f)
    assert plain != cbor2.dumps(f, canonical=True)
    data = b"\xa9" + plain[1:] + cbor2.dumps("sig") + cbor2.dumps(KEY.sign(plain))
    assert "canonical" in reject(data).detail


def test_duplicate_keys_and_trailing_bytes() -> None:
    good = seal(make_env(), KEY)
    assert "trailing" in reject(good + b"\x00").detail
    # replace the "v" key/value (first canonical entry: 0x61 'v' 0x01) by a duplicate of "ts"
    f = _fields()
    signed = cbor2.dumps(f, canonical=True)
    assert signed[1:4] == b"\x61v\x01"
    dup = b"\xa9" + b"\x62ts\x01" + signed[4:] + cbor2.dumps("sig") + cbor2.dumps(bytes(64))
    reject(dup)


def test_deep_nesting_is_refused() -> None:
    nested: Any = 1
    for _ in range(50):
        nested = [nested]
    assert "deeper" in reject(raw_seal(_fields(tensors=[_tensor(meta={"a": nested})]))).detail


def test_rejection_reasons_are_checked() -> None:
    with pytest.raises(ValueError, match="unknown rejection reason"):
        Rejection("nope", "x")
    assert {"too-large", "malformed", "bad-signature"} <= set(REASONS)


def test_flat_single_tensor_round_trip() -> None:
    x = np.arange(10, dtype=np.float32)
    env = make_env(tensors=[Encoded("f32", (10,), x.tobytes(), {})])
    got, _, _ = open_envelope(seal(env, KEY), **LIMITS)
    assert got.tensors[0].shape == (10,) and got.tensors[0].payload == x.tobytes()


def test_numpy_scalars_in_meta_and_shape_are_sealed_as_plain_numbers() -> None:
    shape: Any = (np.int64(4),)
    meta: Any = {"chunk": np.int32(256), "s": np.float32(0.5)}
    got, _, _ = open_envelope(
        seal(make_env(tensors=[Encoded("int8", shape, b"\0" * 8, meta)]), KEY), **LIMITS
    )
    assert got.tensors[0].shape == (4,) and got.tensors[0].meta == {"chunk": 256, "s": 0.5}
    assert type(got.tensors[0].meta["chunk"]) is int
