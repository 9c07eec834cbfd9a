"""The emulator's privacy tier: config checks, pure helpers, DP budget, CLI errors (no Ray)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hierarchy.emulate import EmulationConfig, LocalConfig, run_emulation
from hierarchy.privacy import (
    CLIP_TOLERANCE,
    PrivacyConfig,
    clip_check,
    resolve_mode,
    sampling_rate,
    smpc_seconds,
)
from hierarchy.uplink import UplinkConfig

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "topologies" / "smoke.graphml"


def test_auto_mode_is_smpc_on_ray_and_says_why_not_elsewhere():
    auto = PrivacyConfig()
    assert resolve_mode(auto, "ray", False) == ("gateway-trusted", None)
    mode, why = resolve_mode(auto, "local", False)
    assert mode == "none" and "in-process" in (why or "")
    mode, why = resolve_mode(auto, "ray", True)
    assert mode == "none" and "flush" in (why or "")
    assert resolve_mode(PrivacyConfig(mode="device-shares"), "ray", False)[0] == "device-shares"
    with pytest.raises(ValueError, match="--backend ray"):
        resolve_mode(PrivacyConfig(mode="gateway-trusted"), "local", False)
    with pytest.raises(ValueError, match="synchronous"):
        resolve_mode(PrivacyConfig(mode="device-shares"), "ray", True)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(mode="secret"), "unknown privacy mode"),
        (dict(parties=1), "2..7"),
        (dict(parties=8), "2..7"),
        (dict(noise_multiplier=1.0), "needs a clip norm"),
        (dict(noise_multiplier=-1.0), "noise-multiplier"),
        (dict(clip_norm=0.0), "clip-norm must be > 0"),
        (dict(epsilon_budget=3.0), "needs DP noise"),
        (dict(delta=1.0), "delta"),
        (dict(retries=-1), "retries"),
        (dict(mode="none", secure_clip=1.0), "not with --no-smpc"),
    ],
)
def test_bad_privacy_settings_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        PrivacyConfig(**kw).validate()


def test_device_shares_refuses_codecs_and_late_folding():
    base = dict(topology=SMOKE, backend="ray", privacy=PrivacyConfig(mode="device-shares"))
    with pytest.raises(ValueError, match="no codec can"):
        EmulationConfig(**base, uplink=UplinkConfig(codec="int8")).validate()
    with pytest.raises(ValueError, match="late drop"):
        EmulationConfig(**base, late_policy="fold", deadline_s=1.0).validate()
    with pytest.raises(ValueError, match="dropout"):
        EmulationConfig(topology=SMOKE, dropout=1.0).validate()


def test_gateway_clip_check_clips_a_little_over_and_refuses_far_over():
    v = np.array([3.0, 4.0])  # norm 5
    np.testing.assert_allclose(clip_check(v, 10.0), v)  # under the bound: untouched
    c = clip_check(v, 5.0 / (1 + CLIP_TOLERANCE / 2))  # quantization overshoot: clipped to C
    assert c is not None and np.linalg.norm(c) == pytest.approx(5.0 / (1 + CLIP_TOLERANCE / 2))
    assert clip_check(v, 4.0) is None  # 25 % over: the device did not clip


def test_smpc_clock_and_sampling_rate():
    # 2 communication rounds at 0.5 ms + 80,000 bytes at 10 Gbit/s.
    assert smpc_seconds(2, 80_000, 0.5, 10_000.0) == pytest.approx(1e-3 + 64e-6)
    assert sampling_rate(1.0, False, 0.5) == 1.0
    assert sampling_rate(0.2, False, 0.5) == 0.2
    assert sampling_rate(0.2, True, 0.5) == pytest.approx(0.4)  # over-selection raises q
    assert sampling_rate(0.8, True, 0.5) == 1.0


def _cfg(**kw):
    return EmulationConfig(
        topology=SMOKE,
        dataset="digits",
        seed=2,
        backend="local",
        plots=False,
        local=LocalConfig(lr=0.1),
        **kw,
    )


def test_dp_run_reports_epsilon_per_round_and_stops_at_the_budget(tmp_path):
    pc = PrivacyConfig(clip_norm=1.0, noise_multiplier=1.0, epsilon_budget=10.0)
    rep = run_emulation(_cfg(rounds=10, privacy=pc, out=tmp_path), progress=False)
    eps = [r["epsilon"] for r in rep["rounds"]]
    assert len(eps) == 3 and eps == sorted(eps) and eps[-1] <= 10.0  # round 4 would exceed
    assert rep["stopped"]["kind"] == "privacy-budget" and rep["stopped"]["round"] == 4
    assert "last model is kept" in rep["stopped"]["message"]
    assert rep["privacy"]["epsilon"] == eps[-1] and rep["privacy"]["sampling_rate"] == 1.0
    # The kept model is the last applied one.
    assert rep["rounds"][-1]["model_version"] == 3
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["stopped"]["round"] == 4


def test_a_budget_too_small_for_one_round_runs_nothing():
    pc = PrivacyConfig(clip_norm=1.0, noise_multiplier=0.5, epsilon_budget=0.1)
    rep = run_emulation(_cfg(rounds=3, privacy=pc), progress=False)
    assert rep["rounds"] == [] and rep["stopped"]["round"] == 1


def test_clipping_bounds_every_device_and_noise_moves_the_model():
    """With C tiny every device's update is clipped: the mean update norm is <= C."""
    clipped = run_emulation(_cfg(rounds=1, privacy=PrivacyConfig(clip_norm=0.01)), progress=False)
    assert clipped["rounds"][0]["update_norm"] <= 0.01 * (1 + 1e-6)
    plain = run_emulation(_cfg(rounds=1), progress=False)
    assert plain["rounds"][0]["update_norm"] > 0.05
    noisy = run_emulation(
        _cfg(rounds=1, privacy=PrivacyConfig(clip_norm=0.01, noise_multiplier=5.0)),
        progress=False,
    )
    # Noise of std 0.05 on the sum of ~10 uniform-weight devices dominates their mean.
    assert noisy["rounds"][0]["update_norm"] > 10 * clipped["rounds"][0]["update_norm"]


