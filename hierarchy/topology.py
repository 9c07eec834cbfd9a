"""Load and validate a fleet topology (GraphML) into plain, typed dataclasses.

A topology is the logical tree *devices -> one gateway each -> one cloud*. Everything
downstream (the actor tree, the emulated network, the reports) reads these dataclasses,
never the raw graph, so this module is the single place where a hand-written or generated
file is checked. Every problem is reported as one :class:`TopologyError` whose message
names the file and the offending node or edge, because a fleet file with 10k devices is
useless to debug from a bare ``KeyError``.

GraphML attributes (see the "Topology" contract in DESIGN.md)
----------------------------------------------------------------
Nodes: ``tier`` in {``cloud``, ``gateway``, ``device``} (required on every node).

Device nodes:

============== ========== ===================================================================
attribute      default    meaning / rule
============== ========== ===================================================================
``flops``      required   effective training compute in FLOP/s, > 0. Required because compute
                          time dominates straggling; a silent default would hide a mistake.
``samples``    ``None``   local training samples, integer >= 1; ``None`` = let the dataset's
                          partition rule decide.
``availability`` 1.0      probability the device is reachable in a round, in [0, 1].
``battery_mwh`` ``inf``   battery capacity in mWh, >= 0; ``inf`` means mains powered.
``power_w``    2.0        power draw while training/transmitting in W, >= 0 (a phone SoC
                          under sustained load is ~1.5-4 W).
============== ========== ===================================================================

Edges (device--gateway and gateway--cloud); they may be undirected or directed either
way, and "up" always means *toward the cloud* whatever the edge direction:

================== ========== ===============================================================
attribute          default    meaning / rule
================== ========== ===============================================================
``latency_ms``     required   one-way latency, finite, >= 0.
``bandwidth_mbps`` --         sets both directions when ``up_mbps``/``down_mbps`` are absent.
``up_mbps``        bandwidth  toward the cloud, finite, > 0 (required if no bandwidth_mbps).
``down_mbps``      bandwidth  away from the cloud, finite, > 0 (same).
``jitter_ms``      0.0        latency standard deviation, finite, >= 0.
``loss``           0.0        packet loss probability, in [0, 1).
``link``           ``5g`` for device links, ``fiber`` for gateway--cloud backhaul;
                              any non-empty label (lower-cased), e.g. 5g, lte, wifi,
                              fiber, microwave.
================== ========== ===============================================================

Numbers may be typed (``double``/``int``) or strings that parse as numbers; booleans,
NaN and (except ``battery_mwh``) infinities are rejected. Unknown attributes are ignored so
files can carry labels or drawing hints. A gateway may have no devices, but a topology
needs at least one gateway and one device.

Ordering is deterministic: gateways by natural sort of their id (``gw2`` < ``gw10``),
devices by (gateway order, natural sort of device id).
"""

from __future__ import annotations

import math
import numbers
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import networkx as nx

__all__ = [
    "DEFAULT_AVAILABILITY",
    "DEFAULT_BACKHAUL_KIND",
    "DEFAULT_BATTERY_MWH",
    "DEFAULT_DEVICE_LINK_KIND",
    "DEFAULT_JITTER_MS",
    "DEFAULT_LOSS",
    "DEFAULT_POWER_W",
    "TIERS",
    "DeviceNode",
    "GatewayNode",
    "Link",
    "Topology",
    "TopologyError",
    "load_topology",
    "natural_key",
    "topology_from_graph",
]

TIERS = ("cloud", "gateway", "device")
DEFAULT_JITTER_MS = 0.0
DEFAULT_LOSS = 0.0
DEFAULT_AVAILABILITY = 1.0
DEFAULT_BATTERY_MWH = math.inf  # mains powered: energy never runs out
DEFAULT_POWER_W = 2.0
DEFAULT_DEVICE_LINK_KIND = "5g"
DEFAULT_BACKHAUL_KIND = "fiber"


class TopologyError(ValueError):
    """A topology file or graph is invalid; the message names the node/edge and the rule."""


@dataclass(frozen=True)
class Link:
    """One network hop. ``up`` is toward the cloud, ``down`` away from it."""

    latency_ms: float
    up_mbps: float
    down_mbps: float
    jitter_ms: float
    loss: float
    kind: str


@dataclass(frozen=True)
class DeviceNode:
    """A device and its access link (device <-> its gateway)."""

    id: str
    gateway: str
    flops: float
    samples: int | None
    availability: float
    battery_mwh: float
    power_w: float
    link: Link


