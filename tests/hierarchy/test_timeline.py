"""Virtual-clock arithmetic on a hand-made 3-node topology (cloud - gateway - device)."""

import networkx as nx
import numpy as np
import pytest

from hierarchy.netem import MTU_BYTES, transfer_time
from hierarchy.timeline import (
    close_gateway,
    device_timing,
    gateway_model_arrival,
    gateway_uplink,
    training_flops,
)
from hierarchy.topology import Link, topology_from_graph


def three_nodes(loss: float = 0.0, jitter: float = 0.0):
    g = nx.Graph()
    g.add_node("cloud", tier="cloud")
    g.add_node("gw", tier="gateway")
    g.add_node("dev", tier="device", flops=1e9, samples=100)
    g.add_edge("cloud", "gw", latency_ms=5.0, up_mbps=1000.0, down_mbps=1000.0, link="fiber")
    g.add_edge(
        "gw",
        "dev",
        latency_ms=20.0,
        up_mbps=8.0,
        down_mbps=80.0,
        jitter_ms=jitter,
        loss=loss,
        link="5g",
    )
    return topology_from_graph(g, "three-nodes")


def test_round_timeline_by_hand():
    topo = three_nodes()
    dev, gw = topo.devices["dev"], topo.gateways["gw"]
    model_bytes, update_bytes = 40_000, 10_000
    start = gateway_model_arrival(gw, 0, seed=0, round_=1, model_bytes=model_bytes)
    # 5 ms + 40 kB * 8 / 1 Gbit/s = 5 ms + 0.32 ms
    assert start == pytest.approx(0.005 + 40_000 * 8 / 1e9)
    work = training_flops(1e6, 100)  # 3 * 1 MFLOP * 100 samples = 3e8 FLOP
    t = device_timing(
        dev,
        0,
        seed=0,
        round_=1,
        start_s=start,
        model_bytes=model_bytes,
        update_bytes=update_bytes,
        work_flops=work,
    )
    assert t.download_s == pytest.approx(0.020 + 40_000 * 8 / 80e6)  # 24 ms
    assert t.compute_s == pytest.approx(0.3)  # 3e8 / 1e9
    assert t.upload_s == pytest.approx(0.020 + 10_000 * 8 / 8e6)  # 30 ms
    assert t.arrival_s == pytest.approx(start + 0.024 + 0.3 + 0.030)
    closed = close_gateway([t.arrival_s], None, start)
    assert closed.close_s == t.arrival_s and closed.included == [0]
    up = gateway_uplink(gw, 0, seed=0, round_=1, nbytes=10_064)
    assert up == pytest.approx(0.005 + 10_064 * 8 / 1e9)


def test_deadline_turns_late_devices_into_stragglers():
    closed = close_gateway([0.5, 2.5, 1.9], deadline_s=2.0, start_s=0.1)
    assert closed.included == [0, 2] and closed.stragglers == [1]
    assert closed.close_s == 2.0  # it waited until the deadline for the late one
    on_time = close_gateway([0.5, 1.9], deadline_s=2.0, start_s=0.1)
    assert on_time.close_s == 1.9
    assert close_gateway([], 2.0, 0.1).close_s == 0.1


def test_loss_costs_retransmissions_and_is_seeded():
    lossy = Link(latency_ms=50, up_mbps=1, down_mbps=1, jitter_ms=0, loss=0.2, kind="lte")
    clean = Link(latency_ms=50, up_mbps=1, down_mbps=1, jitter_ms=0, loss=0.0, kind="lte")
    n = 100 * MTU_BYTES
    base = transfer_time(n, clean, "up", np.random.default_rng(0)).seconds
    a = transfer_time(n, lossy, "up", np.random.default_rng(3))
    b = transfer_time(n, lossy, "up", np.random.default_rng(3))
    assert a == b
    assert a.retransmitted_packets > 0
    # each retransmission burst costs at least an RTT more than the clean transfer
    assert a.seconds >= base + 0.1
    mean_retx = np.mean(
        [
            transfer_time(n, lossy, "up", np.random.default_rng(s)).retransmitted_packets
            for s in range(200)
        ]
    )
    assert mean_retx == pytest.approx(100 * 0.2 / (1 - 0.2), rel=0.15)  # geometric resends


def test_jitter_only_adds_delay_and_direction_picks_bandwidth():
    link = Link(latency_ms=10, up_mbps=1, down_mbps=100, jitter_ms=5, loss=0, kind="5g")
    rng = np.random.default_rng(1)
    ups = [transfer_time(1000, link, "up", rng).seconds for _ in range(50)]
    assert min(ups) >= 0.010 + 8000 / 1e6
    down = transfer_time(1000, link, "down", np.random.default_rng(1)).seconds
    assert down < min(ups)
    with pytest.raises(ValueError, match="nbytes"):
        transfer_time(-1, link, "up", rng)


def test_quorum_closes_at_the_arrival_that_completes_it():
    from hierarchy.timeline import quorum_count

    arrivals = [0.9, 0.2, 3.0, 0.5, 1.4]
    q = quorum_count(0.6, 5)  # 3 of 5
    assert q == 3
    closed = close_gateway(arrivals, deadline_s=2.0, start_s=0.1, quorum_count=q)
    assert closed.close_s == 0.9  # third arrival: 0.2, 0.5, 0.9
    assert sorted(closed.included) == [0, 1, 3] and sorted(closed.stragglers) == [2, 4]
    # the deadline still wins when the quorum is slower
    slow = close_gateway([2.5, 2.6, 0.3], deadline_s=2.0, start_s=0.1, quorum_count=2)
    assert slow.close_s == 2.0 and slow.included == [2]
    # quorum of the selected devices, including ones that never report
    assert quorum_count(0.3, 10) == 3 and quorum_count(None, 10) is None
    assert quorum_count(0.3, 1) == 1


def test_staleness_weight_and_energy():
    from hierarchy.timeline import energy_mwh, staleness_weight

    assert staleness_weight(0, 0.5) == 1.0
    assert staleness_weight(3, 0.5) == pytest.approx(0.5)
    assert staleness_weight(1, 1.0) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        staleness_weight(-1, 0.5)
    # 2 W for 1.8 s of compute and radio = 3.6 J = 1 mWh
    assert energy_mwh(2.0, 1.0, 0.8) == pytest.approx(1.0)
