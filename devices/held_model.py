"""Which model version each device holds, and how a round's download brings it current.

The cloud answers a round's "I hold version v" questions with a
:class:`RoundDownlink`: for every version some device holds, either the
delta chain from it (its CBOR wire bytes) or the full model.
:class:`HeldModels` is the device side for a pool of devices (one cohort
trainer's): it knows each device's version, parses and applies the exact
bytes a device receives, verifies the hash, and remembers the result as that
device's new version.

Devices holding the same version receive the same bytes and rebuild the same
model (deterministic float32 steps), so the rebuild runs once per distinct
version, not once per device; every device is still charged its own
download. A device whose version the downlink does not cover, or whose
rebuild does not hash to the round's version, is an error, never a silent
fallback. Numpy only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from devices.delta_chain import DeltaChain, download_nbytes, reconstruct
from devices.downlink import Downlink, DownlinkError

__all__ = ["HeldModels", "Received", "RoundDownlink"]


@dataclass(frozen=True)
class RoundDownlink:
    """What the cloud sends down for one model version, keyed by what devices hold.

    ``chains[v]`` is the CBOR chain from version ``v``; every version in
    ``full_for`` (``None``: holds nothing) gets ``full``. ``keep_from`` is the
    oldest version number the cloud may still send a chain from, so holders
    can forget older models; ``max_steps`` bounds a chain's length.
    """

    version: int
    hash: str
    size: int
    full: Downlink | None
    chains: dict[str, bytes] = field(default_factory=dict)
    full_for: frozenset[str | None] = frozenset()
    keep_from: int = 0
    max_steps: int = 0

    def download_for(self, held: str | None) -> Downlink | bytes:
        """The download a holder of ``held`` gets; KeyError if the round did not plan for it."""
        if held is not None and held in self.chains:
            return self.chains[held]
        if held in self.full_for and self.full is not None:
            return self.full
        raise KeyError(held)

    def nbytes_for(self, held: str | None) -> int:
        """Link bytes of what a holder of ``held`` downloads."""
        return download_nbytes(self.download_for(held))


@dataclass(frozen=True)
class Received:
    """What a batch of devices received this round (in the order asked)."""

    params: np.ndarray  # the rebuilt current model, float32, flat
    nbytes: np.ndarray  # int64, link bytes per device
    full: np.ndarray  # bool, got the full model
    steps: np.ndarray  # int64, chain length (0 for the full model)


class HeldModels:
    """The model versions a pool of devices hold (keyed by the caller's device ids)."""

    def __init__(self) -> None:
        self._held: dict[int, str] = {}  # device -> hash of the version it holds
        self._models: dict[str, tuple[int, np.ndarray]] = {}  # hash -> (version, params)

    def held(self, device: int) -> str | None:
        return self._held.get(device)

    def receive(self, devices: Sequence[int], downlink: RoundDownlink) -> Received:
        """Bring ``devices`` to ``downlink``'s version; raises DownlinkError on any doubt."""
        if not devices:
            raise ValueError("receive needs at least one device")
        n = len(devices)
        nbytes = np.zeros(n, dtype=np.int64)
        full = np.zeros(n, dtype=bool)
        steps = np.zeros(n, dtype=np.int64)
        groups: dict[str | None, list[int]] = {}
        for k, d in enumerate(devices):
            groups.setdefault(self._held.get(int(d)), []).append(k)
        params: np.ndarray | None = None
        for base, ks in groups.items():
            out, chain_len = self._rebuild(base, downlink, devices[ks[0]])
            params = out if params is None else params
            idx = np.asarray(ks)
            nbytes[idx] = downlink.nbytes_for(base)
            full[idx] = chain_len is None
            steps[idx] = chain_len or 0
        assert params is not None
        for d in devices:
            self._held[int(d)] = downlink.hash
        self._models[downlink.hash] = (downlink.version, params)
        self._forget(downlink.keep_from)
        return Received(params, nbytes, full, steps)

    def _rebuild(
        self, base: str | None, downlink: RoundDownlink, device: int
    ) -> tuple[np.ndarray, int | None]:
        """The model a holder of ``base`` rebuilds, and its chain length (None: full model)."""
        try:
            dl = downlink.download_for(base)
        except KeyError:
            raise DownlinkError(
                "wrong-base",
                f"device {device} holds {str(base)[:12]}..., which the downlink of "
                f"version {downlink.version} does not cover",
            ) from None
        if isinstance(dl, Downlink):
            out, announced, chain_len = reconstruct(dl, None), dl.hash, None
        else:
            chain = DeltaChain.from_bytes(
                dl, max_elements=downlink.size, max_steps=downlink.max_steps
            )
            held = self._models.get(base) if base is not None else None
            if held is None:
                raise DownlinkError(
                    "wrong-base", f"device {device}: model {str(base)[:12]}... is not held"
                )
            out, announced, chain_len = reconstruct(chain, held[1]), chain.hash, len(chain.steps)
        # reconstruct verified the download's own hash; it must also be this round's version.
        if announced != downlink.hash or out.size != downlink.size:
            raise DownlinkError(
                "hash-mismatch",
                f"device {device}: download rebuilds {announced[:12]}..., not version "
                f"{downlink.version} ({downlink.hash[:12]}...)",
            )
        return out, chain_len

    def _forget(self, keep_from: int) -> None:
        """Drop models no device holds any more, or too old for the cloud to chain from."""
        wanted = set(self._held.values())
        for h in [h for h, (v, _) in self._models.items() if h not in wanted or v < keep_from]:
            del self._models[h]
