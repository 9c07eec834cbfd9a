"""The cloud parties' side of the ``device-shares`` mode: sealed seeds -> additive shares.

Notation (all arithmetic in the int64 ring Z_{2^64}, i.e. numpy wrap-around):
device i encodes ``x_i = encode_fixed(w_i delta_i)``, draws a seed ``s_ik``
for every seeded party k in S (S = {1..K-1}, or {0..K-1} with
``seal_to_party0``), expands ``m_ik = expand_mask(s_ik, k, P, MASK_LABEL)``
and sends its gateway ``masked_i = x_i - sum_{k in S} m_ik`` plus the boxes
(``devices.masking``). For the devices D a gateway included, it forwards
``M = sum_{i in D} masked_i`` to party 0 and D with the boxes to every party
(``gateway.masked_sum``). Party k's additive share of the unit is

    share_k = [k = 0] M  +  [k in S] sum_{i in D} m_ik

and the shares add up to the plaintext sum:

    sum_k share_k = M + sum_{i in D} sum_{k in S} m_ik
                  = sum_{i in D} (masked_i + sum_{k in S} m_ik)
                  = sum_{i in D} x_i                              (mod 2^64).

So party k opens exactly the boxes of the listed devices (:func:`party_share`),
expands and sums their masks, party 0 adds the gateway's masked sum, and the
result is a ``SharedPartial`` like a gateway-trusted share: the existing
CrypTen parties (``cloud.smpc``) sum the units, add the DP noise and reveal,
unchanged. A device that dropped out is in no list and costs nothing.

Privacy. The gateway sees each ``masked_i``: uniform, whatever ``x_i`` is,
while one of its seeds is unknown. Party k >= 1 sees masks only (uniform);
party 0 sees M, uniform while one seeded party's masks are unknown. With the
default S the gateway holds party 0's share, so the gateway *together with*
parties 1..K-1 could unmask; ``seal_to_party0`` closes that for one more seed
per device. The device list is public (to the gateway and every party).

Consistency. A unit is registered under ``"<unit>#<digest>"`` where the digest
covers (gateway, unit, round, device list): a gateway that tells two parties
different lists produces two names, the driver's agreement excludes both (no
party holds the same name), and the parties' own all-gathered agreement
(``AggregatorParty._agree`` hashes the unit names) would abort before any
secret is combined. :class:`DeviceSharesAggregator` strips the digests from
what it returns.

Norm bounds in SMPC. The gateway sees no plaintext, so its validation (finite,
norm bound) cannot run. What replaces it:

- per-gateway units (default): the existing ``clip_norm`` path bounds each
  *gateway's* masked-then-unmasked sum, as in gateway-trusted mode. It cannot
  bound one device inside that sum: one device may contribute up to the whole
  gateway bound.
- per-device units (``MaskedSum.forwards(per_device=True)``): every device is
  its own unit, so the same ``clip_norm`` path bounds every device:
  ``s_i <= min(1, C / ||x_i||)`` computed in SMPC (``cloud.smpc.ClipPlan``),
  honest devices with ``||x_i|| <= C - 2 delta`` untouched, a larger one
  scaled to within ~5 % below C. Cost: party 0 receives P*8 bytes per
  device instead of per gateway, and the secure norm/comparison/matmul work
  grows with the number of devices (G = devices in ``ClipPlan``'s terms).
- Not checked, in either case: per-coordinate ranges. A device controls its
  ring values completely, so it can craft x_i whose squared norm wraps the
  ring; the guarantee holds for ``||x_i|| + delta < limit`` (``ClipPlan.limit``,
  ``headroom`` x C, typically > 100 C) and a wrap that makes the squared norm
  negative drops the device (s = 0), but a crafted wrap to a small positive
  value passes unscaled. Closing that needs a secure range check of every
  coordinate (devices x P comparisons) or a zero-knowledge range proof from the
  device; neither is done here. Float checks (NaN/Inf) have no meaning on
  ring values: any ring value decodes to a finite number.

Keys: party k's X25519 private key (``cloud.party_keys``) is installed in its
own process (:meth:`DeviceSharesParty.configure` in emulation, or
:meth:`DeviceSharesParty.load_key` from the party's own file).
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from cloud.secure_aggregator import SecureAggregator, SecureSum
from cloud.smpc import AggregatorParty
from devices.masking import SealError, SeedOpener, device_mask
from gateway.masked_sum import MaskedSum, PartyForward
from gateway.secret_sharing import SharedPartial

__all__ = [
    "DeviceSharesAggregator",
    "DeviceSharesParty",
    "SealError",
    "party_share",
    "unit_base",
    "unit_key",
]


def unit_key(forward: PartyForward) -> str:
    """The name a unit is registered under: ``<unit>#<digest of gateway, unit, round, list>``."""
    h = hashlib.sha256()
    for part in (forward.gateway, forward.unit, str(forward.round), *forward.devices):
        b = part.encode()
        h.update(len(b).to_bytes(4, "big") + b)
    return f"{forward.unit}#{h.hexdigest()[:16]}"


