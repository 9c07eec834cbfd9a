"""A cohort trainer's real uplinks: seal each device's update and send it with the device client.

Every emulated device signs its envelope with its own Ed25519 key
(``hierarchy.transport.device_key``) and uploads it with the reference
device's client: ``devices.transport_coap.CoapDeviceClient`` (block-wise POST
/update, waiting for 2.04 or the error code) or
``devices.transport_mqtt.MqttDeviceClient`` (QoS 1 publish, waiting for the
gateway's ack). Concurrency is bounded (``DeviceTransport.concurrency``
uploads in flight per trainer) so a thousand-device cohort does not open a
thousand transfers at once.

CoAP: aiocoap's client allows one outstanding confirmable request per server
per context (NSTART = 1), so uploads share a small pool of client contexts,
as many as the concurrency bound (each its own UDP socket, like separate
devices), and every upload carries a fresh Request-Tag (the client does
that), so block-wise transfers sharing a socket never mix. MQTT: each device
has its own connection (its own client id and ack subscription, as a real
device would), opened on its first upload and kept across rounds, for up to
``MAX_MQTT_CONNECTIONS`` devices per trainer; beyond that the least recently
used device disconnects and reconnects next time, like a device that sleeps
between rounds. The cap exists because paho's network loop uses ``select()``,
which cannot watch file descriptors above 1024, and each client holds three
(measured: the 341st concurrent client in one process never sees its
CONNACK). Uploads run on a bounded thread pool because
``MqttDeviceClient.send`` blocks until the ack arrives.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from devices.codecs import Encoded
from devices.envelope import NONCE_BYTES, PROTOCOL_VERSION, Envelope, seal
from hierarchy.transport import DeviceTransport, device_key

if TYPE_CHECKING:
    import aiocoap
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from devices.transport_mqtt import MqttDeviceClient

__all__ = ["DeviceUplinks", "Upload", "UploadResult"]

_CONNECT_TIMEOUT_S = 10.0
MAX_MQTT_CONNECTIONS = 128  # x 3 file descriptors, well below select()'s 1024


@dataclass(frozen=True)
class Upload:
    """One device's sealed envelope for its gateway."""

    gateway: str
    device: str
    envelope: bytes


@dataclass(frozen=True)
class UploadResult:
    """What the device heard back: ``accepted``/``duplicate``/``rejected``, or ``failed``.

    ``failed`` means no answer (timeout, lost connection); ``reason`` is the
    gateway's rejection code; ``rtt_s`` the real wall time of the upload.
    """

    status: str
    reason: str | None
    detail: str
    rtt_s: float


