"""Real-time rounds: compression x round policy on a bundled topology, in one table.

For each codec in {uncompressed f32, int8, top-k + int8 with error feedback,
adaptive} and each round policy in {sync (wait for all), deadline + quorum,
async (FedBuff-style, if this build has it)}, one emulation on the same
topology, data and seed. Prints final accuracy, mean/max update bytes,
emulated round latency p50/p95, emulated time to reach a target accuracy and
device energy, with the uncompressed sync run as the baseline of the same
run. Targets: updates <= 50 KB with accuracy within 1 point of uncompressed;
round latency p95 <= 2 s on metro-5g and <= 5 s on rural-lte; async reaches
the target accuracy in less emulated time than sync on rural-lte.

    .venv/bin/python bench/bench_realtime.py --topology topologies/metro-5g.graphml
    .venv/bin/python bench/bench_realtime.py --topology topologies/rural-lte.graphml --target 0.6
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hierarchy.emulate import EmulationConfig, LocalConfig, run_emulation  # noqa: E402
from hierarchy.uplink import UplinkConfig  # noqa: E402

CODECS = {
    "f32": UplinkConfig(codec="f32"),
    "int8": UplinkConfig(codec="int8"),
    "topk-int8+ef": UplinkConfig(codec="topk-int8", topk_ratio=0.1, error_feedback=True),
    "adaptive": UplinkConfig(codec="adaptive", upload_budget_s=0.05),
}


def time_to(report: dict[str, Any], target: float) -> float | None:
    """Emulated seconds until the global model first reaches ``target`` accuracy."""
    t = 0.0
    for r in report["rounds"]:
        t = r.get("time_s", t + r["latency_s"])
        if r["accuracy"] is not None and r["accuracy"] >= target:
            return t
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--topology", type=Path, default=ROOT / "topologies" / "metro-5g.graphml")
    ap.add_argument("--dataset", default="har")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--strategy", default="fedavgm")
    ap.add_argument("--target", type=float, default=0.8, help="accuracy for time-to-target")
    ap.add_argument(
        "--deadline-s",
        type=float,
        default=None,
        help="deadline for the deadline+quorum policy (default: the sync run's p50)",
    )
    ap.add_argument("--quorum", type=float, default=0.7)
    ap.add_argument("--buffer-size", type=int, default=10, help="async: updates per flush")
    ap.add_argument(
        "--async-rounds",
        type=int,
        default=None,
        help="async: applied versions (default: --rounds x devices per buffer)",
    )
    ap.add_argument(
        "--async-server-lr",
        type=float,
        default=None,
        help="async: server learning rate (stale, one-gateway versions are noisier)",
    )
    ap.add_argument("--async-strategy", default=None, help="async: server optimizer")
    ap.add_argument("--codecs", default=",".join(CODECS))
    ap.add_argument("--policies", default="sync,deadline+quorum,async")
    ap.add_argument("--backend", default="local", choices=("local", "ray"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    fields = {f.name for f in dataclasses.fields(EmulationConfig)}
    base = dict(
        topology=args.topology,
        dataset=args.dataset,
        rounds=args.rounds,
        seed=args.seed,
        local=LocalConfig(epochs=args.epochs, lr=args.lr),
        strategy=args.strategy,
        backend=args.backend,
        plots=False,
        eval_every=1,
    )
    rows: list[dict[str, Any]] = []
    deadline = args.deadline_s
    for policy in args.policies.split(","):
        if policy == "async" and "mode" not in fields:
            print("async: not available in this build (no EmulationConfig.mode); skipped")
            continue
        for name in args.codecs.split(","):
            extra: dict[str, Any] = {}
            if policy == "deadline+quorum":
                if deadline is None:
                    sync = next((r for r in rows if r["policy"] == "sync"), None)
                    deadline = sync["latency_p50_s"] if sync else 2.0
                extra = dict(deadline_s=deadline, quorum=args.quorum, late_policy="fold")
            elif policy == "async":
                extra = dict(mode="async", buffer_size=args.buffer_size)
            kw = dict(base)
            if policy == "async":
                kw["rounds"] = args.async_rounds or args.rounds * 4
                if args.async_server_lr is not None:
                    kw["server_lr"] = args.async_server_lr
                if args.async_strategy is not None:
                    kw["strategy"] = args.async_strategy
            cfg = EmulationConfig(**kw, uplink=CODECS[name], **extra)  # type: ignore[arg-type]
            t0 = time.perf_counter()
            rep = run_emulation(cfg, progress=False)
            wall = time.perf_counter() - t0
            rs = rep["rounds"]
            rows.append(
                {
                    "policy": policy,
                    "codec": name,
                    "final_accuracy": rep["summary"]["final_accuracy"],
                    "update_bytes_mean": sum(r["bytes"]["update_bytes_mean"] for r in rs) / len(rs),
                    "update_bytes_max": max(r["bytes"]["update_bytes_max"] for r in rs),
                    "latency_p50_s": rep["summary"]["round_latency_p50_s"],
                    "latency_p95_s": rep["summary"]["round_latency_p95_s"],
                    "time_to_target_s": time_to(rep, args.target),
                    "emulated_s": rep["summary"]["emulated_time_s"],
                    "energy_mwh_per_device_round": sum(r["energy_mwh"]["mean"] for r in rs)
                    / len(rs),
                    "wall_s": wall,
                }
            )
            r = rows[-1]
            print(
                f"  {policy:16s} {name:13s} acc {r['final_accuracy']:.4f}  "
                f"bytes {r['update_bytes_mean']:8.0f}/{r['update_bytes_max']:6d}  "
                f"p50 {r['latency_p50_s']:.2f}s p95 {r['latency_p95_s']:.2f}s  "
                f"t->{args.target:.0%} {r['time_to_target_s'] or float('nan'):.1f}s  "
                f"wall {wall:.0f}s",
                flush=True,
            )
    ref = next(r for r in rows if r["policy"] == "sync" and r["codec"] == "f32")
    print(
        f"\n{args.topology.name}, {args.dataset}, {args.rounds} rounds, {args.strategy}, "
        f"{args.epochs} local epochs; baseline = sync f32 "
        f"(accuracy {ref['final_accuracy']:.4f})"
    )
    hdr = (
        f"{'policy':16s} {'codec':13s} {'acc':>7s} {'Δacc pt':>8s} {'bytes mean':>10s} "
        f"{'max':>6s} {'x smaller':>9s} {'p50 s':>6s} {'p95 s':>6s} "
        f"{'t->' + format(args.target, '.0%'):>8s} {'mWh/dev':>8s}"
    )
    print(hdr)
    for r in rows:
        tt = r["time_to_target_s"]
        print(
            f"{r['policy']:16s} {r['codec']:13s} {r['final_accuracy']:7.4f} "
            f"{(r['final_accuracy'] - ref['final_accuracy']) * 100:+8.2f} "
            f"{r['update_bytes_mean']:10.0f} {r['update_bytes_max']:6d} "
            f"{ref['update_bytes_mean'] / r['update_bytes_mean']:9.1f} "
            f"{r['latency_p50_s']:6.2f} {r['latency_p95_s']:6.2f} "
            f"{(f'{tt:.1f}' if tt is not None else 'never'):>8s} "
            f"{r['energy_mwh_per_device_round']:8.3f}"
        )
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args), "rows": rows}, default=str, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
