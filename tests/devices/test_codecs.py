"""Update codecs: round trips, error bounds, unbiasedness, top-k, sizes, hostile payloads."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from devices.codecs import CODECS, REASONS, CodecError, Encoded, decode, encode, max_encoded_size
from devices.codecs.indices import (
    BITMAP,
    VARINT,
    bitmap_size,
    decode_indices,
    encode_indices,
    index_size_bound,
)
from devices.codecs.topk import select_topk

QMAX = {"int8": 127, "int4": 7}
TOPK = ["topk-f16", "topk-int8", "topk-int4"]


def _params(codec: str, **kw: Any) -> dict[str, Any]:
    """Options for ``codec``: top-k ones (``k``/``ratio``, default ratio 0.1) only for top-k."""
    if not codec.startswith("topk"):
        return {key: v for key, v in kw.items() if key not in ("k", "ratio")}
    if "k" not in kw and "ratio" not in kw:
        kw["ratio"] = 0.1
    return kw


def _vec(n: int, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # heavy-tailed, like real updates: a few large coordinates, many small
    return (rng.standard_t(3, n) * scale).astype(np.float32)


def _chunk_scales(x: np.ndarray, qmax: int, chunk: int) -> np.ndarray:
    """Per-element scale the quantizer should use: max |x| of the element's chunk / qmax."""
    m = -(-x.size // chunk)
    pad = np.zeros(m * chunk)
    pad[: x.size] = np.abs(x)
    amax = pad.reshape(m, chunk).max(axis=1)
    return np.repeat(amax / qmax, chunk)[: x.size]


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("codec", list(CODECS))
@pytest.mark.parametrize("shape", [(), (0,), (1,), (7,), (3, 4, 5), (1000,)])
def test_round_trip_shapes(codec: str, shape: tuple[int, ...]) -> None:
    x = _vec(math.prod(shape), seed=1).reshape(shape)
    enc = encode(codec, x, **_params(codec))
    assert enc.codec == codec and enc.shape == shape and isinstance(enc.payload, bytes)
    assert enc.nbytes <= max_encoded_size(codec, x.size, **_params(codec))
    out = decode(enc, max_elements=max(x.size, 1))
    assert out.shape == shape and out.dtype == np.float32
    assert np.isfinite(out).all()
    assert out.flags.writeable
    if codec == "f32":
        assert np.array_equal(out, x)


def test_f16_relative_error_and_saturation() -> None:
    x = np.concatenate([_vec(5000, seed=2), _vec(100, seed=3, scale=1e-6), [0.0, 1e4, -6e4]])
    out = decode(encode("f16", x), max_elements=x.size)
    # 11-bit significand: relative 2^-11 for normal halves, absolute 2^-25 below them
    assert np.all(np.abs(out - x) <= 2.0**-11 * np.abs(x) + 2.0**-25)
    big = decode(encode("f16", np.array([1e6, -1e6, 7e4])), max_elements=3)
    assert np.array_equal(big, np.array([65504, -65504, 65504], dtype=np.float32))


@pytest.mark.parametrize("codec", ["int8", "int4"])
@pytest.mark.parametrize("chunk", [1, 7, 256, 5000])
@pytest.mark.parametrize("stochastic", [False, True])
def test_quantization_error_within_scale(codec: str, chunk: int, stochastic: bool) -> None:
    x = _vec(3001, seed=4)
    x[100:400] = 0.0  # all-zero chunks must decode to exactly zero
    rng = np.random.default_rng(5) if stochastic else None
    enc = encode(codec, x, rng=rng, chunk=chunk)
    assert enc.meta == {"chunk": chunk}
    out = decode(enc, max_elements=x.size)
    s = _chunk_scales(x, QMAX[codec], chunk)
    bound = s if stochastic else s / 2
    assert np.all(np.abs(out - x) <= bound * (1 + 1e-5) + 1e-30)
    assert np.all(out[100:400] == 0) or chunk > 300


@pytest.mark.parametrize("codec", ["int8", "int4", "topk-int8", "topk-int4"])
def test_quantization_extreme_magnitudes(codec: str) -> None:
    tiny = np.array([1e-44, -3e-45, 0.0, 1e-45] * 4, dtype=np.float32)  # subnormal chunk
    huge = np.array([3.4e38, -3.4e38, 1.0, -2e38] * 4, dtype=np.float32)
    for x in (tiny, huge):
        out = decode(encode(codec, x, **_params(codec, k=16)), max_elements=x.size)
        assert np.isfinite(out).all()
        assert np.all(
            np.abs(out - x) <= np.abs(x).max() / QMAX[codec.split("-")[-1]] * 1.001 + 1e-44
        )


@pytest.mark.parametrize("codec", ["int8", "int4", "topk-int8", "topk-int4"])
def test_stochastic_rounding_is_unbiased(codec: str) -> None:
    x = _vec(64, seed=6)
    rng = np.random.default_rng(7)
    draws = 1500
    acc = np.zeros(x.size)
    for _ in range(draws):
        acc += decode(encode(codec, x, rng=rng, **_params(codec, k=64)), max_elements=x.size)
    mean = acc / draws
    s = np.abs(x).max() / QMAX[codec.split("-")[-1]]
    # each draw errs by at most s (variance <= s^2/4): 6 standard errors
    assert np.all(np.abs(mean - x) <= 6 * (s / 2) / math.sqrt(draws))
    # ... whereas rounding to nearest is deterministic and (here) visibly biased somewhere
    det = decode(encode(codec, x, **_params(codec, k=64)), max_elements=x.size)
    assert np.array_equal(
        det, decode(encode(codec, x, **_params(codec, k=64)), max_elements=x.size)
    )
    assert np.abs(det - x).max() > 6 * (s / 2) / math.sqrt(draws)


def test_same_seed_same_bytes() -> None:
    x = _vec(2000, seed=8)
    for codec in CODECS:
        a = encode(codec, x, rng=np.random.default_rng(1), **_params(codec))
        b = encode(codec, x, rng=np.random.default_rng(1), **_params(codec))
        assert a == b


# ---------------------------------------------------------------------- top-k


@pytest.mark.parametrize("codec", TOPK)
@pytest.mark.parametrize("k", [0, 1, 10, 500, 1999, 2000])
def test_topk_keeps_exactly_the_k_largest(codec: str, k: int) -> None:
    rng = np.random.default_rng(9)
    # distinct magnitudes in [1, 2): every kept value quantizes to a non-zero level
    x = (1 + rng.permutation(2000) / 2000).astype(np.float32) * rng.choice([-1, 1], 2000)
    enc = encode(codec, x, k=k)
    assert enc.meta["k"] == k
    out = decode(enc, max_elements=x.size)
    expected = np.sort(np.argsort(-np.abs(x))[:k])
    kept = np.flatnonzero(out)
    assert np.array_equal(kept, expected)
    err = np.abs(out[kept] - x[kept])
    if codec == "topk-f16":
        assert np.all(err <= 2.0**-11 * np.abs(x[kept]))
    elif k:
        assert np.all(err <= np.abs(x[kept]).max() / QMAX[codec[5:]] / 2 * 1.00001)


def test_topk_ties_go_to_lower_indices() -> None:
    x = np.array([1, -3, 3, 2, 3, -3, 0], dtype=np.float32)
    assert select_topk(x, 2).tolist() == [1, 2]
    assert select_topk(x, 5).tolist() == [1, 2, 3, 4, 5]
    out = decode(encode("topk-f16", np.ones(50), k=7), max_elements=50)
    assert np.flatnonzero(out).tolist() == list(range(7))


def test_topk_ratio_and_index_encoding_choice() -> None:
    x = _vec(10_000, seed=10)
    sparse = encode("topk-int8", x, ratio=0.01)
    dense = encode("topk-int8", x, ratio=0.5)
    assert sparse.meta["k"] == 100 and sparse.meta["idx"] == VARINT
    assert dense.meta["k"] == 5000 and dense.meta["idx"] == BITMAP
    assert encode("topk-f16", x[:3], ratio=1e-9).meta["k"] == 1  # at least one entry


@pytest.mark.parametrize("n,k", [(1, 1), (200, 3), (10_000, 77), (10_000, 1250), (300_000, 40)])
def test_index_coding_round_trip_and_bound(n: int, k: int) -> None:
    rng = np.random.default_rng(n + k)
    even = np.linspace(0, n - 1, k).astype(np.int64)  # evenly spread: the varint worst case
    for idx in (np.sort(rng.choice(n, k, replace=False)), np.unique(even), np.arange(k)):
        buf, mode = encode_indices(idx, n)
        assert np.array_equal(decode_indices(buf, n, idx.size, mode), idx)
        assert len(buf) <= index_size_bound(n, idx.size) <= bitmap_size(n)


def test_index_bound_is_tight_for_even_spacing() -> None:
    n, k = 100_000, 500  # gaps of 200: two bytes each
    buf, mode = encode_indices(np.arange(k) * 200, n)
    assert mode == VARINT and len(buf) == 2 * k - 1
    # the bound also allows for a couple of 3-byte gaps (>= 16384) the slack could afford
    assert 2 * k - 1 <= index_size_bound(n, k) <= 2 * k + 2


# ---------------------------------------------------------------------- sizes


def test_sizes_for_10k_floats() -> None:
    x = _vec(10_000, seed=11)
    sizes = {c: encode(c, x, **_params(c, ratio=0.01)).nbytes for c in CODECS}
    assert sizes["f32"] == 40_000
    assert sizes["f16"] == 20_000
    assert sizes["int8"] == 10_000 + 4 * 40
    assert sizes["int4"] == 5_000 + 4 * 40
    # 100 values + ~100 varint gaps (avg gap 100 < 128: mostly one byte each)
    assert sizes["topk-f16"] <= 200 + 200
    assert sizes["topk-int8"] <= 100 + 4 + 200
    assert sizes["topk-int4"] <= 50 + 4 + 200
    for c in CODECS:
        assert sizes[c] <= max_encoded_size(c, 10_000, **_params(c, ratio=0.01))


# ------------------------------------------------------------- encoder errors


@pytest.mark.parametrize(
    "codec,x,params,reason",
    [
        ("nope", np.ones(3), {}, "unknown-codec"),
        ("f32", np.array([1.0, np.nan]), {}, "non-finite"),
        ("f16", np.array([np.inf]), {}, "non-finite"),
        ("f32", np.array([1e300]), {}, "non-finite"),  # beyond float32
        ("f32", np.array(["a"]), {}, "bad-input"),
        ("f32", np.array([1 + 1j]), {}, "bad-input"),
        ("f32", np.ones(3), {"chunk": 4}, "bad-params"),
        ("int8", np.ones(3), {"chunk": 0}, "bad-params"),
        ("int4", np.ones(3), {"chunk": 2.5}, "bad-params"),
        ("topk-int8", np.ones(3), {}, "bad-params"),
        ("topk-int8", np.ones(3), {"k": 4}, "bad-params"),
        ("topk-int8", np.ones(3), {"k": 1, "ratio": 0.5}, "bad-params"),
        ("topk-f16", np.ones(3), {"ratio": 0.0}, "bad-params"),
        ("topk-f16", np.ones(3), {"k": 1, "chunk": 8}, "bad-params"),
    ],
)
def test_encoder_rejects(codec: str, x: np.ndarray, params: dict[str, Any], reason: str) -> None:
    with pytest.raises(CodecError) as e:
        encode(codec, x, **params)
    assert e.value.reason == reason


# ------------------------------------------------------- hostile decoder input


def _replace(enc: Encoded, **kw: Any) -> Encoded:
    return dataclasses.replace(enc, **kw)


def _set(payload: bytes, at: int, value: bytes) -> bytes:
    return payload[:at] + value + payload[at + len(value) :]


X = _vec(600, seed=12)
E: dict[str, Encoded] = {c: encode(c, X, **_params(c, ratio=0.05)) for c in CODECS}
E_BITMAP = encode("topk-int8", X, ratio=0.5)
NAN32 = np.array([np.nan], dtype="<f4").tobytes()

HOSTILE: list[tuple[str, Callable[[], Encoded], str]] = [
    ("codec name", lambda: _replace(E["f32"], codec="f64"), "unknown-codec"),
    ("codec type", lambda: _replace(E["f32"], codec=None), "unknown-codec"),
    ("negative dim", lambda: _replace(E["f32"], shape=(-600,)), "bad-shape"),
    ("float dim", lambda: _replace(E["f32"], shape=(600.0,)), "bad-shape"),
    ("bool dim", lambda: _replace(E["f32"], shape=(True,)), "bad-shape"),
    ("shape not a tuple", lambda: _replace(E["f32"], shape="600"), "bad-shape"),
    ("rank 40", lambda: _replace(E["f32"], shape=(1,) * 40), "bad-shape"),
    ("huge shape", lambda: _replace(E["int8"], shape=(10**6, 10**6)), "too-many-elements"),
    ("huge dim", lambda: _replace(E["int8"], shape=(0, 10**30)), "too-many-elements"),
    ("payload type", lambda: _replace(E["f32"], payload="x" * 2400), "bad-payload"),
    ("meta type", lambda: _replace(E["f32"], meta=[]), "bad-meta"),
    ("extra meta", lambda: _replace(E["f32"], meta={"chunk": 4}), "bad-meta"),
    ("missing meta", lambda: _replace(E["int8"], meta={}), "bad-meta"),
    ("meta value type", lambda: _replace(E["int8"], meta={"chunk": "256"}), "bad-meta"),
    ("f32 short", lambda: _replace(E["f32"], payload=E["f32"].payload[:-1]), "bad-length"),
    ("f32 long", lambda: _replace(E["f32"], payload=E["f32"].payload + b"\0"), "bad-length"),
    ("f32 NaN", lambda: _replace(E["f32"], payload=_set(E["f32"].payload, 8, NAN32)), "non-finite"),
    (
        "f16 inf",
        lambda: _replace(E["f16"], payload=_set(E["f16"].payload, 2, b"\x00\x7c")),
        "non-finite",
    ),
    ("f16 odd", lambda: _replace(E["f16"], payload=E["f16"].payload[:-1]), "bad-length"),
    ("int8 chunk 0", lambda: _replace(E["int8"], meta={"chunk": 0}), "bad-chunk"),
    ("int8 chunk huge", lambda: _replace(E["int8"], meta={"chunk": 2**40}), "bad-chunk"),
    ("int8 chunk float", lambda: _replace(E["int8"], meta={"chunk": 256.0}), "bad-meta"),
    ("int8 chunk bool", lambda: _replace(E["int8"], meta={"chunk": True}), "bad-meta"),
    ("int8 other chunk", lambda: _replace(E["int8"], meta={"chunk": 300}), "bad-length"),
    (
        "int8 NaN scale",
        lambda: _replace(E["int8"], payload=_set(E["int8"].payload, 0, NAN32)),
        "bad-scale",
    ),
    (
        "int8 negative scale",
        lambda: _replace(E["int8"], payload=_set(E["int8"].payload, 4, np.float32(-1).tobytes())),
        "bad-scale",
    ),
    (
        "int8 overflowing scale",
        lambda: _replace(E["int8"], payload=_set(E["int8"].payload, 0, np.float32(1e37).tobytes())),
        "bad-scale",
    ),
    (
        "int8 level -128",
        lambda: _replace(E["int8"], payload=_set(E["int8"].payload, 20, b"\x80")),
        "bad-value",
    ),
    ("int8 truncated", lambda: _replace(E["int8"], payload=E["int8"].payload[:100]), "bad-length"),
    (
        "int4 level -8",
        lambda: _replace(E["int4"], payload=_set(E["int4"].payload, 20, b"\x80")),
        "bad-value",
    ),
    (
        "int4 padding",
        lambda: _replace(E["int4"], shape=(599,), payload=E["int4"].payload[:-1] + b"\x18"),
        "bad-padding",
    ),
    ("int4 long", lambda: _replace(E["int4"], payload=E["int4"].payload + b"\x88"), "bad-length"),
    ("topk k > n", lambda: _replace(E["topk-f16"], meta={"k": 601, "idx": 0}), "bad-meta"),
    ("topk k < 0", lambda: _replace(E["topk-f16"], meta={"k": -1, "idx": 0}), "bad-meta"),
    ("topk idx mode", lambda: _replace(E["topk-f16"], meta={"k": 30, "idx": 2}), "bad-meta"),
    ("topk k + 1", lambda: _replace(E["topk-f16"], meta={"k": 31, "idx": 0}), "bad-length"),
    ("topk k - 1", lambda: _replace(E["topk-f16"], meta={"k": 29, "idx": 0}), "bad-indices"),
    (
        "topk truncated",
        lambda: _replace(E["topk-f16"], payload=E["topk-f16"].payload[:20]),
        "bad-length",
    ),
    (
        "topk repeated index",
        lambda: _replace(E["topk-f16"], payload=_set(E["topk-f16"].payload, 1, b"\x00")),
        "bad-indices",
    ),
    (
        "topk index out of range",
        lambda: _replace(E["topk-f16"], payload=b"\xd8\x04" + E["topk-f16"].payload[1:]),
        "bad-indices",
    ),
    (
        "topk overlong varint",
        lambda: _replace(E["topk-f16"], payload=b"\x80\x80\x00" + E["topk-f16"].payload[1:]),
        "bad-indices",
    ),
    (
        "topk non-canonical varint",
        lambda: _replace(
            E["topk-f16"],
            payload=bytes([E["topk-f16"].payload[0] | 0x80, 0]) + E["topk-f16"].payload[1:],
        ),
        "bad-indices",
    ),
    (
        "topk unterminated",
        lambda: _replace(E["topk-f16"], payload=b"\x81" + E["topk-f16"].payload[1:]),
        "bad-indices",
    ),
    ("topk bitmap length", lambda: _replace(E_BITMAP, payload=E_BITMAP.payload[1:]), "bad-length"),
    (
        "topk bitmap popcount",
        lambda: _replace(
            E_BITMAP, payload=_set(E_BITMAP.payload, 0, bytes([E_BITMAP.payload[0] ^ 1]))
        ),
        "bad-indices",
    ),
    ("topk bitmap beyond n", lambda: _replace(E_BITMAP, shape=(595,)), "bad-indices"),
    (
        "topk int8 NaN scale",
        lambda: _replace(
            E["topk-int8"],
            payload=E["topk-int8"].payload[:-34] + NAN32 + E["topk-int8"].payload[-30:],
        ),
        "bad-scale",
    ),
]


@pytest.mark.parametrize("name,make,reason", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_decoder_rejects(name: str, make: Callable[[], Encoded], reason: str) -> None:
    tracemalloc.start()
    try:
        with pytest.raises(CodecError) as e:
            decode(make(), max_elements=10**6)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert e.value.reason == reason, str(e.value)
    assert reason in REASONS
    assert str(e.value).startswith(reason + ": ") and len(e.value.detail) > 10
    assert peak < 256 * 1024, f"{name}: decoder allocated {peak} bytes before refusing"


def test_max_elements_is_enforced_before_allocating() -> None:
    enc = encode("f32", np.zeros(600))
    with pytest.raises(CodecError, match="too-many-elements"):
        decode(enc, max_elements=599)
    assert decode(enc, max_elements=600).shape == (600,)


def _mutations(enc: Encoded, rng: np.random.Generator) -> Encoded:
    """One random hostile variant of a valid encoding."""
    p = bytearray(enc.payload)
    kind = int(rng.integers(9))
    if kind == 0 and p:  # flip random bytes
        for _ in range(int(rng.integers(1, 4))):
            p[int(rng.integers(len(p)))] = int(rng.integers(256))
        return _replace(enc, payload=bytes(p))
    if kind == 1:  # truncate
        return _replace(enc, payload=bytes(p[: int(rng.integers(len(p) + 1))]))
    if kind == 2:  # append junk
        return _replace(enc, payload=bytes(p) + rng.bytes(int(rng.integers(1, 9))))
    if kind == 3:  # random payload of a plausible size
        return _replace(enc, payload=rng.bytes(int(rng.integers(len(p) * 2 + 2))))
    if kind == 4:  # hostile shape
        shapes: list[Any] = [
            (10**12,),
            (2**31, 2**31),
            (601,),
            (599,),
            (0,),
            (-1,),
            (1.5,),
            [600],
            (2**63,),
            (600, 1),
            (),
        ]
        return _replace(enc, shape=shapes[int(rng.integers(len(shapes)))])
    if kind in (5, 6) and enc.meta:  # perturb one meta value
        key = sorted(enc.meta)[int(rng.integers(len(enc.meta)))]
        values: list[Any] = [
            0,
            1,
            -1,
            2,
            2**63,
            -(2**63),
            10**40,
            0.5,
            float("nan"),
            float("inf"),
            None,
            "1",
            True,
            int(enc.meta[key]) + 1,
            int(enc.meta[key]) - 1,
        ]
        return _replace(enc, meta={**enc.meta, key: values[int(rng.integers(len(values)))]})
    if kind == 7:  # swap in another codec's name
        return _replace(enc, codec=list(CODECS)[int(rng.integers(len(CODECS)))])
    # flip bits in the index/scale area near the start
    if p:
        at = int(rng.integers(min(len(p), 64)))
        p[at] ^= 1 << int(rng.integers(8))
    return _replace(enc, payload=bytes(p))


@pytest.mark.parametrize("codec", list(CODECS))
def test_fuzz_decoder_only_raises_codec_error(codec: str) -> None:
    rng = np.random.default_rng(list(CODECS).index(codec))
    valid = [
        E[codec],
        encode(codec, X[:37], **_params(codec, ratio=0.3)),
        encode(codec, X, rng=rng, **_params(codec, ratio=0.6)),
    ]
    max_elements = 1000
    tracemalloc.start()
    try:
        for i in range(400):
            bad = _mutations(valid[i % len(valid)], rng)
            try:
                out = decode(bad, max_elements=max_elements)
            except CodecError as e:
                assert e.reason in REASONS
                continue
            assert out.dtype == np.float32 and out.size <= max_elements
            assert np.isfinite(out).all()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 512 * 1024, f"fuzzing {codec} allocated {peak} bytes at peak"


def test_codecs_and_compression_import_without_torch() -> None:
    code = (
        "import sys, devices.codecs, devices.compression, devices.downlink; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_encode_f32_rows_matches_encoding_each_row() -> None:
    from devices.codecs import encode_f32_rows

    rng = np.random.default_rng(7)
    block = rng.normal(size=(5, 33)).astype(np.float32)
    block[3, 4] = np.nan  # a diverged device: sent raw, refused at the gateway
    got = encode_f32_rows(block)
    assert len(got) == 5
    for k, enc in enumerate(got):
        if k == 3:
            assert enc.payload == block[3].astype("<f4").tobytes()
            with pytest.raises(CodecError):
                encode("f32", block[3])
        else:
            assert enc == encode("f32", block[k])
    with pytest.raises(ValueError, match="2-D"):
        encode_f32_rows(block[0])


def test_decode_rows_equals_decoding_each_alone() -> None:
    """The block path gives the rows, order and refusal reasons of one-by-one decode."""
    from devices.codecs import decode_rows

    n = 40
    rng = np.random.default_rng(3)
    good = [rng.normal(size=n).astype(np.float32) for _ in range(4)]
    nan = good[0].copy()
    nan[5] = np.inf
    encs: list[Any] = [
        encode("f32", good[0]),
        encode("int8", good[1]),  # another codec: decoded one by one
        Encoded("f32", (n,), nan.astype("<f4").tobytes(), {}),  # non-finite
        Encoded("f32", (n,), good[2].astype("<f4").tobytes()[:-4], {}),  # short payload
        encode("f32", good[2][: n - 1]),  # wrong shape
        "not an update",
        Encoded("f32", (n,), good[3].astype("<f4").tobytes(), {"x": 1}),  # unexpected meta
        encode("f32", good[3]),
    ]
    rows, kept, errors = decode_rows(encs, n)
    want_rows, want_kept, want_reasons = [], [], []
    for i, e in enumerate(encs):
        try:
            d = decode(e, max_elements=n)
            if d.shape != (n,):
                raise CodecError("bad-shape", f"update has shape {d.shape}")
        except CodecError as err:
            want_reasons.append((i, err.reason))
            continue
        want_rows.append(d)
        want_kept.append(i)
    assert kept == want_kept == [0, 1, 7]
    np.testing.assert_array_equal(rows, np.stack(want_rows))
    assert rows.dtype == np.float32
    assert [(i, e.reason) for i, e in errors] == want_reasons
    assert {r for _, r in want_reasons} >= {"non-finite", "bad-length", "bad-shape"}
    empty_rows, empty_kept, empty_errors = decode_rows([], n)
    assert empty_rows.shape == (0, n) and empty_kept == [] and empty_errors == []
