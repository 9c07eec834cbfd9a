"""``tierfl topology generate|show``: argparse wiring and handlers.

The CLI lead wires this in with::

    sub = parser.add_subparsers(dest="command", required=True)
    add_topology_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)

Each leaf parser sets ``func`` to its handler; handlers return a process exit code
(0 ok, 2 for a bad topology, mirroring argparse's usage-error code) instead of calling
``sys.exit`` so they are testable in-process. Flag values are validated by argparse type
functions, so a bad ``--gateways 0`` is a usage error before any work starts.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from devices.argtypes import number
from hierarchy.topogen import PROFILES, generate_topology, write_topology
from hierarchy.topology import Topology, TopologyError, load_topology, topology_from_graph

__all__ = [
    "add_topology_parser",
    "cmd_topology_generate",
    "cmd_topology_show",
    "format_summary",
    "summarize_topology",
]


def add_topology_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``topology`` with ``generate`` and ``show`` to an argparse subparsers object."""
    top = subparsers.add_parser(
        "topology",
        help="generate or inspect fleet topologies (GraphML)",
        description="Generate or inspect device -> gateway -> cloud fleet topologies.",
    )
    sub = top.add_subparsers(dest="topology_command", required=True, metavar="{generate,show}")

    gen = sub.add_parser(
        "generate",
        help="write a seeded random fleet as GraphML",
        description="Write a fleet with seeded heterogeneity (compute, links) as GraphML.",
    )
    gen.add_argument(
        "--gateways",
        type=number(int, minimum=1),
        required=True,
        metavar="G",
        help="number of edge gateways (>= 1)",
    )
    gen.add_argument(
        "--devices-per-gateway",
        type=number(int, minimum=1),
        required=True,
        metavar="D",
        help="devices attached to each gateway (>= 1)",
    )
    gen.add_argument(
        "--profile",
        choices=PROFILES,
        default="5g",
        help="network/device profile (default: 5g); 'zero' = no network cost",
    )
    gen.add_argument(
        "--seed",
        type=number(int, minimum=0),
        default=0,
        metavar="S",
        help="random seed (>= 0, default 0); same seed, same file",
    )
    gen.add_argument(
        "-o", "--output", type=Path, required=True, metavar="FILE", help="GraphML file to write"
    )
    gen.set_defaults(func=cmd_topology_generate)

    show = sub.add_parser(
        "show",
        help="validate a topology and print statistics",
        description="Validate a GraphML topology and print per-tier and per-link statistics.",
    )
    show.add_argument("file", type=Path, metavar="FILE", help="GraphML topology")
    show.add_argument("--png", type=Path, metavar="OUT.png", help="also draw the tree to a PNG")
    show.add_argument("--json", action="store_true", help="print the statistics as JSON")
    show.set_defaults(func=cmd_topology_show)
    return top


