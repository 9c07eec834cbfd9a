"""How emulated devices reach their gateways: in-process (``direct``) or over real sockets.

``direct`` (the default, and the fast one) hands each encoded update from the
cohort trainer to the gateway host as a Python object. ``coap`` and ``mqtt``
send every device's real signed envelope, carrying its real encoded update,
with the real device-side client (``devices.transport_coap`` /
``devices.transport_mqtt``) over loopback to a real gateway intake
(``gateway.coap`` / ``gateway.mqtt`` around ``gateway.service``): validation,
Ed25519 signature check against the gateway's device registry, replay and
duplicate protection. The virtual clock is untouched by the choice: arrival
times still come from ``hierarchy.timeline`` and travel to the gateway host out
of band, so the same seed gives the same model with every transport.

One difference is deliberate: an update the intake refuses (bad signature,
unknown device, non-finite ...) never reaches the gateway host's buffer, so it
neither counts toward the quorum (a real gateway counts accepted updates) nor
holds the gateway open until it arrives. With ``direct``, a non-finite update
is refused only when the gateway closes, after it was waited for. Runs in
which nothing is refused are identical; runs with refusals can close a
gateway earlier.

This module holds what both ends share: the names, the per-device keys and
the plain, picklable descriptions handed to the actors.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

TRANSPORTS = ("direct", "coap", "mqtt")
SOCKET_TRANSPORTS = frozenset({"coap", "mqtt"})

# A virtual hour: the emulated gateway service only has to stay open while a round's
# uploads come in; who is on time is decided by the virtual clock in GatewayHost.close.
SERVICE_ROUND_OPEN_S = 3600.0


def device_key(seed: int, device: str) -> Ed25519PrivateKey:
    """The emulated device's Ed25519 signing key, derived from (seed, device id).

    Deterministic so that the trainer process (which signs) and the gateway
    host process (which registers the public half) agree without shipping
    keys around; a real device generates its key (``tierfl keys new``).
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    material = b"tierfl-emulated-device-key\0" + seed.to_bytes(8, "little") + device.encode()
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(material).digest())


@dataclass(frozen=True)
class GatewayTransport:
    """What a gateway host needs to serve its logical gateways over ``kind``.

    ``devices`` maps each hosted gateway to the ids of its devices (whose keys
    it registers); ``broker`` is the MQTT broker's ``mqtt://host:port``.
    """

    kind: str
    seed: int
    devices: dict[str, tuple[str, ...]] = field(default_factory=dict)
    broker: str | None = None


@dataclass(frozen=True)
class DeviceTransport:
    """What a cohort trainer needs to reach the gateways over ``kind``.

    ``endpoints`` maps a gateway id to its URL: ``coap://127.0.0.1:PORT`` or
    ``mqtt://127.0.0.1:PORT/GATEWAY``. ``concurrency`` bounds the uploads one
    trainer has in flight at a time.
    """

    kind: str
    seed: int
    endpoints: dict[str, str] = field(default_factory=dict)
    concurrency: int = 16  # CPU-bound beyond this on 2 cores (measured 8: idle gaps, 16-64: same)
    timeout_s: float = 30.0
