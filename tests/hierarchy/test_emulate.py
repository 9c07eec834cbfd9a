"""End to end: `tierfl emulate` on the bundled smoke topology through real Ray actors."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cloud.downlink import DownlinkConfig
from hierarchy.emulate import EmulationConfig, LocalConfig, run_emulation

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "topologies" / "smoke.graphml"
WALL_KEYS = {
    "wall_s",
    "wall_train_s",
    "wall_close_s",
    "wall_cloud_s",
    "wall_transport_s",
    "transport_rtt_s",
}


def _strip_wall(report: dict) -> dict:
    out = json.loads(json.dumps(report))
    for r in out["rounds"]:
        for k in WALL_KEYS:
            r.pop(k)
    out.pop("summary")
    out.pop("placement")
    out["config"].pop("backend")
    out["config"].pop("out")
    return out


def _ray_daemons_of(driver_pid: int) -> set[int]:
    """GCS/raylet processes of the Ray session a driver started (named session_..._<pid>)."""
    import psutil

    found = set()
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if f"_{driver_pid}/" in cmd and ("raylet" in cmd or "gcs_server" in cmd):
            found.add(p.pid)
    return found


@pytest.fixture(scope="module")
def ray_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("emu")
    cmd = [
        sys.executable,
        "-m",
        "hierarchy.cli",
        "emulate",
        str(SMOKE),
        "--dataset",
        "digits",
        "--rounds",
        "6",
        "--seed",
        "3",
        "--lr",
        "0.1",
        "--downlink",
        "delta",
        "--downlink-codec",
        "int8",
        "--out",
        str(out),
        "--quiet",
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert "report:" in stdout
    # Quiet: no Ray log lines leak into the user's terminal, only our own output.
    assert "ray" not in stderr.lower().replace("starting the ray backend", ""), stderr[-2000:]
    # Shut down at the end: no Ray daemon of this run outlives it.
    deadline = time.time() + 20
    while _ray_daemons_of(proc.pid) and time.time() < deadline:
        time.sleep(0.5)
    assert not _ray_daemons_of(proc.pid)
    return out, json.loads((out / "report.json").read_text()), stdout


def test_ray_emulation_learns_and_report_is_complete(ray_report):
    out, report, _proc = ray_report
    assert report["placement"]["backend"] == "ray"
    placement = report["placement"]
    assert len(placement["trainers"]) >= 1 and len(placement["gateway_hosts"]) >= 1
    hosted = sorted(g for h in placement["gateway_hosts"] for g in h["gateways"])
    assert hosted == ["gw00", "gw01"]
    pids = {placement["coordinator"]["pid"]} | {t["pid"] for t in placement["trainers"]}
    assert len(pids) == 1 + len(placement["trainers"])  # every actor its own process
    rounds = report["rounds"]
    assert len(rounds) == 6
    first_acc = report["initial"]["accuracy"]
    assert rounds[-1]["accuracy"] > first_acc + 0.3, (first_acc, rounds[-1]["accuracy"])
    n_dev = report["topology"]["devices"]
    for r in rounds:
        assert r["participants"] + r["unavailable"] + r["stragglers"] + r["rejected"] == n_dev
        lat = r["device_latency_s"]
        assert 0 < lat["p50"] <= lat["p95"] <= lat["max"] <= r["latency_s"]
        crit = r["breakdown_critical_s"]
        assert sum(crit.values()) == pytest.approx(r["latency_s"], rel=1e-9)
        assert r["bytes"]["device_up"] == pytest.approx(
            r["bytes"]["update_bytes_mean"] * (r["selected"] - r["unavailable"])
        )
        assert r["bytes"]["update_bytes_max"] > 4 * report["model"]["params"]
        assert r["wall_s"] > 0
    versions = [r["model_version"] for r in rounds]
    assert versions == sorted(set(versions))
    assert (out / "accuracy_vs_time.png").stat().st_size > 1000
    assert (out / "latency_breakdown.png").stat().st_size > 1000
    assert (out / "bytes_energy.png").stat().st_size > 1000


def test_same_seed_same_report_across_backends(ray_report):
    """The virtual clock and training do not depend on the placement (Ray vs in-process).

    The Ray run used SMPC (the default there), the in-process one plaintext sums
    (no party processes): the models agree to fixed-point precision, so accuracy
    is equal within 0.5 points (the acceptance bar) and in fact to 1e-4; only the
    cloud leg of the clock (share bytes, the parties' protocol) differs.
    """
    _, report, _ = ray_report
    assert report["privacy"]["mode"] == "gateway-trusted" and report["privacy"]["parties"] == 3
    cfg = EmulationConfig(
        topology=SMOKE,
        rounds=6,
        dataset="digits",
        seed=3,
        out=None,
        local=LocalConfig(lr=0.1),
        backend="local",
        plots=False,
        downlink=DownlinkConfig(mode="delta", codec="int8"),
    )
    local = run_emulation(cfg, progress=False)
    a, b = _strip_wall(report), _strip_wall(local)
    for ra, rb in zip(a["rounds"], b["rounds"], strict=True):
        assert abs(ra["accuracy"] - rb["accuracy"]) <= 0.005
        for key in ("accuracy", "loss", "train_loss", "update_norm"):
            assert ra.pop(key) == pytest.approx(rb.pop(key), rel=1e-4, abs=1e-6)
        ra.pop("model_hash"), rb.pop("model_hash")
        assert ra["privacy"]["mode"] == "gateway-trusted" and ra["privacy"]["smpc_s"] > 0
        assert rb["privacy"] == {"mode": "none", "smpc_s": 0.0}
        # Shares: P int64 to the last party + a seed to each other one, per gateway.
        assert ra["bytes"]["gateway_up"] == 2 * (8 * report["model"]["params"] + 64 + 2 * 96)
        for r in (ra, rb):
            for key in ("privacy", "latency_s", "time_s", "breakdown_critical_s"):
                r.pop(key)
            r["bytes"].pop("gateway_up"), r["bytes"].pop("cloud_parties")
            r["breakdown_mean_s"].pop("gateway_to_cloud"), r["breakdown_mean_s"].pop("cloud_smpc")
        assert ra == rb
    again = run_emulation(cfg, progress=False)
    assert _strip_wall(again) == _strip_wall(local)  # bit-identical in one placement


def test_delta_downlink_through_ray_sends_fewer_bytes_than_full(ray_report):
    """Same run with the full model as every download: chains cost ~1/4, accuracy holds."""
    _, delta, _ = ray_report
    full = run_emulation(
        EmulationConfig(
            topology=SMOKE,
            rounds=6,
            dataset="digits",
            seed=3,
            local=LocalConfig(lr=0.1),
            backend="local",
            plots=False,
            downlink=DownlinkConfig(mode="full"),
        ),
        progress=False,
    )
    assert delta["config"]["downlink"]["mode"] == "delta"
    assert full["config"]["downlink"]["mode"] == "full"
    model_bytes = 4 * delta["model"]["params"]
    for rd, rf in zip(delta["rounds"], full["rounds"], strict=True):
        dd, df = rd["downlink"], rf["downlink"]
        # the full run: everyone gets the model, every round
        assert df["gateway_to_device"]["delta"] == 0
        assert df["gateway_to_device"]["bytes_mean"] > model_bytes
        assert df["cloud_to_gateway"]["kind"] == "full"
        n = dd["gateway_to_device"]["full"] + dd["gateway_to_device"]["delta"]
        assert n == rd["selected"] - rd["unavailable"]  # every device that trained downloaded
        mean = dd["gateway_to_device"]["bytes_mean"]
        assert rd["bytes"]["device_down"] == pytest.approx(mean * n)
        assert rd["bytes"]["gateway_down"] == dd["cloud_to_gateway"]["bytes_each"] * 2
        if rd["round"] == 1:  # nobody holds a model yet
            assert dd["gateway_to_device"]["delta"] == 0
            assert dd["cloud_to_gateway"]["kind"] == "full"
        else:  # gateways and devices hold recent versions: int8 chains, ~1/4 of the model each
            assert dd["cloud_to_gateway"]["kind"] == "delta"
            assert dd["cloud_to_gateway"]["bytes_each"] < model_bytes / 3
            assert dd["gateway_to_device"]["delta"] > 0
            assert dd["gateway_to_device"]["bytes_mean"] < model_bytes / 2
            assert rd["bytes"]["device_down"] < rf["bytes"]["device_down"] / 2
    sd, sf = delta["summary"], full["summary"]
    assert sd["total_bytes_down"] < sf["total_bytes_down"] / 2
    assert sd["downlink"]["device_delta"] > sd["downlink"]["device_full"] > 0
    assert sd["downlink"]["device_bytes_mean"] < sf["downlink"]["device_bytes_mean"] / 2
    # compressed global steps with error feedback: the same learning, to within a point or two
    assert sd["final_accuracy"] == pytest.approx(sf["final_accuracy"], abs=0.03)


def test_deadline_produces_stragglers_and_excludes_them():
    cfg = EmulationConfig(
        topology=SMOKE, rounds=1, dataset="digits", seed=0, backend="local", plots=False
    )
    free = run_emulation(cfg, progress=False)["rounds"][0]
    deadline = free["device_latency_s"]["p50"]
    cut = run_emulation(
        EmulationConfig(
            topology=SMOKE,
            rounds=1,
            dataset="digits",
            seed=0,
            backend="local",
            plots=False,
            deadline_s=deadline,
        ),
        progress=False,
    )["rounds"][0]
    assert cut["stragglers"] > 0
    assert cut["participants"] == free["participants"] - cut["stragglers"]
    assert cut["latency_s"] <= deadline + max(cut["breakdown_mean_s"]["gateway_to_cloud"] * 10, 0.1)


def test_diverged_updates_are_rejected_at_the_gateway_not_applied():
    cfg = EmulationConfig(
        topology=SMOKE,
        rounds=3,
        dataset="digits",
        seed=0,
        backend="local",
        plots=False,
        local=LocalConfig(epochs=3, lr=1e12),
    )
    report = run_emulation(cfg, progress=False)
    assert sum(r["rejected"] for r in report["rounds"]) > 0
    for r in report["rounds"]:
        # whatever got through was finite: the model stays usable
        assert r["loss"] is not None and r["loss"] == r["loss"]


def test_lr_schedule_drives_each_rounds_client_lr_and_is_validated():
    from devices.lr_schedule import scheduled_lr

    base = dict(
        topology=SMOKE,
        rounds=4,
        dataset="digits",
        seed=0,
        backend="local",
        plots=False,
        local=LocalConfig(lr=0.1),
    )
    decayed = run_emulation(
        EmulationConfig(**base, lr_schedule="cosine", lr_final=0.1), progress=False
    )
    assert [r["lr"] for r in decayed["rounds"]] == pytest.approx(
        [scheduled_lr(0.1, r, 4, "cosine", 0.1) for r in range(1, 5)]
    )
    assert decayed["rounds"][-1]["lr"] == pytest.approx(0.01)
    assert decayed["config"]["lr_schedule"] == "cosine"
    flat = run_emulation(EmulationConfig(**base), progress=False)
    assert [r["lr"] for r in flat["rounds"]] == [0.1] * 4
    # Round 1 trains at the same rate, so it is the same model; later rounds differ.
    assert decayed["rounds"][0]["model_hash"] == flat["rounds"][0]["model_hash"]
    assert decayed["rounds"][-1]["update_norm"] < flat["rounds"][-1]["update_norm"]

    with pytest.raises(ValueError, match="unknown lr-schedule 'step'"):
        EmulationConfig(**base, lr_schedule="step").validate()
    with pytest.raises(ValueError, match="lr-final must be in"):
        EmulationConfig(**base, lr_schedule="exp", lr_final=0.0).validate()
    with pytest.raises(ValueError, match="lr-schedule is a synchronous-round option"):
        EmulationConfig(**base, lr_schedule="cosine", mode="async").validate()
    with pytest.raises(ValueError, match="lr-warmup-rounds is a synchronous-round option"):
        EmulationConfig(**base, lr_warmup_rounds=2, mode="async").validate()
    with pytest.raises(ValueError, match="must not exceed the rounds"):
        EmulationConfig(**base, lr_warmup_rounds=5).validate()
    warm = run_emulation(EmulationConfig(**base, lr_warmup_rounds=2), progress=False)
    assert [r["lr"] for r in warm["rounds"]] == pytest.approx([0.05, 0.1, 0.1, 0.1])
    assert warm["config"]["lr_warmup_rounds"] == 2


def test_max_grad_norm_reaches_the_trainers_and_the_report():
    """Client gradient clipping travels inside the per-round LocalTrainingConfig to the
    cohort trainers (with a tiny bound the round's update shrinks accordingly) and is
    recorded in the report's config."""
    base = dict(topology=SMOKE, rounds=2, dataset="digits", seed=0, backend="local", plots=False)
    c, lr = 1e-3, 0.1
    clipped = run_emulation(
        EmulationConfig(**base, local=LocalConfig(lr=lr, max_grad_norm=c)), progress=False
    )
    free = run_emulation(EmulationConfig(**base, local=LocalConfig(lr=lr)), progress=False)
    assert clipped["config"]["local"]["max_grad_norm"] == c
    assert free["config"]["local"]["max_grad_norm"] is None
    # Unclipped digits gradients at init are O(1), so c = 1e-3 shrinks round 1 ~1000x.
    assert 0 < clipped["rounds"][0]["update_norm"] < free["rounds"][0]["update_norm"] / 10
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="max-grad-norm must be finite and > 0"):
            EmulationConfig(**base, local=LocalConfig(max_grad_norm=bad)).validate()
