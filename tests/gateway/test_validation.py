"""Gateway validation: each rejection reason from a crafted payload, exactly-once intake."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import cbor2
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from devices.codecs import Encoded, encode
from devices.envelope import PROTOCOL_VERSION, Envelope, seal
from devices.keys import DeviceRegistry
from gateway.validation import (
    REASONS,
    Accepted,
    IntakeBuffer,
    RateLimit,
    Rejection,
    RejectionCounter,
    ReplayCache,
    ValidationConfig,
    Validator,
)

ROOT = Path(__file__).resolve().parents[2]
BASE = "0f" * 32
OTHER_BASE = "1e" * 32
SHAPES = [(4, 3), (3,)]
NUM_PARAMS = 15
NOW = 1_700_000_000.0
KEYS = {
    "d1": Ed25519PrivateKey.from_private_bytes(b"\x01" * 32),
    "d2": Ed25519PrivateKey.from_private_bytes(b"\x02" * 32),
}


class Clock:
    def __init__(self, t: float = NOW) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def delta(scale: float = 0.1) -> np.ndarray:
    return (np.arange(NUM_PARAMS, dtype=np.float32) - 7) * np.float32(scale)


def tensors_of(x: np.ndarray, codec: str = "f32") -> list[Encoded]:
    return [encode(codec, x[:12].reshape(4, 3)), encode(codec, x[12:])]


def update(
    device: str = "d1",
    *,
    x: np.ndarray | None = None,
    tensors: list[Encoded] | None = None,
    key: Ed25519PrivateKey | None = None,
    **over: Any,
) -> bytes:
    fields: dict[str, Any] = {
        "version": PROTOCOL_VERSION,
        "device": device,
        "round": 3,
        "base": BASE,
        "nonce": os.urandom(16),
        "timestamp": NOW,
        "samples": 10,
        "tensors": tensors if tensors is not None else tensors_of(delta() if x is None else x),
    }
    fields.update(over)
    return seal(Envelope(**fields), key or KEYS.get(device, KEYS["d1"]))


def make_validator(clock: Clock | None = None, **config: Any) -> Validator:
    registry = DeviceRegistry({d: k.public_key() for d, k in KEYS.items()})
    cfg = ValidationConfig(**{"norm_bound": 10.0, "rate_limit": RateLimit(3, 30.0), **config})
    return Validator(registry, SHAPES, round=3, base=BASE, config=cfg, clock=clock or Clock())


def rejected(v: Validator, data: bytes, reason: str, transport: str = "coap") -> Rejection:
    with pytest.raises(Rejection) as info:
        v.check(data, transport)
    assert info.value.reason == reason, info.value
    return info.value


def test_good_update_is_accepted() -> None:
    v = make_validator()
    acc = v.check(update(), "mqtt")
    assert isinstance(acc, Accepted)
    assert (acc.device, acc.round, acc.samples, acc.transport) == ("d1", 3, 10, "mqtt")
    assert acc.delta.dtype == np.float32 and acc.delta.shape == (NUM_PARAMS,)
    np.testing.assert_array_equal(acc.delta, delta())
    assert not acc.redelivery and len(acc.nonce) == 16


def test_flat_and_compressed_updates_are_accepted() -> None:
    v = make_validator()
    acc = v.check(update(tensors=[encode("f32", delta())]))
    np.testing.assert_array_equal(acc.delta, delta())
    acc = v.check(update("d2", tensors=tensors_of(delta(), "int8")))
    np.testing.assert_allclose(acc.delta, delta(), atol=0.01)


def _nan_payload() -> list[Encoded]:
    x = delta()
    x[5] = np.nan
    return [
        Encoded("f32", (4, 3), x[:12].tobytes(), {}),
        Encoded("f32", (3,), x[12:].tobytes(), {}),
    ]


def _inf_flat() -> list[Encoded]:
    x = delta()
    x[0] = np.inf
    return [Encoded("f32", (NUM_PARAMS,), x.tobytes(), {})]


def _bad_signature() -> bytes:
    data = bytearray(update())
    data[-1] ^= 0x40
    return bytes(data)


def _truncated_payload() -> list[Encoded]:
    return [Encoded("f32", (4, 3), b"\x00" * 44, {}), encode("f32", delta()[12:])]


CASES: list[tuple[str, Any]] = [
    ("too-large", lambda: b"\x00" * 5000),
    ("malformed", lambda: b"\xa9garbage"),
    ("malformed", lambda: update()[:-10]),
    ("malformed", lambda: update(samples=1)[:50] + b"\x5b" + (1 << 60).to_bytes(8, "big")),
    ("malformed", lambda: update(tensors=_truncated_payload())),
    ("unknown-device", lambda: update("d9", key=KEYS["d1"])),
    ("bad-signature", _bad_signature),
    ("bad-signature", lambda: update("d1", key=KEYS["d2"])),
    ("replay", lambda: update(timestamp=NOW - 500)),
    ("replay", lambda: update(timestamp=NOW + 500)),
    ("stale-round", lambda: update(round=2)),
    ("stale-round", lambda: update(round=4)),
    ("stale-base", lambda: update(base=OTHER_BASE)),
    (
        "bad-shape",
        lambda: update(tensors=[encode("f32", delta()[:12]), encode("f32", delta()[12:])]),
    ),
    ("bad-shape", lambda: update(tensors=[encode("f32", delta()[:14])])),
    ("bad-shape", lambda: update(tensors=tensors_of(delta())[::-1])),
    ("non-finite", lambda: update(tensors=_nan_payload())),
    ("non-finite", lambda: update(tensors=_inf_flat())),
    ("norm-bound", lambda: update(x=delta(scale=10.0))),
]


@pytest.mark.parametrize(
    ("reason", "make"), CASES, ids=[f"{r}-{i}" for i, (r, _) in enumerate(CASES)]
)
def test_each_rejection_then_a_good_update_is_still_accepted(reason: str, make: Any) -> None:
    v = make_validator()
    rejected(v, make(), reason, "coap")
    assert v.rejections.get(reason, "coap") == 1 and v.rejections.total == 1
    assert v.check(update()).device == "d1"
    assert v.rejections.total == 1


def test_malformed_signed_payloads_never_cost_a_signature_check_when_unknown() -> None:
    v = make_validator()
    # an unknown device with a garbage signature is "unknown-device": checked before the signature
    data = bytearray(update("nobody", key=KEYS["d1"]))
    data[-1] ^= 1
    rejected(v, bytes(data), "unknown-device")


def test_replayed_nonce() -> None:
    v = make_validator()
    nonce = os.urandom(16)
    v.check(update(nonce=nonce))
    r = rejected(v, update(nonce=nonce, samples=11), "replay")
    assert nonce.hex() in r.detail
    # another device may (by chance) use the same nonce: keys are per device
    v.check(update("d2", nonce=nonce))


def test_codec_allow_list() -> None:
    v = make_validator(codecs=frozenset({"f32", "f16"}))
    r = rejected(v, update(tensors=tensors_of(delta(), "int8")), "bad-shape")
    assert "int8" in r.detail
    v.check(update(tensors=tensors_of(delta(), "f16")))


def test_round_lifecycle() -> None:
    v = make_validator()
    v.close_round()
    rejected(v, update(), "round-closed")
    v.start_round(4, OTHER_BASE)
    rejected(v, update(), "stale-round")
    v.check(update(round=4, base=OTHER_BASE))


def test_rate_limit_token_bucket() -> None:
    clock = Clock()
    v = make_validator(clock, rate_limit=RateLimit(3, 30.0))
    for _ in range(3):
        v.check(update())
    r = rejected(v, update(), "rate-limited")
    assert "3 updates in 30 s" in r.detail
    v.check(update("d2"))  # per device
    clock.t += 10.0  # one token back (3 per 30 s)
    v.check(update(timestamp=clock.t))
    rejected(v, update(timestamp=clock.t), "rate-limited")


def test_redelivery_is_accepted_without_a_token_and_folded_once() -> None:
    v = make_validator(rate_limit=RateLimit(1, 60.0))
    buf = IntakeBuffer("gw0", 3, NUM_PARAMS, rejections=v.rejections)
    data = update(samples=4)
    first = v.check(data, "mqtt")
    again = v.check(data, "mqtt")  # QoS 1 redelivery: same bytes
    assert not first.redelivery and again.redelivery
    assert buf.offer(first) == "accepted"
    assert buf.offer(again) == "duplicate"
    assert buf.offer(again) == "duplicate"
    agg = buf.aggregate
    assert agg.count == 1 and agg.total_weight == 4.0 and agg.devices == ["d1"]
    np.testing.assert_allclose(agg.weighted_sum, 4.0 * delta().astype(np.float64))
    assert buf.duplicates == 2 and v.rejections.total == 0
    # a fresh update by d1 is still rate limited (the redelivery took no token)
    rejected(v, update(), "rate-limited")


def test_intake_buffer_one_update_per_device_per_round() -> None:
    v = make_validator()
    counter = RejectionCounter()
    buf = IntakeBuffer("gw0", 3, NUM_PARAMS, rejections=counter)
    assert buf.offer(v.check(update(samples=2), "coap")) == "accepted"
    with pytest.raises(Rejection) as info:
        buf.offer(v.check(update(samples=3), "coap"))
    assert info.value.reason == "rate-limited"
    assert buf.offer(v.check(update("d2", samples=5))) == "accepted"
    assert buf.aggregate.count == 2 and buf.aggregate.total_weight == 7.0
    other = IntakeBuffer("gw0", 4, NUM_PARAMS)
    with pytest.raises(Rejection) as info:
        other.offer(v.check(update("d1", samples=1)))
    assert info.value.reason == "stale-round"
    assert counter.get("rate-limited", "coap") == 1


def test_rejection_counter() -> None:
    c = RejectionCounter()
    c.inc("replay", "coap")
    c.inc("replay", "mqtt")
    c.inc("replay", "mqtt")
    assert c.get("replay") == 3 and c.get("replay", "mqtt") == 2 and c.get("malformed") == 0
    assert c.snapshot() == {("replay", "coap"): 1, ("replay", "mqtt"): 2} and c.total == 3
    with pytest.raises(ValueError):
        c.inc("bogus", "coap")
    assert len(REASONS) == len(set(REASONS)) == 13


def test_replay_cache_memory_is_bounded_under_100k_nonces() -> None:
    cache = ReplayCache(max_skew_s=1.0, capacity=100_000)
    now, peak, peak_heap = NOW, 0, 0
    for i in range(100_000):
        now += 0.001  # 1000 updates per second, so ~1000 live within the 1 s window
        nonce = i.to_bytes(16, "little")
        assert cache.check("d1", nonce, now, 7, now) is False
        cache.add("d1", nonce, now, 7, now)
        peak, peak_heap = max(peak, len(cache)), max(peak_heap, len(cache._expiry))
    assert peak <= 1002 and peak_heap <= 1002
    # the newest nonce is still remembered; a redelivery is recognized, a reuse is a replay
    assert cache.check("d1", nonce, now, 7, now) is True
    with pytest.raises(Rejection, match="already used"):
        cache.check("d1", nonce, now, 8, now)


def test_replay_cache_fails_closed_when_full() -> None:
    cache = ReplayCache(max_skew_s=60.0, capacity=10)
    for i in range(10):
        cache.add("d1", bytes([i]) * 16, NOW, i, NOW)
    with pytest.raises(Rejection) as info:
        cache.add("d1", b"\xff" * 16, NOW, 99, NOW)
    assert info.value.reason == "rate-limited"
    cache.add("d1", b"\xff" * 16, NOW + 61, 99, NOW + 61)  # the old ones have expired
    assert len(cache) == 1
    v = make_validator(replay_capacity=1)
    v.check(update())
    rejected(v, update("d2"), "rate-limited")


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        RateLimit(0, 1.0)
    with pytest.raises(ValueError):
        ValidationConfig(norm_bound=0.0)
    with pytest.raises(ValueError):
        ValidationConfig(codecs=frozenset({"f64"}))
    with pytest.raises(ValueError):
        Validator(DeviceRegistry(), [], round=0, base=BASE)
    v = make_validator()
    assert v.max_bytes > 4 * NUM_PARAMS
    assert replace(ValidationConfig(), max_bytes=10).max_bytes == 10


def test_non_canonical_resigned_envelope_is_malformed() -> None:
    """A device that signs a non-canonical encoding is refused, even with a valid signature."""
    env = Envelope(PROTOCOL_VERSION, "d1", 3, BASE, os.urandom(16), NOW, 10, tensors_of(delta()))
    plain = cbor2.dumps(env.fields())  # insertion order, not canonical
    data = b"\xa9" + plain[1:] + cbor2.dumps("sig") + cbor2.dumps(KEYS["d1"].sign(plain))
    r = rejected(make_validator(), data, "malformed")
    assert "canonical" in r.detail


BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in {'torch', 'crypten', 'ray', 'networkx', 'matplotlib'}:
            raise ImportError(f'{name} is blocked: the gateway must not need it')
        return None
sys.meta_path.insert(0, Block())
import devices.envelope, devices.keys, gateway.validation
import numpy as np
from devices.codecs import encode
k = devices.keys.generate_keypair()
reg = devices.keys.DeviceRegistry({'d1': k.public_key()})
v = gateway.validation.Validator(reg, [(3,)], round=1, base='00' * 32)
env = devices.envelope.Envelope.new('d1', 1, '00' * 32, 5, [encode('f16', np.ones(3))])
acc = v.check(devices.envelope.seal(env, k), 'coap')
assert acc.samples == 5 and acc.delta.tolist() == [1.0, 1.0, 1.0]
print('ok', sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'ray', 'crypten'}))
"""


def test_envelope_and_validation_import_without_torch_crypten_or_ray() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", BLOCKER], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok []"
