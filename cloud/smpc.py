"""Secure aggregation inside the cloud: K CrypTen aggregator parties (and an optional dealer).

Each :class:`AggregatorParty` is one cloud server. It receives one additive
share of every gateway's partial aggregate (``gateway.secret_sharing``), and
the K parties together compute

    sum_g  s_g * x_g  +  N(0, noise_std^2)          (s_g = 1 without norm bounding)

revealing only that noisy sum, to rank 0. No party ever holds a gateway's
aggregate, the un-noised sum, the per-gateway norms or clip factors, or the
total noise. The class is plain; the driver (``cloud.secure_aggregator``)
turns it into a Ray actor, one process per party; the parties talk to each
other over a torch.distributed gloo group through CrypTen's communicator.

Protocol of one round (every step is the same on every party):

1. *Agreement.* All parties are called with the same ordered gateway list,
   which the driver chose from what reached every party. They all-gather a
   digest of (round, list, length, public weights and counts, clip, noise) plus
   whether they hold every share; any mismatch aborts the round on all parties
   before anything secret is touched.
2. *Sum* (no norm bounding): each party adds its shares locally (int64,
   wrap-around), adds its own share of the noise, and the parties reduce to
   rank 0. One reduce of P int64 per party; no multiplications, so no dealer.
3. *Noise.* Party k samples N(0, noise_std^2 / K) per coordinate from SHAKE-256
   keyed with a fresh 256-bit secret, encodes it in fixed point and adds it to
   its share; the revealed total noise is N(0, noise_std^2) and no single party
   knows it. (A coalition of t parties knows t/K of the variance; see
   ``secure_aggregator`` docs.)
4. *Norm bounding* (``clip_norm=C``), with the dealer: the result is
   ``sum_g s_g x_g`` with ``s_g <= min(1, C / ||x_g||)``. See :class:`ClipPlan`
   for how ||x_g|| is computed without truncation errors, and how s_g is read
   off a batch of secure comparisons against public thresholds (no secure
   square root or division). The weighted sum ``s^T X`` is one Beaver matrix
   product whose result (scale 2^32) is revealed without truncation and
   decoded in float64: exact, with no probabilistic-truncation failures.

Revealing: always the raw ring values (``comm.reduce``), decoded here in float64
(CrypTen's ``FixedPointEncoder.decode`` is wrong for some negative values).

The dealer (``provider="TTP"``): multiplications and comparisons need
correlated randomness (Beaver triples). CrypTen's default "trusted first party"
lets party 0 generate all of it, which would let party 0 unmask every value
opened during a multiplication, i.e. see every gateway's aggregate. So norm
bounding runs with CrypTen's trusted-third-party provider instead: a separate
:class:`Dealer` process that only ever produces randomness and never receives
an opened value. Assumption: the dealer does not collude with a party.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np

from gateway.secret_sharing import FRAC_BITS, expand_mask

# A chunk of the stacked [G, P] share matrix is at most this many int64s (32 MiB), so
# norm bounding of 100 gateways x 1M parameters does not need 10 copies of 800 MB.
CHUNK_ELEMENTS = 1 << 22
FAULT_STAGES = ("agreed", "reveal")


class RoundAborted(RuntimeError):
    """The parties could not run a round consistently; nothing was revealed."""


# --------------------------------------------------------------------------- noise


def gaussian_noise(n: int, std: float, seed: bytes) -> np.ndarray:
    """n samples of N(0, std^2) from SHAKE-256(seed) via Box-Muller (float64).

    The uniforms are 53-bit values in (0, 1), from a CSPRNG, so a party's noise
    cannot be predicted from anything another party sees.
    """
    if n == 0 or std == 0.0:
        return np.zeros(n, dtype=np.float64)
    m = (n + 1) // 2
    bits = expand_mask(seed, 0, 2 * m, label=b"dp-noise").view(np.uint64) >> np.uint64(11)
    u = (bits.astype(np.float64) + 0.5) * 2.0**-53
    r = np.sqrt(-2.0 * np.log(u[:m]))
    theta = 2.0 * math.pi * u[m:]
    z = np.concatenate([r * np.cos(theta), r * np.sin(theta)])[:n]
    return z * std


def encode_noise(noise: np.ndarray, scale_bits: int) -> np.ndarray:
    """Float noise -> int64 ring values at 2^scale_bits, refusing what would swamp the ring."""
    scaled = noise * float(2**scale_bits)
    if scaled.size and float(np.max(np.abs(scaled))) >= 2.0**61:
        raise ValueError(
            f"noise too large for the ring at 2^{scale_bits}: max |noise| "
            f"{float(np.max(np.abs(noise))):.3g} >= {2.0 ** (61 - scale_bits):.3g}"
        )
    return np.rint(scaled).astype(np.int64)


# --------------------------------------------------------------------------- clipping


@dataclass(frozen=True)
class ClipPlan:
    """Public parameters of the in-SMPC norm bound, derived from (C, P, K).

    Computing ||x||^2 on fixed-point shares (scale 2^16) would need 2^32 for
    the squares, so ||x|| had to stay below 2^15.5 before the ring wraps.
    Instead each party shifts its own share right by ``k = 16 - f`` bits. The
    shifted shares sum to ``y = floor(x 2^f) - j`` (``j`` in [0, K-1], from the
    dropped low bits) -- but only modulo 2^(64-k), since the shares' wrap-arounds
    are lost. That is enough: squares and sums are consistent modulo 2^(64-k),
    and multiplying the squared norm by the public 2^k lifts it back to an
    exact ring value ``z = 2^k ||y||^2``, with no probabilistic truncation.
    With nu = ||y|| 2^-f, the triangle inequality gives
    ``||x|| <= nu + delta`` where ``delta = K sqrt(P) 2^-f``; f is the fewest
    fractional bits for which delta <= C / margin.

    Then s is read off comparisons of z with public thresholds
    ``t_0 = C - delta, t_j = t_0 rho^j`` up to ``limit`` (one batched CrypTen comparison of
    G x (J+2) values; no secure sqrt/reciprocal): for nu in (t_{j-1}, t_j],
    ``s = floor_16(C / (t_j + delta))``, which is <= C / ||x|| always, and s = 0
    above the top threshold or when z is negative (the ring wrapped).

    Guarantees and approximations:
    - ``s_g ||x_g|| <= C`` for every contribution with ``||x_g|| + delta < limit``;
      a contribution with ||x_g|| <= C - 2 delta is never scaled.
    - Above C the bounded norm is at least ``C (t_{j-1} - delta) / (t_j + delta)``
      minus the 2^-16 quantization of s: about 0.95 C with the defaults
      (rho = 2^(1/16), delta <= C / 256), i.e. it under-clips by at most ~5 %.
    - ``limit = 2^(23 - f/2)`` is where z reaches 2^62: a contribution past it
      may wrap the 64-bit ring and is not guaranteed to be bounded (it is
      dropped when the wrap makes z negative). ``headroom = limit / C``.
      Closing that gap needs per-coordinate range checks (G x P secure
      comparisons, several seconds per million values here).
    """

    clip_norm: float
    num_params: int
    parties: int
    frac_bits: int  # f: fractional bits kept for the norm
    shift: int  # k = 16 - f
    delta: float
    limit: float
    thresholds: tuple[float, ...]  # t_0..t_J (norm units)
    z_thresholds: tuple[int, ...]  # floor(t_j^2 2^(f+16)) (ring units of z)
    coefs: tuple[int, ...]  # sigma_{j+1} - sigma_j for j = 0..J (fixed point 2^16)
    ratio: float

    @property
    def headroom(self) -> float:
        return self.limit / self.clip_norm

    @classmethod
    def make(
        cls,
        clip_norm: float,
        num_params: int,
        parties: int,
        ratio: float = 2.0 ** (1 / 16),
        margin: float = 256.0,
    ) -> ClipPlan:
        c = float(clip_norm)
        if not math.isfinite(c) or c <= 0:
            raise ValueError(f"clip_norm must be a positive finite number, got {clip_norm!r}")
        if num_params < 1:
            raise ValueError(f"num_params must be >= 1, got {num_params}")
        if not ratio > 1.0:
            raise ValueError(f"ratio must be > 1, got {ratio}")
        root_p = math.sqrt(num_params)
        f = math.ceil(math.log2(margin * parties * root_p / c))
        f = min(max(f, 0), FRAC_BITS)
        delta = parties * root_p * 2.0**-f
        limit = 2.0 ** (23 - f / 2) * (1 - 1e-9)
        t0 = c - delta
        if t0 <= 0:
            raise ValueError(
                f"clip_norm {c:g} is below the fixed-point resolution of a norm over "
                f"{num_params} parameters with {parties} parties: it must exceed "
                f"{parties} * sqrt({num_params}) * 2^-{FRAC_BITS} = {delta:.3g}"
            )
        if limit < 2 * c:
            raise ValueError(
                f"clip_norm {c:g} is too large for the 64-bit ring at {f} fractional bits "
                f"(norms up to {limit:.3g} fit); scale the contributions down"
            )
        ts = [t0]
        while ts[-1] * ratio < limit:
            ts.append(ts[-1] * ratio)
        ts.append(limit)  # the last step may be shorter: s > 0 all the way to the limit
        zscale = 2.0 ** (f + FRAC_BITS)
        z_th = tuple(math.floor(t * t * zscale) for t in ts)
        one = 2**FRAC_BITS
        sigma = [one] + [math.floor(one * c / (t + delta)) for t in ts[1:]] + [0]
        sigma[1:] = [min(s, one) for s in sigma[1:]]
        coefs = tuple(sigma[j + 1] - sigma[j] for j in range(len(ts)))
        return cls(
            clip_norm=c,
            num_params=num_params,
            parties=parties,
            frac_bits=f,
            shift=FRAC_BITS - f,
            delta=delta,
            limit=limit,
            thresholds=tuple(ts),
            z_thresholds=z_th,
            coefs=coefs,
            ratio=ratio,
        )

    def scale_for(self, norm: float) -> float:
        """The clip factor s the protocol computes for a contribution whose nu is ``norm``.

        Plaintext reference (tests): the secure computation reproduces it exactly
        given the same nu.
        """
        one = 2**FRAC_BITS
        n = sum(1 for t in self.thresholds if norm > t)
        s = one + sum(self.coefs[:n])
        return s / one


# --------------------------------------------------------------------------- helpers


@contextmanager
def _process_group_timeout(seconds: float) -> Iterator[None]:
    """Give CrypTen's gloo groups a timeout (it passes none; torch's default is 30 min)."""
    import torch.distributed as dist

    td = timedelta(seconds=seconds)
    orig_init, orig_new = dist.init_process_group, dist.new_group

    def init_pg(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", td)
        return orig_init(*args, **kwargs)

    def new_group(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("timeout") is None and len(args) < 2:
            kwargs["timeout"] = td
        return orig_new(*args, **kwargs)

    dist.init_process_group, dist.new_group = init_pg, new_group  # type: ignore[assignment]
    try:
        yield
    finally:
        dist.init_process_group, dist.new_group = orig_init, orig_new  # type: ignore[assignment]


def _party_env(rank: int, world_size: int, host: str, port: int) -> None:
    os.environ.update(
        {
            "RENDEZVOUS": f"tcp://{host}:{port}",
            "MASTER_ADDR": host,
            "MASTER_PORT": str(port),
            "WORLD_SIZE": str(world_size),
            "RANK": str(rank),
            "DISTRIBUTED_BACKEND": "gloo",
        }
    )


def _configure_crypten(crypten: Any, dealer: bool) -> None:
    from crypten.config import cfg

    cfg.mpc.provider = "TTP" if dealer else "TFP"
    cfg.communicator.verbose = True  # CrypTen counts bytes/rounds only when verbose


@dataclass
class _Held:
    share: np.ndarray
    total_weight: float
    count: int


# --------------------------------------------------------------------------- parties


class AggregatorParty:
    """One cloud aggregator party (rank in [0, world_size)); a Ray actor via the backend.

    Life cycle: ``init()`` joins the gloo group (all parties, and the dealer
    when ``dealer=True``, at once); ``submit_share`` per gateway per round;
    ``aggregate`` per round (all parties at once, same arguments);
    ``shutdown()``.
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        port: int,
        host: str = "127.0.0.1",
        dealer: bool = False,
        timeout_s: float = 60.0,
        threads: int = 1,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        if world_size < 2:
            raise ValueError(f"secure aggregation needs >= 2 parties, got {world_size}")
        self.rank = rank
        self.world_size = world_size
        self.port = port
        self.host = host
        self.dealer = dealer
        self.timeout_s = timeout_s
        self.threads = threads
        self._held: dict[int, dict[str, _Held]] = {}
        self._crypten: Any = None
        self._fault: str | None = None

    # -- setup
    def init(self) -> dict[str, Any]:
        """Join the group: set the rendezvous environment, then ``crypten.init()``."""
        import torch

        from cloud.crypten_shim import import_crypten

        torch.set_num_threads(self.threads)
        _party_env(self.rank, self.world_size, self.host, self.port)
        crypten = import_crypten()
        _configure_crypten(crypten, self.dealer)
        with _process_group_timeout(self.timeout_s):
            crypten.init()
        self._crypten = crypten
        comm = crypten.comm.get()
        if comm.get_rank() != self.rank or comm.get_world_size() != self.world_size:
            raise RuntimeError(
                f"party {self.rank}: CrypTen sees rank {comm.get_rank()} of "
                f"{comm.get_world_size()}, expected {self.rank} of {self.world_size}"
            )
        return {"rank": self.rank, "pid": os.getpid(), "dealer": self.dealer}

    def where(self) -> dict[str, Any]:
        """This party's process and Ray node (placement reports, fault drills)."""
        import sys

        node = None
        if "ray" in sys.modules:
            import ray

            if ray.is_initialized():
                node = ray.get_runtime_context().get_node_id()
        return {"rank": self.rank, "pid": os.getpid(), "node": node}

    def shutdown(self) -> None:
        """Leave the group (rank 0 also tells the dealer to stop)."""
        if self._crypten is not None and self._crypten.is_initialized():
            self._crypten.uninit()
        self._crypten = None

    # -- intake
    def submit_share(
        self, round_: int, gateway: str, share: np.ndarray, total_weight: float, count: int
    ) -> int:
        """Buffer one gateway's share for a round; returns its length. A resend replaces it."""
        a = np.asarray(share)
        if a.dtype != np.int64 or a.ndim != 1:
            raise ValueError(
                f"party {self.rank}: share of {gateway!r} for round {round_} must be a flat "
                f"int64 array, got {a.dtype} with shape {a.shape}"
            )
        w = float(total_weight)
        if not math.isfinite(w) or w < 0 or int(count) < 0:
            raise ValueError(
                f"party {self.rank}: {gateway!r} round {round_}: invalid public weight/count "
                f"{total_weight!r}/{count!r}"
            )
        # Copy: the array may be a read-only view pinned in Ray's object store.
        self._held.setdefault(round_, {})[gateway] = _Held(
            np.array(a, dtype=np.int64, copy=True), w, int(count)
        )
        return int(a.shape[0])

    def submit_seed(self, share: Any) -> int:
        """Buffer a share that arrived as its seed (``gateway.secret_sharing.SeedShare``)."""
        if share.party != self.rank:
            raise ValueError(
                f"party {self.rank}: seed share of {share.gateway!r} is for party {share.party}"
            )
        if not isinstance(share.seed, bytes) or not 16 <= len(share.seed) <= 64:
            raise ValueError(f"party {self.rank}: seed of {share.gateway!r} must be 16-64 bytes")
        if not 0 < int(share.length) <= 1 << 28:
            raise ValueError(f"party {self.rank}: bad share length {share.length!r}")
        sp = share.expand()
        return self.submit_share(sp.round, sp.gateway, sp.share, sp.total_weight, sp.count)

    def submit_batch(self, items: Sequence[Any]) -> int:
        """Several gateways' shares in one call: ``SharedPartial``s and ``SeedShare``s."""
        from gateway.secret_sharing import SeedShare, SharedPartial

        for it in items:
            if isinstance(it, SeedShare):
                self.submit_seed(it)
            elif isinstance(it, SharedPartial):
                if it.party != self.rank:
                    raise ValueError(
                        f"party {self.rank}: share of {it.gateway!r} is for {it.party}"
                    )
                self.submit_share(it.round, it.gateway, it.share, it.total_weight, it.count)
            else:
                raise TypeError(f"party {self.rank}: cannot take a {type(it).__name__}")
        return len(items)

    def received(self, round_: int) -> dict[str, tuple[int, float, int]]:
        """What this party holds for a round: gateway -> (length, total_weight, count)."""
        held = self._held.get(round_, {})
        return {g: (int(h.share.shape[0]), h.total_weight, h.count) for g, h in held.items()}

    def drop_round(self, round_: int) -> None:
        self._held.pop(round_, None)

    def inject_fault(self, stage: str | None) -> None:
        """Fault injection (tests, chaos drills): crash this process at a stage of the next round.

        ``"agreed"``: right after the agreement, before any secret is combined;
        ``"reveal"``: after all the secure computation, just before the reveal.
        """
        if stage not in (None, *FAULT_STAGES):
            raise ValueError(f"unknown fault stage {stage!r}; expected one of {FAULT_STAGES}")
        self._fault = stage

    def _maybe_crash(self, stage: str) -> None:
        if self._fault == stage:
            os._exit(17)  # like a kill -9: no cleanup, the peers see the sockets close

    # -- the round
    def aggregate(
        self,
        round_: int,
        gateways: Sequence[str],
        noise_std: float = 0.0,
        clip_norm: float | None = None,
    ) -> dict[str, Any]:
        """Securely sum the listed gateways' shares (+ noise, norm bound); reveal to rank 0.

        All parties must be called with the same arguments. Returns, on rank 0,
        ``sum`` (float64) and the public totals; on the others ``sum`` is None.
        The round's shares are dropped afterwards, whatever happens.
        """
        if self._crypten is None:
            raise RuntimeError(f"party {self.rank}: init() was not called")
        t_start = time.perf_counter()
        crypten = self._crypten
        comm = crypten.comm.get()
        comm.reset_communication_stats()
        try:
            held = self._held.get(round_, {})
            gateways = list(gateways)
            if noise_std < 0 or not math.isfinite(noise_std):
                raise ValueError(f"noise_std must be finite and >= 0, got {noise_std!r}")
            if not gateways:
                raise RoundAborted(f"round {round_}: empty gateway list")
            missing = [g for g in gateways if g not in held]
            lengths = {held[g].share.shape[0] for g in gateways if g in held}
            num_params = next(iter(lengths)) if len(lengths) == 1 else -1
            self._agree(round_, gateways, held, missing, lengths, noise_std, clip_norm)
            self._maybe_crash("agreed")
            shares = [held[g].share for g in gateways]
            info: dict[str, Any] = {}
            if clip_norm is None:
                raw, scale_bits = self._sum(shares, noise_std), FRAC_BITS
            else:
                if not self.dealer:
                    raise RoundAborted(
                        f"round {round_}: norm bounding needs the dealer (TTP provider); "
                        "start the parties with dealer=True"
                    )
                plan = ClipPlan.make(clip_norm, num_params, self.world_size)
                raw = self._clipped_sum(shares, plan, noise_std)
                scale_bits = 2 * FRAC_BITS
                info = {
                    "frac_bits": plan.frac_bits,
                    "thresholds": len(plan.thresholds),
                    "limit": plan.limit,
                    "headroom": plan.headroom,
                }
            stats = comm.get_communication_stats()
            out: dict[str, Any] = {
                "rank": self.rank,
                "sum": None,
                "gateways": len(gateways),
                "num_params": num_params,
                "total_weight": float(sum(held[g].total_weight for g in gateways)),
                "count": int(sum(held[g].count for g in gateways)),
                "share_bytes_in": int(sum(s.nbytes for s in shares)),
                "comm_bytes": int(stats["bytes"]),
                "comm_rounds": int(stats["rounds"]),
                "clip": info or None,
            }
            if raw is not None:
                out["sum"] = raw.astype(np.float64) / float(2**scale_bits)
            out["seconds"] = time.perf_counter() - t_start
            return out
        finally:
            self._held.pop(round_, None)
            for r in [r for r in self._held if r < round_ - 16]:
                del self._held[r]

    def _agree(
        self,
        round_: int,
        gateways: list[str],
        held: dict[str, _Held],
        missing: list[str],
        lengths: set[int],
        noise_std: float,
        clip_norm: float | None,
    ) -> None:
        """All-gather a digest of the round's public inputs; abort everywhere on any mismatch."""
        import torch

        public = {
            "round": round_,
            "gateways": gateways,
            "meta": [
                (held[g].total_weight, held[g].count) if g in held else None for g in gateways
            ],
            "P": sorted(lengths),
            "noise_std": float(noise_std),
            "clip_norm": None if clip_norm is None else float(clip_norm),
        }
        digest = hashlib.sha256(json.dumps(public, sort_keys=True).encode()).digest()
        words = np.frombuffer(digest, dtype="<i8").tolist()
        mine = torch.tensor([len(missing), int(len(lengths) > 1), *words], dtype=torch.long)
        everyone = self._crypten.comm.get().all_gather(mine)
        problems = []
        for r, t in enumerate(everyone):
            v = t.tolist()
            if v[0]:
                problems.append(f"party {r} lacks {v[0]} of the {len(gateways)} gateways' shares")
            if v[1]:
                problems.append(f"party {r} holds shares of different lengths")
            if v[2:] != everyone[0].tolist()[2:]:
                problems.append(f"party {r} was given different public inputs than party 0")
        if problems:
            mine_missing = f" (party {self.rank} lacks {missing[:5]})" if missing else ""
            raise RoundAborted(
                f"round {round_} aborted before any computation: "
                + "; ".join(problems)
                + mine_missing
            )

    def _noise_share(self, n: int, noise_std: float, scale_bits: int) -> np.ndarray:
        std = noise_std / math.sqrt(self.world_size)
        return encode_noise(gaussian_noise(n, std, secrets.token_bytes(32)), scale_bits)

    def _reveal(self, share: np.ndarray) -> np.ndarray | None:
        """Reveal to rank 0 only: raw ring values (a reduce of the shares), no CrypTen decoding."""
        import torch
        from crypten.mpc import MPCTensor

        self._maybe_crash("reveal")
        out = MPCTensor.from_shares(torch.from_numpy(share), precision=0).reveal(dst=0)
        return None if out is None else out.numpy().astype(np.int64, copy=False)

    def _sum(self, shares: Sequence[np.ndarray], noise_std: float) -> np.ndarray | None:
        total = np.array(shares[0], dtype=np.int64, copy=True)
        for s in shares[1:]:
            total += s  # ring addition (int64 wrap-around)
        if noise_std > 0:
            total += self._noise_share(total.shape[0], noise_std, FRAC_BITS)
        return self._reveal(total)

    def _clipped_sum(
        self, shares: Sequence[np.ndarray], plan: ClipPlan, noise_std: float
    ) -> np.ndarray | None:
        import torch
        from crypten.mpc import MPCTensor
        from crypten.mpc.primitives import ArithmeticSharedTensor as AST
        from crypten.mpc.primitives import beaver

        g, p = len(shares), shares[0].shape[0]
        chunk = max(1, CHUNK_ELEMENTS // g)

        def block(lo: int, hi: int) -> torch.Tensor:
            return torch.from_numpy(np.stack([s[lo:hi] for s in shares]))

        # 1. z_g = 2^k * ||y_g||^2, exact in the ring (see ClipPlan).
        sq = torch.zeros(g, dtype=torch.long)
        for lo in range(0, p, chunk):
            y = AST.from_shares(block(lo, lo + chunk) >> plan.shift, precision=0)
            sq += beaver.square(y).share.sum(dim=1)
        z = sq * (1 << plan.shift)
        # 2. Comparisons: [z > tau_j] for every threshold, and [z < 0] (a wrapped ring).
        tau = torch.tensor(plan.z_thresholds, dtype=torch.long)
        diff = -z[:, None].expand(g, tau.shape[0])
        if self.rank == 0:
            diff = diff + tau[None, :]
        cmp = MPCTensor.from_shares(torch.cat([diff, z[:, None]], dim=1), precision=0)
        bits = cmp._ltz().share  # arithmetic shares of 0/1, scale 1
        coefs = torch.tensor(plan.coefs, dtype=torch.long)
        one = 1 << FRAC_BITS
        s = (bits[:, :-1] * coefs[None, :]).sum(dim=1) - bits[:, -1] * one
        if self.rank == 0:
            s = s + one
        s_sh = AST.from_shares(s[None, :], precision=0)  # [1, G], scale 2^16
        # 3. sum_g s_g x_g: one Beaver matrix product per chunk, kept at scale 2^32.
        out = np.empty(p, dtype=np.int64)
        for lo in range(0, p, chunk):
            x = AST.from_shares(block(lo, lo + chunk), precision=0)
            out[lo : lo + chunk] = beaver.matmul(s_sh, x).share[0].numpy()
        if noise_std > 0:
            out += self._noise_share(p, noise_std, 2 * FRAC_BITS)
        return self._reveal(out)


class Dealer:
    """CrypTen's trusted third party: hands out Beaver triples, never sees an opened value.

    Rank ``world_size`` of the gloo group. ``serve()`` blocks until rank 0's
    ``shutdown`` sends "terminate" (or the group breaks). Runs as its own actor.
    """

    def __init__(
        self, world_size: int, port: int, host: str = "127.0.0.1", timeout_s: float = 60.0
    ) -> None:
        self.world_size = world_size
        self.port = port
        self.host = host
        self.timeout_s = timeout_s

    def serve(self) -> str:
        import torch

        from cloud.crypten_shim import import_crypten

        torch.set_num_threads(1)
        _party_env(self.world_size, self.world_size, self.host, self.port)
        crypten = import_crypten()
        _configure_crypten(crypten, dealer=True)
        # CrypTen's TTPServer draws the parties' PRSS seeds from torch's *default*
        # generator, which starts from a fixed seed in every fresh process: anyone
        # could recompute every triple. Reseed it from the OS CSPRNG first.
        torch.manual_seed(secrets.randbits(63))
        from crypten.mpc.provider.ttp_provider import TTPServer

        with _process_group_timeout(self.timeout_s):
            TTPServer()
        return "terminated"
