"""A standalone gateway's own rounds: serve a model, close on time or quorum, keep the aggregate.

In a full deployment the cloud publishes models and closes rounds (through
the Ray actor of :mod:`gateway.ray_relay`). A gateway on its own -- a pilot
on one edge server, a lab bench, an end-to-end test -- still needs rounds to
take updates in, so ``tierfl gateway serve`` has a minimal local driver,
configured by the ``[rounds]`` table of the gateway's TOML file::

    [rounds]
    model = "models/initial.npz"      # .npz (one array per tensor, in order), .npy,
                                      # or "init:<model>:<dataset>" / "init:<dataset>"
    seed = 0                          # init: the initialization seed
    encoding = "f32"                  # the update codec devices are asked for
    duration_s = 30.0                 # a round closes after this long ...
    quorum = 0                        # ... or once this many updates were accepted (0: off)
    out = "/var/lib/tierfl/rounds"    # where each round's partial aggregate is written
    max_rounds = 0                    # stop (and exit 0) after this many rounds; 0: never
    apply = false                     # true: fold each round's FedAvg into the model

Each closed round with at least one accepted update is written to
``<out>/<gateway>-round-<round:06d>.npz`` (atomically: temp file + rename)
with the :class:`PartialAggregate`'s fields (``weighted_sum`` -- never divided,
as the cloud expects it --, ``total_weight``, ``count``, ``devices``) plus
``round``, ``gateway``, ``base`` (the model hash the updates were computed
from), ``encoding`` and ``closed_at`` (Unix seconds). Then the next round opens
on the same model, or, with ``apply = true``, on the model plus the round's
weighted mean update (a one-gateway FedAvg, handy to watch a pilot learn).

``model`` also gives the gateway its tensor shapes, so it is required even
when the cloud drives the rounds (``--ray-address``). The ``init:`` form
builds the model with torch (the ``emulation`` extra); an edge server without
torch reads a file written on a machine with it by ``tierfl gateway
init-model``. Numpy only at import.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from devices.codecs import CODECS
from gateway.config import ConfigError, build_section
from gateway.partial_aggregate import PartialAggregate

__all__ = [
    "LocalRoundDriver",
    "ModelSource",
    "RoundControl",
    "RoundsConfig",
    "aggregate_path",
    "init_model",
    "load_model_source",
    "read_aggregate",
    "rounds_config_from_dict",
    "save_model",
    "write_aggregate",
]

log = logging.getLogger(__name__)

Shapes = list[tuple[int, ...]]
_INIT = re.compile(r"init:(?:(?P<model>[a-z0-9]+):)?(?P<dataset>[a-z0-9]+)")
_ARR = re.compile(r"arr_(\d+)")
_MAX_MODEL_BYTES = 1 << 30  # a model file bigger than 1 GiB is a mistake, not a model


@dataclass(frozen=True)
class RoundsConfig:
    """The ``[rounds]`` table: which model, and how the local driver runs rounds."""

    model: str = ""
    seed: int = 0
    encoding: str = "f32"
    duration_s: float = 30.0
    quorum: int = 0
    out: Path | None = None
    max_rounds: int = 0
    apply: bool = False

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError(
                "rounds.model: required: a .npz/.npy model file or 'init:<model>:<dataset>' "
                "(the gateway needs the model's tensor shapes)"
            )
        if self.model.startswith("init:") and not _INIT.fullmatch(self.model):
            raise ConfigError(
                f"rounds.model: expected 'init:<model>:<dataset>' or 'init:<dataset>', "
                f"got {self.model!r}"
            )
        if self.seed < 0:
            raise ConfigError(f"rounds.seed: must be >= 0, got {self.seed}")
        if self.encoding not in CODECS:
            raise ConfigError(
                f"rounds.encoding: unknown codec {self.encoding!r} (known: {', '.join(CODECS)})"
            )
        if not (math.isfinite(self.duration_s) and self.duration_s > 0):
            raise ConfigError(
                f"rounds.duration_s: must be a finite number > 0, got {self.duration_s}"
            )
        if self.quorum < 0:
            raise ConfigError(f"rounds.quorum: must be >= 0 (0 = off), got {self.quorum}")
        if self.max_rounds < 0:
            raise ConfigError(
                f"rounds.max_rounds: must be >= 0 (0 = no limit), got {self.max_rounds}"
            )


def rounds_config_from_dict(doc: Any, base: Path | None = None) -> RoundsConfig:
    """The ``[rounds]`` table; relative paths (``out``, ``model``) against ``base``."""
    if not isinstance(doc, dict):
        raise ConfigError("rounds: expected a table [rounds]")
    cfg = build_section(RoundsConfig, doc, "rounds.", base)
    assert isinstance(cfg, RoundsConfig)
    model = cfg.model
    if not model.startswith("init:") and base is not None:
        p = Path(model).expanduser()
        model = str(p if p.is_absolute() else base / p)
    return cfg if model == cfg.model else replace(cfg, model=model)


# --- model sources ------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSource:
    """A model to serve: flat float32 parameters and the tensor shapes they split into."""

    params: np.ndarray
    shapes: Shapes
    origin: str  # the file or init spec, for logs

    @property
    def num_params(self) -> int:
        return int(self.params.size)


def init_model(model: str | None, dataset: str, seed: int) -> ModelSource:
    """A freshly initialized ``model`` (default: the dataset's) for ``dataset``, with torch.

    The input shape and class count come from the dataset itself, so the
    result matches what ``tierfl device --dataset`` builds by construction.
    """
    try:
        from devices.datasets import DATASETS, load_federated
        from devices.models import MODEL_NAMES, build_model, default_model, init_params
    except ImportError as e:
        raise ConfigError(
            f"rounds.model: 'init:' needs torch and the datasets ({e}); on an edge server use "
            "a .npz written by `tierfl gateway init-model` on a machine that has them"
        ) from None
    if dataset not in DATASETS:
        raise ConfigError(
            f"rounds.model: unknown dataset {dataset!r} (known: {', '.join(DATASETS)})"
        )
    name = model or default_model(dataset)
    if name not in MODEL_NAMES:
        raise ConfigError(f"rounds.model: unknown model {name!r} (known: {', '.join(MODEL_NAMES)})")
    try:
        fed = load_federated(dataset, 1)
    except (OSError, ValueError) as e:
        raise ConfigError(f"rounds.model: cannot load dataset {dataset!r}: {e}") from None
    import torch

    with torch.random.fork_rng(devices=[]):
        net = build_model(name, fed.input_shape, fed.num_classes)
    shapes = [tuple(int(d) for d in p.shape) for p in net.parameters()]
    params = init_params(name, fed.input_shape, fed.num_classes, seed)
    return ModelSource(params.astype(np.float32), shapes, f"init:{name}:{dataset} (seed {seed})")


def _check_params(arrays: Sequence[np.ndarray], where: str) -> ModelSource:
    if not arrays:
        raise ConfigError(f"rounds.model: {where} holds no arrays")
    for a in arrays:
        if a.dtype.kind not in "fiu":
            raise ConfigError(f"rounds.model: {where}: arrays must be numeric, got {a.dtype}")
    shapes = [tuple(int(d) for d in a.shape) for a in arrays]
    flat = np.concatenate([np.asarray(a, dtype=np.float32).reshape(-1) for a in arrays])
    if flat.size == 0:
        raise ConfigError(f"rounds.model: {where} has no parameters")
    if not np.isfinite(flat).all():
        raise ConfigError(f"rounds.model: {where} contains NaN or infinity")
    return ModelSource(flat, shapes, where)


def load_model_source(spec: str, seed: int = 0) -> ModelSource:
    """The model named by ``rounds.model``: an ``init:`` spec, a ``.npz`` or a ``.npy`` file.

    ``.npz``: one array per tensor; ``arr_0, arr_1, ...`` (what ``np.savez(f, *tensors)``
    writes) in numeric order, other names in the order stored. ``.npy``: one
    array, served as a single tensor. Never unpickles (``allow_pickle=False``).
    """
    m = _INIT.fullmatch(spec)
    if m:
        return init_model(m.group("model"), m.group("dataset"), seed)
    p = Path(spec)
    try:
        size = p.stat().st_size
    except OSError as e:
        raise ConfigError(f"rounds.model: {p}: cannot read: {e.strerror or e}") from None
    if size > _MAX_MODEL_BYTES:
        raise ConfigError(f"rounds.model: {p}: {size} bytes is larger than {_MAX_MODEL_BYTES}")
    suffix = p.suffix.lower()
    try:
        if suffix == ".npy":
            return _check_params([np.load(p, allow_pickle=False)], str(p))
        if suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                names = list(z.files)
                if names and all(_ARR.fullmatch(n) for n in names):
                    names.sort(key=lambda n: int(n[4:]))
                arrays = [z[n] for n in names]
            return _check_params(arrays, str(p))
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ConfigError(f"rounds.model: {p}: not a readable numpy file ({e})") from None
    raise ConfigError(f"rounds.model: {p}: expected a .npz or .npy file, or 'init:...'")


def save_model(path: str | Path, source: ModelSource) -> Path:
    """Write ``source`` as ``.npz`` (one array per tensor, ``arr_0..``); returns the path."""
    p = Path(path)
    tensors, pos = [], 0
    for s in source.shapes:
        n = math.prod(s)
        tensors.append(source.params[pos : pos + n].reshape(s))
        pos += n
    _atomic_write(p, lambda f: np.savez(f, *tensors))
    return p


# --- aggregate files ----------------------------------------------------------------


def aggregate_path(out: Path, gateway: str, round_: int) -> Path:
    return out / f"{gateway}-round-{round_:06d}.npz"


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """Write through a temporary file in the same directory, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_aggregate(
    out: Path, agg: PartialAggregate, *, base: str | None, encoding: str, closed_at: float
) -> Path:
    """Write one round's partial aggregate as ``.npz`` (see the module docstring)."""
    path = aggregate_path(out, agg.gateway, agg.round)
    fields = {
        "weighted_sum": np.asarray(agg.weighted_sum, dtype=np.float64),
        "total_weight": np.float64(agg.total_weight),
        "count": np.int64(agg.count),
        "devices": np.array(agg.devices, dtype=np.str_),
        "round": np.int64(agg.round),
        "gateway": np.str_(agg.gateway),
        "base": np.str_(base or ""),
        "encoding": np.str_(encoding),
        "closed_at": np.float64(closed_at),
    }
    _atomic_write(path, lambda f: np.savez(f, **fields))  # type: ignore[arg-type]
    return path


def read_aggregate(path: str | Path) -> dict[str, Any]:
    """An aggregate file back as plain Python values and one float64 array."""
    with np.load(path, allow_pickle=False) as z:
        return {
            "weighted_sum": z["weighted_sum"],
            "total_weight": float(z["total_weight"]),
            "count": int(z["count"]),
            "devices": [str(d) for d in z["devices"]],
            "round": int(z["round"]),
            "gateway": str(z["gateway"]),
            "base": str(z["base"]),
            "encoding": str(z["encoding"]),
            "closed_at": float(z["closed_at"]),
        }


# --- the driver ---------------------------------------------------------------------


class RoundControl(Protocol):
    """What the driver needs from a gateway: open a round, close it, see how full it is."""

    def publish_model(
        self, params: np.ndarray, round_: int, deadline_s: float, encoding: str = "f32"
    ) -> str: ...

    def close_round(self) -> PartialAggregate: ...

    def buffered(self) -> int: ...


class LocalRoundDriver:
    """Runs rounds on a gateway without the cloud (see the module docstring).

    ``run`` opens round 0, 1, ... until ``stop`` is set or ``max_rounds`` are
    done; :meth:`flush` closes and writes whatever round is still open (the
    server calls it on shutdown, after the transports have answered what they
    had queued). The quorum is watched by polling the service every
    ``poll_s``: cheap, and no hook into the intake path is needed.
    """

    def __init__(
        self,
        control: RoundControl,
        config: RoundsConfig,
        model: ModelSource,
        out: Path,
        *,
        poll_s: float = 0.05,
        clock: Callable[[], float] = time.time,
        on_close: Callable[[PartialAggregate, Path | None], None] | None = None,
    ) -> None:
        self.control = control
        self.config = config
        self.params = np.array(model.params, dtype=np.float32)
        self.out = out
        self.poll_s = poll_s
        self.clock = clock
        self.on_close = on_close
        self.round = -1  # the round opened last
        self.base: str | None = None  # its model hash
        self._finished = -1  # the last round closed and written
        self.rounds_closed = 0
        self.files: list[Path] = []

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.config
        r = 0
        while not stop.is_set() and (cfg.max_rounds == 0 or r < cfg.max_rounds):
            self.base = self.control.publish_model(self.params, r, cfg.duration_s, cfg.encoding)
            self.round = r
            log.info("round %d open for %.3g s (model %s)", r, cfg.duration_s, self.base[:12])
            end = loop.time() + cfg.duration_s
            while not stop.is_set():
                left = end - loop.time()
                if left <= 0 or (cfg.quorum and self.control.buffered() >= cfg.quorum):
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=min(self.poll_s, left))
            if stop.is_set():
                return  # flush() closes and writes this round
            self.flush()
            r += 1

    def flush(self) -> PartialAggregate | None:
        """Close the open round (idempotent), write its aggregate, apply it if configured."""
        r = self.round
        if r < 0 or r <= self._finished:
            return None
        agg = self.control.close_round()
        self._finished = r
        self.rounds_closed += 1
        path: Path | None = None
        if agg.count:
            path = write_aggregate(
                self.out, agg, base=self.base, encoding=self.config.encoding, closed_at=self.clock()
            )
            self.files.append(path)
            if self.config.apply and agg.total_weight > 0:
                mean = agg.weighted_sum / agg.total_weight
                self.params = (self.params.astype(np.float64) + mean).astype(np.float32)
        log.info(
            "round %d closed: %d update(s), weight %g%s",
            r,
            agg.count,
            agg.total_weight,
            f", written to {path}" if path else "",
        )
        if self.on_close is not None:
            self.on_close(agg, path)
        return agg
