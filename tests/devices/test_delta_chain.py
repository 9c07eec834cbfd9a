"""Delta chains: the wire form, bit-exact rebuilding, and refusal of anything else."""

from __future__ import annotations

import dataclasses

import cbor2
import numpy as np
import pytest

from devices.codecs import encode
from devices.delta_chain import (
    FRAME_BYTES,
    DeltaChain,
    apply_chain,
    apply_step,
    download_nbytes,
    reconstruct,
)
from devices.downlink import Downlink, DownlinkError, model_hash

N = 1_000


def _versions(codec: str = "int8", steps: int = 3, **params: int) -> tuple[list[np.ndarray], list]:
    """A base model and ``steps`` versions made by compressed steps, as the cloud makes them."""
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal(N).astype(np.float32)]
    encs = []
    for _ in range(steps):
        enc = encode(codec, 0.01 * rng.standard_normal(N), **params)
        encs.append(enc)
        xs.append(apply_step(xs[-1], enc))
    return xs, encs


def _chain(xs: list[np.ndarray], encs: list, start: int = 0) -> DeltaChain:
    return DeltaChain(model_hash(xs[start]), model_hash(xs[-1]), N, tuple(encs[start:]))


@pytest.mark.parametrize(
    "codec,params", [("int8", {}), ("int4", {}), ("f16", {}), ("topk-int8", {"k": 50})]
)
def test_chain_over_the_wire_rebuilds_the_exact_model(codec: str, params: dict) -> None:
    xs, encs = _versions(codec, **params)
    for start in range(len(xs)):
        chain = _chain(xs, encs, start)
        parsed = DeltaChain.from_bytes(chain.wire, max_elements=N, max_steps=8)
        assert parsed == chain
        out = apply_chain(parsed, xs[start].copy())
        assert out.view(np.uint32).tolist() == xs[-1].view(np.uint32).tolist()
        assert len(parsed.steps) == len(xs) - 1 - start
    # int8 step: one byte per parameter plus a scale per 256, and < 200 bytes of CBOR
    # (two hex hashes, keys, codec, meta): ~4x less than the full model
    one = _chain(xs, encs, len(xs) - 2)
    full = Downlink("full", model_hash(xs[-1]), None, N, xs[-1].tobytes())
    if codec == "int8":
        assert N + 16 < len(one.wire) < N + 16 + 200
        assert download_nbytes(one) < download_nbytes(full) / 3
    assert download_nbytes(full) == FRAME_BYTES + 4 * N
    assert download_nbytes(one.wire) == download_nbytes(one) == FRAME_BYTES + len(one.wire)


def test_apply_step_is_float32_addition_and_refuses_bad_steps() -> None:
    xs, encs = _versions()
    from devices.codecs import decode

    expected = xs[0] + decode(encs[0], max_elements=N)
    assert expected.dtype == np.float32
    assert np.array_equal(apply_step(xs[0], encs[0]), expected)
    with pytest.raises(DownlinkError, match="too-many-elements"):
        apply_step(xs[0][:-1], encs[0])  # a step for a bigger model
    with pytest.raises(DownlinkError, match="wrong-base"):
        apply_step(xs[0], encode("int8", np.zeros(N - 1)))  # ... and for a smaller one
    bad = dataclasses.replace(encs[0], payload=encs[0].payload[:-1])
    with pytest.raises(DownlinkError, match="bad-length"):
        apply_step(xs[0], bad)
    huge = np.full(N, 3e38, np.float32)
    with pytest.raises(DownlinkError, match="non-finite"):
        apply_step(huge, encode("int8", np.full(N, 3e38)))


def test_wrong_base_tampering_and_missing_model_are_refused() -> None:
    xs, encs = _versions()
    chain = _chain(xs, encs, 1)
    with pytest.raises(DownlinkError, match="wrong-base"):
        apply_chain(chain, xs[0])  # holds another version
    with pytest.raises(DownlinkError, match="wrong-base"):
        reconstruct(chain, None)
    with pytest.raises(DownlinkError, match="wrong-base"):
        apply_chain(chain, xs[1][:10])
    # one quantized level changed: still decodes, but rebuilds another model
    step = encs[-1]
    tampered = bytearray(step.payload)
    tampered[-1] = (tampered[-1] + 1) % 127
    forged_step = dataclasses.replace(step, payload=bytes(tampered))
    forged = dataclasses.replace(chain, steps=(*chain.steps[:-1], forged_step))
    with pytest.raises(DownlinkError, match="hash-mismatch"):
        apply_chain(forged, xs[1])
    # an honest chain announcing another target
    lying = dataclasses.replace(chain, hash=model_hash(xs[0]))
    with pytest.raises(DownlinkError, match="hash-mismatch"):
        apply_chain(lying, xs[1])


def _doc(chain: DeltaChain) -> dict:
    return cbor2.loads(chain.wire)


@pytest.mark.parametrize(
    "mutate,needle",
    [
        (lambda d: d.pop("steps"), "must be a map with"),
        (lambda d: d.update(v=2), "unsupported chain"),
        (lambda d: d.update(kind="full"), "unsupported chain"),
        (lambda d: d.update(base="ABC"), "'base' must be 64 lowercase hex"),
        (lambda d: d.update(size=10**9), "chain size must be"),
        (lambda d: d.update(size=-1), "chain size must be"),
        (lambda d: d.update(steps=[[1, 2]]), "must be [codec, meta map, payload bytes]"),
        (lambda d: d["steps"][0].__setitem__(0, "f32"), "uses 'f32'"),
        (lambda d: d.update(steps=d["steps"] * 5), "at most 8"),
    ],
)
def test_malformed_wire_is_refused_with_a_reason(mutate, needle) -> None:
    xs, encs = _versions()
    doc = _doc(_chain(xs, encs))
    mutate(doc)
    with pytest.raises(DownlinkError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        DeltaChain.from_bytes(cbor2.dumps(doc), max_elements=N, max_steps=8)


def test_garbage_and_oversized_input_is_refused() -> None:
    for data in (b"", b"\xff\x00", b"\x9f"):
        with pytest.raises(DownlinkError, match="bad-payload"):
            DeltaChain.from_bytes(data, max_elements=N, max_steps=8)
    with pytest.raises(DownlinkError, match="exceeds"):
        DeltaChain.from_bytes(bytes(100), max_elements=N, max_steps=8, max_bytes=99)
    # a step whose meta lies about its size fails when applied, not silently
    xs, encs = _versions()
    doc = _doc(_chain(xs, encs))
    doc["steps"][0][1]["chunk"] = 7
    parsed = DeltaChain.from_bytes(cbor2.dumps(doc), max_elements=N, max_steps=8)
    with pytest.raises(DownlinkError, match="bad-length"):
        apply_chain(parsed, xs[0])
