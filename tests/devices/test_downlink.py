"""Model downlink: smallest exact representation, hash-verified reconstruction."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from cloud.model_store import model_hash as cloud_model_hash
from devices.codecs.indices import BITMAP, VARINT
from devices.downlink import (
    Downlink,
    DownlinkError,
    apply_downlink,
    encode_model_update,
    model_hash,
)

N = 8_620  # the HAPT cnn1d model


def _model(seed: int = 0, n: int = N) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32)


def _changed(old: np.ndarray, fraction: float, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    new = old.copy()
    idx = rng.choice(old.size, int(fraction * old.size), replace=False)
    new[idx] += rng.standard_normal(idx.size).astype(np.float32)
    return new


def test_hash_is_the_model_store_hash() -> None:
    for x in (_model(), np.zeros(0, np.float32), np.array([-0.0, 1.5], np.float64)):
        assert model_hash(x) == cloud_model_hash(x)


def test_full_model_when_device_holds_nothing() -> None:
    new = _model()
    dl = encode_model_update(new, None, model_hash(new), None)
    assert dl.kind == "full" and dl.base is None and dl.nbytes == 4 * N
    out = apply_downlink(dl, None)
    assert np.array_equal(out, new) and model_hash(out) == dl.hash


@pytest.mark.parametrize("fraction,mode", [(0.0, VARINT), (0.01, VARINT), (0.3, BITMAP)])
def test_sparse_delta_reconstructs_the_exact_hash(fraction: float, mode: int) -> None:
    old = _model()
    new = _changed(old, fraction)
    dl = encode_model_update(new, old, model_hash(new), None)
    assert dl.kind == "delta" and dl.base == model_hash(old)
    assert dl.meta == {"k": int(fraction * N), "idx": mode}
    # indices + 4 bytes per changed value, far below the 34,480-byte full model
    assert dl.nbytes <= 4 * dl.meta["k"] + max(2 * dl.meta["k"], (N + 7) // 8)
    out = apply_downlink(dl, old)
    assert model_hash(out) == model_hash(new) and np.array_equal(
        out.view(np.uint32), new.view(np.uint32)
    )


def test_dense_change_or_new_architecture_sends_the_full_model() -> None:
    old = _model()
    # 90 % changed: bitmap + values (32,110 B) still beats the full 34,480 B; 98 % does not
    assert (
        encode_model_update(_changed(old, 0.9), old, model_hash(_changed(old, 0.9))).kind == "delta"
    )
    new = _changed(old, 0.98)
    assert encode_model_update(new, old, model_hash(new), None).kind == "full"
    other = _model(n=N + 1)
    dl = encode_model_update(other, old, model_hash(other), None)
    assert dl.kind == "full"
    assert np.array_equal(apply_downlink(dl, old), other)


def test_bitwise_changes_count() -> None:
    old = np.zeros(1000, dtype=np.float32)
    new = old.copy()
    new[17] = -0.0  # equal as a float, different bytes and hash
    dl = encode_model_update(new, old, model_hash(new), None)
    assert dl.kind == "delta" and dl.meta["k"] == 1
    assert model_hash(apply_downlink(dl, old)) == model_hash(new) != model_hash(old)


def test_wrong_announced_hash_and_byte_limit() -> None:
    old = _model()
    new = _changed(old, 0.01)
    with pytest.raises(ValueError, match="not the SHA-256"):
        encode_model_update(new, old, model_hash(old), None)
    dl = encode_model_update(new, old, model_hash(new), 4096)
    assert dl.nbytes <= 4096
    with pytest.raises(DownlinkError) as e:
        encode_model_update(new, old, model_hash(new), 100)
    assert e.value.reason == "too-large"


OLD = _model()
NEW = _changed(OLD, 0.02)
DELTA = encode_model_update(NEW, OLD, model_hash(NEW), None)
FULL = encode_model_update(NEW, None, model_hash(NEW), None)


def _flip(payload: bytes, at: int) -> bytes:
    return payload[:at] + bytes([payload[at] ^ 0x01]) + payload[at + 1 :]


@pytest.mark.parametrize(
    "dl,old,reason",
    [
        (
            dataclasses.replace(DELTA, payload=_flip(DELTA.payload, len(DELTA.payload) - 1)),
            OLD,
            "hash-mismatch",
        ),
        (dataclasses.replace(FULL, payload=_flip(FULL.payload, 100)), None, "hash-mismatch"),
        (dataclasses.replace(FULL, hash="0" * 64), None, "hash-mismatch"),
        (dataclasses.replace(DELTA, hash=model_hash(OLD)), OLD, "hash-mismatch"),
        (DELTA, _changed(OLD, 0.001, seed=9), "wrong-base"),
        (DELTA, None, "wrong-base"),
        (DELTA, OLD[:-1], "wrong-base"),
        (dataclasses.replace(DELTA, payload=DELTA.payload[:-4]), OLD, "bad-indices"),
        (dataclasses.replace(DELTA, payload=DELTA.payload[:3]), OLD, "bad-length"),
        (dataclasses.replace(DELTA, meta={"k": N + 1, "idx": 0}), OLD, "bad-meta"),
        (dataclasses.replace(DELTA, meta={"k": 1}), OLD, "bad-meta"),
        (dataclasses.replace(DELTA, meta={"k": DELTA.meta["k"], "idx": 1}), OLD, "bad-length"),
        (dataclasses.replace(DELTA, payload=b"\x00" + DELTA.payload[1:]), OLD, "hash-mismatch"),
        (dataclasses.replace(DELTA, payload=b"\x00\x00" + DELTA.payload[2:]), OLD, "bad-indices"),
        (dataclasses.replace(FULL, payload=FULL.payload[:-1]), None, "bad-meta"),
        (dataclasses.replace(FULL, size=N + 1), None, "bad-meta"),
        (dataclasses.replace(FULL, kind="zip"), None, "bad-kind"),
        (dataclasses.replace(FULL, payload="x"), None, "bad-payload"),  # type: ignore[arg-type]
    ],
)
def test_tampered_downlink_raises(dl: Downlink, old: np.ndarray | None, reason: str) -> None:
    with pytest.raises(DownlinkError) as e:
        apply_downlink(dl, old)
    assert e.value.reason == reason, str(e.value)


def test_fuzz_apply_only_raises_downlink_error() -> None:
    rng = np.random.default_rng(5)
    accepted = 0
    for i in range(300):
        base = DELTA if i % 2 else FULL
        p = bytearray(base.payload)
        op = i % 5
        if op == 0:
            p[int(rng.integers(len(p)))] ^= 1 << int(rng.integers(8))
        elif op == 1:
            del p[int(rng.integers(len(p))) :]
        elif op == 2:
            p += rng.bytes(int(rng.integers(1, 8)))
        elif op == 3:
            p = bytearray(rng.bytes(len(p)))
        dl = dataclasses.replace(base, payload=bytes(p))
        try:
            out = apply_downlink(dl, OLD)
        except DownlinkError:
            continue
        accepted += 1
        assert model_hash(out) == NEW_HASH  # whatever is accepted is exactly the new model
    assert accepted >= 50  # op 4 leaves the payload untouched


NEW_HASH = model_hash(NEW)
