"""Gateway-side validation of signed device updates, and exactly-once intake.

Pure and transport-independent: the CoAP and MQTT servers hand the raw bytes
of a request/message to :meth:`Validator.check` and answer the
:class:`Rejection`'s reason code (or an ack) in their protocol's way.

Checks run cheapest-and-least-trusting first, so unauthenticated garbage
costs no signature verification and unauthenticated data is never decoded
by a codec::

    size -> CBOR structure/schema -> unknown device -> signature
    -> replay (timestamp skew, nonce) -> stale round -> round closed -> stale base
    -> shapes/codecs vs the model -> codec decode, NaN/Inf -> L2 norm bound -> rate limit

A nonce is remembered only once its update is accepted. A byte-identical
copy of an accepted update (an MQTT QoS 1 redelivery, a CoAP retransmission)
is therefore not a replay: it passes the checks again, marked
``redelivery``, takes no rate-limit token, and :class:`IntakeBuffer` folds it
in zero times ("duplicate", which servers answer with an ack). A *different*
message reusing a nonce is a replay. Nonces are forgotten once their
timestamp falls out of the skew window, because the skew check alone then
refuses them, so the cache holds at most the nonces of one window; it also
has a hard capacity, and when that is full new updates are refused
(fail closed) instead of forgetting nonces that still matter.

Numpy plus ``devices.envelope``/``devices.codecs`` only: edge servers have no torch.
"""

from __future__ import annotations

import heapq
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from devices.codecs import CODECS, CodecError, decode
from devices.envelope import open_envelope, verify
from devices.reasons import REASONS, Rejection
from gateway.partial_aggregate import PartialAggregate

__all__ = [
    "REASONS",
    "Accepted",
    "IntakeBuffer",
    "RateLimit",
    "Rejection",
    "RejectionCounter",
    "ReplayCache",
    "TokenBuckets",
    "ValidationConfig",
    "Validator",
]


@dataclass(frozen=True)
class RateLimit:
    """At most ``updates`` accepted updates per device per ``window_s`` seconds (token bucket)."""

    updates: int = 20
    window_s: float = 60.0

    def __post_init__(self) -> None:
        if self.updates < 1:
            raise ValueError(f"rate limit updates must be >= 1, got {self.updates}")
        if not (math.isfinite(self.window_s) and self.window_s > 0):
            raise ValueError(f"rate limit window_s must be > 0, got {self.window_s}")


@dataclass(frozen=True)
class ValidationConfig:
    """The gateway's intake limits (one concern: what an acceptable update is).

    ``max_bytes`` defaults to what the largest codec (f32) needs for the model
    plus envelope framing; ``codecs`` defaults to every registered codec.
    """

    norm_bound: float | None = None  # L2 bound on the decoded update; None = no bound
    rate_limit: RateLimit | None = field(default_factory=RateLimit)
    max_skew_s: float = 120.0  # |sender timestamp - gateway clock| allowed
    replay_capacity: int = 100_000  # nonces remembered at most (fail closed beyond)
    max_bytes: int | None = None
    codecs: frozenset[str] | None = None

    def __post_init__(self) -> None:
        if self.norm_bound is not None and not (self.norm_bound > 0):
            raise ValueError(f"norm_bound must be > 0 or None, got {self.norm_bound}")
        if not (math.isfinite(self.max_skew_s) and self.max_skew_s > 0):
            raise ValueError(f"max_skew_s must be > 0, got {self.max_skew_s}")
        if self.replay_capacity < 1:
            raise ValueError(f"replay_capacity must be >= 1, got {self.replay_capacity}")
        if self.max_bytes is not None and self.max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {self.max_bytes}")
        if self.codecs is not None and not self.codecs <= set(CODECS):
            raise ValueError(f"unknown codecs {sorted(self.codecs - set(CODECS))}")


@dataclass(frozen=True)
class Accepted:
    """A verified, decoded update ready to be folded into the partial aggregate."""

    device: str
    round: int
    samples: int
    delta: np.ndarray  # float32, flat [P], finite
    nonce: bytes
    transport: str = ""
    redelivery: bool = False  # a byte-identical copy of an update accepted before


