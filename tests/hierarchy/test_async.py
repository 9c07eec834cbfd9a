"""Asynchronous (FedBuff-style) rounds: the pure event logic on a hand-made timeline, then
the emulator end to end (in-process backend, tiny real data)."""

import itertools
import json
from pathlib import Path

import networkx as nx
import pytest

from hierarchy.async_rounds import AsyncTimeline
from hierarchy.emulate import EmulationConfig, LocalConfig, run_emulation
from hierarchy.timeline import staleness_weight
from hierarchy.topology import topology_from_graph

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "topologies" / "smoke.graphml"


class HandEnv:
    """A hand-made timeline: fixed cycle durations, pushes and uplinks (binary-exact floats)."""

    def __init__(self, durations, gateways=1, push=0.25, uplink=0.25, slack=0.0, away=()):
        self.durations = durations  # device -> seconds from start to arrival
        self.gateways = gateways
        self.push, self.uplink = push, uplink
        self.slack = slack  # lower bound = start + (1 - slack) * duration
        self.away = set(away)  # (device, cycle) whose coin says "not reachable"
        self.version = 0
        self.trained: list = []  # every Job trained, in call order
        self.calls = 0
        self.flushes: list = []
        self.delivered_: list = []

    def eligible(self, device):
        return True

    def available(self, device, cycle):
        return (device, cycle) not in self.away

    def sit_out_s(self, device, cycle):
        return 2.0

    def earliest_arrival_s(self, device, cycle, start_s):
        return start_s + (1.0 - self.slack) * self.durations[device]

    def train(self, jobs):
        self.calls += 1
        self.trained.extend(jobs)
        return [j.start_s + self.durations[j.device] for j in jobs]

    def delivered(self, delivery):
        self.delivered_.append(delivery)

    def flush(self, gateway, index, updates, factors):
        self.flushes.append((gateway, index, list(updates), list(factors)))
        return self.uplink, None

    def apply(self, flush):
        self.version += 1
        return self.version

    def push_s(self, version):
        return [self.push] * self.gateways


def summary(applied):
    return [
        (
            a.time_s,
            a.flush.time_s,
            [(u.device, u.cycle, u.version) for u in a.flush.updates],
            a.flush.staleness,
        )
        for a in applied
    ]


def test_hand_timeline_flushes_every_b_with_the_right_staleness():
    # One gateway, devices 0 (1 s cycles) and 1 (1.5 s); device 2 (16 s) is still computing.
    # Model pushes and flush uplinks take 0.25 s. Worked out by hand:
    #  0.25 v0 at the gateway; everyone starts on v0
    #  1.25 d0 lands; 1.75 d1 lands -> flush 1 (staleness 0, 0) -> cloud 2.0 = v1 -> gw 2.25
    #  2.25 v1 reaches the gateway *and* d0 lands: d0 restarts on v1 (same instant)
    #  3.25 d0 (v1) and d1 (cycle 2, v0) land -> flush 2 = d0 c2 (v0), d0 c3 (v1): staleness 1, 0
    #  4.25 d0 c4 (v1) lands -> flush 3 = d1 c2 (v0), d0 c4 (v1): cloud is at v2 -> 2, 1
    env = HandEnv({0: 1.0, 1: 1.5, 2: 16.0}, slack=0.25)
    tl = AsyncTimeline([0, 0, 0], buffer_size=2, staleness_exponent=0.5)
    applied = list(tl.run(env, versions=3))
    assert summary(applied) == [
        (2.0, 1.75, [(0, 1, 0), (1, 1, 0)], (0, 0)),
        (3.5, 3.25, [(0, 2, 0), (0, 3, 1)], (1, 0)),
        (4.5, 4.25, [(1, 2, 0), (0, 4, 1)], (2, 1)),
    ]
    assert [a.version for a in applied] == [1, 2, 3]
    assert [a.previous_s for a in applied] == [0.0, 2.0, 3.5]
    factors = [f for _, _, _, f in env.flushes]
    assert factors[2] == [staleness_weight(2, 0.5), staleness_weight(1, 0.5)]
    # A device restarting after a version change trains on the new version.
    jobs = {(j.device, j.cycle): j for j in env.trained}
    assert jobs[(0, 3)].start_s == 2.25 and jobs[(0, 3)].version == 1
    assert jobs[(0, 4)].version == 1  # started at 3.25; v2 reaches the gateway at 3.75
    pending = {(j.device, j.cycle): j for j in tl.pending}  # started, not trained yet
    assert pending[(0, 5)].start_s == 4.25 and pending[(0, 5)].version == 2
    assert jobs[(2, 1)].version == 0
    # Versions reach the gateway push seconds after their apply.
    assert tl.version_time == {0: 0.0, 1: 2.0, 2: 3.5, 3: 4.5}
    assert tl.latest == [2]  # v3 lands at 4.75, after the run stopped


