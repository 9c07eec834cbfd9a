"""SMPC inside the emulation, for real: K CrypTen party processes behind the Ray actor tree."""

import dataclasses
from pathlib import Path

import pytest

from hierarchy.backend import gather
from hierarchy.emulate import Emulation, EmulationConfig, LocalConfig, RunStopped, run_emulation
from hierarchy.privacy import PrivacyConfig

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "topologies" / "smoke.graphml"


def _cfg(**kw):
    base = dict(
        topology=SMOKE,
        dataset="digits",
        seed=5,
        plots=False,
        local=LocalConfig(lr=0.1),
        trainers=1,
        gateway_hosts=1,
    )
    return EmulationConfig(**{**base, **kw})


def test_device_shares_learn_what_plain_fedavg_learns_with_dropouts():
    """Masked updates + sealed seeds + blind gateway sums: same model as plaintext FedAvg."""
    kw = dict(rounds=3, dropout=0.3)
    secure = run_emulation(_cfg(privacy=PrivacyConfig(mode="device-shares"), **kw), progress=False)
    plain = run_emulation(_cfg(backend="local", **kw), progress=False)
    assert secure["privacy"]["mode"] == "device-shares" and plain["privacy"]["mode"] == "none"
    for s, p in zip(secure["rounds"], plain["rounds"], strict=True):
        assert s["dropped"] == p["dropped"] and s["participants"] == p["participants"]
        assert abs(s["accuracy"] - p["accuracy"]) <= 0.005
        assert s["update_norm"] == pytest.approx(p["update_norm"], rel=1e-4)
        assert s["privacy"]["restarts"] == 0 and s["privacy"]["excluded"] == {}
        # A device sends P int64 + sealed seeds; a gateway forwards one vector in all.
        params = secure["model"]["params"]
        assert s["bytes"]["update_bytes_max"] >= 8 * params
        assert s["bytes"]["gateway_up"] < 2 * (8 * params + 64) + 2000
        assert s["breakdown_critical_s"]["cloud_smpc"] > 0
    assert sum(r["dropped"] for r in secure["rounds"]) > 0


def test_a_party_lost_mid_round_is_retried_on_a_fresh_group_or_stops_cleanly():
    emu = Emulation(_cfg(rounds=3, privacy=PrivacyConfig(parties=3, retries=1)))
    try:
        first = emu.run_round(1)
        assert first["privacy"]["mode"] == "gateway-trusted" and first["privacy"]["restarts"] == 0
        old_pids = {w["pid"] for w in _party_where(emu)}
        emu.secure.inject_fault(1, "agreed")  # party 1 dies after the agreement, mid-round
        second = emu.run_round(2)
        assert second["privacy"]["restarts"] == 1
        assert "party 1" in second["privacy"]["errors"][0]
        assert second["model_version"] == 2 and second["participants"] > 0
        assert not old_pids & {w["pid"] for w in _party_where(emu)}  # a fresh group
        # No retries left: the round fails with nothing revealed and the model kept.
        emu.cfg = dataclasses.replace(
            emu.cfg, privacy=dataclasses.replace(emu.cfg.privacy, retries=0)
        )
        emu.secure.inject_fault(2, "reveal")
        before = gather([emu.coordinator.call("info")])[0]
        with pytest.raises(RunStopped, match="nothing was revealed") as err:
            emu.run_round(3)
        assert err.value.kind == "smpc-failure" and "party 2" in str(err.value)
        assert gather([emu.coordinator.call("info")])[0] == before
    finally:
        emu.close()


def _party_where(emu):
    return gather([h.call("where") for h in emu.secure.party_handles])
