"""MQTT intake against a real mosquitto on a free loopback port.

Every test talks to a real broker process started by :class:`MosquittoBroker`;
updates are real signed envelopes, acks come back over the broker.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from devices.codecs import Encoded, encode
from devices.envelope import Envelope, seal
from devices.keys import DeviceRegistry
from devices.transport_mqtt import (
    Ack,
    MqttDeviceClient,
    MqttTransportError,
    ack_topic,
    decode_ack,
    encode_ack,
    update_topic,
)
from gateway.broker import BrokerError, MosquittoBroker
from gateway.config import GatewayConfig, Limits, MqttListener
from gateway.mqtt import MqttIntake, MqttIntakeError, envelope_device
from gateway.service import GatewayService

GW = "gw0"
SHAPES = [(4, 3), (3,)]
NUM_PARAMS = 15
KEYS = {f"dev{i}": Ed25519PrivateKey.from_private_bytes(bytes([i + 1]) * 32) for i in range(16)}
STRANGER = Ed25519PrivateKey.from_private_bytes(b"\x99" * 32)
MODEL = np.linspace(-1, 1, NUM_PARAMS, dtype=np.float32)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def broker() -> Iterator[MosquittoBroker]:
    b = MosquittoBroker(max_packet_size=4096).start()
    pid = b.pid
    assert pid is not None and _alive(pid)
    yield b
    b.close()
    assert not b.running and not _alive(pid), "the broker process must be gone"


def make_service() -> GatewayService:
    registry = DeviceRegistry({d: k.public_key() for d, k in KEYS.items()})
    cfg = GatewayConfig(id=GW, limits=Limits(norm_bound=100.0, rate_limit_updates=5))
    return GatewayService(GW, registry, SHAPES, cfg)


@pytest.fixture
def gateway(broker: MosquittoBroker) -> Iterator[tuple[MqttIntake, GatewayService, str]]:
    svc = make_service()
    intake = MqttIntake(svc, MqttListener(enabled=True, broker=broker.url)).start(timeout=10)
    base = intake.publish_model(GW, MODEL, 1, deadline_s=600.0)
    yield intake, svc, base
    intake.stop()


def envelope(
    base: str,
    device: str = "dev1",
    *,
    x: np.ndarray | None = None,
    tensors: list[Encoded] | None = None,
    key: Ed25519PrivateKey | None = None,
    round_: int = 1,
    samples: int = 10,
    nonce: bytes | None = None,
) -> bytes:
    x = np.full(NUM_PARAMS, 0.01, dtype=np.float32) if x is None else x
    env = Envelope.new(device, round_, base, samples, tensors or [encode("f32", x)])
    if nonce is not None:
        env = Envelope(
            env.version, device, round_, base, nonce, env.timestamp, samples, env.tensors
        )
    return seal(env, key or KEYS[device])


class AckWatcher:
    """A bare paho client that collects every ack of gateway ``gw`` (subscribed before use)."""

    def __init__(self, broker: MosquittoBroker, gw: str = GW) -> None:
        self.acks: queue.Queue[tuple[str, Ack]] = queue.Queue()
        self._subscribed = threading.Event()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"watch-{os.getpid()}-{id(self)}")
        c.on_connect = lambda cl, *_: cl.subscribe(ack_topic(gw, "+"), qos=1)
        c.on_subscribe = lambda *_: self._subscribed.set()
        c.on_message = lambda _c, _u, m: self.acks.put(
            (m.topic.rsplit("/", 1)[1], decode_ack(bytes(m.payload)))
        )
        c.connect(broker.host, broker.port)
        c.loop_start()
        assert self._subscribed.wait(10), "ack watcher did not subscribe"
        self.client = c

    def next(self, timeout: float = 10.0) -> tuple[str, Ack]:
        return self.acks.get(timeout=timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# --- the envelope's device, read from its heads ---------------------------------------


def test_envelope_device_reads_the_signed_id_and_is_not_fooled_by_the_nonce() -> None:
    base = "ab" * 32
    assert envelope_device(envelope(base, "dev3")) == "dev3"
    # a nonce that contains the bytes of a "device" key and another id
    forged_nonce = b"\x66device\x64dev1" + b"\x00" * 4
    assert envelope_device(envelope(base, "dev2", nonce=forged_nonce)) == "dev2"
    for junk in (b"", b"\xa9", b"garbage", b"\xa9\x61v\x01", b"\xa9\x9f", bytes(100)):
        assert envelope_device(junk) is None


# --- intake over a real broker --------------------------------------------------------


def test_signed_update_is_accepted_and_acked(gateway: Any, broker: MosquittoBroker) -> None:
    intake, svc, base = gateway
    with MqttDeviceClient(GW, "dev1", port=broker.port) as dev:
        info = dev.round_info()
        assert info["round"] == 1 and info["base"] == base and info["open"] is True
        model = dev.model()
        assert model.hash == base and np.array_equal(model.params, MODEL)
        ack = dev.send(envelope(base, "dev1", samples=7))
        assert (ack.status, ack.reason) == ("accepted", None) and ack.ok
    agg = intake.close_round(GW)
    assert agg.count == 1 and agg.total_weight == 7.0
    assert np.allclose(agg.weighted_sum, 7 * 0.01)
    assert svc.metrics.updates_count(GW, "accepted", "mqtt") == 1


def test_bad_inputs_get_their_reason_and_the_gateway_keeps_serving(
    gateway: Any, broker: MosquittoBroker
) -> None:
    intake, svc, base = gateway
    nan = np.full(NUM_PARAMS, 0.01, dtype=np.float32)
    nan[3] = np.nan
    nonce = os.urandom(16)
    cases: list[tuple[str, str, bytes]] = [
        ("garbage CBOR", "malformed", b"\xa9\xff not an envelope"),
        ("bad signature", "bad-signature", envelope(base, "dev1", key=KEYS["dev2"])),
        ("replayed nonce", "replay", envelope(base, "dev2", nonce=nonce, samples=3)),
        (
            "NaN",
            "non-finite",
            envelope(base, "dev3", tensors=[Encoded("f32", (15,), nan.tobytes(), {})]),
        ),
        ("wrong shape", "bad-shape", envelope(base, "dev4", x=np.zeros(14, np.float32))),
        ("oversized", "too-large", os.urandom(svc.max_update_bytes + 100)),
        ("wrong round", "stale-round", envelope(base, "dev5", round_=7)),
        ("topic/signer mismatch", "bad-signature", envelope(base, "dev6")),
    ]
    # the replay case needs the nonce accepted once first
    with MqttDeviceClient(GW, "dev2", port=broker.port) as d2:
        assert d2.send(envelope(base, "dev2", nonce=nonce)).status == "accepted"
    good = iter(f"dev{i}" for i in range(7, 16))
    with MqttDeviceClient(GW, "dev1", port=broker.port) as dev1:
        for what, reason, payload in cases:
            sender = {"replayed nonce": "dev2", "NaN": "dev3", "wrong shape": "dev4"}.get(
                what, "dev5" if what == "wrong round" else "dev1"
            )
            if sender == "dev1":
                ack = dev1.send(payload)
            else:
                with MqttDeviceClient(GW, sender, port=broker.port) as d:
                    ack = d.send(payload)
            assert (ack.status, ack.reason) == ("rejected", reason), (what, ack)
            assert ack.detail, what
            device = next(good)
            with MqttDeviceClient(GW, device, port=broker.port) as d:
                ok = d.send(envelope(base, device))
            assert ok.status == "accepted", (what, ok)
    unknown = envelope(base, "stranger", key=STRANGER)
    with MqttDeviceClient(GW, "stranger", port=broker.port) as d:
        ack = d.send(unknown)
    assert (ack.status, ack.reason) == ("rejected", "unknown-device")
    assert intake.stats["topic_mismatch"] == 1
    assert svc.metrics.rejections_count(GW, "bad-signature", "mqtt") == 2
    assert svc.metrics.rejections_count(GW, "too-large", "mqtt") == 1
    agg = svc.close_round()
    assert agg.count == 1 + len(cases)  # dev2's first update plus one good update per case


def test_qos1_duplicate_is_acked_and_folded_in_once(gateway: Any, broker: MosquittoBroker) -> None:
    _intake, svc, base = gateway
    payload = envelope(base, "dev1", samples=4)
    with MqttDeviceClient(GW, "dev1", port=broker.port) as dev:
        assert dev.send(payload).status == "accepted"
        assert dev.send(payload).status == "duplicate"  # a resend after a lost ack
    # two copies in flight at once, as a QoS 1 redelivery races the original
    watcher = AckWatcher(broker)
    try:
        twice = envelope(base, "dev2", samples=5)
        pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="dup-publisher")
        pub.connect(broker.host, broker.port)
        pub.loop_start()
        infos = [pub.publish(update_topic(GW, "dev2"), twice, qos=1) for _ in range(2)]
        for info in infos:
            info.wait_for_publish(10)
        statuses = sorted(watcher.next()[1].status for _ in range(2))
        pub.disconnect()
        pub.loop_stop()
    finally:
        watcher.close()
    assert statuses == ["accepted", "duplicate"]
    agg = svc.close_round()
    assert (agg.count, agg.total_weight) == (2, 9.0)
    assert svc.metrics.updates_count(GW, "duplicate", "mqtt") == 2


def test_retained_update_is_answered_once_not_at_every_resubscribe(
    gateway: Any, broker: MosquittoBroker
) -> None:
    intake, svc, base = gateway
    watcher = AckWatcher(broker)
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="retain-publisher")
    try:
        pub.connect(broker.host, broker.port)
        pub.loop_start()
        topic = update_topic(GW, "dev3")
        pub.publish(topic, envelope(base, "dev3"), qos=1, retain=True).wait_for_publish(10)
        assert watcher.next()[1].status == "accepted"
        intake.stop()  # a restarted intake subscribes afresh: the broker replays the copy
        intake.start()
        deadline = time.monotonic() + 5
        while not intake.stats["ignored"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert intake.stats["ignored"] == 1 and intake.wait_idle(5)
        assert watcher.acks.empty(), "a stored retained copy must not be answered again"
        pub.publish(topic, b"", qos=1, retain=True).wait_for_publish(10)  # clear it
    finally:
        pub.disconnect()
        pub.loop_stop()
        watcher.close()
    assert svc.close_round().count == 1


def test_mosquitto_pub_interop(gateway: Any, broker: MosquittoBroker, tmp_path: Path) -> None:
    _intake, svc, base = gateway
    path = tmp_path / "envelope.bin"
    path.write_bytes(envelope(base, "dev1"))
    watcher = AckWatcher(broker)
    try:
        cmd = ["mosquitto_pub", "-h", broker.host, "-p", str(broker.port)]
        cmd += ["-t", update_topic(GW, "dev1"), "-f", str(path), "-q", "1"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        assert proc.returncode == 0, proc.stderr
        device, ack = watcher.next()
    finally:
        watcher.close()
    assert device == "dev1" and ack.status == "accepted", ack
    assert svc.close_round().count == 1


def test_oversized_packets_too_large_ack_then_broker_disconnect(
    gateway: Any, broker: MosquittoBroker
) -> None:
    """Above the gateway's limit: a too-large ack. Above max_packet_size: a lost connection."""
    _intake, svc, base = gateway
    assert svc.max_update_bytes < 2000 < broker.max_packet_size < 5000  # type: ignore[operator]
    with MqttDeviceClient(GW, "dev1", port=broker.port) as dev:
        ack = dev.send(os.urandom(2000))
        assert (ack.status, ack.reason) == ("rejected", "too-large")
        with pytest.raises(MqttTransportError, match="connection to the broker lost"):
            dev.send(os.urandom(5000), timeout=10)
    # an MQTT 5 client learns the limit from CONNACK and refuses locally instead
    v5 = MqttDeviceClient(GW, "dev1", port=broker.port, protocol=MQTTProtocolVersion.MQTTv5)
    with v5:
        assert v5.max_packet_size == broker.max_packet_size
        with pytest.raises(MqttTransportError, match="maximum packet size"):
            v5.send(os.urandom(5000))
        assert v5.send(envelope(base, "dev1")).status == "accepted"


