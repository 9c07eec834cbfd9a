"""Non-IID partitioning of a labelled training set over federated clients.

Real fleets are not IID: one phone sees mostly cats, another mostly shoes.
The usual benchmark model of that skew is the per-class Dirichlet split
(Hsu et al., 2019): every class is divided over the clients with proportions
drawn from ``Dir(alpha)``; small ``alpha`` gives each client a few dominant
classes, large ``alpha`` approaches an IID split. Everything here is pure
numpy and deterministic for a seed, because several processes (Ray actors)
rebuild the same partition independently and must agree on it.
"""

from __future__ import annotations

import heapq
import math
import operator
from collections.abc import Sequence

import numpy as np

__all__ = ["dirichlet_partition", "split_contiguous"]

# Iterations of proportional fitting used to make client totals follow `sizes`;
# it converges geometrically, and 50 rounds is far below the cost of a split.
_FIT_ITERATIONS = 50


def _as_count(value: object, what: str) -> int:
    """Accept Python and numpy integers (not bools, not floats) for a count argument."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{what} must be an integer, got {value!r}") from None


def split_contiguous(n: int, parts: int) -> np.ndarray:
    """Boundaries that cut ``range(n)`` into ``parts`` contiguous, near-equal pieces.

    Returns an int64 array ``b`` of length ``parts + 1`` with ``b[0] == 0`` and
    ``b[-1] == n``; piece ``i`` is ``range(b[i], b[i + 1])``. The first ``n % parts``
    pieces are one longer, exactly like ``np.array_split``, but as boundaries so a
    caller can slice one big array into views instead of copying pieces.
    """
    n = _as_count(n, "split_contiguous: n")
    parts = _as_count(parts, "split_contiguous: parts")
    if n < 0:
        raise ValueError(f"split_contiguous: n must be >= 0, got {n}")
    if parts < 1:
        raise ValueError(f"split_contiguous: parts must be >= 1, got {parts}")
    base, extra = divmod(n, parts)
    lengths = np.full(parts, base, dtype=np.int64)
    lengths[:extra] += 1
    bounds = np.zeros(parts + 1, dtype=np.int64)
    np.cumsum(lengths, out=bounds[1:])
    return bounds


def _validate(
    labels: np.ndarray,
    num_clients: object,
    alpha: object,
    seed: object,
    sizes: Sequence[int] | None,
) -> tuple[np.ndarray, int, float, int, np.ndarray | None]:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"dirichlet_partition: labels must be 1-D, got shape {labels.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"dirichlet_partition: labels must be integers, got dtype {labels.dtype}")
    k = _as_count(num_clients, "dirichlet_partition: num_clients")
    if k < 1:
        raise ValueError(f"dirichlet_partition: num_clients must be >= 1, got {k}")
    if k > labels.size:
        raise ValueError(
            f"dirichlet_partition: num_clients={k} exceeds the {labels.size} samples; "
            "every client needs at least one sample"
        )
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.integer, np.floating)):
        raise ValueError(f"dirichlet_partition: alpha must be a number, got {alpha!r}")
    a = float(alpha)
    if not (a > 0 and math.isfinite(a)):
        raise ValueError(f"dirichlet_partition: alpha must be a finite number > 0, got {alpha!r}")
    s = _as_count(seed, "dirichlet_partition: seed")
    if s < 0:
        raise ValueError(f"dirichlet_partition: seed must be >= 0, got {s}")
    weights: np.ndarray | None = None
    if sizes is not None:
        weights = np.asarray(sizes, dtype=np.float64)
        if weights.shape != (k,):
            raise ValueError(
                f"dirichlet_partition: sizes must have one entry per client ({k}), "
                f"got shape {weights.shape}"
            )
        bad = np.flatnonzero(~(np.isfinite(weights) & (weights > 0)))
        if bad.size:
            raise ValueError(
                f"dirichlet_partition: sizes must be finite and > 0; client {int(bad[0])} "
                f"has {weights[bad[0]]!r}"
            )
    return labels, k, a, s, weights


def _fit_to_sizes(props: np.ndarray, class_counts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Reweight per-class proportions so expected client totals follow ``sizes``.

    ``props`` is (classes, clients) with rows summing to 1. Multiplying a column
    by a client weight and renormalising rows keeps each client's *relative*
    class mix (the Dirichlet skew) while scaling its share; iterative
    proportional fitting finds the weights that make ``class_counts @ props``
    proportional to ``sizes`` (as closely as the drawn proportions allow).
    """
    target = sizes / sizes.sum() * class_counts.sum()
    weights = sizes / sizes.sum()
    fitted = props
    for _ in range(_FIT_ITERATIONS):
        fitted = props * weights
        row = fitted.sum(axis=1, keepdims=True)
        fitted = np.divide(
            fitted, row, out=np.full_like(fitted, 1.0 / fitted.shape[1]), where=row > 0
        )
        achieved = class_counts @ fitted
        ratio = np.divide(target, achieved, out=np.ones_like(target), where=achieved > 0)
        weights = weights * ratio
        weights = weights / weights.sum()
    return fitted


