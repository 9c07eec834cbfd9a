import numpy as np
import pytest

from gateway.partial_aggregate import PartialAggregate, combine


def test_add_and_add_batch_match_numpy_weighted_sum():
    rng = np.random.default_rng(0)
    deltas = rng.normal(size=(7, 11)).astype(np.float32)
    weights = rng.integers(1, 50, size=7).astype(np.float64)
    a = PartialAggregate.empty("gw0", 1, 11)
    for i in range(7):
        a.add(f"d{i}", deltas[i], weights[i])
    b = PartialAggregate.empty("gw0", 1, 11)
    b.add_batch([f"d{i}" for i in range(7)], deltas, weights)
    expected = (weights[:, None] * deltas.astype(np.float64)).sum(0)
    np.testing.assert_allclose(a.weighted_sum, expected, rtol=1e-12)
    np.testing.assert_allclose(b.weighted_sum, expected, rtol=1e-12)
    assert a.total_weight == b.total_weight == weights.sum()
    assert a.count == b.count == 7
    assert b.devices == [f"d{i}" for i in range(7)]


def test_combine_is_the_sum_over_gateways_and_divides_to_fedavg():
    rng = np.random.default_rng(1)
    parts, all_d, all_w = [], [], []
    for g in range(4):
        n = g + 1
        d = rng.normal(size=(n, 5))
        w = rng.integers(1, 9, size=n).astype(float)
        p = PartialAggregate.empty(f"gw{g}", 3, 5)
        p.add_batch([f"x{g}{i}" for i in range(n)], d, w)
        parts.append(p)
        all_d.append(d)
        all_w.append(w)
    total, weight, count = combine(parts, 5)
    d = np.concatenate(all_d)
    w = np.concatenate(all_w)
    np.testing.assert_allclose(total / weight, np.average(d, axis=0, weights=w), rtol=1e-12)
    assert count == len(w)


@pytest.mark.parametrize(
    "delta,weight,match",
    [
        (np.zeros(4), 1.0, "shape"),
        (np.zeros(5), -1.0, "invalid weight"),
        (np.zeros(5), float("nan"), "invalid weight"),
    ],
)
def test_add_rejects_bad_updates_with_a_reason(delta, weight, match):
    p = PartialAggregate.empty("gw", 0, 5)
    with pytest.raises(ValueError, match=match):
        p.add("dev7", delta, weight)
    assert p.count == 0


def test_combine_rejects_mismatched_shapes():
    p = PartialAggregate.empty("gwX", 0, 3)
    with pytest.raises(ValueError, match="gwX"):
        combine([p], 4)