def unit_base(key: str) -> str:
    return key.rsplit("#", 1)[0]


def party_share(
    forward: PartyForward,
    opener: SeedOpener | X25519PrivateKey | None,
    seeded: bool,
) -> SharedPartial:
    """Party ``forward.party``'s additive share of one unit (see the module docstring).

    Opens the box of every listed device (a bad one raises :class:`SealError`
    naming the device), expands and sums their masks; party 0 adds the masked
    sum. ``seeded``: whether this party is one that devices seal seeds to.
    ``opener``: the party's :class:`SeedOpener` (or bare private key, opened
    without a cache).
    """
    k, n = forward.party, forward.num_params
    where = f"party {k}: {forward.gateway!r} unit {forward.unit!r} round {forward.round}"
    devices = forward.devices
    if len(set(devices)) != len(devices) or forward.count != len(devices):
        raise ValueError(f"{where}: the device list has duplicates or does not match the count")
    if (forward.masked_sum is not None) != (k == 0):
        raise ValueError(f"{where}: the masked sum goes to party 0 and only to party 0")
    share = np.zeros(n, dtype=np.int64)
    if forward.masked_sum is not None:
        m = forward.masked_sum
        if not isinstance(m, np.ndarray) or m.dtype != np.int64 or m.shape != (n,):
            raise ValueError(f"{where}: the masked sum must be int64 of shape ({n},)")
        share += m
    if seeded:
        if len(forward.sealed) != len(devices):
            raise ValueError(
                f"{where}: {len(forward.sealed)} sealed seeds for {len(devices)} devices"
            )
        if opener is None:
            raise ValueError(f"party {k}: no private key installed; cannot open sealed seeds")
        if isinstance(opener, X25519PrivateKey):
            opener = SeedOpener(opener)
        mask = np.empty(n, dtype=np.int64)  # scratch: each device's mask is expanded here
        for d, box in zip(devices, forward.sealed, strict=True):
            seed = opener.open(box, d, forward.round, k)
            share += device_mask(seed, k, n, out=mask)  # ring addition
    elif forward.sealed:
        raise ValueError(f"{where}: sealed seeds for a party that devices do not seal to")
    return SharedPartial(
        unit_key(forward), forward.round, k, share, forward.total_weight, forward.count
    )


class DeviceSharesParty(AggregatorParty):
    """An aggregator party that also takes ``device-shares`` forwards (a Ray actor)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._opener: SeedOpener | None = None  # the key and its box-key cache
        self._seeded = self.rank != 0

    def _install(self, key: X25519PrivateKey) -> str:
        self._opener = SeedOpener(key)
        return self._opener.public_raw.hex()

    def configure(self, key: bytes | None, seal_to_party0: bool = False) -> str | None:
        """Install this party's raw private key (emulation); returns its public key as hex."""
        self._seeded = self.rank != 0 or seal_to_party0
        if key is not None:
            return self._install(X25519PrivateKey.from_private_bytes(key))
        return None if self._opener is None else self._opener.public_raw.hex()

    def load_key(self, path: str, seal_to_party0: bool = False) -> str:
        """Load this party's own key file (a deployment); returns its public key as hex."""
        from cloud.party_keys import load_party_key

        key = load_party_key(Path(path))
        self._seeded = self.rank != 0 or seal_to_party0
        return self._install(key)

    def submit_forwards(self, forwards: Sequence[PartyForward]) -> dict[str, Any]:
        """Unmask and register each forward (a resend of a unit replaces it).

        Every good forward is registered; the bad ones are reported together in
        one ``ValueError`` naming each device whose box did not open.
        """
        t0 = time.perf_counter()
        errors: list[str] = []
        boxes = 0
        for f in forwards:
            if f.party != self.rank:
                errors.append(f"forward of {f.unit!r} is for party {f.party}, not {self.rank}")
                continue
            try:
                sp = party_share(f, self._opener, self._seeded)
            except ValueError as exc:  # SealError is a ValueError
                errors.append(str(exc))
                continue
            held = self._held.get(f.round, {})
            base = unit_base(sp.gateway)
            for name in [g for g in held if unit_base(g) == base and g != sp.gateway]:
                del held[name]
            self.submit_share(sp.round, sp.gateway, sp.share, sp.total_weight, sp.count)
            boxes += len(f.sealed)
        if errors:
            more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
            raise ValueError("; ".join(errors[:3]) + more)
        return {"rank": self.rank, "boxes": boxes, "seconds": time.perf_counter() - t0}

    def submit_batch(self, items: Sequence[Any]) -> int:
        """Forwards (``device-shares``) and/or shares, several gateways in one call."""
        forwards = [it for it in items if isinstance(it, PartyForward)]
        if forwards:
            self.submit_forwards(forwards)
        rest = [it for it in items if not isinstance(it, PartyForward)]
        return len(forwards) + (super().submit_batch(rest) if rest else 0)


