"""Topology loading/validation, generation, rendering and the ``topology`` CLI."""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import networkx as nx
import pytest

from hierarchy.cli_topology import add_topology_parser
from hierarchy.render import render_topology_png
from hierarchy.topogen import generate_topology, write_topology
from hierarchy.topology import (
    DEFAULT_POWER_W,
    Topology,
    TopologyError,
    load_topology,
    topology_from_graph,
)

TOPOLOGIES = Path(__file__).resolve().parents[2] / "topologies"

LINK = {"latency_ms": 10.0, "bandwidth_mbps": 100.0, "link": "5g"}
BACKHAUL = {"latency_ms": 5.0, "bandwidth_mbps": 1000.0, "link": "fiber"}


def base_graph() -> nx.Graph:
    """cloud -> gw1 (d1, d2, d10), gw2 (d3): small but exercises natural ordering."""
    g = nx.Graph()
    g.add_node("cloud", tier="cloud")
    for gw in ("gw2", "gw1"):  # inserted out of order on purpose
        g.add_node(gw, tier="gateway")
        g.add_edge("cloud", gw, **BACKHAUL)
    for dev, gw in (("d10", "gw1"), ("d2", "gw1"), ("d1", "gw1"), ("d3", "gw2")):
        g.add_node(dev, tier="device", flops=1e9)
        g.add_edge(gw, dev, **LINK)
    return g


def write(g: nx.Graph, tmp_path: Path, name: str = "t.graphml") -> Path:
    path = tmp_path / name
    nx.write_graphml(g, path)
    return path


# ------------------------------------------------------------------------------- loading


def test_valid_graph_loads_with_defaults_and_natural_order(tmp_path: Path) -> None:
    topo = load_topology(write(base_graph(), tmp_path, "fleet.graphml"))
    assert topo.name == "fleet"
    assert topo.cloud == "cloud"
    assert list(topo.gateways) == ["gw1", "gw2"]
    assert list(topo.devices) == ["d1", "d2", "d10", "d3"]
    assert topo.gateways["gw1"].devices == ("d1", "d2", "d10")
    d = topo.devices["d1"]
    assert d.gateway == "gw1"
    assert d.samples is None
    assert d.availability == 1.0
    assert math.isinf(d.battery_mwh)
    assert d.power_w == DEFAULT_POWER_W
    assert d.link.up_mbps == d.link.down_mbps == 100.0
    assert d.link.jitter_ms == 0.0 and d.link.loss == 0.0
    assert topo.gateways["gw2"].link.kind == "fiber"


def test_default_link_kinds_and_optional_attributes(tmp_path: Path) -> None:
    g = base_graph()
    del g.edges["gw1", "d1"]["link"]
    del g.edges["cloud", "gw1"]["link"]
    g.nodes["d2"].update(samples=120, availability=0.5, battery_mwh=4000.0, power_w=1.5)
    topo = load_topology(write(g, tmp_path))
    assert topo.devices["d1"].link.kind == "5g"
    assert topo.gateways["gw1"].link.kind == "fiber"
    d2 = topo.devices["d2"]
    assert (d2.samples, d2.availability, d2.battery_mwh, d2.power_w) == (120, 0.5, 4000.0, 1.5)


@pytest.mark.parametrize("device_first", [True, False])
def test_directed_edges_either_way_up_means_toward_cloud(
    tmp_path: Path, device_first: bool
) -> None:
    g = nx.DiGraph()
    g.add_node("cloud", tier="cloud")
    g.add_node("gw", tier="gateway")
    g.add_node("dev", tier="device", flops=2e9)
    link = {"latency_ms": 30.0, "up_mbps": 5.0, "down_mbps": 50.0}
    if device_first:
        g.add_edge("dev", "gw", **link)
        g.add_edge("gw", "cloud", latency_ms=1.0, bandwidth_mbps=1e4)
    else:
        g.add_edge("gw", "dev", **link)
        g.add_edge("cloud", "gw", latency_ms=1.0, bandwidth_mbps=1e4)
    topo = load_topology(write(g, tmp_path))
    assert topo.devices["dev"].link.up_mbps == 5.0
    assert topo.devices["dev"].link.down_mbps == 50.0


