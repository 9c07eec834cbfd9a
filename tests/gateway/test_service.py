"""GatewayService without sockets: accept, duplicate, every rejection counted, round close."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from devices.codecs import Encoded, encode
from devices.envelope import PROTOCOL_VERSION, Envelope, seal
from devices.keys import DeviceRegistry
from devices.model_wire import decode_model
from devices.reasons import REASONS
from gateway.config import ConfigError, GatewayConfig, Limits, load_gateway_config
from gateway.metrics import GatewayMetrics
from gateway.service import GatewayService, Outcome

SHAPES = [(4, 3), (3,)]
NUM_PARAMS = 15
NOW = 1_700_000_000.0
ROUND = 3
KEYS = {f"d{i}": Ed25519PrivateKey.from_private_bytes(bytes([i]) * 32) for i in range(1, 5)}
MODEL = np.linspace(-1, 1, NUM_PARAMS, dtype=np.float32)


class Clock:
    def __init__(self, t: float = NOW) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def delta(scale: float = 0.1) -> np.ndarray:
    return (np.arange(NUM_PARAMS, dtype=np.float32) - 7) * np.float32(scale)


def make_update(
    base: str,
    device: str = "d1",
    *,
    x: np.ndarray | None = None,
    tensors: list[Encoded] | None = None,
    key: Ed25519PrivateKey | None = None,
    **over: Any,
) -> bytes:
    x = delta() if x is None else x
    fields: dict[str, Any] = {
        "version": PROTOCOL_VERSION,
        "device": device,
        "round": ROUND,
        "base": base,
        "nonce": os.urandom(16),
        "timestamp": NOW,
        "samples": 10,
        "tensors": tensors if tensors is not None else [encode("f32", x)],
    }
    fields.update(over)
    return seal(Envelope(**fields), key or KEYS.get(device, KEYS["d1"]))


def make_service(
    clock: Clock | None = None, **limits: Any
) -> tuple[GatewayService, str, GatewayMetrics]:
    registry = DeviceRegistry({d: k.public_key() for d, k in KEYS.items()})
    lim = Limits(**{"norm_bound": 10.0, "rate_limit_updates": 3, **limits})
    metrics = GatewayMetrics()
    svc = GatewayService(
        "gw0", registry, SHAPES, GatewayConfig(id="gw0", limits=lim), metrics, clock or Clock()
    )
    base = svc.publish_model(MODEL, ROUND, deadline_s=10.0)
    return svc, base, metrics


def test_accept_then_duplicate_counted_once() -> None:
    svc, base, m = make_service()
    data = make_update(base)
    assert svc.submit(data, "coap") == Outcome("accepted", None, "round 3", "d1")
    dup = svc.submit(data, "mqtt")
    assert dup.status == "duplicate" and dup.ok and dup.reason is None
    agg = svc.close_round()
    assert agg.count == 1 and agg.total_weight == 10.0 and agg.round == ROUND
    np.testing.assert_allclose(agg.weighted_sum, 10.0 * delta(), rtol=1e-6)
    assert m.updates_count("gw0", "accepted") == 1
    assert m.updates_count("gw0", "duplicate", "mqtt") == 1
    assert m.updates_count("gw0", "rejected") == 0
    h = svc.health()
    assert (h["accepted"], h["duplicates"], h["rejected"], h["open"]) == (1, 1, 0, False)


def test_accept_listeners_see_each_accepted_update_once() -> None:
    svc, base, _ = make_service()
    seen: list[Any] = []
    svc.on_accept(seen.append)
    svc.on_accept(lambda update: 1 / 0)  # a broken listener neither stops others nor the intake
    data = make_update(base)
    assert svc.submit(data, "coap").status == "accepted"
    assert svc.submit(data, "coap").status == "duplicate"
    assert svc.submit(make_update(base, "d2", x=delta(100.0)), "coap").reason == "norm-bound"
    assert [(u.device, u.round, u.samples, u.transport) for u in seen] == [
        ("d1", ROUND, 10, "coap")
    ]
    np.testing.assert_array_equal(seen[0].delta, delta())


def _bad_sig(base: str) -> bytes:
    data = bytearray(make_update(base))
    data[-1] ^= 0x40
    return bytes(data)


def _nan(base: str) -> bytes:
    x = delta()
    x[3] = np.nan
    return make_update(base, tensors=[Encoded("f32", (NUM_PARAMS,), x.tobytes(), {})])


CASES: list[tuple[str, Any]] = [
    ("too-large", lambda b: b"\x00" * 100_000),
    ("malformed", lambda b: b"\xa9garbage"),
    ("malformed", lambda b: make_update(b)[:-7]),
    ("malformed", lambda b: b""),
    ("unknown-device", lambda b: make_update(b, "d9", key=KEYS["d1"])),
    ("bad-signature", _bad_sig),
    ("replay", lambda b: make_update(b, timestamp=NOW - 1000)),
    ("stale-round", lambda b: make_update(b, round=ROUND - 1)),
    ("stale-base", lambda b: make_update("ab" * 32)),
    ("bad-shape", lambda b: make_update(b, x=delta()[:9])),
    ("non-finite", _nan),
    ("norm-bound", lambda b: make_update(b, x=delta(100.0))),
]


@pytest.mark.parametrize(
    ("reason", "make"), CASES, ids=[f"{r}-{i}" for i, (r, _) in enumerate(CASES)]
)
def test_each_rejection_counted_by_reason_and_transport(reason: str, make: Any) -> None:
    svc, base, m = make_service()
    out = svc.submit(make(base), "coap")
    assert out.status == "rejected" and out.reason == reason and out.detail, out
    assert not out.ok
    assert m.rejections_count("gw0", reason, "coap") == 1
    assert m.rejections_count("gw0", reason, "mqtt") == 0
    assert sum(m.rejections_count("gw0", r) for r in REASONS) == 1
    assert svc.rejections.get(reason, "coap") == 1
    assert svc.submit(make_update(base), "coap").status == "accepted"
    assert m.updates_count("gw0", "accepted", "coap") == 1


def test_submit_never_raises_on_non_bytes() -> None:
    svc, _, m = make_service()
    out = svc.submit("not bytes", "coap")  # type: ignore[arg-type]
    assert out.reason == "malformed"
    assert m.rejections_count("gw0", "malformed") == 1


def test_replayed_nonce_and_rate_limit() -> None:
    svc, base, m = make_service(rate_limit_updates=1)
    nonce = os.urandom(16)
    assert svc.submit(make_update(base, nonce=nonce), "coap").status == "accepted"
    assert svc.submit(make_update(base, nonce=nonce, samples=3), "coap").reason == "replay"
    # a second, different update of the same device: its token is spent
    assert svc.submit(make_update(base), "coap").reason == "rate-limited"
    assert m.rejections_count("gw0", "replay") == 1
    assert m.rejections_count("gw0", "rate-limited") == 1


def test_round_close_and_deadline() -> None:
    clock = Clock()
    svc, base, m = make_service(clock)
    assert svc.submit(make_update(base, "d1"), "coap").status == "accepted"
    agg = svc.close_round()
    assert svc.close_round() is agg  # idempotent
    out = svc.submit(make_update(base, "d2"), "coap")
    assert out.reason == "round-closed"
    assert agg.count == 1 and agg.devices == ["d1"]
    # the next round: new model, new base; the deadline closes it by itself
    model2 = MODEL + 1
    base2 = svc.publish_model(model2, ROUND + 1, deadline_s=2.0)
    assert base2 != base
    info = svc.round_info()
    assert info == {
        "round": 4,
        "deadline": NOW + 2.0,
        "encoding": "f32",
        "base": base2,
        "open": True,
    }
    assert svc.submit(make_update(base, "d2", round=4), "coap").reason == "stale-base"
    assert svc.submit(make_update(base2, "d2", round=4), "coap").status == "accepted"
    clock.t += 3.0
    assert svc.round_info()["open"] is False
    assert svc.submit(make_update(base2, "d3", round=4), "coap").reason == "round-closed"
    assert svc.close_round().count == 1
    assert m.rejections_count("gw0", "round-closed") == 2


def test_nothing_open_before_the_first_model() -> None:
    registry = DeviceRegistry({d: k.public_key() for d, k in KEYS.items()})
    svc = GatewayService("gw0", registry, SHAPES, clock=Clock())
    assert svc.submit(b"\xa0", "coap").reason == "round-closed"
    assert svc.round_info()["round"] is None
    with pytest.raises(LookupError):
        svc.model_payload()
    assert svc.metrics.rejections_count("gw0", "round-closed", "coap") == 1


def test_model_payload_round_trips() -> None:
    svc, base, _ = make_service()
    payload, etag = svc.model_payload()
    assert etag == base
    got = decode_model(payload)
    np.testing.assert_array_equal(got.params, MODEL)
    assert (got.hash, got.round, got.shapes, got.encoding) == (base, ROUND, SHAPES, "f32")
    assert [t.shape for t in got.tensors()] == SHAPES
    corrupt = bytearray(payload)
    corrupt[-5] ^= 1
    with pytest.raises(ValueError, match="hash"):
        decode_model(bytes(corrupt))


def test_metrics_endpoint_serves_counters() -> None:
    import urllib.request

    from gateway.metrics import serve_metrics

    svc, base, m = make_service()
    svc.submit(make_update(base), "coap")
    svc.submit(b"junk", "mqtt")
    server = serve_metrics(0, registry=m)
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
    finally:
        server.shutdown()
        server.server_close()
    assert (
        'tierfl_gateway_updates_total{gateway="gw0",outcome="accepted",transport="coap"} 1.0'
        in text
    )
    assert 'reason="malformed",transport="mqtt"} 1.0' in text
    assert "tierfl_gateway_validation_seconds_bucket" in text


def test_config_from_toml(tmp_path: Path) -> None:
    p = tmp_path / "gw.toml"
    p.write_text(
        'id = "gw07"\nregistry = "keys"\nmetrics_port = 9108\n'
        '[coap]\nhost = "::"\nport = 5684\n'
        '[mqtt]\nenabled = true\nbroker = "mqtts://broker:8883"\nusername = "u"\n'
        'password = "p"\ntls_ca = "ca.pem"\n'
        "[limits]\nmax_update_bytes = 60000\nnorm_bound = 5\nrate_limit_updates = 0\n"
        'codecs = ["f32", "int8"]\n'
    )
    cfg = load_gateway_config(p)
    assert cfg.id == "gw07" and cfg.registry == tmp_path / "keys"
    assert (cfg.coap.host, cfg.coap.port, cfg.metrics_port) == ("::", 5684, 9108)
    assert (cfg.mqtt.host, cfg.mqtt.port, cfg.mqtt.tls) == ("broker", 8883, True)
    assert cfg.mqtt.tls_ca == tmp_path / "ca.pem"
    vc = cfg.validation_config()
    assert vc.rate_limit is None and vc.norm_bound == 5.0 and vc.max_bytes == 60000
    assert vc.codecs == frozenset({"f32", "int8"})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[limits]\nrate_limt_updates = 3\n", "limits.rate_limt_updates: unknown key"),
        ("[coap]\nport = 70000\n", "coap.port: port must be in"),
        ('[coap]\nport = "x"\n', "coap.port: expected an integer"),
        ('[mqtt]\nbroker = "http://x"\n', "mqtt.broker: expected mqtt://"),
        ('[limits]\ncodecs = ["f64"]\n', "limits.codecs: unknown ['f64']"),
        ('id = "bad id"\n', "id: invalid device id"),
        ("coap = 3\n", "coap: expected a table"),
        ("[limits\n", "gw.toml"),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    p = tmp_path / "gw.toml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=r"gw\.toml") as info:
        load_gateway_config(p)
    assert message in str(info.value)