def test_ack_codec_round_trip_and_refusals() -> None:
    assert decode_ack(encode_ack("rejected", "replay", "x")) == Ack("rejected", "replay", "x")
    assert decode_ack(encode_ack("duplicate", None, "")).ok
    with pytest.raises(ValueError):
        encode_ack("rejected", "no-such-reason", "")
    for bad in (b"", b"\xff", b"\xa0", encode_ack("accepted", None, "")[:-1]):
        with pytest.raises(ValueError):
            decode_ack(bad)


# --- authentication, broker lifecycle, reconnects -------------------------------------


def test_username_password_auth_and_wrong_password_refused() -> None:
    users = {"gw0": "gateway-secret", "dev1": "device-secret"}
    with MosquittoBroker(users=users) as b:
        good = MqttListener(enabled=True, broker=b.url, username="gw0", password="gateway-secret")
        svc = make_service()
        with MqttIntake(svc, good) as intake:
            base = intake.publish_model(GW, MODEL, 1, deadline_s=600.0)
            dev = MqttDeviceClient(
                GW, "dev1", port=b.port, username="dev1", password="device-secret"
            )
            with dev:
                assert dev.send(envelope(base, "dev1")).status == "accepted"
            with pytest.raises(MqttTransportError, match="refused"):
                MqttDeviceClient(GW, "dev1", port=b.port, username="dev1", password="nope").connect(
                    5
                )
            with pytest.raises(MqttTransportError, match="refused"):
                MqttDeviceClient(GW, "dev1", port=b.port).connect(5)  # anonymous
        bad = MqttListener(enabled=True, broker=b.url, username="gw0", password="wrong")
        with pytest.raises(MqttIntakeError, match=r"(?i)not authori[sz]ed|password"):
            MqttIntake(make_service(), bad, reconnect_min_s=1).start(timeout=5)