def test_slow_device_arrives_stale_and_is_discounted():
    env = HandEnv({0: 1.0, 1: 1.5, 2: 16.0})
    tl = AsyncTimeline([0, 0, 0], buffer_size=2, staleness_exponent=0.5)
    applied = []
    for a in tl.run(env, versions=40):
        applied.append(a)
        if any(u.device == 2 for u in a.flush.updates):
            break
    slow = applied[-1]
    k = [u.device for u in slow.flush.updates].index(2)
    landed = slow.flush.updates[k].arrival_s
    assert landed == 16.25
    # its staleness counts the versions applied by the time its buffer filled up
    assert slow.flush.time_s >= landed
    before = [a for a in applied if a.time_s <= slow.flush.time_s]
    assert len(before) >= 10  # the fast devices kept producing versions meanwhile
    assert slow.flush.staleness[k] == len(before)
    assert slow.flush.factors[k] == staleness_weight(len(before), 0.5) < 0.3


def test_batching_does_not_change_the_outcome():
    durations = {0: 1.0, 1: 1.5, 2: 2.75, 3: 0.75, 4: 16.0}
    gw = [0, 0, 1, 1, 1]
    runs = []
    for slack in (0.0, 0.5, 1.0):  # exact bound, loose, none at all (train at once)
        env = HandEnv(durations, gateways=2, slack=slack)
        tl = AsyncTimeline(gw, buffer_size=2, staleness_exponent=0.5)
        runs.append((summary(tl.run(env, versions=15)), env.calls))
    assert runs[0][0] == runs[1][0] == runs[2][0]
    calls = [c for _, c in runs]
    # a tighter bound means fewer, larger training batches
    assert calls[0] <= calls[1] <= calls[2] and calls[0] < calls[2], calls


def test_a_lower_bound_above_the_truth_is_caught():
    env = HandEnv({0: 1.0}, slack=-0.5)  # claims the update cannot land before 1.5 s
    tl = AsyncTimeline([0], buffer_size=1, staleness_exponent=0.5)
    with pytest.raises(RuntimeError, match="lower bound"):
        list(tl.run(env, versions=2))


def test_an_unreachable_device_sits_out_a_slot_then_retries_with_a_new_cycle():
    env = HandEnv({0: 1.0, 1: 1.0}, away={(1, 1)})
    tl = AsyncTimeline([0, 0], buffer_size=1, staleness_exponent=0.0)
    applied = list(tl.run(env, versions=4))
    jobs = {(j.device, j.cycle): j for j in env.trained}
    assert (1, 1) not in jobs
    assert jobs[(1, 2)].start_s == 0.25 + 2.0  # the slot, then the next cycle's coin
    assert applied[0].sit_outs == 1
    # d1 lands at 3.25 with d0's third update; same instant: lower device first
    assert [u.device for a in applied for u in a.flush.updates] == [0, 0, 0, 1]


# --- the emulator ---------------------------------------------------------------------