def test_bandwidth_fills_only_the_missing_direction(tmp_path: Path) -> None:
    g = base_graph()
    g.edges["gw1", "d1"]["up_mbps"] = 7.0
    topo = load_topology(write(g, tmp_path))
    assert (topo.devices["d1"].link.up_mbps, topo.devices["d1"].link.down_mbps) == (7.0, 100.0)


def test_numbers_stored_as_strings_are_accepted(tmp_path: Path) -> None:
    g = base_graph()
    g.nodes["d1"]["flops"] = "3e9"
    g.edges["gw1", "d1"]["latency_ms"] = " 12.5 "
    topo = load_topology(write(g, tmp_path))
    assert topo.devices["d1"].flops == 3e9
    assert topo.devices["d1"].link.latency_ms == 12.5


def test_topology_from_graph_uses_graph_name_and_source() -> None:
    g = base_graph()
    assert topology_from_graph(g, "mem").name == "mem"
    g.graph["name"] = "named"
    assert topology_from_graph(g).name == "named"
    g.nodes["d1"]["flops"] = -1.0
    with pytest.raises(TopologyError, match=r"^mem: device 'd1'"):
        topology_from_graph(g, "mem")


# ---------------------------------------------------------------------------- validation

Mutation = Callable[[nx.Graph], None]


def _set_node(node: str, **attrs: object) -> Mutation:
    return lambda g: g.nodes[node].update(attrs)


def _set_edge(u: str, v: str, **attrs: object) -> Mutation:
    return lambda g: g.edges[u, v].update(attrs)


def _del_node_attr(node: str, attr: str) -> Mutation:
    return lambda g: g.nodes[node].pop(attr)


def _del_edge_attr(u: str, v: str, *attrs: str) -> Mutation:
    def mutate(g: nx.Graph) -> None:
        for a in attrs:
            g.edges[u, v].pop(a)

    return mutate


def _add_edge(u: str, v: str) -> Mutation:
    return lambda g: g.add_edge(u, v, **LINK)


def _add_node(node: str, **attrs: object) -> Mutation:
    return lambda g: g.add_node(node, **attrs)


def _remove_edge(u: str, v: str) -> Mutation:
    return lambda g: g.remove_edge(u, v)


def _combine(*ms: Mutation) -> Mutation:
    def mutate(g: nx.Graph) -> None:
        for m in ms:
            m(g)

    return mutate


def _remove_all_devices(g: nx.Graph) -> None:
    g.remove_nodes_from([n for n, t in g.nodes(data="tier") if t == "device"])