class DeviceSharesAggregator(SecureAggregator):
    """K :class:`DeviceSharesParty` actors: gateway-trusted rounds plus ``device-shares`` rounds.

    ``keys``: the parties' private keys, installed in each party's process
    (emulation); or ``key_dir``: each party loads ``party-<k>.key`` from it
    itself (a deployment with a per-node path).
    """

    def __init__(
        self,
        backend: Any,
        parties: int = 3,
        *,
        keys: Sequence[X25519PrivateKey] | None = None,
        key_dir: str | Path | None = None,
        seal_to_party0: bool = False,
        **kwargs: Any,
    ) -> None:
        if (keys is None) == (key_dir is None):
            raise ValueError("give the parties' keys either as keys=... or as key_dir=...")
        if keys is not None and len(keys) != parties:
            raise ValueError(f"{len(keys)} private keys for {parties} parties")
        self._raw_keys = None if keys is None else [k.private_bytes_raw() for k in keys]
        self._key_dir = None if key_dir is None else str(key_dir)
        self.seal_to_party0 = seal_to_party0
        self.last_unmask: list[dict[str, Any]] = []
        super().__init__(backend, parties, **kwargs)

    def _party_class(self) -> type:
        return DeviceSharesParty

    def start(self) -> None:
        super().start()
        if self._raw_keys is not None:
            refs = [
                h.call("configure", raw, self.seal_to_party0)
                for h, raw in zip(self._handles, self._raw_keys, strict=True)
            ]
        else:
            from cloud.party_keys import key_path

            refs = [
                h.call("load_key", str(key_path(str(self._key_dir), r)), self.seal_to_party0)
                for r, h in enumerate(self._handles)
            ]
        self._collect(refs, "key installation", self.timeout_s)

    def submit_forwards(self, forwards: Iterable[PartyForward]) -> list[dict[str, Any]]:
        """Route forwards to their parties (one call per party); they unmask in parallel.

        A box that does not open fails the submission with an error naming the
        device; the group stays up, the other units are registered, and the
        gateway can ``drop`` the device and forward again.
        """
        self._check_up()
        by_party: dict[int, list[PartyForward]] = {}
        for f in forwards:
            if not 0 <= f.party < self.parties:
                raise ValueError(
                    f"forward of {f.unit!r} is for party {f.party}, but there are "
                    f"{self.parties} parties"
                )
            by_party.setdefault(f.party, []).append(f)
        ranks = sorted(by_party)
        refs = [self._handles[r].call("submit_forwards", by_party[r]) for r in ranks]
        self.last_unmask = self._collect(refs, "submit", self.timeout_s, ranks)
        return self.last_unmask

    def aggregate(
        self,
        round_: int,
        gateways: Sequence[str] | None = None,
        noise_std: float = 0.0,
        clip_norm: float | None = None,
    ) -> SecureSum:
        """Like :meth:`SecureAggregator.aggregate`; ``gateways`` are unit names without digests."""
        keys = None
        if gateways is not None:
            agreed, _ = self.agree(round_)
            by_base = {unit_base(k): k for k in agreed}
            missing = [g for g in gateways if g not in by_base]
            if missing:
                raise ValueError(f"round {round_}: no agreed unit named {missing}")
            keys = [by_base[g] for g in gateways]
        res = super().aggregate(round_, keys, noise_std, clip_norm)
        excluded: dict[str, str] = {}
        for name, why in res.excluded.items():
            base = unit_base(name)
            if base in excluded:
                why = "the parties were given different device lists for it"
            excluded[base] = why
        return dataclasses.replace(
            res, gateways=tuple(unit_base(g) for g in res.gateways), excluded=excluded
        )

    def secure_sum_masked(
        self,
        round_: int,
        sums: Sequence[MaskedSum],
        noise_std: float = 0.0,
        clip_norm: float | None = None,
        per_device: bool = False,
    ) -> SecureSum:
        """Gateways' forwards in, noisy (optionally norm-bounded) revealed sum out."""
        self.submit_forwards([f for s in sums for f in s.forwards(per_device)])
        return self.aggregate(round_, None, noise_std, clip_norm)
