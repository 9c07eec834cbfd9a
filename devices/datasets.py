"""Federated datasets: real data split over a fleet of devices, non-IID.

Three workloads, from tiny to realistic:

- ``digits``: sklearn's 8x8 digits (1,797 images), for fast tests.
- ``fashion``: Fashion-MNIST (60k/10k, 28x28), from the Debian package
  ``dataset-fashion-mnist``; label skew from a Dirichlet split.
- ``har``: UCI HAPT smartphone activity windows; devices are the *subjects*,
  so the skew is natural (people move differently and do different things).

Every Ray actor process calls :func:`load_federated` on its own and must get
the same devices, so loading is a pure function of its arguments. It is also
vectorised: each device's arrays are views into one array laid out device by
device, so 10,000 Fashion devices load in about a second and share memory.
"""

from __future__ import annotations

import gzip
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from devices.hapt import NUM_CLASSES as HAPT_CLASSES
from devices.hapt import load_hapt_windows
from devices.partition import dirichlet_partition, split_contiguous

__all__ = [
    "DATASETS",
    "FASHION_DIR",
    "LOCAL_TEST_FRACTION",
    "DeviceData",
    "FederatedDataset",
    "load_federated",
    "local_test_counts",
]

DATASETS = ("har", "fashion", "digits")
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
LOCAL_TEST_FRACTION = 0.2
# Stream tag that separates the local-test shuffle from the partition's own rng.
_SPLIT_STREAM = 0x7E57


@dataclass(frozen=True)
class DeviceData:
    """One device's private data: what it trains on and what it evaluates on locally."""

    x_train: np.ndarray  # float32, shape (n, *input_shape)
    y_train: np.ndarray  # int64, shape (n,)
    x_test: np.ndarray  # local test split (may be empty)
    y_test: np.ndarray


@dataclass(frozen=True)
class FederatedDataset:
    """A workload: its devices plus a global held-out test set for the server."""

    name: str  # "har" | "fashion" | "digits"
    input_shape: tuple[int, ...]  # har (6, 128); fashion (1, 28, 28); digits (64,)
    num_classes: int
    devices: list[DeviceData]
    x_test: np.ndarray  # global held-out test set (float32)
    y_test: np.ndarray

    def pooled_train(self) -> tuple[np.ndarray, np.ndarray]:
        """All devices' training data concatenated (the centralised baseline)."""
        if not self.devices:
            return np.empty((0, *self.input_shape), np.float32), np.empty(0, np.int64)
        return (
            np.concatenate([d.x_train for d in self.devices]),
            np.concatenate([d.y_train for d in self.devices]),
        )


# ---------------------------------------------------------------------------
# Layout helpers
# ---------------------------------------------------------------------------


def local_test_counts(sizes: np.ndarray) -> np.ndarray:
    """How many of each device's samples go to its local test split.

    20 % rounded half up, but at least one when a device has two or more
    samples (so every such device can evaluate) and never all of them (so
    every device can train).
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    k = np.floor(sizes * LOCAL_TEST_FRACTION + 0.5).astype(np.int64)
    k = np.where(sizes >= 2, np.maximum(k, 1), 0)
    return np.minimum(k, np.maximum(sizes - 1, 0))


def _build_devices(
    x: np.ndarray,
    y: np.ndarray,
    index: np.ndarray,
    owner: np.ndarray,
    is_test: np.ndarray,
    num_devices: int,
    prepare: Callable[[np.ndarray], np.ndarray],
) -> tuple[list[DeviceData], np.ndarray, np.ndarray]:
    """Gather samples device by device (train, then local test) and cut views.

    Sample ``index[i]`` of ``x``/``y`` belongs to device ``owner[i]`` and is local
    test when ``is_test[i]``; within a device's train or test part samples keep
    the order of ``index``. ``prepare`` turns the gathered raw block into model
    input once (one array for the whole fleet, so 10,000 devices cost 10,000
    views, not 10,000 copies). Returns the devices and the concatenated local
    test sets, in device order.
    """
    order = np.lexsort((np.arange(index.size), is_test, owner))
    xs, ys = prepare(x[index[order]]), y[index[order]]
    n_dev = np.bincount(owner, minlength=num_devices)
    n_test = np.bincount(owner[is_test], minlength=num_devices)
    starts = np.concatenate(([0], np.cumsum(n_dev)))
    mids = starts[1:] - n_test
    devices = [
        DeviceData(x_train=xs[a:m], y_train=ys[a:m], x_test=xs[m:b], y_test=ys[m:b])
        for a, m, b in zip(starts[:-1].tolist(), mids.tolist(), starts[1:].tolist(), strict=True)
    ]
    test_mask = is_test[order]
    return devices, xs[test_mask], ys[test_mask]


def _random_local_split(
    parts: list[np.ndarray],
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sample index, owner and local-test flag for a random 20 % split of every device."""
    lengths = np.array([p.size for p in parts], dtype=np.int64)
    index = np.concatenate(parts)
    owner = np.repeat(np.arange(len(parts)), lengths)
    key = np.random.default_rng([seed, _SPLIT_STREAM]).random(index.size)
    shuffled = np.lexsort((key, owner))  # random order within each device
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    position = np.empty(index.size, dtype=np.int64)
    position[shuffled] = np.arange(index.size) - starts[owner[shuffled]]
    is_test = position < local_test_counts(lengths)[owner]
    return index, owner, is_test


