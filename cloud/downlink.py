"""What the cloud sends down: the downlink policy and the per-version downloads.

``full``: every holder gets the whole model (float32), every time.
``delta``: the coordinator broadcasts compressed steps (``cloud.broadcast``);
a holder of one of the last ``history`` versions gets the chain of steps from
its version (``devices.delta_chain``) when that is smaller than the model,
and the full model otherwise (unknown version, too old, or a long chain).
Pure logic; ``cloud.coordinator`` keeps the versions, this decides per holder.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from cloud.broadcast import BroadcastCompressor
from cloud.model_store import ModelStore
from devices.delta_chain import DELTA_CODECS, DeltaChain, download_nbytes
from devices.downlink import Downlink
from devices.held_model import RoundDownlink

__all__ = ["DOWNLINK_MODES", "DownlinkConfig", "plan_downlink"]

DOWNLINK_MODES = ("full", "delta")


@dataclass(frozen=True)
class DownlinkConfig:
    mode: str = "delta"  # "full" | "delta"
    codec: str = "int8"  # codec of the broadcast step (delta mode)
    topk_ratio: float = 0.1  # top-k codecs: share of the parameters a step changes
    chunk: int = 256  # quantization chunk of int8/int4 steps
    history: int = 8  # versions back a chain may start from (older holders get the model)

    def validate(self) -> None:
        if self.mode not in DOWNLINK_MODES:
            raise ValueError(
                f"unknown downlink {self.mode!r}; choose one of {', '.join(DOWNLINK_MODES)}"
            )
        if self.codec not in DELTA_CODECS:
            raise ValueError(
                f"unknown downlink codec {self.codec!r}; choose one of {', '.join(DELTA_CODECS)}"
            )
        if not 0 < self.topk_ratio <= 1:
            raise ValueError(f"downlink-topk-ratio must be in (0, 1], got {self.topk_ratio}")
        if self.chunk < 1:
            raise ValueError(f"downlink chunk must be >= 1, got {self.chunk}")
        if self.history < 1:
            raise ValueError(f"downlink-history must be >= 1, got {self.history}")

    def compressor(self) -> BroadcastCompressor | None:
        """The cloud's step compressor in delta mode; None in full mode (publish as is)."""
        if self.mode == "full":
            return None
        return BroadcastCompressor(self.codec, topk_ratio=self.topk_ratio, chunk=self.chunk)

    @property
    def keep_steps(self) -> int:
        return self.history if self.mode == "delta" else 0


def plan_downlink(
    store: ModelStore, bases: Iterable[str | None], cfg: DownlinkConfig
) -> RoundDownlink:
    """The current version's downloads for holders of ``bases`` (``None``: holds nothing).

    Each chain is built once per distinct base and kept only if it is
    smaller on the link than the full model.
    """
    cur = store.current
    params = store.params()
    full = Downlink("full", cur.hash, None, int(params.size), np.asarray(params, "<f4").tobytes())
    full_size = download_nbytes(full)
    chains: dict[str, bytes] = {}
    full_for: set[str | None] = set()
    for base in set(bases):
        if cfg.mode == "delta" and base is not None:
            steps = store.chain(base)
            if steps is not None:
                wire = DeltaChain(base, cur.hash, int(params.size), tuple(steps)).wire
                if download_nbytes(wire) < full_size:
                    chains[base] = wire
                    continue
        full_for.add(base)
    return RoundDownlink(
        version=cur.version,
        hash=cur.hash,
        size=int(params.size),
        full=full if full_for else None,
        chains=chains,
        full_for=frozenset(full_for),
        keep_from=cur.version - cfg.history,
        max_steps=cfg.history,
    )
