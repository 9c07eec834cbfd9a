"""Error feedback (nothing lost for good) and byte-budget codec choice."""

from __future__ import annotations

import numpy as np
import pytest

from devices.codecs import CodecError, decode, encode, max_encoded_size
from devices.compression import ErrorFeedback, fit_budget

LOSSY = [
    ("f16", {}),
    ("int8", {}),
    ("int4", {"chunk": 64}),
    ("topk-f16", {"ratio": 0.05}),
    ("topk-int8", {"ratio": 0.02}),
    ("topk-int4", {"k": 10}),
]


def _updates(rounds: int, n: int, seed: int) -> np.ndarray:
    """Updates with a persistent direction plus noise, like successive SGD deltas."""
    rng = np.random.default_rng(seed)
    drift = rng.standard_t(3, n) * 0.01
    return (drift + rng.standard_normal((rounds, n)) * 0.01).astype(np.float32)


@pytest.mark.parametrize("codec,params", LOSSY)
def test_decoded_sum_equals_update_sum_minus_final_residual(codec: str, params: dict) -> None:
    ups = _updates(40, 500, seed=1)
    ef = ErrorFeedback()
    rng = np.random.default_rng(2)
    decoded_sum = np.zeros(500)
    for u in ups:
        enc = ef.compress(u, codec, rng=rng, **params)
        decoded_sum += decode(enc, max_elements=500)
    assert ef.residual is not None
    gap = ups.astype(np.float64).sum(axis=0) - decoded_sum
    # sum(u_t) - sum(decoded_t) == residual_T: exact up to float64 rounding
    np.testing.assert_allclose(gap, ef.residual, rtol=0, atol=1e-12)


def test_residual_is_bounded_so_the_average_converges() -> None:
    n = 2000
    ups = _updates(400, n, seed=3)
    ef = ErrorFeedback()
    plain_sum = np.zeros(n)
    decoded_sum = np.zeros(n)
    true_sum = np.zeros(n)
    errors = {}
    for t, u in enumerate(ups, start=1):
        enc, dec = ef.step(u, "topk-int8", rng=np.random.default_rng(t), ratio=0.01)
        np.testing.assert_array_equal(dec, decode(enc, max_elements=n))
        decoded_sum += dec
        plain_sum += decode(encode("topk-int8", u, ratio=0.01), max_elements=n)
        true_sum += u
        if t in (20, 400):
            errors[t] = np.linalg.norm(true_sum - decoded_sum) / np.linalg.norm(true_sum)
    # the gap is one residual, which stays bounded while the sum grows ~ t
    assert errors[400] < errors[20] / 4
    assert errors[400] < 0.1
    # without feedback, 1 % top-k loses most of the accumulated update for good
    plain = np.linalg.norm(true_sum - plain_sum) / np.linalg.norm(true_sum)
    assert plain > 0.5 > 5 * errors[400]


def test_float32_residual_keeps_the_identity_to_float32_rounding() -> None:
    ups = _updates(30, 300, seed=4)
    ef = ErrorFeedback(dtype=np.float32)
    dec_sum = np.zeros(300)
    for u in ups:
        dec_sum += ef.step(u, "topk-int8", rng=np.random.default_rng(0), ratio=0.05)[1]
    assert ef.residual is not None and ef.residual.dtype == np.float32
    gap = ups.astype(np.float64).sum(axis=0) - dec_sum
    np.testing.assert_allclose(gap, ef.residual, rtol=0, atol=1e-6)


def test_lossless_codec_leaves_no_residual_and_shapes_survive() -> None:
    ef = ErrorFeedback()
    u = np.arange(12, dtype=np.float32).reshape(3, 4)
    enc = ef.compress(u, "f32")
    assert enc.shape == (3, 4)
    assert ef.residual is not None and not ef.residual.any()


def test_errors_leave_the_residual_untouched() -> None:
    ef = ErrorFeedback()
    ef.compress(np.full(10, 0.3, dtype=np.float32), "topk-f16", k=2)
    assert ef.residual is not None
    before = ef.residual.copy()
    with pytest.raises(CodecError, match="non-finite"):
        ef.compress(np.full(10, np.nan), "topk-f16", k=2)
    with pytest.raises(ValueError, match="reset"):
        ef.compress(np.zeros(11), "f16")
    np.testing.assert_array_equal(ef.residual, before)
    ef.reset()
    assert ef.residual is None
    ef.compress(np.zeros(11), "f16")


# ---------------------------------------------------------------- fit_budget


@pytest.mark.parametrize("n", [10_000, 8_620])
def test_dense_codecs_at_their_exact_sizes(n: int) -> None:
    sizes = {
        c: max_encoded_size(c, n, **({"chunk": 256} if c[:3] == "int" else {}))
        for c in ("f32", "f16", "int8", "int4")
    }
    assert fit_budget(n, 50_000)[0] == "f32"  # 8,620 or 10,000 floats fit 50 KB as f32
    for codec, size in sizes.items():
        assert fit_budget(n, size)[0] == codec
    assert fit_budget(n, sizes["f32"] - 1)[0] == "f16"
    assert fit_budget(n, sizes["int8"]) == ("int8", {"chunk": 256})
    codec, params = fit_budget(n, sizes["int4"] - 1)
    assert codec == "topk-int8" and params["k"] > n // 3


@pytest.mark.parametrize("budget", [12, 100, 500, 1_000, 2_500, 4_000])
def test_topk_budget_is_met_and_k_is_maximal(budget: int) -> None:
    n = 8_620
    codec, params = fit_budget(n, budget)
    assert codec == "topk-int8"
    k = params["k"]
    assert 1 <= k < n
    assert max_encoded_size(codec, n, **params) <= budget
    assert max_encoded_size(codec, n, **{**params, "k": k + 1}) > budget
    rng = np.random.default_rng(budget)
    spread = np.zeros(n, dtype=np.float32)
    spread[np.linspace(0, n - 1, k).astype(int)] = 1.0  # evenly spread: the costliest indices
    for x in (rng.standard_normal(n).astype(np.float32), spread):
        assert encode(codec, x, rng=rng, **params).nbytes <= budget


def test_budget_too_small_and_bad_arguments() -> None:
    with pytest.raises(ValueError, match="no codec"):
        fit_budget(8_620, 6)
    with pytest.raises(ValueError, match="unknown codec"):
        fit_budget(10, 100, preference=("zip",))
    with pytest.raises(ValueError):
        fit_budget(-1, 100)
    assert fit_budget(0, 0) == ("f32", {})
    assert fit_budget(1000, 300, preference=("f16", "topk-f16"))[0] == "topk-f16"
