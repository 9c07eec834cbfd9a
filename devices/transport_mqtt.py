"""The device side of the MQTT uplink: publish a signed update, wait for the gateway's verdict.

Topics (``prefix`` is ``tierfl``; gateway and device ids never contain ``/``, ``+`` or ``#``)::

    tierfl/<gateway>/update/<device>   device -> gateway, QoS 1: the sealed envelope bytes
    tierfl/<gateway>/ack/<device>      gateway -> device, QoS 1:
                                       CBOR {"status", "reason", "detail"}
    tierfl/<gateway>/model             retained: the model download (devices.model_wire)
    tierfl/<gateway>/round             retained:
                                       CBOR {"round", "deadline", "encoding", "base", "open"}

``status`` is ``accepted``, ``duplicate`` (a resend of an update already taken in:
delivered, counted once) or ``rejected`` with a :data:`devices.reasons.REASONS`
code in ``reason``. The broker's PUBACK only says the *broker* has the message;
the ack topic says whether the *gateway* took it, so :meth:`MqttDeviceClient.send`
waits for the latter.

Acks carry no request id (the wire format is fixed), so a client keeps one
update in flight at a time and drops acks that arrive while nothing is in flight
(a late ack of an update it gave up on). Resending the *same bytes* after a
timeout is always safe: the gateway answers ``duplicate`` if the first copy
made it.

What a device sees when its update is too big: above the gateway's limit, an
ack with reason ``too-large``; above the broker's ``max_packet_size`` (a hard
guard set much higher), the broker closes the connection and :meth:`send`
raises :class:`MqttTransportError` -- no ack ever comes.

This module also owns the topic names and the ack codec, because ``devices``
must not import ``gateway`` and the gateway (``gateway.mqtt``) imports them
from here. Needs paho-mqtt 2.x (the ``gateway`` extra); no numpy at import.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import ssl
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

import cbor2
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion

from devices.reasons import REASONS

if TYPE_CHECKING:
    from paho.mqtt.properties import Properties
    from paho.mqtt.reasoncodes import ReasonCode

    from devices.model_wire import ModelDownload

__all__ = [
    "ACK_STATUSES",
    "TOPIC_PREFIX",
    "Ack",
    "MqttDeviceClient",
    "MqttTransportError",
    "ack_topic",
    "decode_ack",
    "disable_nagle",
    "encode_ack",
    "model_topic",
    "round_topic",
    "update_topic",
]

TOPIC_PREFIX: Final = "tierfl"
ACK_STATUSES: Final = ("accepted", "duplicate", "rejected")
_MAX_ACK_BYTES: Final = 4096
_MAX_ROUND_BYTES: Final = 4096
_MAX_DETAIL: Final = 1000


def update_topic(gateway: str, device: str, prefix: str = TOPIC_PREFIX) -> str:
    return f"{prefix}/{gateway}/update/{device}"


def ack_topic(gateway: str, device: str, prefix: str = TOPIC_PREFIX) -> str:
    return f"{prefix}/{gateway}/ack/{device}"


def model_topic(gateway: str, prefix: str = TOPIC_PREFIX) -> str:
    return f"{prefix}/{gateway}/model"


def round_topic(gateway: str, prefix: str = TOPIC_PREFIX) -> str:
    return f"{prefix}/{gateway}/round"


def disable_nagle(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    """paho's ``on_socket_open``: turn Nagle off.

    An update and its ack are each one small burst; with Nagle on, the last
    segment waits for the peer's delayed ACK and every round trip costs ~40 ms.
    """
    with contextlib.suppress(OSError, AttributeError):  # not TCP (websockets, unix): no-op
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class MqttTransportError(RuntimeError):
    """The broker refused us, the connection dropped, or no ack came in time."""


@dataclass(frozen=True)
class Ack:
    """The gateway's verdict on one update."""

    status: str  # one of ACK_STATUSES
    reason: str | None  # a REASONS code when rejected
    detail: str

    @property
    def ok(self) -> bool:
        """True when the update counts (accepted now or before)."""
        return self.status != "rejected"