def test_device_client_close_releases_its_sockets(broker: MosquittoBroker) -> None:
    """paho frees its wake-up socket pair only at garbage collection; close() must not wait.

    The emulator reconnects hundreds of device clients in one process, and paho's
    select() loop breaks once descriptors pass 1024.
    """
    fds = len(os.listdir("/proc/self/fd"))
    for i in range(20):
        client = MqttDeviceClient(GW, f"dev{i % 16}", host=broker.host, port=broker.port)
        client.connect(timeout=10)
        client.close()
    assert len(os.listdir("/proc/self/fd")) <= fds


def test_broker_is_stopped_by_its_pid() -> None:
    b = MosquittoBroker().start()
    pid = b.pid
    assert pid is not None and _alive(pid) and b.running
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        assert b"mosquitto" in f.read()
    b.close()
    assert not _alive(pid) and b.pid is None and not b.running
    with pytest.raises(BrokerError, match="exited"):
        MosquittoBroker(extra_config=["no_such_option 1"]).start()


def test_gateway_reconnects_after_broker_restart() -> None:
    with MosquittoBroker() as b:
        svc = make_service()
        with MqttIntake(svc, MqttListener(enabled=True, broker=b.url)) as intake:
            base = intake.publish_model(GW, MODEL, 1, deadline_s=600.0)
            with MqttDeviceClient(GW, "dev1", port=b.port) as dev:
                assert dev.send(envelope(base, "dev1")).status == "accepted"
            port, old_pid = b.port, b.pid
            b.restart(down_s=0.2)
            assert b.port == port and b.pid != old_pid
            assert intake.wait_ready(15), "the intake did not reconnect"
            assert intake.stats["connects"] >= 2 and intake.stats["disconnects"] >= 1
            with MqttDeviceClient(GW, "dev2", port=b.port) as dev:
                # the restarted broker had no retained messages: the intake re-announced them
                assert dev.round_info(timeout=5)["base"] == base
                assert dev.send(envelope(base, "dev2")).status == "accepted"
        assert svc.close_round().count == 2