def dirichlet_partition(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    seed: int,
    sizes: Sequence[int] | None = None,
) -> list[np.ndarray]:
    """Split sample indices over ``num_clients`` with per-class Dirichlet(alpha) skew.

    For each class (in ascending label order) the class's indices are shuffled
    and divided at the cumulative proportions of one ``Dir(alpha * ones)`` draw.
    With ``sizes`` the proportions are weighted so client totals follow
    ``sizes`` (relative targets, not absolute counts: every sample is still
    assigned). Afterwards every empty client takes one sample from the client
    that is currently largest, so no client is left without data.

    Returns one sorted int64 index array per client; together they are a
    permutation of ``range(len(labels))`` (disjoint, covering). Deterministic
    for ``(labels, num_clients, alpha, seed, sizes)``.
    """
    labels, k, a, s, weights = _validate(labels, num_clients, alpha, seed, sizes)
    rng = np.random.default_rng(s)

    classes = np.unique(labels)
    shuffled: list[np.ndarray] = []
    props = np.empty((classes.size, k), dtype=np.float64)
    for row, cls in enumerate(classes):
        shuffled.append(rng.permutation(np.flatnonzero(labels == cls)))
        p = rng.dirichlet(np.full(k, a))
        total = p.sum()
        # Tiny alpha can underflow every component; fall back to a uniform row.
        props[row] = p / total if np.isfinite(total) and total > 0 else 1.0 / k
    class_counts = np.array([idx.size for idx in shuffled], dtype=np.float64)
    if weights is not None:
        props = _fit_to_sizes(props, class_counts, weights)

    # Owner of each shuffled index: cut each class at its cumulative proportions.
    owners = np.empty(labels.size, dtype=np.int64)
    start = 0
    for idx, p in zip(shuffled, props, strict=True):
        cuts = (np.cumsum(p) * idx.size).astype(np.int64)
        cuts[-1] = idx.size
        counts = np.diff(np.concatenate(([0], np.minimum.accumulate(cuts[::-1])[::-1])))
        owners[start : start + idx.size] = np.repeat(np.arange(k), counts)
        start += idx.size
    order = np.concatenate(shuffled) if shuffled else np.empty(0, dtype=np.int64)

    # Group by owner (stable: within a client, class order then shuffled order).
    by_owner = np.argsort(owners, kind="stable")
    grouped = order[by_owner]
    sizes_now = np.bincount(owners, minlength=k)
    bounds = np.concatenate(([0], np.cumsum(sizes_now)))
    parts = [grouped[bounds[i] : bounds[i + 1]] for i in range(k)]

    empty = np.flatnonzero(sizes_now == 0)
    if empty.size:
        # Max-heap on (size, lowest id first) so ties resolve deterministically.
        heap = [(-int(n), i) for i, n in enumerate(sizes_now) if n > 0]
        heapq.heapify(heap)
        for e in empty:
            neg, donor = heapq.heappop(heap)
            parts[e] = parts[donor][-1:]
            parts[donor] = parts[donor][:-1]
            heapq.heappush(heap, (neg + 1, donor))
            heapq.heappush(heap, (-1, int(e)))
    return [np.sort(part).astype(np.int64, copy=False) for part in parts]
