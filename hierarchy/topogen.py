"""Generate fleet topologies of any size with seeded, realistic heterogeneity.

Real fleets are not uniform: device compute spans more than an order of magnitude
(lognormal is the usual fit), radio links differ per device (distance to the cell,
congestion), and a few devices are flaky. The emulator's straggler and accuracy numbers
are only meaningful on such fleets, so the generator draws every device's compute and
link independently around a profile, from one ``numpy`` generator seeded by ``seed``: the
same arguments always give the same graph (same node order, same values).

Profiles (per device link unless noted; ranges are roughly the 5th-95th percentile):

- ``5g``: latency 10-20 ms, down 50-300 Mbps, up 10-100 Mbps, jitter 1-5 ms,
  loss 0.1-0.5 %; devices 1e9-5e10 FLOP/s (median ~6e9); availability ~0.8-1.0;
  gateway backhaul: fiber, 2-10 ms, 1-10 Gbps.
- ``lte``: latency 40-80 ms, down 5-30 Mbps, up 1-10 Mbps, jitter 5-20 ms, loss 1-3 %;
  slower devices 2e8-3e9 FLOP/s (median ~8e8); availability ~0.5-0.95; smaller batteries;
  backhaul: microwave, 15-40 ms, 100-500 Mbps, loss ~0.01-0.1 %.
- ``mixed``: each gateway is a 5G or an LTE cell (alternating, starting at random, so both
  appear as soon as there are two gateways) and its devices and backhaul follow that cell.
- ``zero``: no network cost at all (latency/jitter/loss 0, 1e9 Mbps, link kind ``ideal``)
  and availability 1.0, so benchmarks measure the emulator, not the emulated network;
  device compute stays heterogeneous (5g distribution).

Values are rounded so the written GraphML stays human-readable.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import numpy as np

from hierarchy.topology import natural_key

__all__ = ["PROFILES", "generate_topology", "write_topology"]

PROFILES = ("5g", "lte", "mixed", "zero")

_ZERO_MBPS = 1e9  # "infinite" but finite, so every consumer can divide by it


@dataclass(frozen=True)
class _Cell:
    """Distribution parameters of one radio technology (device links + backhaul)."""

    kind: str
    latency_ms: tuple[float, float]  # uniform range
    down_mbps: tuple[float, float]  # log-uniform range
    up_mbps: tuple[float, float]  # log-uniform range
    jitter_ms: tuple[float, float]
    loss: tuple[float, float]
    flops_median: float  # lognormal device compute
    flops_sigma: float
    flops_clip: tuple[float, float]
    availability_beta: tuple[float, float]
    availability_min: float
    battery_mwh: tuple[float, float]
    power_w: tuple[float, float]
    backhaul_kind: str
    backhaul_latency_ms: tuple[float, float]
    backhaul_mbps: tuple[float, float]  # symmetric, log-uniform
    backhaul_loss: tuple[float, float]


_CELLS: dict[str, _Cell] = {
    "5g": _Cell(
        kind="5g",
        latency_ms=(10.0, 20.0),
        down_mbps=(50.0, 300.0),
        up_mbps=(10.0, 100.0),
        jitter_ms=(1.0, 5.0),
        loss=(0.001, 0.005),
        flops_median=6e9,
        flops_sigma=0.9,
        flops_clip=(1e9, 5e10),
        availability_beta=(9.0, 1.2),
        availability_min=0.5,
        battery_mwh=(10_000.0, 20_000.0),
        power_w=(1.5, 4.0),
        backhaul_kind="fiber",
        backhaul_latency_ms=(2.0, 10.0),
        backhaul_mbps=(1_000.0, 10_000.0),
        backhaul_loss=(0.0, 0.0001),
    ),
    "lte": _Cell(
        kind="lte",
        latency_ms=(40.0, 80.0),
        down_mbps=(5.0, 30.0),
        up_mbps=(1.0, 10.0),
        jitter_ms=(5.0, 20.0),
        loss=(0.01, 0.03),
        flops_median=8e8,
        flops_sigma=0.8,
        flops_clip=(2e8, 3e9),
        availability_beta=(4.0, 1.0),
        availability_min=0.3,
        battery_mwh=(3_000.0, 12_000.0),
        power_w=(1.0, 3.0),
        backhaul_kind="microwave",
        backhaul_latency_ms=(15.0, 40.0),
        backhaul_mbps=(100.0, 500.0),
        backhaul_loss=(0.0001, 0.001),
    ),
}


def generate_topology(gateways: int, devices_per_gateway: int, profile: str, seed: int) -> nx.Graph:
    """Build a device -> gateway -> cloud tree as an undirected ``nx.Graph``.

    Node ids: ``cloud``, ``gw00``..., ``gw00-d000``... (zero-padded so lexical order is the
    fleet order). The graph carries ``name``, ``profile``, ``seed`` and ``generator``
    attributes so a written file says how to regenerate it.
    """
    if isinstance(gateways, bool) or not isinstance(gateways, int) or gateways < 1:
        raise ValueError(f"gateways must be an integer >= 1, got {gateways!r}")
    if (
        isinstance(devices_per_gateway, bool)
        or not isinstance(devices_per_gateway, int)
        or devices_per_gateway < 1
    ):
        raise ValueError(
            f"devices_per_gateway must be an integer >= 1, got {devices_per_gateway!r}"
        )
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r} (expected one of {', '.join(PROFILES)})")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")

    rng = np.random.default_rng(seed)
    gw_width = max(2, len(str(gateways - 1)))
    dev_width = max(3, len(str(devices_per_gateway - 1)))

    if profile == "mixed":
        start = int(rng.integers(2))
        cells = [("5g", "lte")[(start + i) % 2] for i in range(gateways)]
    elif profile == "zero":
        cells = ["5g"] * gateways  # compute distribution only
    else:
        cells = [profile] * gateways

    g = nx.Graph(
        name=f"{profile}-{gateways}x{devices_per_gateway}-s{seed}",
        profile=profile,
        seed=seed,
        generator="tierfl.hierarchy.topogen",
    )
    g.add_node("cloud", tier="cloud")
    for i, cell_name in enumerate(cells):
        cell = _CELLS[cell_name]
        gw = f"gw{i:0{gw_width}d}"
        g.add_node(gw, tier="gateway", cell=cell_name)
        if profile == "zero":
            g.add_edge("cloud", gw, **_zero_link())
        else:
            g.add_edge("cloud", gw, **_backhaul(cell, rng))
        for dev_attrs, link_attrs, j in _devices(cell, devices_per_gateway, rng, profile):
            dev = f"{gw}-d{j:0{dev_width}d}"
            g.add_node(dev, tier="device", **dev_attrs)
            g.add_edge(gw, dev, **link_attrs)
    return g


def write_topology(g: nx.Graph, path: str | Path) -> Path:
    """Write ``g`` as GraphML (networkx ``write_graphml``), creating parent folders.

    Nodes are written in a deterministic order (cloud, gateways, devices, natural sort)
    so that regenerated files diff cleanly.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    order = {"cloud": 0, "gateway": 1, "device": 2}
    nodes = sorted(
        g.nodes(data=True),
        key=lambda nd: (order.get(str(nd[1].get("tier")), 3), natural_key(str(nd[0]))),
    )
    out = type(g)()
    out.graph.update(g.graph)
    out.add_nodes_from(nodes)
    out.add_edges_from(g.edges(data=True))
    # Key ids equal to attribute names (<data key="latency_ms">) keep the file readable;
    # only safe when no name is reused across graph/node/edge scopes (ids must be unique).
    scopes = [
        set(out.graph),
        {k for _, d in out.nodes(data=True) for k in d},
        {k for *_, d in out.edges(data=True) for k in d},
    ]
    named = sum(len(s) for s in scopes) == len(set().union(*scopes))
    nx.write_graphml(out, p, prettyprint=True, named_key_ids=named)
    return p