# ---------------------------------------------------------------------------
# Raw data (memoised per process; read-only so no caller can corrupt the cache)
# ---------------------------------------------------------------------------


def _readonly(*arrays: np.ndarray) -> None:
    for arr in arrays:
        arr.flags.writeable = False


@lru_cache(maxsize=1)
def _digits_raw() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    arrays = (
        np.ascontiguousarray(x_tr),
        np.ascontiguousarray(x_te),
        np.ascontiguousarray(y_tr),
        np.ascontiguousarray(y_te),
    )
    _readonly(*arrays)
    return arrays


def _read_idx(path: Path) -> np.ndarray:
    """Parse one gzipped IDX file (the MNIST format: magic, dims, raw uint8)."""
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex()})")
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    if len(data) != header + math.prod(dims):
        raise ValueError(f"{path}: IDX header says {dims} but holds {len(data) - header} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


@lru_cache(maxsize=1)
def _fashion_raw(directory: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    root = Path(directory)
    names = (
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    )
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST not found: {root} lacks {', '.join(missing)}; install the Debian "
            "package dataset-fashion-mnist (apt-get install dataset-fashion-mnist)"
        )
    x_tr, y_tr, x_te, y_te = (_read_idx(root / n) for n in names)
    if x_tr.shape[0] != y_tr.shape[0] or x_te.shape[0] != y_te.shape[0]:
        raise ValueError(f"{root}: image and label counts differ")
    return x_tr, y_tr.astype(np.int64), x_te, y_te.astype(np.int64)


def _fashion_pixels(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.float32) / np.float32(255.0)).reshape(-1, 1, 28, 28)


# ---------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------


def _check_capacity(name: str, num_devices: int, available: int) -> None:
    if num_devices > available:
        raise ValueError(
            f"load_federated({name!r}): num_devices={num_devices} exceeds the {available} "
            "training samples; every device needs at least one"
        )


def _load_digits(
    num_devices: int, seed: int, alpha: float, sizes: Sequence[int] | None
) -> FederatedDataset:
    x_tr, x_te, y_tr, y_te = _digits_raw()
    _check_capacity("digits", num_devices, y_tr.size)
    parts = dirichlet_partition(y_tr, num_devices, alpha, seed, sizes)
    empty_x, empty_y = np.empty((0, 64), np.float32), np.empty(0, np.int64)
    devices = [
        DeviceData(x_train=x_tr[p], y_train=y_tr[p], x_test=empty_x, y_test=empty_y) for p in parts
    ]
    return FederatedDataset(
        name="digits",
        input_shape=(64,),
        num_classes=10,
        devices=devices,
        x_test=x_te.copy(),
        y_test=y_te.copy(),
    )


def _load_fashion(
    num_devices: int, seed: int, alpha: float, sizes: Sequence[int] | None
) -> FederatedDataset:
    x_tr, y_tr, x_te, y_te = _fashion_raw(str(FASHION_DIR))
    _check_capacity("fashion", num_devices, y_tr.size)
    parts = dirichlet_partition(y_tr, num_devices, alpha, seed, sizes)
    index, owner, is_test = _random_local_split(parts, seed)
    devices, _, _ = _build_devices(x_tr, y_tr, index, owner, is_test, num_devices, _fashion_pixels)
    return FederatedDataset(
        name="fashion",
        input_shape=(1, 28, 28),
        num_classes=10,
        devices=devices,
        x_test=_fashion_pixels(x_te),
        y_test=y_te.copy(),
    )


def _allot_devices(counts: np.ndarray, num_devices: int) -> np.ndarray:
    """Devices per subject, proportional to window counts (largest remainder, >= 1, <= count)."""
    quota = num_devices * counts / counts.sum()
    alloc = np.clip(np.floor(quota).astype(np.int64), 1, counts)
    while alloc.sum() > num_devices:  # the minimum of one pushed us over: take from the richest
        alloc[np.argmax(np.where(alloc > 1, alloc - quota, -np.inf))] -= 1
    while alloc.sum() < num_devices:  # largest remainder among subjects with spare windows
        alloc[np.argmax(np.where(alloc < counts, quota - alloc, -np.inf))] += 1
    return alloc