def test_dropout_devices_are_counted_and_never_heard_from():
    rep = run_emulation(_cfg(rounds=3, dropout=0.5), progress=False)
    n = rep["topology"]["devices"]
    dropped = sum(r["dropped"] for r in rep["rounds"])
    assert 0 < dropped < 3 * n
    for r in rep["rounds"]:
        assert r["participants"] + r["unavailable"] + r["dropped"] + r["stragglers"] == n


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "hierarchy.cli", "emulate", str(SMOKE), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--privacy", "device-shares", "--backend", "local"], "--backend ray"),
        (["--no-smpc", "--privacy", "gateway-trusted"], "contradicts"),
        (["--noise-multiplier", "1"], "needs a clip norm"),
        (["--smpc-parties", "9"], "2..7"),
        (["--smpc-parties", "1"], "must be >= 2"),
        (["--clip-norm", "0"], "must be > 0"),
        (["--epsilon-budget", "4"], "needs DP noise"),
        (["--mode", "async", "--privacy", "device-shares"], "synchronous"),
        (["--dropout", "1"], "dropout"),
    ],
)
def test_cli_privacy_errors_exit_2_with_a_message(args, match):
    proc = _cli(*args)
    assert proc.returncode == 2, proc.stderr
    assert match in proc.stderr


def test_help_documents_the_privacy_flags():
    out = _cli("--help").stdout
    for flag in (
        "--privacy",
        "--no-smpc",
        "--smpc-parties",
        "--noise-multiplier",
        "--clip-norm",
        "--epsilon-budget",
        "--secure-clip",
        "--smpc-retries",
        "--dropout",
    ):
        assert flag in out