def test_one_intake_serves_several_logical_gateways(broker: MosquittoBroker) -> None:
    registry = DeviceRegistry({d: k.public_key() for d, k in KEYS.items()})
    svcs = [GatewayService(g, registry, SHAPES, GatewayConfig(id=g)) for g in ("gwA", "gwB")]
    with MqttIntake(svcs, MqttListener(enabled=True, broker=broker.url)) as intake:
        bases = {
            g: intake.publish_model(g, MODEL * (i + 1), 1, 600.0)
            for i, g in enumerate(("gwA", "gwB"))
        }
        for g in ("gwA", "gwB"):
            with MqttDeviceClient(g, "dev1", port=broker.port) as dev:
                assert dev.send(envelope(bases[g], "dev1")).status == "accepted"
                # an update for gwA's model sent to gwB is refused as stale
                other = bases["gwB" if g == "gwA" else "gwA"]
                assert dev.send(envelope(other, "dev1")).reason == "stale-base"
        assert [s.close_round().count for s in svcs] == [1, 1]
    t0 = time.monotonic()
    assert intake.health()["connected"] is False and time.monotonic() - t0 < 1


def _tls_files(d: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1 (PEM files in ``d``)."""
    now = datetime.datetime.now(datetime.UTC)

    def cert(
        subject: str, key: ec.EllipticCurvePrivateKey, issuer: str, signer: Any, ca: bool
    ) -> x509.Certificate:
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
            b = b.add_extension(san, critical=False)
        return b.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    srv_key = ec.generate_private_key(ec.SECP256R1())
    ca = cert("tierfl test CA", ca_key, "tierfl test CA", ca_key, True)
    srv = cert("127.0.0.1", srv_key, "tierfl test CA", ca_key, False)
    paths = d / "ca.pem", d / "server.pem", d / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(srv.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        srv_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


def test_tls_listener_with_ca_check(tmp_path: Path) -> None:
    ca, cert, key = _tls_files(tmp_path)
    tls = [f"cafile {ca}", f"certfile {cert}", f"keyfile {key}"]
    with MosquittoBroker(extra_config=tls) as b:
        listener = MqttListener(enabled=True, broker=f"mqtts://127.0.0.1:{b.port}", tls_ca=ca)
        svc = make_service()
        with MqttIntake(svc, listener) as intake:
            base = intake.publish_model(GW, MODEL, 1, deadline_s=600.0)
            with MqttDeviceClient(GW, "dev1", port=b.port, tls_ca=ca) as dev:
                assert dev.send(envelope(base, "dev1")).status == "accepted"
            with pytest.raises(MqttTransportError):  # plain MQTT on a TLS listener
                MqttDeviceClient(GW, "dev2", port=b.port).connect(3)
        assert svc.close_round().count == 1


def test_inline_mode_answers_in_the_network_thread(broker: MosquittoBroker) -> None:
    svc = make_service()
    listener = MqttListener(enabled=True, broker=broker.url, client_id="inline-intake")
    with MqttIntake(svc, listener, worker=False) as intake:
        base = intake.publish_model(GW, MODEL, 1, deadline_s=600.0)
        payload = envelope(base, "dev1")
        with MqttDeviceClient(GW, "dev1", port=broker.port) as dev:
            assert dev.send(payload).status == "accepted"
            assert dev.send(payload).status == "duplicate"
            assert dev.send(b"junk").reason == "malformed"
        assert intake.wait_idle(5)
    assert svc.close_round().count == 1


# --- liveness: online / offline, and the will when the gateway dies -------------------


class StatusWatcher:
    def __init__(self, broker: MosquittoBroker, topic: str) -> None:
        import json

        self.seen: queue.Queue[dict[str, Any]] = queue.Queue()
        ready = threading.Event()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"status-{os.getpid()}-{id(self)}")
        c.on_connect = lambda cl, *_: cl.subscribe(topic, qos=1)
        c.on_subscribe = lambda *_: ready.set()
        c.on_message = lambda _c, _u, m: self.seen.put(json.loads(bytes(m.payload)))
        c.connect(broker.host, broker.port)
        c.loop_start()
        assert ready.wait(10)
        self.client = c

    def next_state(self, state: str, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            doc = self.seen.get(timeout=max(0.01, deadline - time.monotonic()))
            if doc["state"] == state:
                return doc

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_status_is_online_then_offline_on_a_clean_stop(broker: MosquittoBroker) -> None:
    from gateway.mqtt import status_topic

    lst = MqttListener(enabled=True, broker=broker.url, client_id="gw-live+1")
    watch = StatusWatcher(broker, status_topic("gw-live+1"))
    try:
        intake = MqttIntake(make_service(), lst).start(timeout=10)
        assert intake.status_topic == "tierfl/status/gw-live_1"  # no wildcard in the topic
        assert watch.next_state("online")["gateways"] == [GW]
        intake.stop()
        assert watch.next_state("offline")["reason"] == "stopped"
    finally:
        watch.close()


def test_a_killed_gateway_is_announced_offline_by_its_will(broker: MosquittoBroker) -> None:
    """SIGKILL leaves no DISCONNECT: the broker publishes the intake's will, retained."""
    from gateway.mqtt import status_topic

    root = Path(__file__).resolve().parents[2]
    code = (
        "import sys, time\n"
        "from tests.gateway.test_mqtt import make_service\n"
        "from gateway.config import MqttListener\n"
        "from gateway.mqtt import MqttIntake\n"
        f"MqttIntake(make_service(), MqttListener(enabled=True, broker={broker.url!r}, "
        "client_id='gw-doomed')).start(timeout=10)\n"
        "print('up', flush=True)\n"
        "time.sleep(120)\n"
    )
    watch = StatusWatcher(broker, status_topic("gw-doomed"))
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "up"
        watch.next_state("online")
        proc.kill()
        proc.wait(10)
        assert watch.next_state("offline", timeout=15)["reason"] == "connection lost"
    finally:
        proc.kill()
        watch.close()
    # Retained: a device that subscribes later still learns the gateway is gone.
    late = StatusWatcher(broker, status_topic("gw-doomed"))
    try:
        assert late.next_state("offline")["gateways"] == [GW]
    finally:
        late.close()
