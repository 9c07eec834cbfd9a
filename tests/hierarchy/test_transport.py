"""`tierfl emulate --transport coap|mqtt`: real signed envelopes over real sockets, same model.

Every test here runs real servers: aiocoap gateway servers on loopback ports,
or a real mosquitto broker with the real paho intake, and the real device
clients. Smoke topology, digits, 2 rounds: a few seconds per emulation.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from devices.keys import generate_keypair, public_key_hex
from hierarchy.cli import main
from hierarchy.emulate import Emulation, EmulationConfig, LocalConfig, run_emulation
from hierarchy.privacy import PrivacyConfig

# Wall-clock measurements differ between any two runs; everything else must not.
from .test_emulate import SMOKE, WALL_KEYS


def _cfg(transport: str, **kw: Any) -> EmulationConfig:
    base: dict[str, Any] = dict(
        topology=SMOKE,
        rounds=2,
        dataset="digits",
        seed=5,
        local=LocalConfig(lr=0.1),
        backend="local",
        plots=False,
        transport=transport,
    )
    base.update(kw)
    return EmulationConfig(**base)


def _comparable(report: dict[str, Any]) -> list[dict[str, Any]]:
    rounds = json.loads(json.dumps(report["rounds"]))
    for r in rounds:
        for k in WALL_KEYS:
            r.pop(k)
    return rounds


@pytest.fixture(scope="module")
def direct_local() -> dict[str, Any]:
    return run_emulation(_cfg("direct"), progress=False)


@pytest.mark.parametrize("transport", ["coap", "mqtt"])
def test_same_seed_same_model_as_direct_in_process(transport, direct_local):
    report = run_emulation(_cfg(transport), progress=False)
    assert report["config"]["transport"] == transport
    assert direct_local["config"]["transport"] == "direct"
    # Same bytes, another path: every record (hashes, accuracy, bytes, virtual times) equal.
    assert _comparable(report) == _comparable(direct_local)
    for r in report["rounds"]:
        assert r["participants"] > 0 and r["rejected"] == 0 and r["transport_failed"] == 0
        # the uploads really went over a socket and waited for the gateway's answer
        assert 0 < r["transport_rtt_s"]["p50"] <= r["transport_rtt_s"]["max"]
        assert r["wall_transport_s"] >= r["transport_rtt_s"]["max"]
    assert report["summary"]["wall_transport_s"] > 0


def test_same_seed_same_model_through_ray_actors():
    """CoAP and MQTT between Ray actor processes give the in-process direct run's model.

    Two trainers in both runs (Ray's default on 2 CPUs): the placement, not the
    backend, decides how devices are batched, so the hashes must match exactly.
    Plaintext aggregation (``--no-smpc``) on both sides: the in-process run has no
    cloud parties, and SMPC's fixed-point sum is not what is compared here.
    """
    from hierarchy.backend import RayBackend

    direct = run_emulation(_cfg("direct", trainers=2), progress=False)
    cluster = RayBackend(num_cpus=2)  # one cluster for both runs (Ray start-up is seconds)
    try:
        reports = {
            t: run_emulation(
                _cfg(t, backend="ray", trainers=2, privacy=PrivacyConfig(mode="none")),
                progress=False,
            )
            for t in ("coap", "mqtt")
        }
    finally:
        cluster.shutdown()
    for t, report in reports.items():
        assert [r["model_hash"] for r in report["rounds"]] == [
            r["model_hash"] for r in direct["rounds"]
        ], t
        assert _comparable(report) == _comparable(direct)
        placement = report["placement"]
        assert placement["backend"] == "ray"
        pids = {h["pid"] for h in placement["gateway_hosts"]} | {
            tr["pid"] for tr in placement["trainers"]
        }
        assert len(pids) == len(placement["gateway_hosts"]) + len(placement["trainers"]) == 3
        assert all(r["transport_rtt_s"]["p50"] > 0 for r in report["rounds"])


def _host_of(emu: Emulation, gateway: str) -> Any:
    return emu.hosts[emu.placement.host_of()[gateway]]


@pytest.mark.parametrize("transport", ["coap", "mqtt"])
def test_unregistered_or_impostor_devices_are_rejected_over_the_socket(transport):
    emu = Emulation(_cfg(transport, rounds=1))
    try:
        reachable = emu.select(1)["reachable"]
        devices = list(emu.topo.devices.values())
        revoked, impostor = devices[reachable[0]], devices[reachable[-1]]
        assert revoked.gateway != impostor.gateway  # one refusal at each gateway
        _host_of(emu, revoked.gateway).call("revoke", revoked.gateway, revoked.id)
        # The gateway now holds another key for this device: its real signature fails.
        other = public_key_hex(generate_keypair())
        _host_of(emu, impostor.gateway).call("enroll", impostor.gateway, impostor.id, other)
        rec = emu.run_round(1)
        # Counted by the real gateway service, under the socket's transport label.
        intakes = {g: _host_of(emu, g)._obj._intakes.services[g] for g in emu.topo.gateways}
        m_revoked = intakes[revoked.gateway].metrics
        m_impostor = intakes[impostor.gateway].metrics
        assert m_revoked.rejections_count(revoked.gateway, "unknown-device", transport) == 1
        assert m_impostor.rejections_count(impostor.gateway, "bad-signature", transport) == 1
        accepted = sum(
            v.metrics.updates_count(g, "accepted", transport) for g, v in intakes.items()
        )
        broker_pid = emu.broker.pid if emu.broker is not None else None
        direct = Emulation(_cfg("direct", rounds=1))
        try:
            baseline = direct.run_round(1)
        finally:
            direct.close()
    finally:
        emu.close()
    if transport == "mqtt":  # the driver's broker is stopped by its PID at close
        assert broker_pid is not None and emu.broker is None
        with pytest.raises(ProcessLookupError):
            os.kill(broker_pid, 0)
    assert accepted == rec["participants"]
    assert rec["rejected_by_reason"] == {"unknown-device": 1, "bad-signature": 1}
    assert rec["rejected"] == 2
    # The round completed with everyone else.
    assert rec["participants"] == len(reachable) - 2 == baseline["participants"] - 2
    n = len(emu.topo.devices)
    assert rec["participants"] + rec["unavailable"] + rec["stragglers"] + rec["rejected"] == n
    assert rec["model_version"] == baseline["model_version"]
    assert rec["model_hash"] != baseline["model_hash"]  # two updates fewer in the average
    assert rec["transport_failed"] == 0


def test_transport_choice_is_validated():
    with pytest.raises(ValueError, match="unknown transport 'http'; choose one of direct"):
        _cfg("http").validate()
    with pytest.raises(ValueError, match="--transport coap with --mode async is not supported"):
        _cfg("coap", mode="async").validate()
    with pytest.raises(ValueError, match=r"loopback.*cannot be combined with --ray-address"):
        _cfg("mqtt", backend="ray", ray_address="auto").validate()
    with pytest.raises(ValueError, match="device-shares updates are masked ring values"):
        _cfg("coap", backend="ray", privacy=PrivacyConfig(mode="device-shares")).validate()


def test_cli_documents_and_checks_transport(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["emulate", "--help"])
    assert exc.value.code == 0
    assert "--transport {direct,coap,mqtt}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["emulate", str(SMOKE), "--transport", "udp"])
    assert exc.value.code == 2
    assert "invalid choice: 'udp'" in capsys.readouterr().err
    assert main(["emulate", str(SMOKE), "--transport", "mqtt", "--mode", "async"]) == 2
    assert "--transport mqtt with --mode async is not supported" in capsys.readouterr().err
