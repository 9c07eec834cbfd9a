"""Delta downlinks in the emulator: devices that sit out rounds, and disagreement is an error."""

from __future__ import annotations

import pytest

from cloud.downlink import DownlinkConfig
from devices.downlink import DownlinkError
from hierarchy.emulate import Emulation, EmulationConfig, LocalConfig, run_emulation

from .test_emulate import SMOKE


def _cfg(**kw) -> EmulationConfig:
    base = dict(
        topology=SMOKE,
        rounds=8,
        dataset="digits",
        seed=1,
        local=LocalConfig(lr=0.1),
        backend="local",
        plots=False,
        participation=0.4,
        downlink=DownlinkConfig(mode="delta", codec="int8", history=3),
    )
    base.update(kw)
    return EmulationConfig(**base)  # type: ignore[arg-type]


def test_devices_that_sat_out_get_chains_or_the_model_when_too_old():
    report = run_emulation(_cfg(), progress=False)
    model_bytes = 4 * report["model"]["params"]
    dev = [r["downlink"]["gateway_to_device"] for r in report["rounds"]]
    # With 40 % participation devices come back several versions behind: multi-step
    # chains, and (history 3, or chains past ~4 int8 steps) the full model again.
    assert max(d["chain_steps_max"] for d in dev) >= 2
    assert sum(d["full"] for d in dev[3:]) > 0
    assert sum(d["delta"] for d in dev) > 0
    for d in dev:
        assert d["chain_steps_max"] <= 3
        assert d["bytes_max"] <= model_bytes + 96  # never more than the full model
    # every round's devices trained on the version the cloud had: hashes chain on
    versions = [r["model_version"] for r in report["rounds"]]
    assert versions == list(range(1, 9))


def test_delta_is_the_default_in_sync_mode_and_full_in_async():
    sync = _cfg(downlink=None)
    assert sync.effective_downlink.mode == "delta"
    assert _cfg(downlink=None, mode="async", participation=1.0).effective_downlink.mode == "full"
    with pytest.raises(ValueError, match="not supported with --mode async"):
        _cfg(mode="async", participation=1.0).validate()


def test_driver_and_device_disagreeing_on_the_held_version_fails_the_round():
    emu = Emulation(_cfg(participation=1.0))
    try:
        emu.run_round(1)
        # The driver now believes every device holds an unknown version: the cloud plans the
        # full model for that one only, and each device, holding the real one, refuses.
        emu._held = ["ab" * 32] * len(emu._held)
        with pytest.raises(DownlinkError, match="does not cover"):
            emu.run_round(2)
    finally:
        emu.close()
