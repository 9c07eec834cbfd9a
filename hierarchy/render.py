"""Draw a topology as a layered tree PNG (cloud on top, gateways, then devices).

The layout is computed directly from the tree (each gateway owns a horizontal slot wide
enough for its drawn devices), never by a force-directed layout: spring layout on a 10k
node fleet takes minutes and shuffles on every run, while this is linear and stable.
Gateways beyond ``max_gateways`` and devices beyond ``max_devices_per_gateway`` are
summarized with "+N more" labels, and every edge set is one ``LineCollection`` per link
kind, so even large fleets render in about a second.

Uses matplotlib's object API with the Agg canvas (no pyplot, no global backend state), so
it is safe in headless servers and inside Ray workers.
"""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from hierarchy.topology import Topology

__all__ = ["LINK_COLORS", "render_topology_png"]

LINK_COLORS: dict[str, str] = {
    "5g": "#1f77b4",
    "lte": "#ff7f0e",
    "wifi": "#2ca02c",
    "fiber": "#7f3fbf",
    "microwave": "#d62728",
    "ideal": "#7f7f7f",
}
_OTHER_COLOR = "#8c564b"

_Y_CLOUD, _Y_GATEWAY, _Y_DEVICE = 2.0, 1.0, 0.0


def render_topology_png(
    topo: Topology,
    path: str | Path,
    *,
    max_devices_per_gateway: int = 32,
    max_gateways: int = 48,
    dpi: int = 110,
) -> Path:
    """Render ``topo`` to ``path`` (PNG) and return the path.

    Device marker size grows with log compute (FLOP/s) so slow devices stand out; edges
    are coloured by link kind (legend included).
    """
    if max_devices_per_gateway < 1 or max_gateways < 1:
        raise ValueError("max_devices_per_gateway and max_gateways must be >= 1")
    gw_ids = list(topo.gateways)
    shown_gws = gw_ids[:max_gateways]
    hidden_gws = len(gw_ids) - len(shown_gws)

    # Horizontal slots: one unit per drawn device (at least one per gateway).
    slots: list[int] = []
    for gw in shown_gws:
        n = len(topo.gateways[gw].devices)
        drawn_n = min(n, max_devices_per_gateway)
        slots.append(max(1, drawn_n + (1 if n > drawn_n else 0)))  # +1 slot for "+N more"
    gap = 1.0
    total = float(sum(slots)) + gap * max(0, len(slots) - 1)

    segments: dict[str, list[list[tuple[float, float]]]] = {}
    gx: list[float] = []
    dx: list[float] = []
    dsize: list[float] = []
    more_labels: list[tuple[float, str]] = []
    device_labels: list[tuple[float, str]] = []
    total_devices = sum(len(topo.gateways[g].devices) for g in shown_gws)
    label_devices = total_devices <= 40
    cloud_x = total / 2.0

    cursor = 0.0
    for gw, width in zip(shown_gws, slots, strict=True):
        node = topo.gateways[gw]
        centre = cursor + width / 2.0
        gx.append(centre)
        segments.setdefault(node.link.kind, []).append([(cloud_x, _Y_CLOUD), (centre, _Y_GATEWAY)])
        drawn = node.devices[:max_devices_per_gateway]
        for k, dev_id in enumerate(drawn):
            dev = topo.devices[dev_id]
            x = cursor + k + 0.5
            dx.append(x)
            dsize.append(6.0 + 5.0 * max(0.0, math.log10(dev.flops) - 7.0))
            segments.setdefault(dev.link.kind, []).append([(centre, _Y_GATEWAY), (x, _Y_DEVICE)])
            if label_devices:
                device_labels.append((x, dev_id))
        extra = len(node.devices) - len(drawn)
        if extra > 0:
            more_labels.append((cursor + len(drawn) + 0.5, f"+{extra} more"))
        cursor += width + gap

    width_in = min(28.0, max(6.0, 0.12 * total + 2.0))
    fig = Figure(figsize=(width_in, 5.5), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.88, bottom=0.02)

    handles = []
    for kind in sorted(segments):
        color = LINK_COLORS.get(kind, _OTHER_COLOR)
        lw = 1.6 if kind in {topo.gateways[g].link.kind for g in shown_gws} else 0.6
        ax.add_collection(LineCollection(segments[kind], colors=color, linewidths=lw, zorder=1))
        handles.append(Line2D([0], [0], color=color, lw=2, label=kind))

    ax.scatter(dx, [_Y_DEVICE] * len(dx), s=dsize, c="#444444", zorder=2, linewidths=0)
    ax.scatter(gx, [_Y_GATEWAY] * len(gx), s=90, marker="s", c="#2b6cb0", zorder=3)
    ax.scatter([cloud_x], [_Y_CLOUD], s=400, marker="h", c="#38a169", zorder=3)
    ax.annotate(
        topo.cloud,
        (cloud_x, _Y_CLOUD),
        xytext=(0, 12),
        textcoords="offset points",
        ha="center",
        fontsize=9,
    )

    gw_font = 8 if len(shown_gws) <= 24 else 6
    rotate = 0 if len(shown_gws) <= 16 else 90
    for x, gw in zip(gx, shown_gws, strict=True):
        ax.annotate(
            gw,
            (x, _Y_GATEWAY),
            xytext=(6, 6),
            textcoords="offset points",
            fontsize=gw_font,
            rotation=rotate,
        )
    for x, text in more_labels:
        ax.annotate(
            text,
            (x, _Y_DEVICE),
            xytext=(0, -14),
            textcoords="offset points",
            ha="center",
            fontsize=6,
            rotation=90,
            va="top",
        )
    for x, text in device_labels:
        ax.annotate(
            text,
            (x, _Y_DEVICE),
            xytext=(0, -8),
            textcoords="offset points",
            ha="center",
            va="top",
            fontsize=6,
            rotation=90,
        )

    ax.set_xlim(-0.5, total + 0.5)
    ax.set_ylim(-0.9, 2.5)
    ax.axis("off")
    title = f"{topo.name}: 1 cloud, {len(gw_ids)} gateways, {len(topo.devices)} devices"
    if hidden_gws:
        title += f"\n(showing the first {len(shown_gws)} gateways; +{hidden_gws} more gateways)"
    ax.set_title(title, fontsize=10)
    ax.legend(
        handles=handles,
        title="link",
        loc="upper right",
        fontsize=8,
        title_fontsize=8,
        frameon=False,
    )
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, format="png")
    return p