def encode_ack(status: str, reason: str | None, detail: str) -> bytes:
    """The ack payload: CBOR ``{"status", "reason", "detail"}`` (detail cut to 1000 chars)."""
    if status not in ACK_STATUSES:
        raise ValueError(f"unknown ack status {status!r}")
    if (reason is None) != (status != "rejected") or (reason is not None and reason not in REASONS):
        raise ValueError(f"ack status {status!r} cannot have reason {reason!r}")
    return cbor2.dumps({"status": status, "reason": reason, "detail": detail[:_MAX_DETAIL]})


def decode_ack(data: bytes) -> Ack:
    """Parse an ack payload; ``ValueError`` says what is wrong with it."""
    if len(data) > _MAX_ACK_BYTES:
        raise ValueError(f"ack of {len(data)} bytes is larger than {_MAX_ACK_BYTES}")
    try:
        obj = cbor2.loads(data)
    except Exception as e:
        raise ValueError(f"ack is not CBOR: {e}") from None
    if not isinstance(obj, dict) or set(obj) != {"status", "reason", "detail"}:
        raise ValueError("ack must be a CBOR map with keys status, reason, detail")
    status, reason, detail = obj["status"], obj["reason"], obj["detail"]
    if status not in ACK_STATUSES:
        raise ValueError(f"ack status {status!r:.40} is not one of {', '.join(ACK_STATUSES)}")
    if status == "rejected" and reason not in REASONS:
        raise ValueError(f"rejection reason {reason!r:.40} is not a known code")
    if status != "rejected" and reason is not None:
        raise ValueError(f"a {status} ack has reason {reason!r:.40}")
    if not isinstance(detail, str):
        raise ValueError("ack detail must be text")
    return Ack(status, reason, detail)