def _har_segments(subject: np.ndarray, num_devices: int) -> tuple[np.ndarray, np.ndarray]:
    """Device and segment of every window (windows are subject-major, time-ordered).

    A segment is a contiguous stretch of one subject's timeline. With at least
    one device per subject, devices are allotted to subjects in proportion to
    their window counts and each subject's timeline is cut into that many
    contiguous chunks (segment = device). With fewer devices than subjects,
    consecutive subjects share a device and each subject is one segment.
    """
    ids, counts = np.unique(subject, return_counts=True)
    subj_pos = np.searchsorted(ids, subject)
    if num_devices < ids.size:
        bounds = split_contiguous(ids.size, num_devices)
        device_of_subject = np.repeat(np.arange(num_devices), np.diff(bounds))
        return device_of_subject[subj_pos], subj_pos
    alloc = _allot_devices(counts, num_devices)
    first_device = np.concatenate(([0], np.cumsum(alloc)[:-1]))
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    device = np.empty(subject.size, dtype=np.int64)
    for s, (start, count, parts) in enumerate(zip(starts, counts, alloc, strict=True)):
        bounds = split_contiguous(int(count), int(parts))
        chunk = np.searchsorted(bounds, np.arange(count), side="right") - 1
        device[start : start + count] = first_device[s] + chunk
    return device, device


def _load_har(num_devices: int) -> FederatedDataset:
    windows = load_hapt_windows()
    _check_capacity("har", num_devices, len(windows))
    # Windows are sorted by (subject, time), so index order is time order.
    device, segment = _har_segments(windows.subject, num_devices)
    seg_sizes = np.bincount(segment)
    seg_start = np.concatenate(([0], np.cumsum(seg_sizes)[:-1]))
    position = np.arange(segment.size) - seg_start[segment]
    # The last 20 % in time of every segment is local test: the device is
    # evaluated on its own future, not on samples interleaved with training.
    # (Windows overlap by 50 %, so only the one boundary pair shares samples.)
    is_test = position >= seg_sizes[segment] - local_test_counts(seg_sizes)[segment]
    train = windows.x[~is_test]
    mean = train.mean(axis=(0, 2), dtype=np.float64)[None, :, None].astype(np.float32)
    std = train.std(axis=(0, 2), dtype=np.float64)[None, :, None].astype(np.float32)
    std[std == 0] = 1.0
    del train

    def standardize(block: np.ndarray) -> np.ndarray:
        # Statistics from pooled *train* windows only: no test information leaks in.
        block -= mean
        block /= std
        return block

    devices, x_test, y_test = _build_devices(
        windows.x, windows.y, np.arange(len(windows)), device, is_test, num_devices, standardize
    )
    return FederatedDataset(
        name="har",
        input_shape=(6, 128),
        num_classes=HAPT_CLASSES,
        devices=devices,
        x_test=x_test,
        y_test=y_test,
    )


def _validate(
    name: object, num_devices: object, seed: object, alpha: object, sizes: Sequence[int] | None
) -> None:
    if name not in DATASETS:
        raise ValueError(f"load_federated: unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
    if isinstance(num_devices, bool) or not isinstance(num_devices, (int, np.integer)):
        raise ValueError(f"load_federated: num_devices must be an integer, got {num_devices!r}")
    if num_devices < 1:
        raise ValueError(f"load_federated: num_devices must be >= 1, got {num_devices}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"load_federated: seed must be an integer >= 0, got {seed!r}")
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, (int, float, np.integer, np.floating))
        or not (alpha > 0 and math.isfinite(alpha))
    ):
        raise ValueError(f"load_federated: alpha must be a finite number > 0, got {alpha!r}")
    if sizes is not None:
        arr = np.asarray(sizes, dtype=np.float64)
        if arr.shape != (num_devices,):
            raise ValueError(
                f"load_federated: sizes must have one entry per device ({num_devices}), "
                f"got shape {arr.shape}"
            )
        bad = np.flatnonzero(~(np.isfinite(arr) & (arr > 0)))
        if bad.size:
            raise ValueError(
                f"load_federated: sizes must be > 0; device {int(bad[0])} has {arr[bad[0]]!r}"
            )


def load_federated(
    name: str,
    num_devices: int,
    *,
    seed: int = 0,
    alpha: float = 0.5,
    sizes: Sequence[int] | None = None,
) -> FederatedDataset:
    """Split workload ``name`` over ``num_devices`` devices (deterministic in all arguments).

    ``alpha`` and ``seed`` drive the Dirichlet label split of ``digits`` and
    ``fashion``; ``sizes`` (e.g. the topology's per-device ``samples``) makes
    their device totals proportional to it. ``har`` is split by subject and time,
    which is already non-IID, so it ignores ``seed``, ``alpha`` and ``sizes``.
    """
    _validate(name, num_devices, seed, alpha, sizes)
    k, s, a = int(num_devices), int(seed), float(alpha)
    if name == "digits":
        return _load_digits(k, s, a, sizes)
    if name == "fashion":
        return _load_fashion(k, s, a, sizes)
    return _load_har(k)