BAD_CASES: list[tuple[str, Mutation, list[str]]] = [
    ("no tier", _del_node_attr("d2", "tier"), ["'d2'", "no 'tier'"]),
    ("unknown tier", _set_node("gw2", tier="router"), ["'gw2'", "unknown tier 'router'"]),
    ("no cloud", _set_node("cloud", tier="gateway"), ["no cloud node"]),
    ("two clouds", _add_node("cloud2", tier="cloud"), ["2 cloud nodes", "cloud2"]),
    ("two gateways", _add_edge("gw2", "d1"), ["device 'd1'", "2 gateways", "gw1, gw2"]),
    ("no gateway", _add_node("d9", tier="device", flops=1e9), ["device 'd9'", "not attached"]),
    ("device to cloud", _add_edge("cloud", "d3"), ["'cloud' -- 'd3'", "directly to the cloud"]),
    (
        "device to device",
        _combine(_add_node("d9", tier="device", flops=1e9), _add_edge("d3", "d9")),
        ["'d3' -- 'd9'", "two devices"],
    ),
    ("gateway to gateway", _add_edge("gw1", "gw2"), ["'gw1' -- 'gw2'", "two gateways"]),
    (
        "gateway without cloud",
        _remove_edge("cloud", "gw2"),
        ["gateway 'gw2'", "not linked to the cloud"],
    ),
    ("self loop", _add_edge("gw1", "gw1"), ["'gw1' -- 'gw1'", "self-loop"]),
    ("no devices", _remove_all_devices, ["no device nodes"]),
    (
        "zero bandwidth",
        _set_edge("gw1", "d2", bandwidth_mbps=0.0),
        ["edge 'gw1' -- 'd2'", "bandwidth_mbps must be > 0"],
    ),
    (
        "negative bandwidth",
        _set_edge("cloud", "gw2", bandwidth_mbps=-10.0),
        ["edge 'cloud' -- 'gw2'", "bandwidth_mbps must be > 0"],
    ),
    ("negative up", _set_edge("gw1", "d2", up_mbps=-1.0), ["'gw1' -- 'd2'", "up_mbps must be > 0"]),
    (
        "missing bandwidth",
        _del_edge_attr("gw2", "d3", "bandwidth_mbps"),
        ["'gw2' -- 'd3'", "no bandwidth"],
    ),
    (
        "missing latency",
        _del_edge_attr("gw2", "d3", "latency_ms"),
        ["'gw2' -- 'd3'", "missing required attribute 'latency_ms'"],
    ),
    (
        "negative latency",
        _set_edge("gw2", "d3", latency_ms=-1.0),
        ["'gw2' -- 'd3'", "latency_ms must be >= 0"],
    ),
    (
        "negative jitter",
        _set_edge("gw2", "d3", jitter_ms=-0.5),
        ["'gw2' -- 'd3'", "jitter_ms must be >= 0"],
    ),
    ("loss one", _set_edge("gw1", "d1", loss=1.0), ["'gw1' -- 'd1'", "loss must be in [0, 1)"]),
    ("loss negative", _set_edge("gw1", "d1", loss=-0.01), ["'gw1' -- 'd1'", "loss must be >= 0"]),
    (
        "availability",
        _set_node("d2", availability=1.5),
        ["device 'd2'", "availability must be in [0, 1]"],
    ),
    ("zero flops", _set_node("d2", flops=0.0), ["device 'd2'", "flops must be > 0"]),
    (
        "missing flops",
        _del_node_attr("d10", "flops"),
        ["device 'd10'", "missing required attribute 'flops'"],
    ),
    ("negative samples", _set_node("d2", samples=-3), ["device 'd2'", "samples must be >= 1"]),
    ("fractional samples", _set_node("d2", samples=2.5), ["device 'd2'", "must be an integer"]),
    ("negative battery", _set_node("d2", battery_mwh=-1.0), ["device 'd2'", "battery_mwh"]),
    ("negative power", _set_node("d2", power_w=-2.0), ["device 'd2'", "power_w must be >= 0"]),
    ("non-numeric", _set_node("d3", flops="fast"), ["device 'd3'", "flops='fast' is not a number"]),
    ("non-numeric edge", _set_edge("gw1", "d1", loss="low"), ["'gw1' -- 'd1'", "'low'"]),
    ("boolean", _set_node("d3", availability=True), ["device 'd3'", "not a number"]),
    ("nan", _set_node("d3", power_w=float("nan")), ["device 'd3'", "power_w is NaN"]),
    (
        "inf latency",
        _set_edge("gw1", "d1", latency_ms=float("inf")),
        ["'gw1' -- 'd1'", "must be finite"],
    ),
]


@pytest.mark.parametrize(
    ("mutate", "fragments"), [(m, f) for _, m, f in BAD_CASES], ids=[c[0] for c in BAD_CASES]
)
def test_invalid_topology_names_the_culprit(
    tmp_path: Path, mutate: Mutation, fragments: list[str]
) -> None:
    g = base_graph()
    mutate(g)
    path = write(g, tmp_path)
    with pytest.raises(TopologyError) as info:
        load_topology(path)
    message = str(info.value)
    assert message.startswith(str(path))
    for fragment in fragments:
        assert fragment in message, message


def test_cycle_from_link_in_both_directions(tmp_path: Path) -> None:
    g = nx.DiGraph(base_graph())  # every edge both ways: each link is a 2-cycle
    with pytest.raises(TopologyError, match="must be a tree but has a cycle"):
        load_topology(write(g, tmp_path))