class RejectionCounter:
    """(reason, transport) -> count; a plain dict, exported to Prometheus elsewhere."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def inc(self, reason: str, transport: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}")
        with self._lock:
            key = (reason, transport)
            self._counts[key] = self._counts.get(key, 0) + 1

    def get(self, reason: str, transport: str | None = None) -> int:
        """Count for ``reason`` on ``transport``, or on all transports when it is None."""
        with self._lock:
            if transport is not None:
                return self._counts.get((reason, transport), 0)
            return sum(c for (r, _), c in self._counts.items() if r == reason)

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())

    def snapshot(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self._counts)


class ReplayCache:
    """Nonces of accepted updates within the clock-skew window, with bounded memory.

    Entries are keyed by (device, nonce) so one device cannot burn another's
    nonces, and remember an 8-byte fingerprint of the signature so a
    byte-identical redelivery is told apart from a replay. An entry expires
    when its timestamp is more than ``max_skew_s`` in the past: from then on the
    skew check refuses that timestamp anyway.
    """

    def __init__(self, max_skew_s: float, capacity: int) -> None:
        self.max_skew_s = max_skew_s
        self.capacity = capacity
        self._seen: dict[tuple[str, bytes], int] = {}
        self._expiry: list[tuple[float, str, bytes]] = []  # min-heap on expiry time

    def __len__(self) -> int:
        return len(self._seen)

    def _expire(self, now: float) -> None:
        heap = self._expiry
        while heap and heap[0][0] < now:
            _, device, nonce = heapq.heappop(heap)
            self._seen.pop((device, nonce), None)

    def check(
        self, device: str, nonce: bytes, timestamp: float, fingerprint: int, now: float
    ) -> bool:
        """Raise ``replay`` if stale/future or the nonce was used by another message.

        Returns True for a redelivery (same nonce, same signature), False if new.
        """
        if abs(timestamp - now) > self.max_skew_s:
            raise Rejection(
                "replay",
                f"timestamp {timestamp:.3f} is {timestamp - now:+.1f} s from the gateway clock "
                f"(allowed ±{self.max_skew_s:g} s)",
            )
        self._expire(now)
        seen = self._seen.get((device, nonce))
        if seen is None:
            return False
        if seen != fingerprint:
            raise Rejection("replay", f"nonce {nonce.hex()} of {device!r} was already used")
        return True

    def add(
        self, device: str, nonce: bytes, timestamp: float, fingerprint: int, now: float
    ) -> None:
        """Remember an accepted nonce; refuse (``rate-limited``) when the cache is full."""
        self._expire(now)
        key = (device, nonce)
        if key in self._seen:
            return
        if len(self._seen) >= self.capacity:
            raise Rejection(
                "rate-limited", f"replay cache is full ({self.capacity} nonces in the skew window)"
            )
        self._seen[key] = fingerprint
        heapq.heappush(self._expiry, (timestamp + self.max_skew_s, device, nonce))


class TokenBuckets:
    """One token bucket per device: ``updates`` tokens, refilled evenly over ``window_s``.

    Only registered devices that pass every other check reach it, so its size
    is bounded by the registry.
    """

    def __init__(self, limit: RateLimit) -> None:
        self.limit = limit
        self._rate = limit.updates / limit.window_s
        self._state: dict[str, tuple[float, float]] = {}  # device -> (tokens, last refill time)

    def _tokens(self, device: str, now: float) -> float:
        tokens, last = self._state.get(device, (float(self.limit.updates), now))
        return min(float(self.limit.updates), tokens + max(0.0, now - last) * self._rate)

    def allows(self, device: str, now: float) -> bool:
        return self._tokens(device, now) >= 1.0

    def take(self, device: str, now: float) -> None:
        self._state[device] = (self._tokens(device, now) - 1.0, now)


ShapeSpec = Sequence[Sequence[int]]


class Validator:
    """Turns untrusted bytes into an :class:`Accepted` update or a :class:`Rejection`.

    ``expected_shapes`` are the model's tensor shapes; an envelope carries
    either one tensor per shape, in order, or a single flat tensor of all the
    parameters. ``round``/``base`` are the round in progress and the model
    hash it serves; the gateway moves them with :meth:`start_round`. ``clock``
    (Unix seconds) is injectable for tests. Thread-safe: a CoAP event loop
    and an MQTT network thread may call :meth:`check` concurrently.
    """

    def __init__(
        self,
        registry: Mapping[str, Ed25519PublicKey],
        expected_shapes: ShapeSpec,
        *,
        round: int,
        base: str,
        config: ValidationConfig | None = None,
        clock: Callable[[], float] = time.time,
        rejections: RejectionCounter | None = None,
    ) -> None:
        self.registry = registry
        self.shapes = [tuple(int(d) for d in s) for s in expected_shapes]
        if not self.shapes or any(d < 0 for s in self.shapes for d in s):
            raise ValueError(f"expected_shapes must be non-empty and non-negative: {self.shapes}")
        self.num_params = sum(math.prod(s) for s in self.shapes)
        self.config = config or ValidationConfig()
        self.max_bytes = self.config.max_bytes or (
            4 * self.num_params + 1024 + 256 * len(self.shapes)
        )
        self.codecs = self.config.codecs if self.config.codecs is not None else frozenset(CODECS)
        self.clock = clock
        self.rejections = rejections if rejections is not None else RejectionCounter()
        self.replay = ReplayCache(self.config.max_skew_s, self.config.replay_capacity)
        self.buckets = TokenBuckets(self.config.rate_limit) if self.config.rate_limit else None
        self.round = round
        self.base = base
        self.closed = False
        self._lock = threading.Lock()

    def start_round(self, round: int, base: str) -> None:
        """Accept updates for ``round`` computed from model ``base`` from now on."""
        with self._lock:
            self.round, self.base, self.closed = round, base, False

    def close_round(self) -> None:
        """Refuse further updates for the current round (``round-closed``)."""
        with self._lock:
            self.closed = True

    def check(self, data: bytes, transport: str = "") -> Accepted:
        """Validate one update; count and re-raise any :class:`Rejection`."""
        try:
            with self._lock:
                return self._check(data, transport)
        except Rejection as r:
            self.rejections.inc(r.reason, transport)
            raise

    def _check(self, data: bytes, transport: str) -> Accepted:
        env, sig, signed = open_envelope(
            data,
            max_bytes=self.max_bytes,
            max_tensors=max(len(self.shapes), 1),
            max_elements=self.num_params,
        )
        key = self.registry.get(env.device)
        if key is None:
            raise Rejection("unknown-device", f"no key registered for device {env.device!r}")
        if not verify(signed, sig, key):
            raise Rejection("bad-signature", f"signature of {env.device!r} does not verify")
        now = self.clock()
        fingerprint = int.from_bytes(sig[:8], "little")
        redelivery = self.replay.check(env.device, env.nonce, env.timestamp, fingerprint, now)
        if env.round != self.round:
            raise Rejection(
                "stale-round",
                f"update of {env.device!r} is for round {env.round}, "
                f"the gateway is in round {self.round}",
            )
        if self.closed:
            raise Rejection("round-closed", f"round {self.round} is closed")
        if env.base != self.base:
            raise Rejection(
                "stale-base",
                f"update of {env.device!r} was computed from model {env.base[:12]}..., "
                f"round {self.round} serves {self.base[:12]}...",
            )
        self._check_shapes(env.device, [(t.codec, tuple(t.shape)) for t in env.tensors])
        parts: list[np.ndarray] = []
        for i, t in enumerate(env.tensors):
            try:
                parts.append(decode(t, max_elements=self.num_params).reshape(-1))
            except CodecError as e:
                reason = "non-finite" if e.reason == "non-finite" else "malformed"
                raise Rejection(reason, f"tensor {i} ({t.codec}) of {env.device!r}: {e}") from None
        delta = parts[0] if len(parts) == 1 else np.concatenate(parts)
        if not np.isfinite(delta).all():  # codecs promise this; an aggregate must never see NaN
            raise Rejection("non-finite", f"update of {env.device!r} contains NaN or infinity")
        bound = self.config.norm_bound
        if bound is not None:
            # pairwise summation in float64, not np.linalg.norm: that goes through BLAS dot,
            # whose thread pool spins for milliseconds on a busy 2-core edge box
            norm = math.sqrt(float(np.square(delta, dtype=np.float64).sum()))
            if not norm <= bound:
                raise Rejection(
                    "norm-bound", f"update of {env.device!r} has L2 norm {norm:.4g} > {bound:g}"
                )
        if not redelivery:
            if self.buckets is not None and not self.buckets.allows(env.device, now):
                lim = self.buckets.limit
                raise Rejection(
                    "rate-limited",
                    f"{env.device!r} sent more than {lim.updates} updates in {lim.window_s:g} s",
                )
            self.replay.add(env.device, env.nonce, env.timestamp, fingerprint, now)
            if self.buckets is not None:
                self.buckets.take(env.device, now)
        return Accepted(env.device, env.round, env.samples, delta, env.nonce, transport, redelivery)

    def _check_shapes(self, device: str, tensors: list[tuple[str, tuple[int, ...]]]) -> None:
        for i, (codec, _) in enumerate(tensors):
            if codec not in self.codecs:
                raise Rejection(
                    "bad-shape",
                    f"tensor {i} of {device!r}: codec {codec!r} is not accepted here "
                    f"(accepted: {', '.join(sorted(self.codecs))})",
                )
        shapes = [s for _, s in tensors]
        if shapes == self.shapes or shapes == [(self.num_params,)]:
            return
        raise Rejection(
            "bad-shape",
            f"update of {device!r} has tensor shapes {shapes[:8]}"
            f"{'...' if len(shapes) > 8 else ''}, the model has {len(self.shapes)} tensors "
            f"{self.shapes[:8]}{'...' if len(self.shapes) > 8 else ''} ({self.num_params} "
            "parameters; one flat tensor is also accepted)",
        )


class IntakeBuffer:
    """Accepted updates of one round, folded into a :class:`PartialAggregate` exactly once.

    Keyed by (device, round, nonce): a redelivered or retransmitted copy is a
    ``"duplicate"`` (servers ack it, nothing is added). A second *different*
    update from a device in the same round is refused (``rate-limited``),
    because FedAvg weights each device once per round.
    """

    def __init__(
        self,
        gateway: str,
        round: int,
        num_params: int,
        *,
        rejections: RejectionCounter | None = None,
    ) -> None:
        self.aggregate = PartialAggregate.empty(gateway, round, num_params)
        self.rejections = rejections
        self.duplicates = 0
        self._keys: set[tuple[str, int, bytes]] = set()
        self._devices: set[str] = set()
        self._lock = threading.Lock()

    @property
    def round(self) -> int:
        return self.aggregate.round

    def offer(self, update: Accepted) -> Literal["accepted", "duplicate"]:
        """Fold ``update`` in once; ``"duplicate"`` if this exact update is already in."""
        try:
            with self._lock:
                return self._offer(update)
        except Rejection as r:
            if self.rejections is not None:
                self.rejections.inc(r.reason, update.transport)
            raise

    def _offer(self, update: Accepted) -> Literal["accepted", "duplicate"]:
        key = (update.device, update.round, update.nonce)
        if key in self._keys:
            self.duplicates += 1
            return "duplicate"
        if update.round != self.aggregate.round:
            raise Rejection(
                "stale-round",
                f"update of {update.device!r} is for round {update.round}, "
                f"this buffer holds round {self.aggregate.round}",
            )
        if update.device in self._devices:
            raise Rejection(
                "rate-limited", f"{update.device!r} already contributed to round {update.round}"
            )
        self.aggregate.add(update.device, update.delta, float(update.samples))
        self._keys.add(key)
        self._devices.add(update.device)
        return "accepted"
