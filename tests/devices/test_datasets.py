"""Federated workloads: shapes, exact sizes, non-IID-ness, determinism, HAPT decoding safety."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from devices import datasets, hapt
from devices.datasets import FederatedDataset, load_federated, local_test_counts
from devices.hapt import HaptUnpickler, UnsafePickleError, load_hapt_windows, window_recording

HAVE_FASHION = (datasets.FASHION_DIR / "train-images-idx3-ubyte.gz").is_file()
needs_fashion = pytest.mark.skipif(
    not HAVE_FASHION, reason="Fashion-MNIST absent (Debian package dataset-fashion-mnist)"
)


def _check_devices(fd: FederatedDataset) -> None:
    for d in fd.devices:
        assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int64
        assert d.x_train.shape[1:] == fd.input_shape and d.x_test.shape[1:] == fd.input_shape
        assert d.x_train.shape[0] == d.y_train.shape[0] >= 1
        assert d.x_test.shape[0] == d.y_test.shape[0]
    assert fd.x_test.dtype == np.float32 and fd.y_test.dtype == np.int64
    assert fd.x_test.shape[1:] == fd.input_shape


def _label_histograms(fd: FederatedDataset) -> np.ndarray:
    h = np.stack([np.bincount(d.y_train, minlength=fd.num_classes) for d in fd.devices])
    return h / h.sum(axis=1, keepdims=True)


# --------------------------------------------------------------------------- digits


def test_digits_workload_is_exact() -> None:
    fd = load_federated("digits", 10, seed=0, alpha=0.5)
    _check_devices(fd)
    assert (fd.name, fd.input_shape, fd.num_classes) == ("digits", (64,), 10)
    x, y = fd.pooled_train()
    assert x.shape == (1437, 64) and y.shape == (1437,)
    assert fd.x_test.shape == (360, 64) and fd.y_test.shape == (360,)
    assert all(d.x_test.shape == (0, 64) for d in fd.devices)
    assert x.min() >= 0.0 and x.max() <= 1.0
    assert np.array_equal(np.bincount(fd.y_test), [36, 36, 35, 37, 36, 37, 36, 36, 35, 36])


def test_digits_is_deterministic_and_seeded() -> None:
    a = load_federated("digits", 8, seed=4, alpha=0.3)
    b = load_federated("digits", 8, seed=4, alpha=0.3)
    c = load_federated("digits", 8, seed=5, alpha=0.3)
    assert all(
        np.array_equal(p.x_train, q.x_train) and np.array_equal(p.y_train, q.y_train)
        for p, q in zip(a.devices, b.devices, strict=True)
    )
    assert any(p.y_train.size != q.y_train.size for p, q in zip(a.devices, c.devices, strict=True))


def test_digits_sizes_shape_device_totals() -> None:
    fd = load_federated("digits", 4, seed=0, alpha=1.0, sizes=[100, 100, 100, 400])
    totals = [d.y_train.size for d in fd.devices]
    assert sum(totals) == 1437
    assert totals[3] == pytest.approx(1437 * 4 / 7, rel=0.1)


# --------------------------------------------------------------------------- fashion


@needs_fashion
def test_fashion_shapes_dtypes_and_local_split() -> None:
    fd = load_federated("fashion", 50, seed=1, alpha=0.5)
    _check_devices(fd)
    assert (fd.input_shape, fd.num_classes) == ((1, 28, 28), 10)
    assert fd.x_test.shape == (10000, 1, 28, 28) and fd.y_test.shape == (10000,)
    n_train = sum(d.y_train.size for d in fd.devices)
    n_local = sum(d.y_test.size for d in fd.devices)
    assert n_train + n_local == 60000
    for d in fd.devices:
        n = d.y_train.size + d.y_test.size
        assert d.y_test.size == local_test_counts(np.array([n]))[0]
    assert fd.x_test.min() >= 0.0 and fd.x_test.max() == 1.0
    assert np.unique(_label_histograms(fd).argmax(axis=1)).size > 1  # devices differ


@needs_fashion
def test_fashion_ten_thousand_devices_is_fast_and_deterministic() -> None:
    load_federated("fashion", 2, seed=0)  # warm the raw-array cache
    start = time.perf_counter()
    a = load_federated("fashion", 10_000, seed=3, alpha=0.5)
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0, f"10,000 fashion devices took {elapsed:.2f} s"
    assert len(a.devices) == 10_000 and all(d.y_train.size >= 1 for d in a.devices)
    b = load_federated("fashion", 10_000, seed=3, alpha=0.5)
    for i in (0, 4999, 9999):
        assert np.array_equal(a.devices[i].x_train, b.devices[i].x_train)
        assert np.array_equal(a.devices[i].y_test, b.devices[i].y_test)


def test_fashion_missing_names_the_debian_package(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(datasets, "FASHION_DIR", tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_federated("fashion", 3)


def test_idx_parser_rejects_a_bad_header(tmp_path: Path) -> None:
    bad = tmp_path / "bad-idx.gz"
    bad.write_bytes(gzip.compress(b"\x00\x00\x0d\x01\x00\x00\x00\x02ab"))
    with pytest.raises(ValueError, match="not an unsigned-byte IDX"):
        datasets._read_idx(bad)
    short = tmp_path / "short-idx.gz"
    short.write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x05ab"))
    with pytest.raises(ValueError, match="holds 2 bytes"):
        datasets._read_idx(short)


# --------------------------------------------------------------------------- HAPT / har


def test_hapt_windows_shape_classes_subjects() -> None:
    w = load_hapt_windows()
    assert w.x.shape == (len(w), 6, 128) and w.x.dtype == np.float32
    assert w.y.dtype == np.int64 and set(np.unique(w.y)) == set(range(12))
    assert np.array_equal(np.unique(w.subject), np.arange(1, 31))
    assert len(w) > 10_000
    # Subject-major, time-ordered within each subject.
    assert np.all(np.diff(w.subject) >= 0)
    same = np.diff(w.subject) == 0
    assert np.all(np.diff(w.time)[same] == 1)


@pytest.mark.parametrize("num_devices", [30, 300, 31])
def test_har_devices_keep_every_window_once_in_time_order(num_devices: int) -> None:
    w = load_hapt_windows()
    fd = load_federated("har", num_devices)
    _check_devices(fd)
    assert (fd.input_shape, fd.num_classes, len(fd.devices)) == ((6, 128), 12, num_devices)
    # Undo the per-channel standardization with statistics of the pooled train windows:
    # devices laid end to end (train then local test) must reproduce the windows in order.
    is_test = np.concatenate(
        [np.r_[np.zeros(d.y_train.size, bool), np.ones(d.y_test.size, bool)] for d in fd.devices]
    )
    assert is_test.size == len(w), "every window exactly once"
    raw_train = w.x[~is_test].astype(np.float64)
    mean = raw_train.mean(axis=(0, 2))[None, :, None]
    std = raw_train.std(axis=(0, 2))[None, :, None]
    laid_out = np.concatenate([np.concatenate([d.x_train, d.x_test]) for d in fd.devices])
    assert np.allclose(laid_out, (w.x - mean) / std, atol=1e-4)
    assert np.array_equal(np.concatenate([np.r_[d.y_train, d.y_test] for d in fd.devices]), w.y)
    # Local test = union; pooled train is standardized.
    assert np.array_equal(fd.x_test, np.concatenate([d.x_test for d in fd.devices]))
    x, _ = fd.pooled_train()
    assert np.allclose(x.mean(axis=(0, 2)), 0, atol=1e-3)
    assert np.allclose(x.std(axis=(0, 2)), 1, atol=1e-3)


def test_har_fewer_devices_group_whole_subjects() -> None:
    w = load_hapt_windows()
    fd = load_federated("har", 7)
    _check_devices(fd)
    counts = np.bincount(w.subject)[1:]
    groups = np.array_split(np.arange(30), 7)  # consecutive subjects share a device
    n_test = local_test_counts(counts)
    for d, g in zip(fd.devices, groups, strict=True):
        assert d.y_test.size == n_test[g].sum()
        assert d.y_train.size == (counts[g] - n_test[g]).sum()
        expected = np.bincount(w.y[np.isin(w.subject, g + 1)], minlength=12)
        assert np.array_equal(np.bincount(np.r_[d.y_train, d.y_test], minlength=12), expected)
    x, _ = fd.pooled_train()
    assert np.allclose(x.mean(axis=(0, 2)), 0, atol=1e-3)


def test_har_devices_are_subjects_with_last_fifth_as_local_test() -> None:
    w = load_hapt_windows()
    fd = load_federated("har", 30)
    counts = np.bincount(w.subject)[1:]
    for d, n in zip(fd.devices, counts, strict=True):
        assert d.y_train.size + d.y_test.size == n
        assert d.y_test.size == local_test_counts(np.array([n]))[0]


def test_har_devices_are_non_iid() -> None:
    fd = load_federated("har", 300)
    hist = _label_histograms(fd)
    # Total-variation distance between device label histograms: clearly not IID.
    tv = 0.5 * np.abs(hist[:, None, :] - hist[None, :, :]).sum(axis=2)
    assert np.median(tv) > 0.3
    sizes = np.array([d.y_train.size + d.y_test.size for d in fd.devices])
    assert sizes.max() / sizes.min() < 1.25  # proportional allotment keeps chunks even


def test_har_ignores_seed_and_alpha() -> None:
    a = load_federated("har", 40, seed=0, alpha=0.5)
    b = load_federated("har", 40, seed=9, alpha=3.0)
    assert all(
        np.array_equal(p.x_train, q.x_train) for p, q in zip(a.devices, b.devices, strict=True)
    )


def test_window_recording_majority_and_unlabelled() -> None:
    t = 128 + 64 * 3  # four windows: starts 0, 64, 128, 192
    signals = np.arange(2 * t, dtype=np.float64).reshape(2, t)
    labels = np.full(t, 5)
    labels[:100] = -1  # window 0: 100 x -1 -> dropped
    labels[200:300] = 7  # window 2: 72 x 5 vs 56 x 7; window 3: 100 x 7
    x, y, start = window_recording(signals, labels)
    assert x.shape == (3, 2, 128) and x.dtype == np.float32
    assert np.array_equal(start, [64, 128, 192])
    assert np.array_equal(y, [5, 5, 7])
    assert np.array_equal(x[0, 1], signals[1, 64:192])
    # Ties go to the lowest label: half unlabelled is dropped, 3/4 split keeps 3.
    one = signals[:, :128]
    assert window_recording(one, np.r_[np.full(64, -1), np.full(64, 3)])[1].size == 0
    assert window_recording(one, np.r_[np.full(64, 4), np.full(64, 3)])[1].tolist() == [3]
    x, y, _ = window_recording(signals[:, :100], labels[:100])
    assert x.shape == (0, 2, 128) and y.size == 0
    with pytest.raises(ValueError, match="labels outside"):
        window_recording(signals, np.full(t, 13))


def test_hapt_cache_roundtrip(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TIERFL_CACHE", str(tmp_path))
    assert hapt.hapt_cache_dir() == tmp_path
    first = load_hapt_windows()
    cache = tmp_path / f"{hapt.HAPT_VERSION}.npz"
    assert cache.is_file()
    assert not any(p.name.endswith(".tmp.npz") for p in tmp_path.iterdir())
    hapt._load_cached.cache_clear()
    start = time.perf_counter()
    again = load_hapt_windows()
    assert time.perf_counter() - start < 1.0
    assert np.array_equal(first.x, again.x) and np.array_equal(first.subject, again.subject)
    assert not again.x.flags.writeable
    # A corrupt cache is rebuilt, not trusted.
    cache.write_bytes(b"not a zip")
    hapt._load_cached.cache_clear()
    rebuilt = load_hapt_windows()
    assert np.array_equal(rebuilt.y, first.y)
    hapt._load_cached.cache_clear()


# --------------------------------------------------------------------------- restricted unpickler


class _Evil:
    def __reduce__(self) -> tuple:
        return (os.system, ("echo pwned > /tmp/tierfl-pwned",))


def _unpickle(data: bytes) -> Any:
    return HaptUnpickler(io.BytesIO(data), source="test.pkl").load()


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_unpickler_refuses_os_system(protocol: int) -> None:
    with pytest.raises(UnsafePickleError, match=r"refusing to load global (os|posix)\.system"):
        _unpickle(pickle.dumps(_Evil(), protocol=protocol))


def test_unpickler_refuses_builtins_and_misused_helpers() -> None:
    with pytest.raises(UnsafePickleError, match=r"builtins\.eval"):
        _unpickle(b"cbuiltins\neval\n(S'1+1'\ntR.")
    with pytest.raises(UnsafePickleError, match="only pandas holders"):
        _unpickle(b"ccopy_reg\n_reconstructor\n(cbuiltins\nslice\ncbuiltins\nobject\nNtR.")
    with pytest.raises(UnsafePickleError, match="encoding 'rot13'"):
        _unpickle(b"c_codecs\nencode\n(X\x01\x00\x00\x00aX\x05\x00\x00\x00rot13tR.")


def test_unpickler_reads_numpy_protocol_2_and_pandas_holders() -> None:
    arr = np.arange(12, dtype=np.float64).reshape(3, 4)
    assert np.array_equal(_unpickle(pickle.dumps(arr, protocol=2)), arr)
    holder = _unpickle(b"cpandas.core.frame\nDataFrame\n)R}S'k'\nK\x01sb.")
    assert isinstance(holder, hapt._PandasState) and holder.fields() == {"k": 1}


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (("mnist", 3), {}, "unknown dataset 'mnist'; valid: har, fashion, digits"),
        (("digits", 0), {}, "num_devices must be >= 1"),
        (("digits", 2.0), {}, "num_devices must be an integer"),
        (("digits", 1438), {}, "num_devices=1438 exceeds the 1437 training samples"),
        (("har", 10**6), {}, "exceeds the"),
        (("digits", 3), {"alpha": 0}, "alpha must be a finite number > 0"),
        (("digits", 3), {"seed": -2}, "seed must be an integer >= 0"),
        (("digits", 3), {"sizes": [1, 2]}, "one entry per device"),
        (("digits", 3), {"sizes": [1, -2, 3]}, "device 1"),
    ],
)
def test_bad_arguments_raise_clear_errors(args: tuple, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_federated(*args, **kwargs)


def test_local_test_counts_rule() -> None:
    assert local_test_counts(np.array([0, 1, 2, 3, 5, 7, 8, 10, 100])).tolist() == [
        0,
        0,
        1,
        1,
        1,
        1,
        2,
        2,
        20,
    ]