@dataclass(frozen=True)
class GatewayNode:
    """A gateway, its backhaul (gateway <-> cloud) and its devices in deterministic order."""

    id: str
    link: Link
    devices: tuple[str, ...]


@dataclass(frozen=True)
class Topology:
    """The validated tree. Dict insertion order is the deterministic fleet order."""

    name: str
    cloud: str
    gateways: dict[str, GatewayNode]
    devices: dict[str, DeviceNode]


# Builds a TopologyError prefixed with the source file; passed down so helpers stay pure.
_Fail = Callable[[str], TopologyError]

_DIGITS = re.compile(r"(\d+)")


def natural_key(text: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that orders embedded numbers numerically (``d2`` < ``d10``).

    Each chunk is tagged so numbers and strings never get compared with each other.
    """
    parts = _DIGITS.split(text)
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts if p != "")


def load_topology(path: str | Path) -> Topology:
    """Read a GraphML fleet file and validate it; the topology is named after the file stem."""
    p = Path(path)
    if not p.exists():
        raise TopologyError(f"{p}: topology file does not exist")
    if not p.is_file():
        raise TopologyError(f"{p}: not a regular file")
    try:
        g = nx.read_graphml(p)
    except ET.ParseError as exc:
        raise TopologyError(f"{p}: not a GraphML file (XML parse error: {exc})") from exc
    except nx.NetworkXError as exc:
        raise TopologyError(f"{p}: not a valid GraphML file ({exc})") from exc
    except (ValueError, KeyError, TypeError) as exc:
        # networkx raises these for typed keys whose values do not parse (attr.type="double"
        # holding "fast") or for malformed key declarations.
        raise TopologyError(f"{p}: invalid GraphML content ({type(exc).__name__}: {exc})") from exc
    except OSError as exc:
        raise TopologyError(f"{p}: cannot read topology file ({exc})") from exc
    return _build(g, source=str(p), name=p.stem)


def topology_from_graph(g: nx.Graph, source: str = "<graph>") -> Topology:
    """Validate an in-memory graph (any networkx graph class); ``source`` prefixes errors.

    The name is the graph's ``name`` attribute if set, else ``source``.
    """
    name = str(g.graph.get("name") or source)
    return _build(g, source=source, name=name)


# ---------------------------------------------------------------------------- internals


def _build(g: nx.Graph, source: str, name: str) -> Topology:
    def fail(msg: str) -> TopologyError:
        return TopologyError(f"{source}: {msg}")

    # 1. tiers
    tier_of: dict[str, str] = {}
    attrs_of: dict[str, Mapping[str, Any]] = {}
    for node, data in g.nodes(data=True):
        nid = str(node)
        if nid in tier_of:
            raise fail(f"node id {nid!r} appears twice")
        raw = data.get("tier")
        if raw is None:
            raise fail(f"node {nid!r} has no 'tier' attribute (expected one of {', '.join(TIERS)})")
        tier = str(raw).strip().lower()
        if tier not in TIERS:
            raise fail(
                f"node {nid!r} has unknown tier {raw!r} (expected one of {', '.join(TIERS)})"
            )
        tier_of[nid] = tier
        attrs_of[nid] = data

    clouds = [n for n, t in tier_of.items() if t == "cloud"]
    if not clouds:
        raise fail("no cloud node (exactly one node must have tier='cloud')")
    if len(clouds) > 1:
        raise fail(
            f"{len(clouds)} cloud nodes ({', '.join(sorted(clouds, key=natural_key))}); "
            "exactly one is allowed"
        )
    cloud = clouds[0]
    gateway_ids = sorted((n for n, t in tier_of.items() if t == "gateway"), key=natural_key)
    device_ids = [n for n, t in tier_of.items() if t == "device"]
    if not gateway_ids:
        raise fail("no gateway nodes (a topology needs at least one gateway)")
    if not device_ids:
        raise fail("no device nodes (a topology needs at least one device)")

    # 2. edges: which tier pairs may be linked
    parents: dict[str, list[str]] = {d: [] for d in device_ids}
    uplinks: dict[str, int] = {gw: 0 for gw in gateway_ids}
    edge_attrs: dict[tuple[str, str], Mapping[str, Any]] = {}  # (parent, child) -> attrs
    multi = nx.MultiGraph()
    multi.add_nodes_from(tier_of)
    for u_raw, v_raw, data in g.edges(data=True):
        u, v = str(u_raw), str(v_raw)
        if u == v:
            raise fail(f"edge {u!r} -- {v!r} is a self-loop")
        multi.add_edge(u, v)
        tu, tv = tier_of[u], tier_of[v]
        # Name edges parent-first (cloud, gateway, device; then natural order) so a message
        # does not depend on how the file happened to store an undirected edge.
        if (TIERS.index(tv), natural_key(v)) < (TIERS.index(tu), natural_key(u)):
            u, v, tu, tv = v, u, tv, tu
        pair = {tu, tv}
        if pair == {"device", "gateway"}:
            dev, gw = (u, v) if tu == "device" else (v, u)
            if gw not in parents[dev]:
                parents[dev].append(gw)
            edge_attrs[(gw, dev)] = data
        elif pair == {"gateway", "cloud"}:
            gw = u if tu == "gateway" else v
            uplinks[gw] += 1
            edge_attrs[(cloud, gw)] = data
        elif pair == {"device", "cloud"}:
            dev = u if tu == "device" else v
            raise fail(
                f"edge {u!r} -- {v!r} links device {dev!r} directly to the cloud; "
                "devices attach to a gateway"
            )
        elif pair == {"device"}:
            raise fail(f"edge {u!r} -- {v!r} links two devices; a device links only to its gateway")
        else:  # gateway -- gateway (cloud -- cloud is impossible with one cloud and no loops)
            raise fail(
                f"edge {u!r} -- {v!r} links two gateways; a gateway links only to the cloud "
                "and its devices"
            )

    for dev in device_ids:
        ps = parents[dev]
        if not ps:
            raise fail(f"device {dev!r} is not attached to any gateway")
        if len(ps) > 1:
            names = ", ".join(sorted(ps, key=natural_key))
            raise fail(
                f"device {dev!r} is attached to {len(ps)} gateways ({names}); "
                "it must have exactly one"
            )
    for gw in gateway_ids:
        if uplinks[gw] == 0:
            raise fail(f"gateway {gw!r} is not linked to the cloud {cloud!r}")

    # 3. with every device on one gateway and every gateway on the cloud, only repeated
    # links (parallel edges, or a->b plus b->a in a directed file) can still form a cycle.
    try:
        cycle = nx.find_cycle(multi)
    except nx.NetworkXNoCycle:
        cycle = []
    if cycle:
        path = " - ".join([str(cycle[0][0]), *(str(e[1]) for e in cycle)])
        raise fail(f"the graph must be a tree but has a cycle: {path} (a link is repeated?)")

    # 4. attributes
    devices_by_gw: dict[str, list[str]] = {gw: [] for gw in gateway_ids}
    for dev in device_ids:
        devices_by_gw[parents[dev][0]].append(dev)
    gateways: dict[str, GatewayNode] = {}
    devices: dict[str, DeviceNode] = {}
    for gw in gateway_ids:
        members = tuple(sorted(devices_by_gw[gw], key=natural_key))
        backhaul = _link(
            edge_attrs[(cloud, gw)], f"edge {cloud!r} -- {gw!r}", DEFAULT_BACKHAUL_KIND, fail
        )
        gateways[gw] = GatewayNode(id=gw, link=backhaul, devices=members)
        for dev in members:
            link = _link(
                edge_attrs[(gw, dev)], f"edge {gw!r} -- {dev!r}", DEFAULT_DEVICE_LINK_KIND, fail
            )
            devices[dev] = _device(dev, gw, attrs_of[dev], link, fail)
    return Topology(name=name, cloud=cloud, gateways=gateways, devices=devices)


def _number(value: Any, where: str, attr: str, fail: _Fail) -> float:
    """Parse an attribute as a real number; GraphML may hand us str, int, float or bool."""
    if isinstance(value, bool):
        raise fail(f"{where}: attribute {attr}={value!r} is not a number")
    if isinstance(value, numbers.Real):
        x = float(value)
    elif isinstance(value, str):
        try:
            x = float(value.strip())
        except ValueError:
            raise fail(f"{where}: attribute {attr}={value!r} is not a number") from None
    else:
        raise fail(f"{where}: attribute {attr}={value!r} is not a number")
    if math.isnan(x):
        raise fail(f"{where}: attribute {attr} is NaN")
    return x


def _get(
    data: Mapping[str, Any],
    attr: str,
    where: str,
    fail: _Fail,
    *,
    default: float | None,
    minimum: float,
    strict: bool = False,
    maximum: float | None = None,
    max_exclusive: bool = False,
    allow_inf: bool = False,
    unit: str = "",
) -> float | None:
    """Read one numeric attribute and check its range; ``None`` if absent and no default."""
    raw = data.get(attr)
    if raw is None or (isinstance(raw, str) and raw.strip() == ""):
        return default
    x = _number(raw, where, attr, fail)
    if math.isinf(x) and not (allow_inf and x > 0):
        raise fail(f"{where}: {attr} must be finite, got {raw!r}")
    suffix = f" {unit}" if unit else ""
    if strict and x <= minimum:
        raise fail(f"{where}: {attr} must be > {minimum:g}{suffix}, got {x:g}")
    if not strict and x < minimum:
        raise fail(f"{where}: {attr} must be >= {minimum:g}{suffix}, got {x:g}")
    if maximum is not None:
        if max_exclusive and x >= maximum:
            raise fail(f"{where}: {attr} must be in [{minimum:g}, {maximum:g}), got {x:g}")
        if not max_exclusive and x > maximum:
            raise fail(f"{where}: {attr} must be in [{minimum:g}, {maximum:g}], got {x:g}")
    return x


def _required(value: float | None, attr: str, where: str, fail: _Fail) -> float:
    if value is None:
        raise fail(f"{where}: missing required attribute {attr!r}")
    return value


def _link(data: Mapping[str, Any], where: str, default_kind: str, fail: _Fail) -> Link:
    latency = _required(
        _get(data, "latency_ms", where, fail, default=None, minimum=0.0, unit="ms"),
        "latency_ms",
        where,
        fail,
    )
    bw = _get(
        data, "bandwidth_mbps", where, fail, default=None, minimum=0.0, strict=True, unit="Mbps"
    )
    up = _get(data, "up_mbps", where, fail, default=bw, minimum=0.0, strict=True, unit="Mbps")
    down = _get(data, "down_mbps", where, fail, default=bw, minimum=0.0, strict=True, unit="Mbps")
    if up is None or down is None:
        missing = "up_mbps" if up is None else "down_mbps"
        raise fail(f"{where}: no bandwidth (set bandwidth_mbps, or {missing})")
    jitter = _get(data, "jitter_ms", where, fail, default=DEFAULT_JITTER_MS, minimum=0.0, unit="ms")
    loss = _get(
        data,
        "loss",
        where,
        fail,
        default=DEFAULT_LOSS,
        minimum=0.0,
        maximum=1.0,
        max_exclusive=True,
    )
    raw_kind = data.get("link")
    kind = default_kind if raw_kind is None else str(raw_kind).strip().lower()
    if not kind:
        raise fail(f"{where}: attribute link is empty (e.g. 5g, lte, wifi, fiber)")
    assert jitter is not None and loss is not None
    return Link(
        latency_ms=latency, up_mbps=up, down_mbps=down, jitter_ms=jitter, loss=loss, kind=kind
    )


def _device(dev: str, gw: str, data: Mapping[str, Any], link: Link, fail: _Fail) -> DeviceNode:
    where = f"device {dev!r}"
    flops = _required(
        _get(data, "flops", where, fail, default=None, minimum=0.0, strict=True, unit="FLOP/s"),
        "flops",
        where,
        fail,
    )
    samples_f = _get(data, "samples", where, fail, default=None, minimum=1.0)
    samples: int | None = None
    if samples_f is not None:
        if not samples_f.is_integer():
            raise fail(f"{where}: samples must be an integer, got {samples_f:g}")
        samples = int(samples_f)
    availability = _get(
        data, "availability", where, fail, default=DEFAULT_AVAILABILITY, minimum=0.0, maximum=1.0
    )
    battery = _get(
        data,
        "battery_mwh",
        where,
        fail,
        default=DEFAULT_BATTERY_MWH,
        minimum=0.0,
        allow_inf=True,
        unit="mWh",
    )
    power = _get(data, "power_w", where, fail, default=DEFAULT_POWER_W, minimum=0.0, unit="W")
    assert availability is not None and battery is not None and power is not None
    return DeviceNode(
        id=dev,
        gateway=gw,
        flops=flops,
        samples=samples,
        availability=availability,
        battery_mwh=battery,
        power_w=power,
        link=link,
    )