def run(topo=None, **kw):
    kw.setdefault("rounds", 20)
    kw.setdefault("local", LocalConfig(lr=0.2, epochs=2))
    cfg = EmulationConfig(
        topology=SMOKE,
        dataset="digits",
        seed=1,
        backend="local",
        plots=False,
        mode="async",
        **kw,
    )
    return run_emulation(cfg, progress=False, topo=topo)


def _strip_wall(report: dict) -> dict:
    out = json.loads(json.dumps(report))
    for r in out["rounds"]:
        r.pop("wall_s"), r.pop("wall_train_s")
    out.pop("summary"), out.pop("placement")
    return out


@pytest.fixture(scope="module")
def async_report():
    return run(buffer_size=2)


def test_async_emulation_learns_and_versions_move_forward(async_report):
    report = async_report
    rounds = report["rounds"]
    assert len(rounds) == 20
    assert report["config"]["mode"] == "async"
    assert report["summary"]["async"]["buffer_size"] == 2
    assert report["summary"]["final_accuracy"] > report["initial"]["accuracy"] + 0.3
    times = [r["time_s"] for r in rounds]
    assert all(b >= a for a, b in itertools.pairwise(times)) and times[-1] > times[0]
    assert times[-1] == pytest.approx(report["summary"]["emulated_time_s"], rel=1e-9)
    for prev, r in itertools.pairwise(rounds):
        assert r["latency_s"] == pytest.approx(r["time_s"] - prev["time_s"], abs=1e-12)
    assert [r["model_version"] for r in rounds] == list(range(1, 21))
    for r in rounds:
        assert r["participants"] == r["selected"] == 2 and r["stragglers"] == 0
        assert len(r["devices"]) == len(r["staleness"]["values"]) == 2
        assert r["bytes"]["gateway_up"] > 4 * report["model"]["params"]
        if r["updates_landed"]:  # uploads are charged to the span in which they land
            assert r["bytes"]["update_bytes_max"] > 4 * report["model"]["params"]
    landed = sum(r["updates_landed"] for r in rounds)
    assert landed >= 2 * len(rounds)
    assert sum(r["bytes"]["device_up"] for r in rounds) > landed * 4 * report["model"]["params"]
    # Devices keep cycling: later flushes carry updates computed on older versions.
    assert max(r["staleness"]["max"] for r in rounds) >= 1


def test_async_same_seed_same_report(async_report):
    assert _strip_wall(run(buffer_size=2)) == _strip_wall(async_report)


def test_sync_records_carry_cumulative_time():
    cfg = EmulationConfig(
        topology=SMOKE, rounds=3, dataset="digits", seed=0, backend="local", plots=False
    )
    rounds = run_emulation(cfg, progress=False)["rounds"]
    total = 0.0
    for r in rounds:
        total += r["latency_s"]
        assert r["time_s"] == pytest.approx(total, rel=1e-12)


def test_async_fast_devices_keep_producing_versions_while_a_slow_one_computes():
    g = nx.Graph()
    g.add_node("cloud", tier="cloud")
    g.add_node("gw", tier="gateway")
    g.add_edge("cloud", "gw", latency_ms=5, bandwidth_mbps=1000)
    for i, flops in enumerate([2e8, 2.5e8, 3e8, 3.5e8, 1.5e7]):  # d4 is ~15x slower
        g.add_node(f"d{i}", tier="device", flops=flops)
        g.add_edge("gw", f"d{i}", latency_ms=10, bandwidth_mbps=50)
    topo = topology_from_graph(g, "one-slow")
    rounds = run(topo=topo, rounds=40, buffer_size=2, local=LocalConfig(lr=0.1))["rounds"]
    with_slow = [r for r in rounds if "d4" in r["devices"]]
    assert with_slow, "the slow device's update never got applied"
    first = with_slow[0]
    k = first["devices"].index("d4")
    stale = first["staleness"]["values"][k]
    before = [r for r in rounds if r["round"] < first["round"]]
    assert len(before) >= 8  # versions the fast devices produced meanwhile
    assert stale >= 8 and stale >= len(before) - 1
    assert first["staleness_weight_min"] == pytest.approx(staleness_weight(stale, 0.5))
    assert first["staleness_weight_min"] < 0.35
    fast_only = [r for r in before if "d4" not in r["devices"]]
    assert len(fast_only) == len(before)