# ---------------------------------------------------------------------------- internals


def _uniform(rng: np.random.Generator, lo_hi: tuple[float, float], n: int) -> np.ndarray:
    return rng.uniform(lo_hi[0], lo_hi[1], size=n)


def _log_uniform(rng: np.random.Generator, lo_hi: tuple[float, float], n: int) -> np.ndarray:
    """Bandwidth is spread multiplicatively (a cell-edge device is 5x slower, not 50 Mbps)."""
    return np.exp(rng.uniform(np.log(lo_hi[0]), np.log(lo_hi[1]), size=n))


def _zero_link() -> dict[str, float | str]:
    return {
        "latency_ms": 0.0,
        "up_mbps": _ZERO_MBPS,
        "down_mbps": _ZERO_MBPS,
        "jitter_ms": 0.0,
        "loss": 0.0,
        "link": "ideal",
    }


def _backhaul(cell: _Cell, rng: np.random.Generator) -> dict[str, float | str]:
    return {
        "latency_ms": round(float(_uniform(rng, cell.backhaul_latency_ms, 1)[0]), 2),
        "bandwidth_mbps": round(float(_log_uniform(rng, cell.backhaul_mbps, 1)[0]), 0),
        "jitter_ms": round(float(rng.uniform(0.1, 1.0)), 2),
        "loss": round(float(_uniform(rng, cell.backhaul_loss, 1)[0]), 6),
        "link": cell.backhaul_kind,
    }


def _devices(
    cell: _Cell, n: int, rng: np.random.Generator, profile: str
) -> list[tuple[dict[str, float], dict[str, float | str], int]]:
    """Draw ``n`` devices of one cell at once (vectorized: 10k devices in milliseconds)."""
    flops = np.exp(rng.normal(np.log(cell.flops_median), cell.flops_sigma, size=n))
    flops = np.clip(flops, *cell.flops_clip)
    avail = rng.beta(*cell.availability_beta, size=n)
    avail = np.clip(avail, cell.availability_min, 1.0)
    battery = _uniform(rng, cell.battery_mwh, n)
    power = _uniform(rng, cell.power_w, n)
    latency = _uniform(rng, cell.latency_ms, n)
    down = _log_uniform(rng, cell.down_mbps, n)
    up = _log_uniform(rng, cell.up_mbps, n)
    jitter = _uniform(rng, cell.jitter_ms, n)
    loss = _uniform(rng, cell.loss, n)

    out: list[tuple[dict[str, float], dict[str, float | str], int]] = []
    for j in range(n):
        dev_attrs = {
            "flops": float(f"{flops[j]:.3g}"),
            "availability": 1.0 if profile == "zero" else round(float(avail[j]), 3),
            "battery_mwh": round(float(battery[j]), 0),
            "power_w": round(float(power[j]), 2),
        }
        link_attrs: dict[str, float | str]
        if profile == "zero":
            link_attrs = _zero_link()
        else:
            link_attrs = {
                "latency_ms": round(float(latency[j]), 2),
                "up_mbps": round(float(up[j]), 1),
                "down_mbps": round(float(down[j]), 1),
                "jitter_ms": round(float(jitter[j]), 2),
                "loss": round(float(loss[j]), 5),
                "link": cell.kind,
            }
        out.append((dev_attrs, link_attrs, j))
    return out
