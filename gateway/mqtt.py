"""MQTT intake: a paho-mqtt client that feeds one or more logical gateways from a real broker.

Topics and payloads are defined in :mod:`devices.transport_mqtt` (the device
side): updates arrive on ``tierfl/<gateway>/update/<device>`` (QoS 1), each
goes to :meth:`GatewayService.submit` with transport ``"mqtt"``, and the
verdict goes back on ``tierfl/<gateway>/ack/<device>`` (QoS 1, CBOR
``{"status", "reason", "detail"}``). The model and the round info are kept
*retained* on ``tierfl/<gateway>/model`` and ``tierfl/<gateway>/round``, and
re-published on every (re)connect, because a broker without persistence
forgets retained messages when it restarts.

Topic vs. envelope identity. The device named in the topic must be the device
that signed the envelope. Before submitting, the intake reads the ``device``
field from the envelope's first six canonical CBOR fields (a few heads, no
decoding of the tensors); if it names someone else the update is refused
with reason ``bad-signature`` -- the signature does not authenticate the
sender the topic claims to be -- and is never folded in. (``unknown-device``
stays reserved for ids without a registered key: an enrolment problem, not
an impersonation attempt.) The broker's ACL (deploy/mosquitto.conf) should
enforce the same rule one hop earlier. Bytes that do not start like an
envelope skip this check and the validator names what is wrong with them.

Delivery and memory. The client acknowledges an update (PUBACK) only after
it was validated and its ack published (paho ``manual_ack``), so:

- the broker never has more than ``queue_size`` unacknowledged updates out to
  us (MQTT 5 Receive Maximum), which bounds the intake queue -- the network
  thread never has to block on it -- and leaves the backlog in the broker,
  whose own queue limits apply (deploy/mosquitto.conf);
- a QoS 1 redelivery (after a reconnect, or any resend of the same bytes) is
  validated again, answered ``duplicate`` and folded in zero times
  (:class:`~gateway.validation.IntakeBuffer` keys on device, round, nonce);
- an update whose PUBACK could not be sent before a disconnect is redelivered
  by the broker on the resumed session (MQTT 5 session expiry), and PUBACKs of
  messages from a previous connection are never sent on a new one, where the
  packet id may mean another message.

Threads. paho's network thread only parses packets and enqueues; one worker
thread validates (size -> CBOR -> key -> Ed25519 -> replay -> decode -> NaN ->
norm), publishes the ack and sends the PUBACK. Validation is serialized by
the validator's lock anyway, so a second worker would add contention, not
throughput; the point of the worker is that a burst of signature checks
never stalls keep-alives and socket reads.

Reconnects: paho's ``loop_start`` thread reconnects with exponential backoff
(``reconnect_delay_set``); ``on_connect`` resubscribes and re-announces the
retained model/round of every gateway.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import ssl
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

import cbor2
import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from devices.transport_mqtt import (
    TOPIC_PREFIX,
    ack_topic,
    disable_nagle,
    encode_ack,
    model_topic,
    round_topic,
    update_topic,
)
from gateway.config import MqttListener
from gateway.service import GatewayService, Outcome

if TYPE_CHECKING:
    from paho.mqtt.reasoncodes import ReasonCode

    from gateway.partial_aggregate import PartialAggregate

__all__ = ["MqttIntake", "MqttIntakeError", "envelope_device", "status_topic"]

log = logging.getLogger(__name__)

TRANSPORT: Final = "mqtt"


def status_topic(client_id: str, prefix: str = TOPIC_PREFIX) -> str:
    """Where an intake says it is online/offline (retained; the offline one is its MQTT will).

    MQTT wildcards and level separators cannot appear in a topic one publishes to,
    and a multi-gateway intake's default id joins gateway ids with ``+``.
    """
    return f"{prefix}/status/" + "".join("_" if ch in "+#/" else ch for ch in client_id)


_STOP: Final = object()
_MAX_ID: Final = 64  # devices.keys.DEVICE_ID_PATTERN allows 64 characters


class MqttIntakeError(RuntimeError):
    """The intake could not connect or subscribe (refused credentials, unreachable broker)."""


def envelope_device(data: bytes) -> str | None:
    """The ``device`` field of a canonical envelope, read from its heads; None if not found.

    A sealed envelope is a 9-entry CBOR map whose keys come in canonical order
    ``v, ts, base, nonce, round, device, ...``: every value before ``device``
    is a number or a short string, so the id is found after a handful of
    heads, without touching the tensors. Anything else (a container before
    ``device``, a truncated head, a non-text id) returns None; such bytes can
    never pass validation, because the validator insists on the canonical form.
    """
    n = len(data)
    if n < 2 or data[0] != 0xA9:
        return None
    pos = 1
    for _ in range(6):
        if pos >= n:
            return None
        ib = data[pos]
        if ib >> 5 != 3 or ib & 0x1F >= 24:  # keys are short text strings
            return None
        end = pos + 1 + (ib & 0x1F)
        key = data[pos + 1 : end]
        if end >= n:
            return None
        ib = data[end]
        major, ai = ib >> 5, ib & 0x1F
        pos = end + 1
        if ai < 24:
            arg = ai
        elif ai <= 27:
            size = 1 << (ai - 24)
            if pos + size > n:
                return None
            arg = int.from_bytes(data[pos : pos + size], "big")
            pos += size
        else:
            return None
        if key == b"device":
            if major != 3 or arg > _MAX_ID or pos + arg > n:
                return None
            try:
                return data[pos : pos + arg].decode("utf-8")
            except UnicodeDecodeError:
                return None
        if major in (2, 3):
            if arg > n - pos:
                return None
            pos += arg
        elif major not in (0, 1, 7):  # uint, negative int, float: the head was all of it
            return None
    return None


@dataclass(frozen=True)
class _Update:
    generation: int  # connection it arrived on: its packet id means nothing on another
    gateway: str
    device: str
    payload: bytes
    mid: int
    qos: int


class MqttIntake:
    """MQTT shell around :class:`GatewayService` objects (one per logical gateway).

    ``listener`` says where the broker is and how to log in (``mqtt://`` or
    ``mqtts://`` URL, user name/password, CA/cert/key paths). ``queue_size``
    bounds the updates held between paho's network thread and the worker
    (and is announced to the broker as MQTT 5 Receive Maximum);
    ``max_queued_acks`` bounds the acks paho holds while the broker is away.
    ``session_expiry_s``: how long the broker keeps our subscriptions and
    queues updates for us after a disconnect. ``worker=False`` answers each
    update inside paho's network thread instead: no thread hand-off, ~0.06 ms
    (15 %) less CPU per 50 KB update in bench/bench_gateway_mqtt.py, but the
    socket is not read while an update is validated, which for a large model
    means long pauses of the network loop.
    """

    def __init__(
        self,
        services: GatewayService | Iterable[GatewayService],
        listener: MqttListener | None = None,
        *,
        prefix: str = TOPIC_PREFIX,
        queue_size: int = 64,
        reconnect_min_s: int = 1,
        reconnect_max_s: int = 30,
        max_queued_acks: int = 10_000,
        max_inflight_acks: int = 100,
        session_expiry_s: int = 300,
        worker: bool = True,
    ) -> None:
        svcs = [services] if isinstance(services, GatewayService) else list(services)
        if not svcs:
            raise ValueError("MqttIntake needs at least one GatewayService")
        self.services: dict[str, GatewayService] = {}
        for s in svcs:
            if s.gateway_id in self.services:
                raise ValueError(f"gateway {s.gateway_id!r} given twice")
            self.services[s.gateway_id] = s
        if not 1 <= queue_size <= 65535:
            raise ValueError(f"queue_size must be in [1, 65535], got {queue_size}")
        if not 1 <= reconnect_min_s <= reconnect_max_s:
            raise ValueError("need 1 <= reconnect_min_s <= reconnect_max_s")
        self.listener = listener if listener is not None else MqttListener(enabled=True)
        self.prefix = prefix
        self.queue_size = queue_size
        self.session_expiry_s = session_expiry_s
        self.use_worker = worker
        lst = self.listener
        self.client_id = lst.client_id or "tierfl-gateway-" + "+".join(sorted(self.services))
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
            manual_ack=True,
        )
        c.reconnect_delay_set(reconnect_min_s, reconnect_max_s)
        c.max_inflight_messages_set(max_inflight_acks)
        c.max_queued_messages_set(max_queued_acks)
        if lst.username is not None:
            c.username_pw_set(lst.username, lst.password)
        if lst.tls:
            c.tls_set(
                ca_certs=str(lst.tls_ca) if lst.tls_ca else None,
                certfile=str(lst.tls_cert) if lst.tls_cert else None,
                keyfile=str(lst.tls_key) if lst.tls_key else None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
        # Liveness: "online" retained on the status topic at every connect, "offline" on a
        # clean stop, and the broker publishes the will ("offline", retained) when this
        # intake vanishes without a DISCONNECT (killed, host or network down). Devices and
        # operators subscribe to it instead of waiting out a round that will never close.
        self.status_topic = status_topic(self.client_id, prefix)
        c.will_set(self.status_topic, self._status("offline", "connection lost"), 1, retain=True)
        c.on_socket_open = disable_nagle
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        self.client = c
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._cond = threading.Condition()
        self._generation = 0
        self._connected = False
        self._ready = False  # connected and subscribed
        self._refused: str | None = None
        self._sub_mid: int | None = None
        self._stopping = False
        self._started = False
        self._busy = 0  # updates taken off the queue and not yet answered
        self._worker: threading.Thread | None = None
        self.stats: dict[str, int] = {
            "received": 0,
            "ignored": 0,
            "accepted": 0,
            "duplicate": 0,
            "rejected": 0,
            "topic_mismatch": 0,
            "acks_failed": 0,
            "connects": 0,
            "disconnects": 0,
        }

    # --- lifecycle --------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> MqttIntake:
        """Connect, subscribe, announce retained models; raise if not ready in ``timeout``."""
        if self._started:
            return self
        self._started, self._stopping = True, False
        if self.use_worker:
            self._worker = threading.Thread(
                target=self._work, name="tierfl-mqtt-intake", daemon=True
            )
            self._worker.start()
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.session_expiry_s
        props.ReceiveMaximum = self.queue_size
        lst = self.listener
        self.client.connect_async(
            lst.host,
            lst.port,
            lst.keepalive_s,
            clean_start=mqtt.MQTT_CLEAN_START_FIRST_ONLY,
            properties=props,
        )
        self.client.loop_start()
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._ready and self._refused is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            ready, refused = self._ready, self._refused
        if not ready:
            self.stop()
            why = refused or f"not connected and subscribed within {timeout:g} s"
            raise MqttIntakeError(f"MQTT intake {self.client_id!r} at {lst.broker}: {why}")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Answer what is queued, then disconnect (ending the broker session) and stop threads."""
        if not self._started:
            return
        self._stopping = True
        if self._worker is not None:
            self._queue.put(_STOP)
            self._worker.join(timeout)
            self._worker = None
        if self._connected:
            info = self.client.publish(
                self.status_topic, self._status("offline", "stopped"), qos=1, retain=True
            )
            with contextlib.suppress(RuntimeError, ValueError):  # not sent: the will covers it
                info.wait_for_publish(min(timeout, 2.0))
        props = Properties(PacketTypes.DISCONNECT)
        props.SessionExpiryInterval = 0  # a clean stop: the broker may forget us
        self.client.disconnect(properties=props)
        self.client.loop_stop()
        self._started = False
        with self._cond:
            self._connected = self._ready = False
            self._cond.notify_all()

    def __enter__(self) -> MqttIntake:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _status(self, state: str, why: str | None = None) -> bytes:
        doc: dict[str, Any] = {"state": state, "gateways": sorted(self.services)}
        if why:
            doc["reason"] = why
        return json.dumps(doc).encode()

    @property
    def ready(self) -> bool:
        """Connected and subscribed to every gateway's update topic."""
        return self._ready

    def wait_ready(self, timeout: float = 10.0) -> bool:
        """Wait for (re)connection and subscription; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._ready:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until every received update has been answered; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._busy or not self._queue.empty():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
            return True

    # --- models and rounds ------------------------------------------------------------

    def publish_model(
        self,
        gateway: str,
        params: np.ndarray,
        round_: int,
        deadline_s: float,
        encoding: str = "f32",
    ) -> str:
        """Open ``round_`` on ``gateway`` with ``params`` and publish model + round retained."""
        version = self._service(gateway).publish_model(params, round_, deadline_s, encoding)
        self.announce(gateway)
        return version

    def close_round(self, gateway: str) -> PartialAggregate:
        """Close the gateway's round and re-publish its round info (``open`` is now false)."""
        agg = self._service(gateway).close_round()
        self.announce(gateway, model=False)
        return agg

    def announce(self, gateway: str, *, model: bool = True) -> None:
        """Publish the gateway's current model (if ``model``) and round info, retained, QoS 1.

        Call it after changing a service's round behind the intake's back;
        :meth:`publish_model` and :meth:`close_round` do it themselves.
        """
        svc = self._service(gateway)
        if svc.version is None:
            return
        if model:
            payload, _etag = svc.model_payload()
            self.client.publish(model_topic(gateway, self.prefix), payload, qos=1, retain=True)
        info = cbor2.dumps(svc.round_info())
        self.client.publish(round_topic(gateway, self.prefix), info, qos=1, retain=True)

    def _service(self, gateway: str) -> GatewayService:
        try:
            return self.services[gateway]
        except KeyError:
            raise KeyError(f"this intake serves {sorted(self.services)}, not {gateway!r}") from None

    # --- paho callbacks (network thread) ----------------------------------------------

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: Any,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            log.warning("MQTT intake %s: broker refused the connection: %s", self.client_id, reason)
            with self._cond:
                self._refused = str(reason)
                self._cond.notify_all()
            return
        topics = [(update_topic(g, "+", self.prefix), 1) for g in sorted(self.services)]
        with self._cond:
            self._generation += 1
            self._connected, self._refused = True, None
            self.stats["connects"] += 1
            rc, mid = client.subscribe(topics)
            self._sub_mid = mid if rc == MQTTErrorCode.MQTT_ERR_SUCCESS else None
        log.info("MQTT intake %s connected to %s", self.client_id, self.listener.broker)
        client.publish(self.status_topic, self._status("online"), qos=1, retain=True)
        for g in self.services:  # a restarted broker has lost our retained messages
            try:
                self.announce(g)
            except Exception:  # never let a publish problem kill the network thread
                log.exception("MQTT intake: could not announce gateway %s", g)

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        with self._cond:
            if mid != self._sub_mid:
                return
            failed = [str(c) for c in reason_codes if c.is_failure]
            if failed:
                self._refused = f"subscription refused: {', '.join(failed)}"
                log.error("MQTT intake %s: %s", self.client_id, self._refused)
            else:
                self._ready = True
            self._cond.notify_all()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: Any,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._cond:
            self._connected = self._ready = False
            self.stats["disconnects"] += 1
            self._cond.notify_all()
        if not self._stopping:
            log.warning("MQTT intake %s disconnected (%s); reconnecting", self.client_id, reason)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if self._stopping:
            return  # no PUBACK: the broker keeps it for the session (or the next intake)
        parts = msg.topic.split("/")
        if (
            len(parts) != 4
            or parts[0] != self.prefix
            or parts[2] != "update"
            or parts[1] not in self.services
            or msg.retain
        ):
            # Not an update of ours, or a *stored* retained copy replayed at subscribe time
            # (live messages reach subscribers with retain cleared; the live copy of a
            # retained publish was answered when it arrived). Acknowledge and drop it, so
            # it neither holds a Receive Maximum slot nor gets re-answered at every reconnect.
            self.stats["ignored"] += 1
            if msg.qos:
                client.ack(msg.mid, msg.qos)
            return
        self.stats["received"] += 1
        update = _Update(self._generation, parts[1], parts[3], bytes(msg.payload), msg.mid, msg.qos)
        if self.use_worker:
            # Receive Maximum keeps the broker within queue_size unacknowledged messages, so
            # this put does not block; if a broker ignores it, blocking is the back-pressure.
            self._queue.put(update)
        else:
            self._process(update)

    # --- the worker -------------------------------------------------------------------

    def _work(self) -> None:
        q = self._queue
        while True:
            item = q.get()
            if item is _STOP:
                return
            self._process(item)

    def _process(self, u: _Update) -> None:
        with self._cond:
            self._busy += 1
        try:
            self._answer(u)
        except Exception:  # a bug in one update must not stop the intake
            log.exception("MQTT intake: failed to answer an update from %s", u.device)
        finally:
            with self._cond:
                self._busy -= 1
                if not self._busy:
                    self._cond.notify_all()

    def _answer(self, u: _Update) -> None:
        outcome = self.handle(u.gateway, u.device, u.payload)
        self.stats[outcome.status] += 1
        info = self.client.publish(
            ack_topic(u.gateway, u.device, self.prefix),
            encode_ack(outcome.status, outcome.reason, outcome.detail),
            qos=1,
        )
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            self.stats["acks_failed"] += 1  # paho's ack queue is full: the device will resend
        if u.qos and u.generation == self._generation:
            self.client.ack(u.mid, u.qos)

    def handle(self, gateway: str, device: str, payload: bytes) -> Outcome:
        """The verdict on one update published on ``gateway``'s topic for ``device``.

        Transport-level checks (the topic's device must have signed the
        envelope) and then :meth:`GatewayService.submit`. Public so the
        emulator can drive the exact MQTT path without a broker.
        """
        svc = self.services[gateway]
        if len(payload) <= svc.max_update_bytes:
            signer = envelope_device(payload)
            if signer is not None and signer != device:
                return self._mismatch(svc, device, signer)
        outcome = svc.submit(payload, TRANSPORT)
        if outcome.device is not None and outcome.device != device:  # pragma: no cover
            log.error("MQTT intake: %r accepted on the topic of %r", outcome.device, device)
        return outcome

    def _mismatch(self, svc: GatewayService, device: str, signer: str) -> Outcome:
        t0 = time.perf_counter()
        self.stats["topic_mismatch"] += 1
        svc.rejections.inc("bad-signature", TRANSPORT)
        detail = (
            f"published on the update topic of {device[:_MAX_ID]!r} but the envelope is "
            f"from {signer!r}: its signature does not authenticate the topic's device"
        )
        svc.metrics.record(
            svc.gateway_id, TRANSPORT, "rejected", "bad-signature", time.perf_counter() - t0
        )
        return Outcome("rejected", "bad-signature", detail)

    def health(self) -> dict[str, Any]:
        """Connection state and counters, plus each gateway's own health document."""
        return {
            "client_id": self.client_id,
            "broker": self.listener.broker,
            "connected": self._connected,
            "subscribed": self._ready,
            "queued": self._queue.qsize(),
            **self.stats,
            "gateways": {g: s.health() for g, s in self.services.items()},
        }
