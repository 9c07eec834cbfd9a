"""`tierfl gateway serve` and `tierfl device` as real processes, plus their parts in-process.

The end-to-end test starts the gateway as a subprocess with an MQTT listener on a
real mosquitto and CoAP on a free loopback UDP port, runs two reference devices
(one per transport) for two rounds on digits, and checks the verdicts, the
Prometheus endpoint, the aggregate files and a clean SIGTERM. Everything binds
to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devices.client import GatewayURL, parse_gateway_url
from devices.codecs import encode
from devices.envelope import Envelope, seal
from devices.keys import DeviceRegistry, generate_keypair, save_keypair
from devices.transport_mqtt import MqttDeviceClient
from gateway.broker import MosquittoBroker, free_port
from gateway.config import ConfigError, GatewayConfig, Limits
from gateway.partial_aggregate import PartialAggregate
from gateway.ray_relay import GatewayRelay, RelayClosed, RelayPoller
from gateway.rounds import (
    LocalRoundDriver,
    ModelSource,
    RoundsConfig,
    aggregate_path,
    load_model_source,
    read_aggregate,
    save_model,
)
from gateway.serve import GatewayControl, load_serve_config, serve_config_from_dict
from gateway.service import GatewayService

ROOT = Path(__file__).resolve().parents[2]
_SCRIPT = Path(sys.executable).parent / "tierfl"
TIERFL = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "hierarchy.cli"]
GW = "gw0"


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_free(port: int, kind: int) -> bool:
    """Nothing listens on 127.0.0.1:port and a new server could bind it.

    TCP binds with SO_REUSEADDR, as every TCP server does: the connections our
    own HTTP GET left in TIME_WAIT do not hold the port.
    """
    if kind == socket.SOCK_STREAM:
        with socket.socket() as c:
            if c.connect_ex(("127.0.0.1", port)) == 0:
                return False
    with socket.socket(socket.AF_INET, kind) as s:
        if kind == socket.SOCK_STREAM:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def run_tierfl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TIERFL, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout
    )


class Lines:
    """A subprocess's stdout, line by line, readable with a timeout."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.q: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        assert proc.stdout is not None
        stream = proc.stdout

        def pump() -> None:
            for line in stream:
                self.q.put(line.rstrip("\n"))
            self.q.put(None)

        threading.Thread(target=pump, daemon=True).start()

    def wait_for(self, needle: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.q.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {needle!r} within {timeout} s: {self.seen}") from None
            if line is None:
                raise AssertionError(f"stdout closed before {needle!r}: {self.seen}")
            self.seen.append(line)
            if needle in line:
                return line

    def rest(self, timeout: float = 5.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.q.get(timeout=0.1)
            except queue.Empty:
                continue
            if line is None:
                break
            self.seen.append(line)
        return self.seen


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two device keys, a registry directory and the initial model file."""
    d = tmp_path_factory.mktemp("site")
    keys = d / "keys"
    for dev in ("d-mqtt", "d-coap"):
        save_keypair(generate_keypair(), keys, dev)
    save_keypair(generate_keypair(), d / "other-keys", "d-stranger")  # not in the registry
    model = d / "initial.npz"
    # what `tierfl gateway init-model --dataset digits` writes (without a second torch start-up)
    from gateway.rounds import init_model

    save_model(model, init_model(None, "digits", 0))
    return {"dir": d, "keys": keys, "model": model, "stranger": d / "other-keys/d-stranger.key"}


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- end to end ----------------------------------------------------------------------


def test_gateway_process_with_mqtt_and_coap_devices(site: dict[str, Any], tmp_path: Path) -> None:
    broker = MosquittoBroker().start()
    coap_port, metrics_port = free_udp_port(), free_port()
    out = tmp_path / "rounds"
    cfg = write_config(
        tmp_path / "gateway.toml",
        f"""
id = "{GW}"
registry = "{site["keys"]}"
metrics_port = {metrics_port}

[coap]
host = "127.0.0.1"
port = {coap_port}

[mqtt]
enabled = true
broker = "{broker.url}"

[rounds]
model = "{site["model"]}"
duration_s = 120.0  # the quorum closes rounds; the deadline only bounds a broken run
quorum = 2
out = "{out}"
""",
    )
    gw = subprocess.Popen(
        [*TIERFL, "gateway", "serve", "--config", str(cfg)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stderr_lines: list[str] = []
    assert gw.stderr is not None
    err_stream = gw.stderr
    threading.Thread(target=lambda: stderr_lines.extend(err_stream), daemon=True).start()
    lines = Lines(gw)
    devices: list[subprocess.Popen[str]] = []
    try:
        ready = lines.wait_for("ready", timeout=60)
        assert f"coap coap://127.0.0.1:{coap_port}" in ready and broker.url in ready
        common = ["--dataset", "digits", "--num-devices", "2", "--rounds", "2", "--threads", "1"]
        common += ["--json", "--wait-s", "150", "--retries", "2"]
        for i, (dev, url) in enumerate(
            [("d-mqtt", broker.url), ("d-coap", f"coap://127.0.0.1:{coap_port}")]
        ):
            key = str(site["keys"] / f"{dev}.key")
            argv = ["device", "--gateway", url, "--id", dev, "--key", key]
            devices.append(
                subprocess.Popen(
                    [*TIERFL, *argv, "--device-index", str(i), *common],
                    cwd=ROOT,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        stranger = subprocess.Popen(
            [
                *TIERFL,
                "device",
                "--gateway",
                f"coap://127.0.0.1:{coap_port}",
                "--id",
                "d-stranger",
                "--key",
                str(site["stranger"]),
                *common,
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        devices.append(stranger)
        results = [p.communicate(timeout=180) for p in devices[:2]]
        for p, (stdout, stderr) in zip(devices[:2], results, strict=True):
            assert p.returncode == 0, (stdout, stderr, stderr_lines)
        samples: dict[str, int] = {}
        for (dev, transport), (stdout, _) in zip(
            [("d-mqtt", "mqtt"), ("d-coap", "coap")], results, strict=True
        ):
            records = [json.loads(line) for line in stdout.splitlines()]
            rounds = [r for r in records if r["event"] == "round"]
            assert [(r["round"], r["status"]) for r in rounds] == [(0, "accepted"), (1, "accepted")]
            assert all(r["transport"] == transport and r["reason"] is None for r in rounds)
            assert records[-1] == {
                "event": "done",
                "device": dev,
                "delivered": 2,
                "refused": 0,
                "stopped": False,
            }
            samples[dev] = rounds[0]["samples"]

        # a device the registry does not know: told why, exit 3, nothing folded in
        s_out, s_err = stranger.communicate(timeout=180)
        assert stranger.returncode == 3, (s_out, s_err)
        refusal = [json.loads(line) for line in s_out.splitlines()][-1]
        assert (refusal["status"], refusal["reason"]) == ("rejected", "unknown-device")
        assert s_err.startswith("error: gateway refused d-stranger: unknown-device: CoAP 4.03")

        # the rounds' partial aggregates: both devices in each
        for r in (0, 1):
            path = aggregate_path(out, GW, r)
            deadline = time.monotonic() + 20
            while not path.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            agg = read_aggregate(path)
            assert agg["count"] == 2 and agg["round"] == r and agg["gateway"] == GW
            assert sorted(agg["devices"]) == ["d-coap", "d-mqtt"]
            assert agg["total_weight"] == sum(samples.values())
            assert agg["weighted_sum"].shape == (4810,) and np.isfinite(agg["weighted_sum"]).all()
            assert np.abs(agg["weighted_sum"]).sum() > 0

        # Prometheus: accepted updates by transport, rounds closed
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        accepted = {
            s.labels["transport"]: s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
            if s.name == "tierfl_gateway_updates_total" and s.labels["outcome"] == "accepted"
        }
        assert accepted == {"mqtt": 2.0, "coap": 2.0}
        rejected = [
            (s.labels["transport"], s.labels["reason"], s.value)
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
            if s.name == "tierfl_gateway_rejections_total"
        ]
        assert rejected == [("coap", "unknown-device", 1.0)]
        assert 'tierfl_gateway_rounds_closed_total{gateway="gw0"}' in text

        # SIGTERM: a clean stop, the round announced closed, ports and broker session released
        gw.send_signal(signal.SIGTERM)
        assert gw.wait(timeout=30) == 0, stderr_lines
        tail = lines.rest()
        assert any(
            f"gateway {GW} stopped:" in line and "4 accepted, 0 duplicate, 1 rejected" in line
            for line in tail
        )
        assert port_free(coap_port, socket.SOCK_DGRAM)
        assert port_free(metrics_port, socket.SOCK_STREAM)
        assert broker.running
        assert f"Client tierfl-gateway-{GW} disconnected." in broker.log_text(20_000)
        with MqttDeviceClient(GW, "d-mqtt", host=broker.host, port=broker.port) as probe:
            info = probe.round_info(timeout=5)
        assert info["round"] == 2 and info["open"] is False
    finally:
        for p in [*devices, gw]:
            if p.poll() is None:
                p.kill()
                p.wait()
        pid = broker.pid
        broker.close()
    assert pid is not None and not broker.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


# --- errors of the processes ---------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ("[limits]\nrate_limt_updates = 3\n", "limits.rate_limt_updates: unknown key"),
        ('[rounds]\nmodel = "MODEL"\nout = "r"\nduration_s = -1\n', "rounds.duration_s: must be"),
        ('[rounds]\nmodel = "missing.npz"\nout = "r"\n', "rounds.model: "),
    ],
)
def test_bad_config_exits_2_naming_the_key(
    site: dict[str, Any], tmp_path: Path, body: str, key: str
) -> None:
    cfg = write_config(
        tmp_path / "bad.toml",
        f'id = "gw0"\nregistry = "{site["keys"]}"\n' + body.replace("MODEL", str(site["model"])),
    )
    proc = run_tierfl("gateway", "serve", "--config", str(cfg))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"error: {cfg}: {key}"), proc.stderr
    assert "Traceback" not in proc.stderr


def test_start_up_failures_exit_1_and_sigterm_during_start_up_exits_0(
    site: dict[str, Any], tmp_path: Path
) -> None:
    head = f'id = "gw0"\nregistry = "{site["keys"]}"\n[coap]\nhost = "127.0.0.1"\nport = 0\n'
    rounds = f'[rounds]\nmodel = "{site["model"]}"\n'
    no_ray = write_config(tmp_path / "ray.toml", head + rounds)
    proc = run_tierfl(
        "gateway", "serve", "--config", str(no_ray), "--ray-address", f"127.0.0.1:{free_port()}"
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().endswith("Connection refused"), proc.stderr
    assert "error: cannot reach the Ray cluster at '127.0.0.1:" in proc.stderr

    # the broker never answers: SIGTERM while the gateway waits for it is still a clean stop
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)  # accepts TCP, never speaks MQTT
    try:
        cfg = write_config(
            tmp_path / "mqtt.toml",
            head
            + f'[mqtt]\nenabled = true\nbroker = "mqtt://127.0.0.1:{silent.getsockname()[1]}"\n'
            + rounds
            + f'out = "{tmp_path / "r"}"\n',
        )
        gw = subprocess.Popen(
            [*TIERFL, "gateway", "serve", "--config", str(cfg)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert gw.stderr is not None
        for line in gw.stderr:
            if "connecting to the MQTT broker" in line:
                break
        gw.send_signal(signal.SIGTERM)
        out, _ = gw.communicate(timeout=10)
        assert gw.returncode == 0
        assert out == "gateway gw0 stopped during start-up (connecting to the MQTT broker)\n"
    finally:
        silent.close()


def test_config_errors_need_the_whole_picture(site: dict[str, Any], tmp_path: Path) -> None:
    from gateway.serve import GatewayServer

    base: dict[str, Any] = {"id": "gw0", "registry": str(site["keys"])}
    cases: list[tuple[dict[str, Any], str]] = [
        (
            {
                **base,
                "coap": {"enabled": False},
                "rounds": {"model": str(site["model"]), "out": "r"},
            },
            "coap.enabled, mqtt.enabled: no listener enabled",
        ),
        ({"id": "gw0", "rounds": {"model": str(site["model"]), "out": "r"}}, "registry: required"),
        (base, "rounds.model: required"),
        ({**base, "rounds": {"model": str(site["model"])}}, "rounds.out: required"),
        ({**base, "rounds": {"model": "init:resnet:digits", "out": "r"}}, "rounds.model: unknown"),
        ({**base, "rounds": {"model": "init:"}}, "rounds.model: expected 'init:"),
        ({**base, "rounds": {"model": "m.npz", "encoding": "f64"}}, "rounds.encoding: unknown"),
        ({**base, "rounds": {"model": "m.npz", "quorum": -1}}, "rounds.quorum: must be >= 0"),
        ({**base, "rounds": {"model": "m.npz", "apply": 1}}, "rounds.apply: expected true"),
        ({**base, "rounds": "x"}, "rounds: expected a table"),
    ]
    for doc, message in cases:
        with pytest.raises(ConfigError) as e:
            GatewayServer(serve_config_from_dict(doc, tmp_path)).prepare()
        assert str(e.value).startswith(message), (doc, str(e.value))
    # rounds.out only matters to the local driver: the cloud drives rounds over Ray
    cfg = serve_config_from_dict({**base, "rounds": {"model": str(site["model"])}}, tmp_path)
    registry, model = GatewayServer(cfg, ray_address="auto").prepare()
    assert set(registry) == {"d-mqtt", "d-coap"} and model.num_params == 4810


def test_example_deploy_config_is_valid() -> None:
    cfg = load_serve_config(ROOT / "deploy" / "gateway.toml")
    assert cfg.gateway.id == "gw00" and cfg.gateway.coap.enabled and cfg.gateway.mqtt.enabled
    assert cfg.rounds is not None and cfg.rounds.out == Path("/var/lib/tierfl/rounds")
    unit = (ROOT / "deploy" / "tierfl-gateway.service").read_text()
    assert (
        "ExecStart=/opt/tierfl/venv/bin/tierfl gateway serve --config /etc/tierfl/gateway.toml"
        in unit
    )
    for line in (
        "Type=simple",
        "Restart=on-failure",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/tierfl",
        "User=tierfl",
    ):
        assert line in unit.splitlines(), line


def test_device_errors_are_one_line_with_an_exit_code(site: dict[str, Any]) -> None:
    key = str(site["keys"] / "d-mqtt.key")
    bad_url = run_tierfl(
        "device",
        "--gateway",
        "http://127.0.0.1:1",
        "--id",
        "d-mqtt",
        "--key",
        key,
        "--dataset",
        "digits",
    )
    assert bad_url.returncode == 2 and bad_url.stderr.startswith("error: --gateway: expected")
    no_key = run_tierfl(
        "device",
        "--gateway",
        "coap://127.0.0.1:5683",
        "--id",
        "d-mqtt",
        "--key",
        str(site["dir"] / "nope.key"),
        "--dataset",
        "digits",
    )
    assert no_key.returncode == 2 and "error: --key: " in no_key.stderr
    assert "No such file" in no_key.stderr
    t0 = time.monotonic()
    down = run_tierfl(
        "device",
        "--gateway",
        f"mqtt://127.0.0.1:{free_port()}/gw0",
        "--id",
        "d-mqtt",
        "--key",
        key,
        "--dataset",
        "digits",
        "--retries",
        "1",
    )
    assert down.returncode == 1, down.stderr
    assert "retry 1/1 in 0.5 s" in down.stderr
    assert "unreachable after 2 attempt(s)" in down.stderr.splitlines()[-1]
    assert time.monotonic() - t0 < 20
    for text in (bad_url.stderr, no_key.stderr, down.stderr):
        assert "Traceback" not in text


def test_gateway_urls() -> None:
    assert parse_gateway_url("coap://127.0.0.1") == GatewayURL("coap", "127.0.0.1", 5683)
    assert parse_gateway_url("coap://[::1]:5700") == GatewayURL("coap", "::1", 5700)
    assert str(parse_gateway_url("coap://[::1]:5700")) == "coap://[::1]:5700"
    assert parse_gateway_url("mqtt://h:1884/gw07") == GatewayURL("mqtt", "h", 1884, "gw07")
    assert parse_gateway_url("mqtts://broker/gw0").port == 8883
    for bad, why in [
        ("coaps://h", "DTLS"),
        ("http://h", "expected coap://"),
        ("coap://h:99999", "bad port"),
        ("coap://h/x", "no path"),
        ("mqtt://h/a/b", "not a gateway id"),
        ("mqtt://user:pw@h", "--username"),
        ("mqtt://:1883", "no host"),
    ]:
        with pytest.raises(ValueError, match=why):
            parse_gateway_url(bad)


# --- the local round driver, in-process ----------------------------------------------

SHAPES = [(3, 2), (2,)]
KEYS = {f"d{i}": generate_keypair() for i in range(3)}


def _service() -> GatewayService:
    registry = DeviceRegistry({d: k.public_key() for d, k in KEYS.items()})
    return GatewayService("gw-t", registry, SHAPES, GatewayConfig(id="gw-t", limits=Limits()))


def _update(svc: GatewayService, device: str, value: float, samples: int) -> bytes:
    info = svc.round_info()
    delta = np.full(8, value, dtype=np.float32)
    env = Envelope.new(device, info["round"], info["base"], samples, [encode("f32", delta)])
    return seal(env, KEYS[device])


def test_local_driver_closes_on_quorum_writes_and_applies(tmp_path: Path) -> None:
    svc = _service()
    closed: list[tuple[PartialAggregate, Path | None]] = []
    model = ModelSource(np.zeros(8, np.float32), SHAPES, "test")
    cfg = RoundsConfig(model="x.npz", duration_s=30, quorum=2, out=tmp_path, apply=True)
    driver = LocalRoundDriver(
        GatewayControl(svc),
        cfg,
        model,
        tmp_path,
        poll_s=0.01,
        on_close=lambda a, p: closed.append((a, p)),
    )

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(driver.run(stop))
        for r in (0, 1):
            while svc.round != r or not svc.round_info()["open"]:
                await asyncio.sleep(0.01)
            assert svc.submit(_update(svc, "d0", 1.0, 3), "local").status == "accepted"
            assert svc.submit(_update(svc, "d1", 3.0, 1), "local").status == "accepted"
        while svc.round != 2:
            await asyncio.sleep(0.01)
        stop.set()
        await task
        assert driver.flush() is not None  # the open (empty) round 2 is closed, not written
        assert driver.flush() is None  # ... once

    asyncio.run(asyncio.wait_for(scenario(), 20))
    assert [(a.round, a.count) for a, _ in closed] == [(0, 2), (1, 2), (2, 0)]
    assert [p.name if p else None for _, p in closed] == [
        "gw-t-round-000000.npz",
        "gw-t-round-000001.npz",
        None,
    ]
    agg = read_aggregate(tmp_path / "gw-t-round-000000.npz")
    assert agg["count"] == 2 and agg["total_weight"] == 4.0 and agg["devices"] == ["d0", "d1"]
    np.testing.assert_allclose(agg["weighted_sum"], np.full(8, 6.0))
    # apply = true: each round's mean update (6 / 4 = 1.5) moved the model served next
    np.testing.assert_allclose(driver.params, np.full(8, 3.0))
    assert read_aggregate(tmp_path / "gw-t-round-000001.npz")["base"] != agg["base"]
    assert not list(tmp_path.glob(".*.tmp"))


def test_local_driver_deadline_and_max_rounds(tmp_path: Path) -> None:
    svc = _service()
    cfg = RoundsConfig(model="x.npz", duration_s=0.05, max_rounds=3, out=tmp_path)
    model = ModelSource(np.zeros(8, np.float32), SHAPES, "test")
    driver = LocalRoundDriver(GatewayControl(svc), cfg, model, tmp_path, poll_s=0.01)
    asyncio.run(asyncio.wait_for(driver.run(asyncio.Event()), 10))  # returns by itself
    assert driver.rounds_closed == 3 and svc.round == 2 and not svc.round_info()["open"]
    assert list(tmp_path.iterdir()) == []  # empty rounds write nothing


def test_model_sources(tmp_path: Path) -> None:
    a, b = np.arange(6, dtype=np.float32).reshape(2, 3), np.array([7, 8], dtype=np.float32)
    path = save_model(
        tmp_path / "m.npz", ModelSource(np.concatenate([a.ravel(), b]), [(2, 3), (2,)], "t")
    )
    src = load_model_source(str(path))
    assert src.shapes == [(2, 3), (2,)] and src.params.tolist() == [0, 1, 2, 3, 4, 5, 7, 8]
    many = [np.full(1, i, np.float32) for i in range(12)]  # arr_10 sorts after arr_9
    np.savez(tmp_path / "many.npz", *many)
    assert load_model_source(str(tmp_path / "many.npz")).params.tolist() == list(range(12))
    np.save(tmp_path / "flat.npy", np.ones((4, 2)))
    assert load_model_source(str(tmp_path / "flat.npy")).shapes == [(4, 2)]
    np.save(tmp_path / "nan.npy", np.array([1.0, np.nan]))
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not a zip")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object))
    for name, why in [
        ("nan.npy", "NaN"),
        ("junk.npz", "not a readable"),
        ("obj.npy", "not a readable"),
        ("m.txt", "cannot read"),
    ]:
        with pytest.raises(ConfigError, match=why):
            load_model_source(str(tmp_path / name))


# --- the Ray relay without Ray ---------------------------------------------------------


def test_relay_forwards_calls_results_and_errors() -> None:
    async def scenario() -> None:
        relay = GatewayRelay("gw-t", call_timeout_s=5)

        async def gateway_side() -> None:
            while True:
                call = await relay.next_call(0.05)
                if call is None:
                    continue
                call_id, method, args = call
                if method == "publish_model":
                    params, round_, deadline_s, encoding = args
                    assert (round_, deadline_s, encoding) == (3, 2.5, "int8")
                    await relay.complete(call_id, True, f"hash-of-{params.sum():g}")
                else:
                    await relay.complete(call_id, False, LookupError("no round to close"))

        task = asyncio.create_task(gateway_side())
        assert await relay.publish_model(np.ones(4), 3, 2.5, "int8") == "hash-of-4"
        with pytest.raises(LookupError, match="no round"):
            await relay.close_round()
        task.cancel()
        relay.call_timeout_s = 0.1
        with pytest.raises(RelayClosed, match="did not answer health"):
            await relay.health()  # nobody polls any more
        waiting = asyncio.create_task(relay.round_info())
        await asyncio.sleep(0.01)
        assert await relay.shutdown("gateway stopping") == 1
        with pytest.raises(RelayClosed, match="gateway stopping"):
            await waiting
        with pytest.raises(RelayClosed):
            await relay.publish_model(np.ones(4), 4, 1.0)
        assert await relay.ping() == "gw-t"

    asyncio.run(asyncio.wait_for(scenario(), 10))


def test_relay_poller_runs_calls_on_the_gateway() -> None:
    """The poller against a stand-in for the actor handle (``.method.remote(...)``)."""
    calls: queue.Queue[Any] = queue.Queue()
    completed: list[tuple[int, bool, Any]] = []

    class Method:
        def __init__(self, fn: Any) -> None:
            self.remote = fn

    class Handle:
        next_call = Method(lambda wait_s: calls.get(timeout=wait_s) if not calls.empty() else None)
        complete = Method(lambda call_id, ok, value: completed.append((call_id, ok, value)))
        shutdown = Method(lambda reason: None)

    agg = PartialAggregate.empty("gw-t", 0, 2)
    poller = RelayPoller(
        Handle(),
        {"close_round": lambda: agg, "health": lambda: 1 / 0},
        get=lambda ref, timeout: ref,
        wait_s=0.01,
    ).start()
    for call in [(0, "close_round", ()), (1, "health", ()), (2, "publish_model", ())]:
        calls.put(call)
    deadline = time.monotonic() + 5
    while len(completed) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    poller.stop()
    assert completed[0] == (0, True, agg)
    assert completed[1][:2] == (1, False) and isinstance(completed[1][2], ZeroDivisionError)
    assert completed[2][:2] == (2, False) and "does not serve" in str(completed[2][2])
    with pytest.raises(ValueError, match="no such relay methods"):
        RelayPoller(Handle(), {"rm_rf": lambda: None})


def test_gateway_package_still_imports_without_torch_or_ray() -> None:
    code = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in {'torch', 'crypten', 'ray', 'networkx', 'matplotlib', 'sklearn'}:
            raise ImportError(f'{name} is blocked')
        return None
sys.meta_path.insert(0, Block())
import gateway.serve, gateway.rounds, gateway.ray_relay, gateway.cli, devices.client
print('ok')
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
