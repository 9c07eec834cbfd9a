"""Model downlink: full float32 model vs delta chains of compressed global steps, one run.

Same topology, data, seed and training for every variant; only the downlink
differs: ``full`` (every device downloads the whole model every round, the
baseline measured in this same run) and ``delta`` with the broadcast step
encoded as int8 or int4 (per-chunk scales) or top-k 10 % + int8, each with
the cloud's error feedback. Prints final accuracy and its difference, download
bytes per device per round (mean and max), bytes per cloud→gateway push, how many
downloads were chains vs the full model, emulated round latency p50/p95 and
the mean device download time, with ratios against ``full``. Targets:
accuracy within 0.5-1 point of ``full``, fewer download bytes, no slower rounds.

    .venv/bin/python bench/bench_downlink.py        # HAPT on metro-5g, make demo's settings
    .venv/bin/python bench/bench_downlink.py --topology topologies/rural-lte.graphml \\
        --epochs 2 --lr 0.1 --strategy fedavg --rounds 40
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cloud.downlink import DownlinkConfig  # noqa: E402
from hierarchy.emulate import EmulationConfig, LocalConfig, run_emulation  # noqa: E402

VARIANTS = {
    "full": DownlinkConfig(mode="full"),
    "delta-int8": DownlinkConfig(mode="delta", codec="int8"),
    "delta-int4": DownlinkConfig(mode="delta", codec="int4"),
    "delta-topk-int8": DownlinkConfig(mode="delta", codec="topk-int8", topk_ratio=0.1),
}


def summarize(name: str, rep: dict[str, Any], wall: float) -> dict[str, Any]:
    rs = rep["rounds"]
    dev = [r["downlink"]["gateway_to_device"] for r in rs]
    downloads = sum(d["full"] + d["delta"] for d in dev)
    return {
        "downlink": name,
        "final_accuracy": rep["summary"]["final_accuracy"],
        "best_accuracy": rep["summary"]["best_accuracy"],
        "down_bytes_mean": sum(r["bytes"]["device_down"] for r in rs) / max(1, downloads),
        "down_bytes_max": max(d["bytes_max"] for d in dev),
        "gateway_push_bytes_mean": sum(r["downlink"]["cloud_to_gateway"]["bytes_each"] for r in rs)
        / len(rs),
        "downloads_delta": sum(d["delta"] for d in dev),
        "downloads_full": sum(d["full"] for d in dev),
        "download_s_mean": sum(
            r["breakdown_mean_s"]["device_download"] * (d["full"] + d["delta"])
            for r, d in zip(rs, dev, strict=True)
        )
        / max(1, downloads),
        "latency_p50_s": rep["summary"]["round_latency_p50_s"],
        "latency_p95_s": rep["summary"]["round_latency_p95_s"],
        "emulated_s": rep["summary"]["emulated_time_s"],
        "energy_mwh_per_device_round": sum(r["energy_mwh"]["mean"] for r in rs) / len(rs),
        "wall_s": wall,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--topology", type=Path, default=ROOT / "topologies" / "metro-5g.graphml")
    ap.add_argument("--dataset", default="har")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--strategy", default="fedavgm")
    ap.add_argument("--participation", type=float, default=1.0)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--backend", default="local", choices=("local", "ray"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    rows: list[dict[str, Any]] = []
    for name in args.variants.split(","):
        cfg = EmulationConfig(
            topology=args.topology,
            dataset=args.dataset,
            rounds=args.rounds,
            seed=args.seed,
            local=LocalConfig(epochs=args.epochs, lr=args.lr),
            strategy=args.strategy,
            participation=args.participation,
            backend=args.backend,
            plots=False,
            downlink=VARIANTS[name],
        )
        t0 = time.perf_counter()
        rep = run_emulation(cfg, progress=False)
        rows.append(summarize(name, rep, time.perf_counter() - t0))
        r = rows[-1]
        print(
            f"  {name:16s} acc {r['final_accuracy']:.4f}  "
            f"down/device {r['down_bytes_mean']:8.0f} B (max {r['down_bytes_max']})  "
            f"p50 {r['latency_p50_s']:.3f}s "
            f"p95 {r['latency_p95_s']:.3f}s  wall {r['wall_s']:.0f}s",
            flush=True,
        )
    ref = next((r for r in rows if r["downlink"] == "full"), rows[0])
    print(
        f"\n{args.topology.name}, {args.dataset}, {args.rounds} rounds, {args.strategy}, "
        f"{args.epochs} local epochs, lr {args.lr}, participation {args.participation}; "
        f"baseline = {ref['downlink']} (same run)"
    )
    print(
        f"{'downlink':16s} {'acc':>7s} {'Δ pt':>6s} {'B/device':>9s} {'max':>6s} {'x less':>6s} "
        f"{'push B':>7s} {'chains':>6s} {'full':>5s} {'dl ms':>6s} {'p50 s':>6s} {'p95 s':>6s} "
        f"{'p50 x':>6s} {'mWh/dev':>8s}"
    )
    for r in rows:
        print(
            f"{r['downlink']:16s} {r['final_accuracy']:7.4f} "
            f"{(r['final_accuracy'] - ref['final_accuracy']) * 100:+6.2f} "
            f"{r['down_bytes_mean']:9.0f} {r['down_bytes_max']:6d} "
            f"{ref['down_bytes_mean'] / r['down_bytes_mean']:6.2f} "
            f"{r['gateway_push_bytes_mean']:7.0f} "
            f"{r['downloads_delta']:6d} {r['downloads_full']:5d} "
            f"{r['download_s_mean'] * 1e3:6.2f} "
            f"{r['latency_p50_s']:6.3f} {r['latency_p95_s']:6.3f} "
            f"{ref['latency_p50_s'] / r['latency_p50_s']:6.3f} "
            f"{r['energy_mwh_per_device_round']:8.4f}"
        )
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args), "rows": rows}, default=str, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