class DeviceUplinks:
    """Keys and clients of a trainer's devices; ``send`` uploads a batch and waits for answers."""

    def __init__(self, spec: DeviceTransport, devices: Sequence[str]) -> None:
        if spec.kind not in ("coap", "mqtt"):
            raise ValueError(f"DeviceUplinks sends over coap or mqtt, not {spec.kind!r}")
        if spec.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {spec.concurrency}")
        self.spec = spec
        self._keys: dict[str, Ed25519PrivateKey] = {d: device_key(spec.seed, d) for d in devices}
        # CoAP: one event loop thread, a pool of client contexts on it.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._contexts: list[aiocoap.Context] = []
        # MQTT: one connection per device, a bounded pool of blocking senders.
        self._mqtt: dict[str, MqttDeviceClient] = {}  # least recently used first
        self._mqtt_busy: set[str] = set()
        self._mqtt_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def seal(
        self, device: str, round_: int, base: str, samples: int, enc: Encoded, timestamp: float
    ) -> bytes:
        """The device's signed envelope (fresh random nonce; ``timestamp`` in Unix seconds)."""
        env = Envelope(
            PROTOCOL_VERSION,
            device,
            round_,
            base,
            os.urandom(NONCE_BYTES),
            timestamp,
            max(1, samples),
            [enc],
        )
        return seal(env, self._keys[device])

    def send(self, uploads: Sequence[Upload]) -> list[UploadResult]:
        """Upload each envelope to its gateway; the answers, in the order given."""
        if not uploads:
            return []
        if self.spec.kind == "coap":
            return self._coap_send(uploads)
        return self._mqtt_send(uploads)

    def close(self) -> None:
        """Close every client (idempotent)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        with self._mqtt_lock:
            clients, self._mqtt = list(self._mqtt.values()), {}
        for c in clients:
            c.close()
        loop = self._loop
        if loop is not None:

            async def shutdown() -> None:
                for ctx in self._contexts:
                    await ctx.shutdown()

            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(_CONNECT_TIMEOUT_S)
            self._contexts = []
            loop.call_soon_threadsafe(loop.stop)
            if self._thread is not None:
                self._thread.join(_CONNECT_TIMEOUT_S)
            loop.close()
            self._loop = self._thread = None

    # --- CoAP ---------------------------------------------------------------------------

    def _coap_send(self, uploads: Sequence[Upload]) -> list[UploadResult]:
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(
                target=self._loop.run_forever, name="tierfl-device-coap", daemon=True
            )
            self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._coap_batch(uploads), self._loop)
        return future.result()

    async def _coap_batch(self, uploads: Sequence[Upload]) -> list[UploadResult]:
        import aiocoap

        while len(self._contexts) < self.spec.concurrency:
            self._contexts.append(await aiocoap.Context.create_client_context(transports=["udp6"]))
        free: asyncio.Queue[aiocoap.Context] = asyncio.Queue()
        for ctx in self._contexts:
            free.put_nowait(ctx)

        async def one(u: Upload) -> UploadResult:
            ctx = await free.get()
            try:
                return await self._coap_upload(ctx, u)
            finally:
                free.put_nowait(ctx)

        return list(await asyncio.gather(*(one(u) for u in uploads)))

    async def _coap_upload(self, ctx: aiocoap.Context, u: Upload) -> UploadResult:
        from devices.transport_coap import CoapDeviceClient, CoapLinkError

        client = CoapDeviceClient(
            self.spec.endpoints[u.gateway], context=ctx, timeout_s=self.spec.timeout_s
        )
        t0 = time.perf_counter()
        try:
            reply = await client.post_update(u.envelope)
        except CoapLinkError as e:
            return UploadResult("failed", None, str(e), time.perf_counter() - t0)
        rtt = time.perf_counter() - t0
        if reply.ok:
            status = reply.payload.decode("ascii", "replace")
            return UploadResult(status if status == "duplicate" else "accepted", None, "", rtt)
        detail = reply.payload.decode("utf-8", "replace")
        return UploadResult("rejected", reply.reason, f"{reply.code} {detail}", rtt)

    # --- MQTT ---------------------------------------------------------------------------

    def _mqtt_send(self, uploads: Sequence[Upload]) -> list[UploadResult]:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                self.spec.concurrency, thread_name_prefix="tierfl-device-mqtt"
            )
        return list(self._pool.map(self._mqtt_upload, uploads))

    def _mqtt_client(self, gateway: str, device: str) -> MqttDeviceClient:
        """The device's connected client (connecting it first if needed); marks it busy."""
        from devices.transport_mqtt import MqttDeviceClient

        with self._mqtt_lock:
            self._mqtt_busy.add(device)
            client = self._mqtt.pop(device, None)
            if client is not None and client.connected:
                self._mqtt[device] = client  # now the most recently used
                return client
        if client is not None:
            client.close()
        url = urlsplit(self.spec.endpoints[gateway])
        client = MqttDeviceClient(
            gateway, device, host=url.hostname or "127.0.0.1", port=url.port or 1883
        )
        client.connect(_CONNECT_TIMEOUT_S)
        evicted = []
        with self._mqtt_lock:
            self._mqtt[device] = client
            for other in list(self._mqtt):
                if len(self._mqtt) <= MAX_MQTT_CONNECTIONS:
                    break
                if other not in self._mqtt_busy:
                    evicted.append(self._mqtt.pop(other))
        for c in evicted:
            c.close()
        return client

    def _mqtt_upload(self, u: Upload) -> UploadResult:
        from devices.transport_mqtt import MqttTransportError

        t0 = time.perf_counter()
        try:
            ack = self._mqtt_client(u.gateway, u.device).send(u.envelope, self.spec.timeout_s)
        except MqttTransportError as e:
            return UploadResult("failed", None, str(e), time.perf_counter() - t0)
        finally:
            with self._mqtt_lock:
                self._mqtt_busy.discard(u.device)
        return UploadResult(ack.status, ack.reason, ack.detail, time.perf_counter() - t0)