def cmd_topology_generate(args: argparse.Namespace) -> int:
    """Generate, validate (the same loader every consumer uses) and write a topology."""
    try:
        g = generate_topology(args.gateways, args.devices_per_gateway, args.profile, args.seed)
        g.graph["name"] = Path(args.output).stem
        topo = topology_from_graph(g, source="generated")
        out = write_topology(g, args.output)
    except (TopologyError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot write {args.output}: {exc}", file=sys.stderr)
        return 1
    print(
        f"wrote {out}: {len(topo.gateways)} gateways, {len(topo.devices)} devices "
        f"(profile {args.profile}, seed {args.seed})"
    )
    return 0


def cmd_topology_show(args: argparse.Namespace) -> int:
    """Load and validate ``args.file``; print statistics (text or JSON), optionally a PNG."""
    try:
        topo = load_topology(args.file)
    except TopologyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = summarize_topology(topo)
    summary["source"] = str(args.file)
    if args.json:
        print(json.dumps(summary, indent=2, allow_nan=False))
    else:
        print(format_summary(summary))
    if args.png is not None:
        from hierarchy.render import render_topology_png  # matplotlib only when asked

        try:
            render_topology_png(topo, args.png)
        except OSError as exc:
            print(f"error: cannot write {args.png}: {exc}", file=sys.stderr)
            return 1
        # Keep stdout pure JSON with --json.
        print(f"wrote {args.png}", file=sys.stderr if args.json else sys.stdout)
    return 0


# ------------------------------------------------------------------------------ statistics


def _stats(values: Sequence[float]) -> dict[str, float | None]:
    """min/median/max (and mean); infinities become ``None`` so the result is valid JSON."""
    if not values:
        return {"min": None, "median": None, "max": None, "mean": None}

    def clean(x: float) -> float | None:
        # 6 significant digits: the inputs are rounded, so medians of two values should not
        # print as 5.744999999999999.
        return None if math.isinf(x) else float(f"{x:.6g}")

    return {
        "min": clean(min(values)),
        "median": clean(float(statistics.median(values))),
        "max": clean(max(values)),
        "mean": clean(float(statistics.fmean(values))),
    }


def summarize_topology(topo: Topology) -> dict[str, Any]:
    """Plain-data statistics of a topology (what ``topology show --json`` prints).

    Links are grouped by (role, kind): ``role`` is ``device`` (device--gateway) or
    ``backhaul`` (gateway--cloud), so a kind used on both tiers is not blended.
    """
    groups: dict[tuple[str, str], list[Any]] = {}
    for gw in topo.gateways.values():
        groups.setdefault(("backhaul", gw.link.kind), []).append(gw.link)
    for dev in topo.devices.values():
        groups.setdefault(("device", dev.link.kind), []).append(dev.link)
    links = []
    for (role, kind), members in sorted(groups.items()):
        links.append(
            {
                "role": role,
                "kind": kind,
                "count": len(members),
                "latency_ms": _stats([m.latency_ms for m in members]),
                "up_mbps": _stats([m.up_mbps for m in members]),
                "down_mbps": _stats([m.down_mbps for m in members]),
                "jitter_ms": _stats([m.jitter_ms for m in members]),
                "loss": _stats([m.loss for m in members]),
            }
        )
    devs = list(topo.devices.values())
    per_gw = [len(gw.devices) for gw in topo.gateways.values()]
    samples = [d.samples for d in devs if d.samples is not None]
    return {
        "name": topo.name,
        "cloud": topo.cloud,
        "counts": {"cloud": 1, "gateways": len(topo.gateways), "devices": len(devs)},
        "devices_per_gateway": {"min": min(per_gw), "max": max(per_gw)},
        "links": links,
        "device_flops": _stats([d.flops for d in devs]),
        "availability": _stats([d.availability for d in devs]),
        "battery_mwh": _stats([d.battery_mwh for d in devs]),
        "mains_powered": sum(1 for d in devs if math.isinf(d.battery_mwh)),
        "power_w": _stats([d.power_w for d in devs]),
        "samples": {
            "devices_with_samples": len(samples),
            "total": sum(samples) if samples else None,
        },
    }


def _fmt(x: float | None, spec: str = ".4g") -> str:
    return "-" if x is None else format(x, spec)


def _triple(st: dict[str, float | None], spec: str = ".4g", scale: float = 1.0) -> str:
    vals = [None if (v := st[k]) is None else v * scale for k in ("min", "median", "max")]
    return " / ".join(_fmt(v, spec) for v in vals)


def _table(rows: list[list[str]], indent: str) -> list[str]:
    """Left-aligned columns sized to their widest cell (numbers vary wildly in width)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        indent + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in rows
    ]


def format_summary(s: dict[str, Any]) -> str:
    """Human-readable rendering of :func:`summarize_topology` output."""
    c = s["counts"]
    dpg = s["devices_per_gateway"]
    per_gw = f"{dpg['min']}" if dpg["min"] == dpg["max"] else f"{dpg['min']}-{dpg['max']}"
    lines = [
        f"topology {s['name']}" + (f" ({s['source']})" if "source" in s else ""),
        f"  tiers: 1 cloud ({s['cloud']}), {c['gateways']} gateways, {c['devices']} devices "
        f"({per_gw} per gateway)",
        "  links (min / median / max):",
    ]
    rows = [["role", "kind", "n", "latency ms", "up Mbps", "down Mbps", "jitter ms", "loss %"]]
    for link in s["links"]:
        rows.append(
            [
                link["role"],
                link["kind"],
                str(link["count"]),
                _triple(link["latency_ms"]),
                _triple(link["up_mbps"]),
                _triple(link["down_mbps"]),
                _triple(link["jitter_ms"]),
                _triple(link["loss"], scale=100.0),
            ]
        )
    lines += _table(rows, indent="    ")
    av = s["availability"]
    lines += [
        f"  device compute GFLOP/s (min / median / max): {_triple(s['device_flops'], scale=1e-9)}",
        f"  availability (min / median / max): {_triple(av)}, mean {_fmt(av['mean'])}",
        f"  battery mWh (min / median / max): {_triple(s['battery_mwh'], '.0f')}"
        + (f", {s['mains_powered']} mains powered" if s["mains_powered"] else ""),
        f"  power W (min / median / max): {_triple(s['power_w'])}",
    ]
    sm = s["samples"]
    if sm["total"] is None:
        lines.append("  samples: not given (the dataset's partition rule decides)")
    else:
        lines.append(
            f"  samples: {sm['total']} total on {sm['devices_with_samples']} of "
            f"{c['devices']} devices"
        )
    return "\n".join(lines)
