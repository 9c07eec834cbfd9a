from hierarchy.placement import plan_placement, split_contiguous_balanced
from hierarchy.topology import load_topology

from .test_emulate import ROOT


def test_split_covers_everything_once_and_balances():
    w = [5, 1, 1, 1, 1, 1, 5, 5]
    parts = split_contiguous_balanced(w, 3)
    assert [i for p in parts for i in p] == list(range(8))
    loads = [sum(w[i] for i in p) for p in parts]
    assert max(loads) - min(loads) <= 5
    assert split_contiguous_balanced([1, 1], 5) == [[0], [1]]


def test_many_gateways_pack_onto_few_hosts_and_pinned_ones_get_their_own():
    topo = load_topology(ROOT / "topologies" / "metro-5g.graphml")
    p = plan_placement(topo, trainers=2, gateway_hosts=2)
    assert len(p.gateway_hosts) == 2 and len(p.trainers) == 2
    assert sorted(g for h in p.gateway_hosts for g in h.gateways) == sorted(topo.gateways)
    assert sorted(i for t in p.trainers for i in t) == list(range(len(topo.devices)))
    first = next(iter(topo.gateways))
    pinned = plan_placement(
        topo, trainers=2, gateway_hosts=2, cluster_resources={f"gateway:{first}": 1.0, "CPU": 2}
    )
    assert pinned.gateway_hosts[0].gateways == [first]
    assert pinned.gateway_hosts[0].resources == {f"gateway:{first}": 0.001}
    assert all(first not in h.gateways for h in pinned.gateway_hosts[1:])
