"""Scale: one round of 10,000 devices behind 100 gateways on this machine.

Prints wall time (set-up and the round separately) and the peak memory of the
whole process tree (driver + every Ray process), against a baseline measured
in the same run: the same round at 1,000 devices behind 10 gateways, so the
ratio shows how cost grows with fleet size. Targets: ≤ 60 s, ≤ 6 GB.

    .venv/bin/python bench/bench_scale.py [--devices 10000] [--gateways 100] [--dataset fashion]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.measure import PeakMemory
from hierarchy.emulate import EmulationConfig, run_emulation
from hierarchy.topogen import generate_topology, write_topology


def one(devices: int, gateways: int, dataset: str, backend: str, tmp: Path) -> dict[str, float]:
    path = tmp / f"scale-{gateways}x{devices // gateways}.graphml"
    write_topology(generate_topology(gateways, devices // gateways, "5g", seed=0), path)
    cfg = EmulationConfig(
        topology=path, rounds=1, dataset=dataset, seed=0, backend=backend, plots=False, eval_every=1
    )
    t0 = time.perf_counter()
    with PeakMemory() as mem:
        report = run_emulation(cfg, progress=False)
    wall = time.perf_counter() - t0
    r = report["rounds"][0]
    return {
        "devices": devices,
        "gateways": gateways,
        "participants": r["participants"],
        "wall_total_s": wall,
        "wall_setup_s": report["summary"]["wall_setup_s"],
        "wall_round_s": r["wall_s"],
        "peak_gb": mem.peak_gb,
        "accuracy": r["accuracy"],
        "emulated_round_s": r["latency_s"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--gateways", type=int, default=100)
    ap.add_argument("--dataset", default="fashion", choices=("fashion", "har", "digits"))
    ap.add_argument("--backend", default="ray", choices=("ray", "local"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        base = one(
            args.devices // 10, max(1, args.gateways // 10), args.dataset, args.backend, Path(d)
        )
        big = one(args.devices, args.gateways, args.dataset, args.backend, Path(d))
    print(
        f"{'devices':>8} {'gateways':>8} {'wall s':>8} {'setup s':>8} {'round s':>8} "
        f"{'peak GB':>8} {'acc':>6}"
    )
    for r in (base, big):
        print(
            f"{r['devices']:>8} {r['gateways']:>8} {r['wall_total_s']:>8.1f} "
            f"{r['wall_setup_s']:>8.1f} {r['wall_round_s']:>8.1f} {r['peak_gb']:>8.2f} "
            f"{r['accuracy']:>6.3f}"
        )
    print(
        f"ratio {args.devices} vs {args.devices // 10} devices: wall x"
        f"{big['wall_total_s'] / base['wall_total_s']:.2f}, round x"
        f"{big['wall_round_s'] / base['wall_round_s']:.2f}, memory x"
        f"{big['peak_gb'] / base['peak_gb']:.2f}"
    )
    ok = big["wall_total_s"] <= 60 and big["peak_gb"] <= 6
    print(f"targets (<= 60 s, <= 6 GB): {'met' if ok else 'NOT met'}")
    if args.json:
        args.json.write_text(json.dumps({"baseline": base, "scale": big}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