def test_first_async_version_is_exactly_the_first_sync_round():
    # Compute-free devices on identical links: all four land before any lands twice, so a
    # buffer of four holds each device once, trained on version 0 -- sync round 1, exactly
    # (same streams: cycle 1 = round 1, flush 1 = round 1's uplink, version 0's push).
    g = nx.Graph()
    g.add_node("cloud", tier="cloud")
    g.add_node("gw", tier="gateway")
    g.add_edge("cloud", "gw", latency_ms=5, bandwidth_mbps=1000, jitter_ms=1)
    for i in range(4):
        g.add_node(f"d{i}", tier="device", flops=1e12)
        g.add_edge("gw", f"d{i}", latency_ms=50, bandwidth_mbps=100, jitter_ms=2, loss=0.01)
    topo = topology_from_graph(g, "even")
    cfg = EmulationConfig(
        topology=SMOKE, rounds=1, dataset="digits", seed=1, backend="local", plots=False
    )
    sync = run_emulation(cfg, progress=False, topo=topo)["rounds"][0]
    first = run(topo=topo, rounds=2, buffer_size=4, local=cfg.local)["rounds"][0]
    assert sorted(first["devices"]) == ["d0", "d1", "d2", "d3"]
    assert first["staleness"]["values"] == [0, 0, 0, 0]
    assert first["time_s"] == sync["time_s"] == sync["latency_s"]
    assert first["device_latency_s"]["max"] == pytest.approx(
        sync["device_latency_s"]["max"] - sync["breakdown_critical_s"]["cloud_to_gateway"]
    )
    assert first["update_norm"] == pytest.approx(sync["update_norm"], rel=1e-6)
    assert first["accuracy"] == pytest.approx(sync["accuracy"])
    assert first["bytes"]["update_bytes_max"] == sync["bytes"]["update_bytes_max"]
    assert first["retransmitted_packets"] >= sync["retransmitted_packets"]


def test_async_config_is_validated():
    base = dict(topology=SMOKE, mode="async")
    with pytest.raises(ValueError, match="buffer-size must be >= 1"):
        EmulationConfig(**base, buffer_size=0).validate()
    with pytest.raises(ValueError, match="deadline-s is a synchronous-round option"):
        EmulationConfig(**base, deadline_s=1.0).validate()
    with pytest.raises(ValueError, match="unknown mode"):
        EmulationConfig(topology=SMOKE, mode="fedbuff").validate()
    with pytest.raises(ValueError, match="buffer-size applies to --mode async only"):
        EmulationConfig(topology=SMOKE, buffer_size=4).validate()


def test_cli_async_mode_writes_a_report_and_plots(tmp_path, capsys):
    from hierarchy.cli import main

    out = tmp_path / "async"
    argv = ["emulate", str(SMOKE), "--dataset", "digits", "--backend", "local", "--quiet"]
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--mode", "async", "--buffer-size", "0"])
    assert exc.value.code == 2
    assert "--buffer-size: must be >= 1" in capsys.readouterr().err
    assert main([*argv, "--mode", "async", "--deadline-s", "1"]) == 2
    assert "not with --mode async" in capsys.readouterr().err
    code = main(
        [*argv, "--mode", "async", "--buffer-size", "3", "--rounds", "4", "--out", str(out)]
    )
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["mode"] == "async" and report["config"]["buffer_size"] == 3
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3, 4]
    assert all(r["participants"] == 3 for r in report["rounds"])
    assert (out / "accuracy_vs_time.png").stat().st_size > 1000