def test_cycle_from_parallel_links(tmp_path: Path) -> None:
    g = nx.MultiGraph(base_graph())
    g.add_edge("gw2", "d3", **LINK)
    with pytest.raises(TopologyError, match=r"cycle: (gw2 - d3 - gw2|d3 - gw2 - d3)"):
        load_topology(write(g, tmp_path))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TopologyError, match="does not exist"):
        load_topology(tmp_path / "nope.graphml")


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("this is not xml", "not a GraphML file (XML parse error"),
        ("<root><child/></root>", "not a valid GraphML file"),
        (
            '<graphml xmlns="http://graphml.graphdrawing.org/xmlns">'
            '<key id="k" for="node" attr.name="flops" attr.type="double"/>'
            '<graph edgedefault="undirected"><node id="a"><data key="k">fast</data></node>'
            "</graph></graphml>",
            "invalid GraphML content",
        ),
    ],
    ids=["garbage", "other-xml", "typed-value"],
)
def test_not_graphml(tmp_path: Path, content: str, fragment: str) -> None:
    path = tmp_path / "bad.graphml"
    path.write_text(content)
    with pytest.raises(TopologyError, match=r"bad\.graphml") as info:
        load_topology(path)
    assert fragment in str(info.value)


# ----------------------------------------------------------------------------- generator


def test_generate_write_load_round_trip(tmp_path: Path) -> None:
    g = generate_topology(3, 4, "mixed", seed=5)
    in_memory = topology_from_graph(g)
    loaded = load_topology(write_topology(g, tmp_path / "sub" / "fleet.graphml"))
    assert loaded.devices == in_memory.devices
    assert loaded.gateways == in_memory.gateways
    assert list(loaded.devices)[:2] == ["gw00-d000", "gw00-d001"]
    assert {d.link.kind for d in loaded.devices.values()} == {"5g", "lte"}


def test_write_topology_readable_keys_and_shared_attribute_names(tmp_path: Path) -> None:
    text = write_topology(base_graph(), tmp_path / "a.graphml").read_text()
    assert '<data key="latency_ms">' in text
    g = base_graph()  # "note" on a node and an edge: key ids must stay unique
    g.nodes["d1"]["note"] = "node"
    g.edges["gw1", "d1"]["note"] = "edge"
    back = nx.read_graphml(write_topology(g, tmp_path / "b.graphml"))
    assert back.nodes["d1"]["note"] == "node"
    assert back.edges["gw1", "d1"]["note"] == "edge"
    assert load_topology(tmp_path / "b.graphml").devices["d1"].flops == 1e9


