"""Properties of the Dirichlet non-IID split and the contiguous splitter."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from devices.partition import dirichlet_partition, split_contiguous


def _labels(n: int = 3000, classes: int = 10, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, classes, n)


def _assert_partition(parts: list[np.ndarray], n: int, k: int) -> None:
    assert len(parts) == k
    assert all(p.dtype == np.int64 and p.ndim == 1 for p in parts)
    assert all(p.size >= 1 for p in parts), "no client may be empty"
    assert all(np.all(np.diff(p) > 0) for p in parts), "indices sorted, no duplicates"
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(n)), "every index exactly once"


def _mean_label_entropy(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    ent = []
    for p in parts:
        h = np.bincount(labels[p], minlength=10) / p.size
        h = h[h > 0]
        ent.append(float(-(h * np.log(h)).sum()))
    return float(np.mean(ent))


@pytest.mark.parametrize(("k", "alpha"), [(1, 0.5), (7, 0.5), (50, 0.05), (300, 0.1), (20, 100.0)])
def test_partition_is_a_covering_disjoint_split(k: int, alpha: float) -> None:
    y = _labels()
    _assert_partition(dirichlet_partition(y, k, alpha, seed=3), y.size, k)


def test_every_client_gets_data_even_when_clients_equal_samples() -> None:
    y = _labels(n=200)
    parts = dirichlet_partition(y, 200, 0.01, seed=0)
    _assert_partition(parts, 200, 200)
    assert all(p.size == 1 for p in parts)


def test_tiny_alpha_many_clients_leaves_nobody_empty() -> None:
    y = _labels(n=1000)
    _assert_partition(dirichlet_partition(y, 900, 0.001, seed=5), 1000, 900)


def test_deterministic_for_a_seed_and_seed_sensitive() -> None:
    y = _labels()
    a = dirichlet_partition(y, 25, 0.3, seed=11)
    b = dirichlet_partition(y, 25, 0.3, seed=11)
    c = dirichlet_partition(y, 25, 0.3, seed=12)
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c, strict=True))


def test_skew_decreases_as_alpha_grows() -> None:
    y = _labels()
    ent = [
        _mean_label_entropy(y, dirichlet_partition(y, 30, a, seed=0))
        for a in (0.05, 0.5, 5.0, 100.0)
    ]
    assert ent == sorted(ent), ent
    assert ent[0] < 1.0 < 2.0 < ent[-1]  # near single-class vs near uniform (ln 10 = 2.30)


def test_sizes_make_totals_proportional_and_keep_the_skew() -> None:
    y = _labels(n=6000)
    sizes = [1] * 10 + [4] * 10
    parts = dirichlet_partition(y, 20, 0.1, seed=2, sizes=sizes)
    _assert_partition(parts, y.size, 20)
    totals = np.array([p.size for p in parts], dtype=float)
    expected = np.asarray(sizes) / sum(sizes) * y.size
    assert np.allclose(totals, expected, rtol=0.05)
    plain = dirichlet_partition(y, 20, 0.1, seed=2)
    assert _mean_label_entropy(y, parts) < 1.5  # still strongly non-IID
    assert abs(_mean_label_entropy(y, parts) - _mean_label_entropy(y, plain)) < 0.5


def test_missing_classes_and_unusual_label_values_are_fine() -> None:
    y = np.array([7] * 50 + [-3] * 30 + [100] * 20)
    _assert_partition(dirichlet_partition(y, 9, 0.5, seed=0), y.size, 9)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_clients": 0}, "num_clients must be >= 1"),
        ({"num_clients": 2.5}, "num_clients must be an integer"),
        ({"num_clients": 101}, "exceeds the 100 samples"),
        ({"alpha": 0.0}, "alpha must be a finite number > 0"),
        ({"alpha": -1.0}, "alpha must be a finite number > 0"),
        ({"alpha": float("nan")}, "alpha must be a finite number > 0"),
        ({"seed": -1}, "seed must be >= 0"),
        ({"sizes": [1, 2]}, "one entry per client"),
        ({"sizes": [1, 0, 1, 1]}, "client 1"),
        ({"labels": np.zeros((10, 10), dtype=int)}, "must be 1-D"),
        ({"labels": np.zeros(100)}, "must be integers"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs: dict, match: str) -> None:
    args: dict[str, Any] = {"labels": _labels(n=100), "num_clients": 4, "alpha": 0.5, "seed": 0}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        dirichlet_partition(**args)


@pytest.mark.parametrize(("n", "parts"), [(10, 3), (7, 7), (5, 1), (0, 2), (3, 5)])
def test_split_contiguous_matches_array_split(n: int, parts: int) -> None:
    bounds = split_contiguous(n, parts)
    pieces = np.array_split(np.arange(n), parts)
    assert bounds[0] == 0 and bounds[-1] == n
    assert np.diff(bounds).tolist() == [p.size for p in pieces]


def test_split_contiguous_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="parts must be >= 1"):
        split_contiguous(5, 0)
    with pytest.raises(ValueError, match="n must be >= 0"):
        split_contiguous(-1, 2)
