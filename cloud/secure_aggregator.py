"""Driver for the cloud's secure aggregation: start K parties, run rounds, fail cleanly.

:class:`SecureAggregator` spawns K :class:`cloud.smpc.AggregatorParty` actors
(and a :class:`cloud.smpc.Dealer` when norm bounding is wanted) through a
backend's ``spawn`` (``hierarchy.backend.RayBackend``: one process per party;
the in-process backend cannot host several gloo ranks), picks a free port for
the gloo rendezvous, and per round

1. routes each gateway's ``SharedPartial`` to its party,
2. asks every party what it holds and keeps the gateways that reached *every*
   party with the same public weight, count and length (a gateway that
   missed the deadline at one party is excluded everywhere, consistently),
3. calls ``aggregate`` on all parties with that list, and returns rank 0's
   revealed noisy sum.

A party that dies or errors mid-round fails the round on all parties (gloo
reports the lost peer; a hung peer hits the group timeout): the driver
raises :class:`SecureAggregationError` naming the party, returns no sum, and
stops the whole group (it holds a broken gloo group); ``restart()`` brings up a
fresh one.

DP note: each party adds N(0, sigma^2/K), so the revealed noise is N(0, sigma^2)
against anyone outside the cloud; a coalition of t < K parties that subtracts
its own noise still faces N(0, sigma^2 (K - t) / K).

Ray is touched only through the backend's handles plus ``ray.wait``/``ray.kill``
for timeouts and teardown.
"""

from __future__ import annotations

import contextlib
import math
import re
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gateway.partial_aggregate import PartialAggregate
from gateway.secret_sharing import SharedPartial, share_partial


class SecureAggregationError(RuntimeError):
    """A round could not complete; no sum was revealed."""


@dataclass(frozen=True)
class SecureSum:
    """What one secure round releases: the noisy (optionally norm-bounded) sum and public totals."""

    round: int
    values: np.ndarray  # float64 [P]: sum_g s_g x_g + N(0, noise_std^2)
    gateways: tuple[str, ...]
    excluded: dict[str, str]  # gateway -> why it was left out
    total_weight: float
    count: int
    noise_std: float
    clip_norm: float | None
    clip: dict[str, Any] | None  # public parameters of the norm bound (headroom, ...)
    share_bytes_in: int  # gateway -> cloud share bytes of the included gateways, all parties
    party_bytes: int  # bytes between parties and dealer in the round (CrypTen's count / 2)
    comm_rounds: int  # communication rounds (max over parties)
    seconds: float  # wall time of the secure computation (agreement to reveal)
    per_party: list[dict[str, Any]] = field(default_factory=list)


_PORT_ATTEMPTS = 3


