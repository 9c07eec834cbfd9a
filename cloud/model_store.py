"""Versioned global models, each identified by the hash of its exact bytes.

Devices report the version they trained on by hash, so the store must be able
to answer "is this the current model?" and serve deltas against older
versions. Only the newest ``keep`` parameter vectors are held in memory; the
metadata of every version is kept for provenance. A version made by a
compressed broadcast step (``cloud.broadcast``) also keeps that step, for the
newest ``keep_steps`` versions, so a device holding any of the last
``keep_steps`` versions can be sent the chain of steps instead of the model.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from devices.codecs import Encoded


def model_hash(params: np.ndarray) -> str:
    """SHA-256 of the float32 little-endian bytes: the model's identity on the wire."""
    flat = np.ascontiguousarray(params, dtype="<f4")
    return hashlib.sha256(flat.tobytes()).hexdigest()


@dataclass(frozen=True)
class ModelVersion:
    version: int
    hash: str
    round: int  # the round whose aggregate produced it (0 = initial model)
    parent: str | None  # hash of the version it was derived from


class ModelStore:
    def __init__(self, keep: int = 8, keep_steps: int = 0) -> None:
        if keep < 1:
            raise ValueError("keep must be >= 1")
        if keep_steps < 0:
            raise ValueError("keep_steps must be >= 0")
        self._keep = keep
        self._keep_steps = keep_steps
        self._params: OrderedDict[str, np.ndarray] = OrderedDict()
        self._steps: dict[int, Encoded] = {}  # version -> the step from its parent
        self.history: list[ModelVersion] = []

    def commit(self, params: np.ndarray, round_: int, step: Encoded | None = None) -> ModelVersion:
        """Add a version. ``step``: the broadcast step that made it from the current version
        (``params`` must be exactly ``apply_step(current, step)``; the caller made it so)."""
        params = np.ascontiguousarray(params, dtype=np.float32)
        h = model_hash(params)
        parent = self.history[-1].hash if self.history else None
        if step is not None and parent is None:
            raise ValueError("the first version has no parent to step from")
        mv = ModelVersion(len(self.history), h, round_, parent)
        self.history.append(mv)
        self._params[h] = params.copy()
        self._params.move_to_end(h)
        while len(self._params) > self._keep:
            self._params.popitem(last=False)
        if step is not None and self._keep_steps > 0:
            self._steps[mv.version] = step
        self._steps.pop(mv.version - self._keep_steps, None)
        return mv

    def chain(self, base: str) -> list[Encoded] | None:
        """The steps from version ``base`` to the current one, oldest first.

        ``[]`` if ``base`` is current; ``None`` if ``base`` is not among the
        newest ``keep_steps`` versions, or a version on the way was not made by
        a step (the initial model, a rollback): then only the full model will do.
        """
        steps: list[Encoded] = []
        for mv in reversed(self.history):
            if mv.hash == base:
                steps.reverse()
                return steps
            step = self._steps.get(mv.version)
            if step is None:
                return None
            steps.append(step)
        return None

    @property
    def current(self) -> ModelVersion:
        if not self.history:
            raise LookupError("model store is empty")
        return self.history[-1]

    def params(self, hash_: str | None = None) -> np.ndarray:
        """Parameters of a version (the current one by default); raises if evicted/unknown."""
        h = self.current.hash if hash_ is None else hash_
        try:
            return self._params[h]
        except KeyError:
            raise LookupError(f"model version {h[:12]} is not held (unknown or evicted)") from None

    def rollback(self) -> ModelVersion:
        """Make the previous held version current again (e.g. after a bad round)."""
        if len(self.history) < 2 or self.history[-2].hash not in self._params:
            raise LookupError("no earlier version held to roll back to")
        prev = self.history[-2]
        return self.commit(self._params[prev.hash], prev.round)
