"""One logical gateway, transport-independent: model out, validated updates in, aggregate up.

The CoAP server (``gateway.coap``) and the MQTT intake (``gateway.mqtt``) are
thin shells around :class:`GatewayService`: they hand it the raw bytes of an
upload and turn the :class:`Outcome` into their protocol's reply. Everything
that decides *whether* an update counts lives here and in
``gateway.validation``, so both transports behave identically and the logic
is tested without sockets.

``submit`` never raises for bad input: every refusal becomes an
``Outcome("rejected", reason, detail)`` with one of the fixed
:data:`devices.reasons.REASONS` codes, counted in :class:`GatewayMetrics` by
reason and transport. A byte-identical resend of an accepted update (CoAP
retransmission, MQTT QoS 1 redelivery) is ``"duplicate"``: acked, folded in
zero times.

The model download is :func:`devices.model_wire.encode_model`'s CBOR map
(the fields of a ``full`` :class:`devices.downlink.Downlink` plus round,
shapes and the requested update encoding); its SHA-256 version hash is the
ETag and the ``base`` every update must name.

Thread-safe: one lock serializes round changes against intake (validation
already runs under the validator's own lock, so this costs no parallelism),
because a CoAP event loop and paho's MQTT network thread call in concurrently.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from devices.codecs import CODECS
from devices.model_wire import encode_model
from devices.reasons import Rejection
from gateway.config import GatewayConfig
from gateway.metrics import GatewayMetrics
from gateway.partial_aggregate import PartialAggregate
from gateway.validation import Accepted, IntakeBuffer, RejectionCounter, Validator

__all__ = ["GatewayService", "Outcome"]

log = logging.getLogger(__name__)

_NO_BASE = "0" * 64  # validator placeholder before the first model is published


@dataclass(frozen=True)
class Outcome:
    """What happened to one submitted update; transports map it onto their replies."""

    status: Literal["accepted", "duplicate", "rejected"]
    reason: str | None  # a devices.reasons REASONS code when rejected, else None
    detail: str  # short human diagnostic (CoAP payload / MQTT ack)
    device: str | None = None  # the (verified) sender, when known

    @property
    def ok(self) -> bool:
        """True when the sender should consider the update delivered (accepted or duplicate)."""
        return self.status != "rejected"


class GatewayService:
    """One logical gateway: publishes models, takes in updates, hands over the partial aggregate.

    ``registry`` maps device ids to Ed25519 public keys (``devices.keys.DeviceRegistry``);
    ``shapes`` are the model's tensor shapes. ``clock`` (Unix seconds) drives
    deadlines, replay windows and rate limits; tests inject a fake one.
    """

    def __init__(
        self,
        gateway_id: str,
        registry: Mapping[str, Ed25519PublicKey],
        shapes: Sequence[tuple[int, ...]],
        config: GatewayConfig | None = None,
        metrics: GatewayMetrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.gateway_id = gateway_id
        self.config = config if config is not None else GatewayConfig(id=gateway_id)
        self.metrics = metrics if metrics is not None else GatewayMetrics()
        self.shapes = [tuple(int(d) for d in s) for s in shapes]
        self.clock = clock
        self.rejections = RejectionCounter()
        self.validator = Validator(
            registry,
            self.shapes,
            round=-1,
            base=_NO_BASE,
            config=self.config.validation_config(),
            clock=clock,
            rejections=self.rejections,
        )
        self.validator.close_round()
        self.num_params = self.validator.num_params
        self._lock = threading.Lock()
        self._buffer: IntakeBuffer | None = None
        self._closed_aggregate: PartialAggregate | None = None
        self._close_notified = False
        self._model: tuple[bytes, str] | None = None
        self._round = -1
        self._deadline = math.inf
        self._encoding = "f32"
        self._started = clock()
        self._counts = {"accepted": 0, "duplicate": 0, "rejected": 0}
        self._listeners: list[Callable[[str], None]] = []
        self._accept_listeners: list[Callable[[Accepted], None]] = []
        self.metrics.set_round(gateway_id, -1, open_=False, buffered=0)

    # --- rounds -----------------------------------------------------------------------

    @property
    def max_update_bytes(self) -> int:
        """The largest upload that can be accepted (transports refuse bigger ones early)."""
        return self.validator.max_bytes

    @property
    def round(self) -> int:
        return self._round

    @property
    def version(self) -> str | None:
        """Hash of the model being served, None before the first publish."""
        return self._model[1] if self._model is not None else None

    def publish_model(
        self, params: np.ndarray, round_: int, deadline_s: float, encoding: str = "f32"
    ) -> str:
        """Serve ``params`` as the model of ``round_`` and open that round for ``deadline_s`` s.

        Returns the version hash. An unclosed previous round is dropped (its
        aggregate is lost; call :meth:`close_round` first to keep it).
        """
        if encoding not in CODECS:
            raise ValueError(f"unknown update encoding {encoding!r} (known: {', '.join(CODECS)})")
        if not deadline_s > 0:
            raise ValueError(f"deadline_s must be > 0, got {deadline_s}")
        if round_ < 0:
            raise ValueError(f"round must be >= 0, got {round_}")
        flat = np.ascontiguousarray(params, dtype=np.float32).reshape(-1)
        if flat.size != self.num_params:
            raise ValueError(f"model has {flat.size} parameters, the shapes need {self.num_params}")
        if not np.isfinite(flat).all():
            raise ValueError("model parameters contain NaN or infinity")
        payload, version = encode_model(flat, round_, self.shapes, encoding)
        with self._lock:
            old = self._buffer
            if old is not None and self._closed_aggregate is None and old.aggregate.count:
                log.warning(
                    "gateway %s: round %d dropped with %d updates (not closed before publish)",
                    self.gateway_id,
                    self._round,
                    old.aggregate.count,
                )
            self._model = (payload, version)
            self._round = round_
            self._deadline = self.clock() + deadline_s
            self._encoding = encoding
            self._buffer = IntakeBuffer(
                self.gateway_id, round_, self.num_params, rejections=self.rejections
            )
            self._closed_aggregate = None
            self._close_notified = False
            self.validator.start_round(round_, version)
        self.metrics.set_round(self.gateway_id, round_, open_=True, buffered=0)
        self._notify("model")
        return version

    def subscribe(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(event)`` after every change devices should hear about.

        ``event`` is ``"model"`` (a new model and round: publish_model) or
        ``"round"`` (the round closed). Transports use it to push: CoAP
        notifies its observers of ``/model`` and ``/round``, MQTT republishes
        its retained topics. Listeners run on the thread that made the
        change and must not block (hand the work to your own loop/thread).
        """
        with self._lock:
            self._listeners.append(listener)

    def on_accept(self, listener: Callable[[Accepted], None]) -> None:
        """Call ``listener(update)`` with every newly accepted update (never a duplicate).

        For hosts that aggregate on their own terms: the emulator feeds its
        virtual-clock round buffer from here, so an update reaches its aggregate
        only through the same validation and exactly-once intake as on a real
        gateway. Runs on the transport's thread after the update was folded in;
        must not block. A listener that raises is logged; the device's answer
        stays ``accepted``.
        """
        with self._lock:
            self._accept_listeners.append(listener)

    def _notify(self, event: str) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(event)
            except Exception:  # one broken transport must not stop the others
                log.exception("gateway %s: %s listener failed", self.gateway_id, event)

    def model_payload(self) -> tuple[bytes, str]:
        """(CBOR model download, ETag = version hash); LookupError before the first publish."""
        model = self._model
        if model is None:
            raise LookupError(f"gateway {self.gateway_id} has not published a model yet")
        return model

    def round_info(self) -> dict[str, Any]:
        """``{"round", "deadline", "encoding", "base", "open"}``: what a device asks before work.

        ``deadline`` is Unix seconds (None before the first publish), ``base``
        the model hash updates must name.
        """
        with self._lock:
            open_ = self._is_open()
            return {
                "round": self._round if self._model is not None else None,
                "deadline": self._deadline if self._model is not None else None,
                "encoding": self._encoding,
                "base": self.version,
                "open": open_,
            }

    def _is_open(self) -> bool:
        return (
            self._buffer is not None
            and self._closed_aggregate is None
            and self.clock() <= self._deadline
        )

    def close_round(self) -> PartialAggregate:
        """Stop accepting (later submits get ``round-closed``) and hand over the aggregate.

        Idempotent: closing again returns the same aggregate.
        """
        with self._lock:
            if self._buffer is None:
                raise LookupError(f"gateway {self.gateway_id} has no round to close")
            if self._closed_aggregate is None:
                self.validator.close_round()
                self._closed_aggregate = self._buffer.aggregate
            agg = self._closed_aggregate
            first = not self._close_notified
            self._close_notified = True
        self.metrics.set_round(self.gateway_id, self._round, open_=False, buffered=agg.count)
        if first:
            self._notify("round")
        return agg

    # --- intake -----------------------------------------------------------------------

    def submit(self, data: bytes, transport: str) -> Outcome:
        """Validate one upload and fold it in exactly once; never raises for bad input."""
        t0 = time.perf_counter()
        outcome = self._submit(data, transport)
        self.metrics.record(
            self.gateway_id, transport, outcome.status, outcome.reason, time.perf_counter() - t0
        )
        return outcome

    def reject(self, reason: str, detail: str, transport: str) -> Outcome:
        """Count a refusal a transport made before the bytes reached :meth:`submit`.

        For what only the transport can see: a block-wise upload that never
        completed (``incomplete``), one refused early for its declared size
        (``too-large``), no room for another partial upload (``rate-limited``).
        Counted exactly like a rejection from validation.
        """
        t0 = time.perf_counter()
        try:
            self.rejections.inc(reason, transport)
        except ValueError:
            raise ValueError(f"unknown rejection reason {reason!r}") from None
        with self._lock:
            self._counts["rejected"] += 1
        self.metrics.record(
            self.gateway_id, transport, "rejected", reason, time.perf_counter() - t0
        )
        return Outcome("rejected", reason, detail)

    def _submit(self, data: bytes, transport: str) -> Outcome:
        try:
            with self._lock:
                buffer = self._buffer
                if buffer is None:
                    self.rejections.inc("round-closed", transport)
                    raise Rejection("round-closed", "no round is open yet (no model published)")
                if self._closed_aggregate is None and self.clock() > self._deadline:
                    self.validator.close_round()  # the deadline passed: validator says so
                accepted = self.validator.check(data, transport)
                status = buffer.offer(accepted)
                self._counts[status] += 1
                buffered = buffer.aggregate.count
        except Rejection as r:
            with self._lock:
                self._counts["rejected"] += 1
            return Outcome("rejected", r.reason, r.detail)
        except Exception as e:  # a bug must not take a transport down; the sender gets a reason
            log.exception("gateway %s: unexpected error on a %s upload", self.gateway_id, transport)
            self.rejections.inc("malformed", transport)
            with self._lock:
                self._counts["rejected"] += 1
            return Outcome("rejected", "malformed", f"could not process update: {type(e).__name__}")
        if status == "accepted":
            self.metrics.buffered.labels(self.gateway_id).set(buffered)
            with self._lock:
                accept_listeners = list(self._accept_listeners)
            for listener in accept_listeners:
                try:
                    listener(accepted)
                except Exception:
                    log.exception("gateway %s: accept listener failed", self.gateway_id)
            return Outcome("accepted", None, f"round {accepted.round}", accepted.device)
        return Outcome("duplicate", None, "already accepted", accepted.device)

    # --- health -----------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """A small status document (CoAP ``/health``, MQTT status, logs)."""
        with self._lock:
            return {
                "status": "ok",
                "gateway": self.gateway_id,
                "round": self._round if self._model is not None else None,
                "open": self._is_open(),
                "base": self.version,
                "buffered": self._buffer.aggregate.count if self._buffer is not None else 0,
                "accepted": self._counts["accepted"],
                "duplicates": self._counts["duplicate"],
                "rejected": self._counts["rejected"],
                "uptime_s": round(self.clock() - self._started, 3),
            }
