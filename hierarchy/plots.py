"""PNG plots of an emulation report (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def plot_report(report: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = report["rounds"]
    paths: list[Path] = []
    title = (
        f"{report['topology']['name']} · {report['config']['dataset']} · {report['model']['name']}"
    )

    # Accuracy against emulated (virtual) time: what a user would see in the field.
    t = np.cumsum([r["latency_s"] for r in rounds])
    pts = [(0.0, report["initial"]["accuracy"])] + [
        (float(ti), r["accuracy"])
        for ti, r in zip(t, rounds, strict=True)
        if r["accuracy"] is not None
    ]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3)
    ax.set_xlabel("emulated time (s)")
    ax.set_ylabel("global test accuracy")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    p = out / "accuracy_vs_time.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

    # Where each round's time went along the critical path, tier by tier.
    keys = [
        "cloud_to_gateway",
        "device_download",
        "device_compute",
        "device_upload",
        "gateway_wait",
        "gateway_to_cloud",
        "cloud_smpc",
    ]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    x = np.array([r["round"] for r in rounds])
    bottom = np.zeros(len(rounds))
    for k in keys:
        v = np.array([r["breakdown_critical_s"].get(k, 0.0) for r in rounds])
        ax.bar(x, v, bottom=bottom, label=k.replace("_", " "))
        bottom += v
    ax.set_xlabel("round")
    ax.set_ylabel("emulated seconds (critical path)")
    ax.set_title(f"round latency by tier — {title}", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    p = out / "latency_breakdown.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

    # Bytes per tier, model downloads per device, and device energy, round by round.
    fig, (ax1, ax3, ax2) = plt.subplots(1, 3, figsize=(13.6, 3.8))
    for key, label in (
        ("device_up", "device → gateway"),
        ("device_down", "gateway → device"),
        ("gateway_up", "gateway → cloud"),
        ("gateway_down", "cloud → gateway"),
        ("cloud_parties", "between cloud parties (SMPC)"),
    ):
        ys = [r["bytes"].get(key, 0) / 1e6 for r in rounds]
        if any(ys):
            ax1.plot(x, ys, marker="o", ms=2, label=label)
    ax1.set_xlabel("round")
    ax1.set_ylabel("MB per round")
    ax1.set_yscale("log")
    ax1.legend(fontsize=7)
    ax1.grid(alpha=0.3)
    if all("downlink" in r for r in rounds):
        dev = [r["downlink"]["gateway_to_device"] for r in rounds]
        ax3.plot(x, [d["bytes_mean"] / 1e3 for d in dev], marker="o", ms=2, label="device mean")
        ax3.plot(x, [d["bytes_max"] / 1e3 for d in dev], marker="o", ms=2, label="device max")
        ax3.plot(
            x,
            [r["downlink"]["cloud_to_gateway"]["bytes_each"] / 1e3 for r in rounds],
            marker="o",
            ms=2,
            label="per gateway",
        )
        ax3.set_ylim(bottom=0)
        ax3.set_ylabel("model download (KB)")
        share = sum(d["delta"] for d in dev) / max(1, sum(d["delta"] + d["full"] for d in dev))
        ax3.set_title(f"{share:.0%} of device downloads were delta chains", fontsize=8)
        ax3.legend(fontsize=7)
    ax3.set_xlabel("round")
    ax3.grid(alpha=0.3)
    if all("energy_mwh" in r for r in rounds):
        ax2.plot(x, [r["energy_mwh"]["total"] for r in rounds], marker="o", ms=2, label="total")
        ax2.plot(
            x, [r["energy_mwh"]["compute_total"] for r in rounds], marker="o", ms=2, label="compute"
        )
        ax2.set_ylabel("device energy per round (mWh)")
        ax2.legend(fontsize=7)
    ax2.set_xlabel("round")
    ax2.grid(alpha=0.3)
    fig.suptitle(f"bytes and energy — {title}", fontsize=9)
    fig.tight_layout()
    p = out / "bytes_energy.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    return paths