def test_generation_is_deterministic_per_seed(tmp_path: Path) -> None:
    a = write_topology(generate_topology(2, 6, "5g", seed=11), tmp_path / "a.graphml")
    b = write_topology(generate_topology(2, 6, "5g", seed=11), tmp_path / "b.graphml")
    c = write_topology(generate_topology(2, 6, "5g", seed=12), tmp_path / "c.graphml")
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_profiles_stay_in_their_ranges() -> None:
    five = topology_from_graph(generate_topology(4, 25, "5g", seed=1))
    lte = topology_from_graph(generate_topology(4, 25, "lte", seed=1))
    zero = topology_from_graph(generate_topology(2, 5, "zero", seed=1))
    for d in five.devices.values():
        assert 10 <= d.link.latency_ms <= 20 and 1e9 <= d.flops <= 5e10
        assert 10 <= d.link.up_mbps <= 100 and 50 <= d.link.down_mbps <= 300
        assert 0.001 <= d.link.loss <= 0.005
    for d in lte.devices.values():
        assert 40 <= d.link.latency_ms <= 80 and 2e8 <= d.flops <= 3e9
        assert 1 <= d.link.up_mbps <= 10 and 5 <= d.link.down_mbps <= 30
        assert 0.01 <= d.link.loss <= 0.03
    for gw in five.gateways.values():
        assert gw.link.kind == "fiber" and 2 <= gw.link.latency_ms <= 10
        assert 1000 <= gw.link.up_mbps <= 10000
    flops = sorted(d.flops for d in five.devices.values())
    assert flops[-1] / flops[0] > 5  # heterogeneous compute
    links = [d.link for d in zero.devices.values()] + [g.link for g in zero.gateways.values()]
    for link in links:
        assert link.latency_ms == 0 and link.loss == 0 and link.jitter_ms == 0
    assert all(d.availability == 1.0 for d in zero.devices.values())


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ((0, 1, "5g", 0), "gateways"),
        ((1, 0, "5g", 0), "devices_per_gateway"),
        ((1, 1, "wifi", 0), "unknown profile"),
        ((1, 1, "5g", -1), "seed"),
    ],
)
def test_generator_rejects_bad_arguments(args: tuple[int, int, str, int], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        generate_topology(*args)


@pytest.mark.parametrize(
    ("name", "gateways", "devices", "device_kind", "backhaul_kind"),
    [
        ("smoke", 2, 10, "5g", "fiber"),
        ("metro-5g", 12, 360, "5g", "fiber"),
        ("rural-lte", 3, 60, "lte", "microwave"),
    ],
)
def test_bundled_topologies(
    name: str, gateways: int, devices: int, device_kind: str, backhaul_kind: str
) -> None:
    topo = load_topology(TOPOLOGIES / f"{name}.graphml")
    assert topo.name == name
    assert len(topo.gateways) == gateways
    assert len(topo.devices) == devices
    assert {d.link.kind for d in topo.devices.values()} == {device_kind}
    assert {g.link.kind for g in topo.gateways.values()} == {backhaul_kind}
    if name == "rural-lte":
        assert max(d.flops for d in topo.devices.values()) <= 3e9


# ------------------------------------------------------------------------------- render


def _is_png(path: Path) -> bool:
    return path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_render_small_and_large(tmp_path: Path) -> None:
    small = render_topology_png(load_topology(TOPOLOGIES / "smoke.graphml"), tmp_path / "s.png")
    assert _is_png(small)
    big: Topology = topology_from_graph(generate_topology(80, 40, "mixed", seed=0), "big")
    t0 = time.perf_counter()
    out = render_topology_png(big, tmp_path / "big" / "b.png")
    assert time.perf_counter() - t0 < 5.0
    assert _is_png(out)


# ---------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tierfl")
    add_topology_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def _run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    return int(args.func(args))


def test_cli_generate_then_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "fleet.graphml"
    argv = [
        "topology",
        "generate",
        "--gateways",
        "2",
        "--devices-per-gateway",
        "3",
        "--profile",
        "lte",
        "--seed",
        "4",
        "-o",
        str(out),
    ]
    assert _run(argv) == 0
    assert "2 gateways, 6 devices" in capsys.readouterr().out

    png = tmp_path / "fleet.png"
    assert _run(["topology", "show", str(out), "--png", str(png)]) == 0
    text = capsys.readouterr().out
    assert "2 gateways, 6 devices" in text
    assert "lte" in text and "microwave" in text
    assert _is_png(png)

    assert _run(["topology", "show", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["counts"] == {"cloud": 1, "gateways": 2, "devices": 6}
    kinds = {(link["role"], link["kind"]): link["count"] for link in summary["links"]}
    assert kinds == {("device", "lte"): 6, ("backhaul", "microwave"): 2}
    assert summary["samples"]["total"] is None


def test_cli_show_bad_file_returns_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    g = base_graph()
    g.add_edge("gw2", "d1", **LINK)
    path = write(g, tmp_path, "broken.graphml")
    assert _run(["topology", "show", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ")
    assert "broken.graphml" in captured.err and "device 'd1'" in captured.err

    assert _run(["topology", "show", str(tmp_path / "missing.graphml")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "value", "fragment"),
    [
        ("--gateways", "0", "--gateways: must be >= 1, got 0"),
        ("--devices-per-gateway", "x", "--devices-per-gateway: must be an integer, got 'x'"),
        ("--seed", "-1", "--seed: must be >= 0, got -1"),
    ],
)
def test_cli_rejects_bad_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str, fragment: str
) -> None:
    argv = {"--gateways": "2", "--devices-per-gateway": "2", "--seed": "0"}
    argv[flag] = value
    flat = [x for kv in argv.items() for x in kv]
    with pytest.raises(SystemExit) as info:
        _parser().parse_args(["topology", "generate", *flat, "-o", str(tmp_path / "x.graphml")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and fragment in err