class MqttDeviceClient:
    """One device's MQTT connection to its gateway's broker; a context manager.

    ``connect`` blocks until the broker accepted us and the ack subscription
    is in place (so no ack can be missed), then paho's network thread keeps
    the connection alive. ``send`` publishes one envelope (QoS 1) and returns
    the gateway's :class:`Ack`. ``round_info``/``model`` return the retained
    round info / model, subscribing on first use. MQTT 3.1.1 by default (what
    small devices speak; ``protocol=MQTTProtocolVersion.MQTTv5`` works too).
    """

    def __init__(
        self,
        gateway: str,
        device: str,
        *,
        host: str = "127.0.0.1",
        port: int = 1883,
        username: str | None = None,
        password: str | None = None,
        tls_ca: str | Path | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        client_id: str | None = None,
        keepalive: int = 30,
        prefix: str = TOPIC_PREFIX,
        protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv311,
    ) -> None:
        self.gateway, self.device, self.prefix = gateway, device, prefix
        self.host, self.port, self.keepalive = host, port, keepalive
        self.client_id = client_id or f"{device}-{uuid.uuid4().hex[:8]}"
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=protocol
        )
        if username is not None:
            self._client.username_pw_set(username, password)
        if tls_ca is not None or tls_cert is not None:
            self._client.tls_set(
                ca_certs=str(tls_ca) if tls_ca else None,
                certfile=str(tls_cert) if tls_cert else None,
                keyfile=str(tls_key) if tls_key else None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
        self._client.on_socket_open = disable_nagle
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._acks: queue.Queue[Ack | Exception] = queue.Queue(maxsize=64)
        self._lock = threading.Condition()
        self._connected = False
        self._ever_connected = False
        self._refused: str | None = None
        self._suback: dict[int, list[Any]] = {}
        self._in_flight = False
        self._retained: dict[str, bytes] = {}
        self._subscribed: set[str] = set()
        self._started = False
        #: the broker's packet limit when it announced one (MQTT 5 CONNACK), else None
        self.max_packet_size: int | None = None

    # --- connection -------------------------------------------------------------------

    def connect(self, timeout: float = 10.0) -> MqttDeviceClient:
        """Connect, subscribe to our ack topic, and return once both are confirmed."""
        deadline = time.monotonic() + timeout
        try:
            self._client.connect(self.host, self.port, self.keepalive)
        except OSError as e:
            raise MqttTransportError(
                f"cannot connect to the broker at {self.host}:{self.port}: {e}"
            ) from None
        self._client.loop_start()
        self._started = True
        with self._lock:
            while not self._connected and self._refused is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._lock.wait(left)
            connected, refused = self._connected, self._refused
        if refused is not None or not connected:
            self.close()  # not under our lock: paho's thread may be waiting for it
            why = refused or f"no CONNACK within {timeout:g} s"
            raise MqttTransportError(
                f"broker at {self.host}:{self.port} refused {self.client_id!r}: {why}"
            )
        self._subscribe(ack_topic(self.gateway, self.device, self.prefix), deadline)
        return self

    def close(self) -> None:
        """Disconnect and stop the network thread (idempotent)."""
        if self._started:
            self._started = False
            self._client.disconnect()
            self._client.loop_stop()
            # paho keeps its wake-up socket pair open until the client object is
            # garbage-collected (a reference cycle: whenever gc runs). A process that
            # reconnects many clients would pile up descriptors meanwhile, and past
            # 1024 paho's select() loop fails. Release them now (paho 2.x internals).
            reset = getattr(self._client, "_reset_sockets", None)
            if reset is not None:
                reset()

    def __enter__(self) -> MqttDeviceClient:
        return self.connect()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        return self._connected

    def _subscribe(self, topic: str, deadline: float) -> None:
        if topic in self._subscribed:
            return
        with self._lock:
            rc, mid = self._client.subscribe(topic, qos=1)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                raise MqttTransportError(f"cannot subscribe to {topic}: {mqtt.error_string(rc)}")
            while mid not in self._suback:
                left = deadline - time.monotonic()
                if left <= 0 or not self._connected:
                    raise MqttTransportError(f"no SUBACK for {topic}")
                self._lock.wait(left)
            codes = self._suback.pop(mid)
        if any(getattr(c, "is_failure", False) or c == 0x80 for c in codes):
            raise MqttTransportError(f"broker refused the subscription to {topic}: {codes}")
        self._subscribed.add(topic)

    # --- paho callbacks (network thread) ----------------------------------------------

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: Any,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._lock:
            if reason.is_failure:
                self._refused = str(reason)
            else:
                self._connected, self._refused = True, None
                self._ever_connected = True
                limit = getattr(properties, "MaximumPacketSize", None) if properties else None
                self.max_packet_size = int(limit) if limit else self.max_packet_size
                # a reconnect after a broker restart may have lost our subscriptions
                for topic in self._subscribed:
                    client.subscribe(topic, qos=1)
            self._lock.notify_all()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: Any,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._lock:
            if not self._connected and self._refused is None and not self._ever_connected:
                # closed before any CONNACK: TLS mismatch, a broker that drops us... fail fast
                self._refused = f"connection closed before CONNACK ({reason})"
            self._connected = False
            if self._in_flight:
                self._put_ack(
                    MqttTransportError(
                        f"connection to the broker lost while waiting for the ack ({reason}); "
                        "a packet above the broker's max_packet_size is one cause"
                    )
                )
            self._lock.notify_all()

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        with self._lock:
            self._suback[mid] = list(reason_codes)
            self._lock.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.topic == ack_topic(self.gateway, self.device, self.prefix):
            try:
                ack: Ack | Exception = decode_ack(bytes(msg.payload))
            except ValueError as e:
                ack = MqttTransportError(f"unreadable ack on {msg.topic}: {e}")
            with self._lock:
                if self._in_flight:  # otherwise a late ack of an abandoned send: drop it
                    self._put_ack(ack)
            return
        with self._lock:
            self._retained[msg.topic] = bytes(msg.payload)
            self._lock.notify_all()

    def _put_ack(self, ack: Ack | Exception) -> None:
        with contextlib.suppress(queue.Full):  # a gateway flooding acks: keep the oldest
            self._acks.put_nowait(ack)

    # --- the uplink -------------------------------------------------------------------

    def send(self, envelope: bytes, timeout: float = 10.0) -> Ack:
        """Publish ``envelope`` on our update topic (QoS 1) and wait for the gateway's ack."""
        if not self._connected:
            raise MqttTransportError(f"{self.device}: not connected to the broker")
        topic = update_topic(self.gateway, self.device, self.prefix)
        if self.max_packet_size is not None:
            # PUBLISH = fixed header (<= 5) + topic (2 + len) + packet id (2) + properties (1)
            size = 5 + 2 + len(topic.encode()) + 2 + 1 + len(envelope)
            if size > self.max_packet_size:
                raise MqttTransportError(
                    f"{self.device}: a {len(envelope)}-byte update makes a {size}-byte packet, "
                    f"above the broker's maximum packet size {self.max_packet_size} "
                    "(it would close the connection)"
                )
        with self._lock:
            while True:  # drop acks of earlier, abandoned sends
                try:
                    self._acks.get_nowait()
                except queue.Empty:
                    break
            self._in_flight = True
        try:
            info = self._client.publish(topic, envelope, qos=1)
            if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                raise MqttTransportError(f"publish failed: {mqtt.error_string(info.rc)}")
            try:
                got = self._acks.get(timeout=timeout)
            except queue.Empty:
                raise MqttTransportError(
                    f"{self.device}: no ack from gateway {self.gateway} within {timeout:g} s"
                ) from None
        finally:
            with self._lock:
                self._in_flight = False
        if isinstance(got, Exception):
            raise got
        return got

    # --- retained model / round -------------------------------------------------------

    def _retained_payload(self, topic: str, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        self._subscribe(topic, deadline)
        with self._lock:
            while topic not in self._retained:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise MqttTransportError(f"nothing retained on {topic} within {timeout:g} s")
                self._lock.wait(left)
            return self._retained[topic]

    def round_info(self, timeout: float = 10.0) -> dict[str, Any]:
        """The latest retained round info: ``{"round", "deadline", "encoding", "base", "open"}``."""
        data = self._retained_payload(round_topic(self.gateway, self.prefix), timeout)
        if len(data) > _MAX_ROUND_BYTES:
            raise MqttTransportError(f"round info of {len(data)} bytes is too large")
        try:
            info = cbor2.loads(data)
        except Exception as e:
            raise MqttTransportError(f"round info is not CBOR: {e}") from None
        if not isinstance(info, dict):
            raise MqttTransportError("round info must be a CBOR map")
        return info

    def model_bytes(self, timeout: float = 10.0) -> bytes:
        """The latest retained model download, as published (see devices.model_wire)."""
        return self._retained_payload(model_topic(self.gateway, self.prefix), timeout)

    def model(self, timeout: float = 10.0) -> ModelDownload:
        """The latest retained model, decoded and hash-checked."""
        from devices.model_wire import decode_model  # numpy; only devices that train need it

        return decode_model(self.model_bytes(timeout))

    def wait_round(self, after: int, timeout: float = 10.0) -> dict[str, Any]:
        """Block until the retained round info names a round > ``after``; return it."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.round_info(max(0.0, deadline - time.monotonic()))
            r = info.get("round")
            if isinstance(r, int) and r > after:
                return info
            topic = round_topic(self.gateway, self.prefix)
            with self._lock:
                seen = self._retained.get(topic)
                while self._retained.get(topic) is seen:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise MqttTransportError(f"no round after {after} within {timeout:g} s")
                    self._lock.wait(left)