def _port_taken(reason: str) -> bool:
    return "EADDRINUSE" in reason or "address already in use" in reason.lower()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class SecureAggregator:
    """K aggregator parties (+ a dealer with ``norm_bounding``), for many rounds."""

    def __init__(
        self,
        backend: Any,
        parties: int = 3,
        norm_bounding: bool = False,
        host: str = "127.0.0.1",
        timeout_s: float = 60.0,
        start_timeout_s: float = 180.0,
        threads: int = 1,
        pin_node: str | None = None,
    ) -> None:
        if parties < 2:
            raise ValueError(f"secure aggregation needs at least 2 parties, got {parties}")
        if getattr(backend, "name", None) != "ray":
            raise ValueError(
                "SecureAggregator needs one process per party: use hierarchy.backend.RayBackend"
            )
        self.backend = backend
        self.parties = parties
        self.norm_bounding = norm_bounding
        self.host = host
        self.timeout_s = timeout_s
        self.start_timeout_s = start_timeout_s
        self.threads = threads
        # Where the parties run (a Ray node id): on a cluster, the node whose address is
        # ``host``, because rank 0 serves the gloo rendezvous there. By id, not by the
        # ``node:<ip>`` resource: nodes on one machine share an address.
        self.pin_node = pin_node
        self._handles: list[Any] = []
        self._dealer: Any = None
        self._dealer_ref: Any = None
        self._broken: str | None = None
        self.port = 0
        self.start()

    # ------------------------------------------------------------------ life cycle
    def _party_class(self) -> type:
        """The party actor class; a subclass may extend the intake (``cloud.unmask``)."""
        from cloud.smpc import AggregatorParty

        return AggregatorParty

    def start(self) -> None:
        """Start the party group; a rendezvous port taken meanwhile is retried on a fresh one.

        ``free_port`` only finds a port that was free a moment ago: between it and
        rank 0's listen, another process (a Ray worker, another run) can take it.
        """
        for attempt in range(_PORT_ATTEMPTS):
            try:
                self._start_once()
                return
            except SecureAggregationError as exc:
                if attempt == _PORT_ATTEMPTS - 1 or not _port_taken(str(exc)):
                    raise

    def _start_once(self) -> None:
        from cloud.smpc import Dealer

        self.port = free_port(self.host)
        self._broken = None
        self._handles = [
            self.backend.spawn(
                self._party_class(),
                r,
                self.parties,
                self.port,
                self.host,
                self.norm_bounding,
                self.timeout_s,
                self.threads,
                num_cpus=0,
                pin_node=self.pin_node,
            )
            for r in range(self.parties)
        ]
        if self.norm_bounding:
            self._dealer = self.backend.spawn(
                Dealer,
                self.parties,
                self.port,
                self.host,
                self.timeout_s,
                num_cpus=0,
                pin_node=self.pin_node,
            )
            self._dealer_ref = self._dealer.call("serve")
        refs = [h.call("init") for h in self._handles]
        self._collect(refs, "start", self.start_timeout_s)

    @property
    def party_handles(self) -> list[Any]:
        """The running parties' backend handles, rank order (gateways submit to them)."""
        self._check_up()
        return list(self._handles)

    def restart(self) -> None:
        self.shutdown()
        self.start()

    def shutdown(self) -> None:
        """Leave the group cleanly when healthy, then stop every actor."""
        if self._handles and self._broken is None:
            with contextlib.suppress(SecureAggregationError):
                self._collect([h.call("shutdown") for h in self._handles], "shutdown", 30.0)
        self._kill_all()

    def __enter__(self) -> SecureAggregator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def kill_party(self, rank: int) -> None:
        """Fault injection: kill one party's process now (tests, chaos drills)."""
        _kill(self._handles[rank])

    def inject_fault(self, rank: int, stage: str) -> None:
        """Fault injection: party ``rank`` crashes at ``stage`` ("agreed", "reveal") next round."""
        self._check_up()
        self._collect(
            [self._handles[rank].call("inject_fault", stage)], "inject_fault", 30.0, [rank]
        )

    # ------------------------------------------------------------------ rounds
    def submit(self, shared: SharedPartial | Iterable[SharedPartial]) -> None:
        """Deliver shares to their parties (each ``SharedPartial.party`` is a rank)."""
        self._check_up()
        items = [shared] if isinstance(shared, SharedPartial) else list(shared)
        refs, ranks = [], []
        for sp in items:
            if not 0 <= sp.party < self.parties:
                raise ValueError(
                    f"share of {sp.gateway!r} is for party {sp.party}, but there are "
                    f"{self.parties} parties"
                )
            if sp.share.dtype != np.int64 or sp.share.ndim != 1:
                raise ValueError(f"share of {sp.gateway!r} must be a flat int64 array")
            refs.append(
                self._handles[sp.party].call(
                    "submit_share", sp.round, sp.gateway, sp.share, sp.total_weight, sp.count
                )
            )
            ranks.append(sp.party)
        self._collect(refs, "submit", self.timeout_s, ranks)

    def agree(self, round_: int) -> tuple[list[str], dict[str, str]]:
        """Gateways every party holds with identical public metadata; the rest with reasons."""
        agreed, excluded, _ = self._agree(round_)
        return agreed, excluded

    def _agree(self, round_: int) -> tuple[list[str], dict[str, str], int]:
        self._check_up()
        held: list[dict[str, tuple[int, float, int]]] = self._collect(
            [h.call("received", round_) for h in self._handles],
            f"round {round_} agreement",
            self.timeout_s,
        )
        names = sorted(set().union(*held))
        lengths = [m[g][0] for m in held for g in m]
        common_len = max(set(lengths), key=lengths.count) if lengths else 0
        agreed, excluded = [], {}
        for g in names:
            lacking = [r for r, m in enumerate(held) if g not in m]
            if lacking:
                at = ", ".join(map(str, lacking))
                excluded[g] = f"no share at part{'y' if len(lacking) == 1 else 'ies'} {at}"
                continue
            metas = {tuple(m[g]) for m in held}
            if len(metas) > 1:
                excluded[g] = f"parties hold different length/weight/count: {sorted(metas)}"
            elif held[0][g][0] != common_len:
                excluded[g] = f"share length {held[0][g][0]} != {common_len}"
            else:
                agreed.append(g)
        return agreed, excluded, common_len

    def aggregate(
        self,
        round_: int,
        gateways: Sequence[str] | None = None,
        noise_std: float = 0.0,
        clip_norm: float | None = None,
    ) -> SecureSum:
        """Run the secure round over ``gateways`` (default: what :meth:`agree` finds)."""
        self._check_up()
        if not (math.isfinite(noise_std) and noise_std >= 0):
            raise ValueError(f"noise_std must be finite and >= 0, got {noise_std!r}")
        if clip_norm is not None:
            if not self.norm_bounding:
                raise ValueError(
                    "clip_norm needs the dealer: create SecureAggregator(..., norm_bounding=True)"
                )
            if not (math.isfinite(clip_norm) and clip_norm > 0):
                raise ValueError(f"clip_norm must be positive and finite, got {clip_norm!r}")
        excluded: dict[str, str] = {}
        agreed, found, num_params = self._agree(round_)
        if gateways is None:
            gateways, excluded = agreed, found
        gateways = list(gateways)
        if clip_norm is not None and gateways:
            # Refuse unusable public clip parameters here, before any party starts the round.
            from cloud.smpc import ClipPlan

            ClipPlan.make(clip_norm, num_params, self.parties)
        if not gateways:
            for h in self._handles:
                h.call("drop_round", round_)
            raise SecureAggregationError(
                f"round {round_}: no gateway delivered shares to every party ({excluded})"
            )
        t0 = time.perf_counter()
        refs = [h.call("aggregate", round_, gateways, noise_std, clip_norm) for h in self._handles]
        outs: list[dict[str, Any]] = self._collect(refs, f"round {round_}", self.timeout_s)
        seconds = time.perf_counter() - t0
        head = outs[0]
        if head["sum"] is None:  # pragma: no cover - rank 0 always gets the reveal
            raise SecureAggregationError(f"round {round_}: rank 0 returned no sum")
        return SecureSum(
            round=round_,
            values=np.array(head["sum"], dtype=np.float64),  # writable, owned
            gateways=tuple(gateways),
            excluded=excluded,
            total_weight=head["total_weight"],
            count=head["count"],
            noise_std=noise_std,
            clip_norm=clip_norm,
            clip=head["clip"],
            share_bytes_in=sum(o["share_bytes_in"] for o in outs),
            party_bytes=sum(o["comm_bytes"] for o in outs) // 2,
            comm_rounds=max(o["comm_rounds"] for o in outs),
            seconds=seconds,
            per_party=[{k: v for k, v in o.items() if k != "sum"} for o in outs],
        )

    def secure_sum(
        self,
        round_: int,
        partials: Sequence[PartialAggregate],
        noise_std: float = 0.0,
        clip_norm: float | None = None,
    ) -> SecureSum:
        """Gateway side and cloud side in one call: share each partial, submit, aggregate."""
        shared = [sp for p in partials for sp in share_partial(p, self.parties)]
        self.submit(shared)
        return self.aggregate(round_, None, noise_std, clip_norm)

    # ------------------------------------------------------------------ internals
    def _check_up(self) -> None:
        if self._broken is not None:
            raise SecureAggregationError(
                f"the aggregator parties are down after: {self._broken}; call restart()"
            )
        if not self._handles:
            raise SecureAggregationError("the aggregator parties are not running; call start()")

    def _collect(
        self,
        refs: Sequence[Any],
        what: str,
        timeout_s: float,
        ranks: Sequence[int] | None = None,
    ) -> list[Any]:
        """Wait for one call per party; on any failure stop the group and raise, naming parties."""
        import ray

        ranks = list(range(len(refs))) if ranks is None else list(ranks)
        pending = dict(zip(refs, range(len(refs)), strict=True))
        results: list[Any] = [None] * len(refs)
        died: dict[int, str] = {}
        failed: dict[int, str] = {}
        deadline = time.monotonic() + timeout_s
        dealer_gone = False
        while pending:
            ready, _ = ray.wait(
                list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic())
            )
            if not ready:
                break
            for ref in ready:
                i = pending.pop(ref)
                try:
                    results[i] = ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    died[ranks[i]] = _first_line(exc)
                except ray.exceptions.RayTaskError as exc:
                    failed[ranks[i]] = _first_line(exc.cause if exc.cause else exc)
                except Exception as exc:  # pragma: no cover - defensive
                    failed[ranks[i]] = _first_line(exc)
            if (died or failed) and pending:
                # The others are blocked on the lost peer: gloo reports it quickly;
                # do not wait for the full timeout.
                deadline = min(deadline, time.monotonic() + 10.0)
        if self._dealer_ref is not None and not (died or failed or pending):
            done, _ = ray.wait([self._dealer_ref], timeout=0)
            dealer_gone = bool(done) and what != "shutdown"
        if not (died or failed or pending or dealer_gone):
            return results
        parts = [f"party {r} died ({m})" for r, m in sorted(died.items())]
        by_msg: dict[str, list[int]] = {}
        for r, m in sorted(failed.items()):
            by_msg.setdefault(m, []).append(r)
        parts += [
            f"part{'y' if len(rs) == 1 else 'ies'} {', '.join(map(str, rs))} failed: {m}"
            for m, rs in by_msg.items()
        ]
        parts += [
            f"party {ranks[i]} did not answer within {timeout_s:g} s" for i in pending.values()
        ]
        if dealer_gone:
            parts.append("the dealer stopped")
        reason = f"{what}: " + "; ".join(parts)
        only_input_errors = what == "submit" and not died and not pending and not dealer_gone
        if not only_input_errors:
            self._broken = reason
            self._kill_all()
        raise SecureAggregationError(reason + ("" if only_input_errors else "; no sum revealed"))

    def _kill_all(self) -> None:
        for h in [*self._handles, self._dealer]:
            if h is not None:
                _kill(h)
        self._handles, self._dealer, self._dealer_ref = [], None, None


def _kill(handle: Any) -> None:
    import ray

    actor = getattr(handle, "_actor", None)  # hierarchy.backend.RayHandle keeps the actor here
    if actor is not None:
        with contextlib.suppress(Exception):  # already gone
            ray.kill(actor, no_restart=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    lines = [ln for ln in text.splitlines() if ln.strip()]
    # Ray prefixes task errors with a traceback; the last line is the actual message.
    line = lines[-1] if lines else type(exc).__name__
    # gloo: "[/path/pair.cc:537] Read error [...]: Connection reset by peer. This is typically..."
    line = re.sub(r"^\[[^\]]*\.cc:\d+\]\s*", "", line).split(" This is typically")[0]
    return line[:400]
