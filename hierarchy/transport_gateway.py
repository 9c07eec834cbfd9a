"""A gateway host's real intakes: one ``GatewayService`` per logical gateway, served over sockets.

With ``--transport coap`` every logical gateway gets its own aiocoap server
(``gateway.coap.CoapGateway``) on a free 127.0.0.1 port, as every base
station is its own endpoint; the servers of one host share one event-loop
thread (an idle aiocoap server context is one UDP socket and a few objects:
metro-5g's 12, with their 360 device keys, start in ~80 ms here). With ``--transport mqtt`` every
logical gateway runs its own ``gateway.mqtt.MqttIntake`` (its own broker
session, subscribed to ``tierfl/<gateway>/update/+``) against the broker the
driver started.

Accepted updates do not go into the service's own aggregate only: its accept
hook parks them here, keyed by (round, gateway, device), until the trainer
that sent them passes their virtual arrival times (``take``); the gateway
host then buffers them exactly like direct submissions, so on-time vs late
and the aggregate itself are decided by the same code in every transport.
Rejections are counted by the service (by reason code) and reported per round.

The services run on a virtual clock: a round opens at the virtual instant its
gateway received the model (Unix time ``VIRTUAL_EPOCH`` + emulated seconds),
which is also the timestamp the devices sign, so replay windows and nonce
expiry work in emulated time. The per-device token bucket is off because one
update per device per round is already enforced by the service's intake
buffer (``rate-limited`` for a second, different update), and a bucket sized
in wall seconds means nothing on a clock that jumps a round at a time.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from devices.keys import DeviceRegistry, parse_public_key
from gateway.config import CoapListener, GatewayConfig, Limits, MqttListener
from gateway.service import GatewayService
from gateway.validation import Accepted
from hierarchy.transport import SERVICE_ROUND_OPEN_S, GatewayTransport, device_key

if TYPE_CHECKING:
    from gateway.coap import CoapGateway
    from gateway.mqtt import MqttIntake

__all__ = ["GatewayIntakes"]

_START_TIMEOUT_S = 30.0


class _VirtualClock:
    """The service's clock: set by the driver at each round's open, constant within it."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class GatewayIntakes:
    """Real gateway servers (CoAP) or MQTT intakes for a host's logical gateways."""

    def __init__(self, spec: GatewayTransport, num_params: int, epoch: float) -> None:
        if spec.kind not in ("coap", "mqtt"):
            raise ValueError(f"GatewayIntakes serves coap or mqtt, not {spec.kind!r}")
        if spec.kind == "mqtt" and not spec.broker:
            raise ValueError("the mqtt transport needs a broker URL")
        self.kind = spec.kind
        self._lock = threading.Lock()
        self._parked: dict[tuple[int, str, str], Accepted] = {}
        self._baseline: dict[str, dict[tuple[str, str], int]] = {}
        self._round: dict[str, int] = {}
        self.registries: dict[str, DeviceRegistry] = {}
        self.services: dict[str, GatewayService] = {}
        self._clocks: dict[str, _VirtualClock] = {}
        for g, devices in spec.devices.items():
            reg = DeviceRegistry({d: device_key(spec.seed, d).public_key() for d in devices})
            clock = _VirtualClock(epoch)
            cfg = GatewayConfig(
                id=g,
                coap=CoapListener(host="127.0.0.1", port=0),
                limits=Limits(rate_limit_updates=0),
            )
            svc = GatewayService(g, reg, [(num_params,)], cfg, clock=clock)
            svc.on_accept(self._parker(g))
            self.registries[g], self.services[g], self._clocks[g] = reg, svc, clock
            self._baseline[g] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._coap: dict[str, CoapGateway] = {}
        self._mqtt: dict[str, MqttIntake] = {}
        self._endpoints: dict[str, str] = {}
        try:
            if spec.kind == "coap":
                self._start_coap()
            else:
                assert spec.broker is not None
                self._start_mqtt(spec.broker)
        except BaseException:
            self.stop()
            raise

    # --- lifecycle ----------------------------------------------------------------------

    def _start_coap(self) -> None:
        from gateway.coap import CoapGateway

        loop = self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=loop.run_forever, name="tierfl-emulated-coap", daemon=True
        )
        self._thread.start()
        for g, svc in self.services.items():
            server = CoapGateway(svc)
            host, port = asyncio.run_coroutine_threadsafe(server.start(), loop).result(
                _START_TIMEOUT_S
            )
            self._coap[g] = server
            self._endpoints[g] = f"coap://{host}:{port}"

    def _start_mqtt(self, broker: str) -> None:
        from gateway.mqtt import MqttIntake

        for g, svc in self.services.items():
            listener = MqttListener(enabled=True, broker=broker, client_id=f"tierfl-emulated-{g}")
            self._mqtt[g] = MqttIntake(svc, listener).start(_START_TIMEOUT_S)
            self._endpoints[g] = f"{broker}/{g}"

    def stop(self) -> None:
        """Close every server and intake (idempotent)."""
        for intake in self._mqtt.values():
            intake.stop()
        self._mqtt.clear()
        loop = self._loop
        if loop is not None:
            for server in self._coap.values():
                asyncio.run_coroutine_threadsafe(server.stop(), loop).result(_START_TIMEOUT_S)
            self._coap.clear()
            loop.call_soon_threadsafe(loop.stop)
            if self._thread is not None:
                self._thread.join(_START_TIMEOUT_S)
            loop.close()
            self._loop = self._thread = None

    def endpoints(self) -> dict[str, str]:
        """Gateway id -> URL a device uses (``coap://...`` or ``mqtt://.../GATEWAY``)."""
        return dict(self._endpoints)

    # --- rounds -------------------------------------------------------------------------

    def open_round(self, round_: int, params: np.ndarray, opened_at: Mapping[str, float]) -> str:
        """Publish ``params`` as ``round_``'s model on every gateway, each at its virtual instant.

        Returns the version hash the devices' envelopes must name as their base.
        """
        version = ""
        for g, svc in self.services.items():
            self._clocks[g].now = float(opened_at[g])
            if g in self._mqtt:
                version = self._mqtt[g].publish_model(g, params, round_, SERVICE_ROUND_OPEN_S)
            else:
                version = svc.publish_model(params, round_, SERVICE_ROUND_OPEN_S)
            self._round[g] = round_
        return version

    def _parker(self, gateway: str) -> Any:
        def park(update: Accepted) -> None:
            with self._lock:
                self._parked[(update.round, gateway, update.device)] = update

        return park

    def take(self, round_: int, gateway: str, devices: Sequence[str]) -> list[Accepted | None]:
        """The accepted updates of ``devices`` (None where the gateway accepted none)."""
        if gateway not in self.services:
            raise KeyError(f"gateway {gateway!r} is not hosted here")
        with self._lock:
            return [self._parked.pop((round_, gateway, d), None) for d in devices]

    def end_round(self, round_: int) -> dict[str, dict[str, int]]:
        """Close ``round_`` on every gateway; per gateway, its rejections by reason this round.

        Later uploads of the round are refused (``round-closed``); accepted updates
        nobody claimed (a trainer that died mid-round) are dropped. Refusals made
        between two rounds (a stalled CoAP upload expiring) count in the next one.
        """
        out: dict[str, dict[str, int]] = {}
        for g, svc in self.services.items():
            if self._round.get(g) == round_:
                if g in self._mqtt:
                    self._mqtt[g].close_round(g)
                else:
                    svc.close_round()
            now, before = svc.rejections.snapshot(), self._baseline[g]
            self._baseline[g] = now
            counts: dict[str, int] = {}
            for (reason, transport), n in now.items():
                extra = n - before.get((reason, transport), 0)
                if extra:
                    counts[reason] = counts.get(reason, 0) + extra
            out[g] = counts
        with self._lock:
            for key in [k for k in self._parked if k[0] <= round_]:
                del self._parked[key]
        return out

    # --- enrolment ----------------------------------------------------------------------

    def enroll(self, gateway: str, device: str, public_key: str) -> None:
        """Register (or replace) ``device``'s public key (hex or PEM) at ``gateway``."""
        self._registry(gateway).add(device, parse_public_key(public_key, where=device))

    def revoke(self, gateway: str, device: str) -> None:
        """Remove ``device``'s key: its next update is refused as ``unknown-device``."""
        reg = self._registry(gateway)
        if device not in reg:
            raise KeyError(f"device {device!r} is not registered at gateway {gateway!r}")
        reg.remove(device)

    def _registry(self, gateway: str) -> DeviceRegistry:
        try:
            return self.registries[gateway]
        except KeyError:
            raise KeyError(f"gateway {gateway!r} is not hosted here") from None
