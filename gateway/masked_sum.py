"""The gateway's side of the ``device-shares`` mode: sum masked updates blind (numpy only).

Each device sends ``masked_i = x_i - sum_k m_ik`` (uniform on the int64
ring, see ``devices.masking``) plus one sealed 92-byte seed per seeded cloud
party. The gateway cannot unmask anything: it checks what it can check
without plaintext (round, shape, dtype, one update per device, a box of the
right size for every seeded party), adds the masked vectors in the ring (a
masked sum is still masked), and at round close forwards per party:

- party 0: the masked sum ``M = sum_{i in D} masked_i`` (P int64, like a share
  in ``gateway-trusted`` mode), plus its boxes if it is seeded;
- party k >= 1: the sorted list D of included devices and their boxes for k
  (92 bytes + the id per device; no vector at all).

Dropouts cost nothing: a device that never arrived, or that the gateway
dropped (:meth:`MaskedSum.drop`, e.g. after a party refused its box), is in
no list, so no party expands its masks. The public total weight and count
travel to every party, as in ``gateway-trusted`` mode.

Per-device units (``forwards(per_device=True)``): instead of one sum, party 0
receives each device's masked vector and every party gets one forward per
device. That is what per-device norm bounding in SMPC needs (the cloud must
hold each device's contribution separately) and it costs the gateway's
aggregation gain: P * 8 bytes per device to party 0 instead of P * 8 in all.

The gateway keeps the devices' masked vectors until the round closes (it
needs them to drop a device after the fact, and in per-device mode).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from devices.masking import SEALED_BYTES, MaskedUpdate, seeded_parties
from devices.reasons import Rejection

__all__ = ["MaskedSum", "PartyForward"]


@dataclass(frozen=True)
class PartyForward:
    """What one gateway sends one cloud party for one unit in one round.

    A unit is what the parties treat as one contribution: the gateway's sum,
    or a single device with ``per_device``. ``sealed[j]`` is ``devices[j]``'s
    box for this party (empty when this party holds no seeds);
    ``masked_sum`` is set for party 0 only.
    """

    gateway: str
    round: int
    party: int
    unit: str
    devices: tuple[str, ...]
    sealed: tuple[bytes, ...]
    masked_sum: np.ndarray | None
    num_params: int
    total_weight: float
    count: int

    @property
    def nbytes(self) -> int:
        """Uplink payload to one party: vector (party 0), boxes, device ids, a small header."""
        vec = 0 if self.masked_sum is None else int(self.masked_sum.size) * 8
        ids = sum(len(d.encode()) + 1 for d in self.devices)
        return vec + sum(len(b) for b in self.sealed) + ids + 64


class MaskedSum:
    """One gateway's round in ``device-shares`` mode: masked updates in, party forwards out."""

    def __init__(
        self,
        gateway: str,
        round_: int,
        num_params: int,
        parties: int,
        seal_to_party0: bool = False,
    ) -> None:
        if num_params < 1:
            raise ValueError(f"num_params must be >= 1, got {num_params}")
        self.gateway = gateway
        self.round = int(round_)
        self.num_params = int(num_params)
        self.parties = int(parties)
        self.seeded = seeded_parties(parties, seal_to_party0)
        self._sum = np.zeros(num_params, dtype=np.int64)
        self._updates: dict[str, MaskedUpdate] = {}

    # -- intake
    def add(self, update: MaskedUpdate) -> None:
        """Fold one device's masked update in; a :class:`Rejection` says why it is refused."""
        d = update.device
        if update.round != self.round:
            raise Rejection(
                "stale-round", f"device {d!r} sent round {update.round}, gateway is in {self.round}"
            )
        if d in self._updates:
            raise Rejection("replay", f"device {d!r} already sent an update for round {self.round}")
        m = update.masked
        if not isinstance(m, np.ndarray) or m.dtype != np.int64 or m.shape != (self.num_params,):
            got = f"{m.dtype} {m.shape}" if isinstance(m, np.ndarray) else type(m).__name__
            raise Rejection(
                "bad-shape",
                f"device {d!r}: masked update must be int64 ({self.num_params},), got {got}",
            )
        w = update.weight
        if not (isinstance(w, int | float) and math.isfinite(w) and w >= 0):
            raise Rejection("malformed", f"device {d!r}: invalid weight {w!r}")
        if set(update.sealed) != set(self.seeded):
            raise Rejection(
                "malformed",
                f"device {d!r}: sealed seeds for parties {sorted(update.sealed)}, "
                f"expected {list(self.seeded)}",
            )
        for k, box in update.sealed.items():
            if not isinstance(box, bytes) or len(box) != SEALED_BYTES:
                raise Rejection(
                    "malformed", f"device {d!r}: sealed seed for party {k} is not {SEALED_BYTES} B"
                )
        self._sum += m  # ring addition: the sum stays masked
        self._updates[d] = update

    def drop(self, device: str) -> None:
        """Take a device back out (its masked vector is subtracted; it leaves every list)."""
        u = self._updates.pop(device, None)
        if u is None:
            raise KeyError(f"device {device!r} is not in gateway {self.gateway!r}'s round")
        self._sum -= u.masked

    # -- public totals
    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(sorted(self._updates))

    @property
    def count(self) -> int:
        return len(self._updates)

    @property
    def total_weight(self) -> float:
        return float(sum(u.weight for u in self._updates.values()))

    @property
    def masked_sum(self) -> np.ndarray:
        return self._sum.copy()

    # -- uplink
    def forwards(self, per_device: bool = False) -> list[PartyForward]:
        """One :class:`PartyForward` per party (per device and party with ``per_device``)."""
        if not self._updates:
            return []
        if per_device:
            return [
                f
                for d in self.devices
                for f in self._forwards_for(d, (d,), self._updates[d].masked.copy())
            ]
        return self._forwards_for(self.gateway, self.devices, self._sum.copy())

    def _forwards_for(
        self, unit: str, devices: tuple[str, ...], masked: np.ndarray
    ) -> list[PartyForward]:
        weight = float(sum(self._updates[d].weight for d in devices))
        out = []
        for k in range(self.parties):
            sealed = tuple(self._updates[d].sealed[k] for d in devices) if k in self.seeded else ()
            out.append(
                PartyForward(
                    gateway=self.gateway,
                    round=self.round,
                    party=k,
                    unit=unit,
                    devices=devices,
                    sealed=sealed,
                    masked_sum=masked if k == 0 else None,
                    num_params=self.num_params,
                    total_weight=weight,
                    count=len(devices),
                )
            )
        return out
