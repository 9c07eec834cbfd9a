"""Emulated-round wall time with every device update over real CoAP / MQTT, vs direct.

For each topology, the same emulation (data, seed, rounds) runs three times:
``--transport direct`` (the in-process hand-over: the baseline of the same
run), ``coap`` (every device's signed envelope as a block-wise POST to its
gateway's own aiocoap server) and ``mqtt`` (QoS 1 publish through a real
mosquitto, the gateway's verdict back on the ack topic). Prints per transport
the steady-state wall seconds per round (round 1, which warms up the
trainers, is left out), the part spent handing updates to the gateways, the
per-upload round-trip p50/p95, set-up time, and the ratio against direct; and
checks that all three produced the same model hashes. Aggregation is plaintext
(``--privacy none``) unless ``--privacy`` says otherwise: SMPC costs the same
whichever way the updates reached the gateways.

    .venv/bin/python bench/bench_transport.py
    .venv/bin/python bench/bench_transport.py --topologies smoke,metro-5g --rounds 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hierarchy.emulate import EmulationConfig, LocalConfig, run_emulation  # noqa: E402
from hierarchy.privacy import PrivacyConfig  # noqa: E402

TRANSPORTS = ("direct", "coap", "mqtt")


def steady(report: dict[str, Any], key: str) -> float:
    rounds = report["rounds"][1:] or report["rounds"]
    return statistics.mean(float(r[key]) for r in rounds)


def run(topology: Path, transport: str, args: argparse.Namespace) -> dict[str, Any]:
    cfg = EmulationConfig(
        topology=topology,
        rounds=args.rounds,
        dataset=args.dataset,
        seed=args.seed,
        local=LocalConfig(epochs=1, lr=0.1),
        backend=args.backend,
        plots=False,
        eval_every=args.rounds,  # evaluation is the same in every transport: keep it out
        transport=transport,
        privacy=PrivacyConfig(mode=args.privacy),
    )
    t0 = time.perf_counter()
    report = run_emulation(cfg, progress=False)
    total = time.perf_counter() - t0
    rtts = [r["transport_rtt_s"]["p50"] for r in report["rounds"][1:] or report["rounds"]]
    p95 = [r["transport_rtt_s"]["p95"] for r in report["rounds"][1:] or report["rounds"]]
    return {
        "topology": topology.stem,
        "transport": transport,
        "devices": report["topology"]["devices"],
        "gateways": report["topology"]["gateways"],
        "update_bytes": report["rounds"][0]["bytes"]["update_bytes_mean"],
        "round_wall_s": steady(report, "wall_s"),
        "transport_wall_s": steady(report, "wall_transport_s"),
        "rtt_p50_ms": 1e3 * statistics.mean(rtts),
        "rtt_p95_ms": 1e3 * statistics.mean(p95),
        "setup_s": report["summary"]["wall_setup_s"],
        "total_s": total,
        "hashes": [r["model_hash"] for r in report["rounds"]],
        "rejected": sum(r["rejected"] for r in report["rounds"]),
        "failed": sum(r["transport_failed"] for r in report["rounds"]),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--topologies",
        default="smoke,metro-5g",
        help="comma-separated names under topologies/ (or paths)",
    )
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--backend", default="local", choices=("local", "ray"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--privacy", default="none", choices=("none", "gateway-trusted", "auto"))
    ap.add_argument(
        "--transports",
        default=",".join(TRANSPORTS),
        help="comma-separated; direct always runs (it is the baseline)",
    )
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.rounds < 2:
        ap.error("--rounds must be >= 2 (round 1 is warm-up)")

    rows: list[dict[str, Any]] = []
    for name in args.topologies.split(","):
        path = Path(name)
        if not path.exists():
            path = ROOT / "topologies" / f"{name}.graphml"
        wanted = set(args.transports.split(",")) | {"direct"}
        for transport in [t for t in TRANSPORTS if t in wanted]:
            rows.append(run(path, transport, args))
            print(
                f"  {path.stem} {transport}: {rows[-1]['round_wall_s']:.3f} s/round",
                file=sys.stderr,
                flush=True,
            )

    print(
        f"\nbackend {args.backend}, dataset {args.dataset}, {args.rounds} rounds "
        "(steady state: rounds 2..N)\n"
    )
    print(
        "| topology | devices | transport | update B | wall s/round | × direct "
        "| hand-over s/round | upload RTT p50 / p95 ms | set-up s | same model |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        base = next(
            r for r in rows if r["topology"] == row["topology"] and r["transport"] == "direct"
        )
        same = "yes" if row["hashes"] == base["hashes"] else "NO"
        rtt = (
            "—"
            if row["transport"] == "direct"
            else f"{row['rtt_p50_ms']:.1f} / {row['rtt_p95_ms']:.1f}"
        )
        print(
            f"| {row['topology']} | {row['devices']} | {row['transport']} "
            f"| {row['update_bytes']:,.0f} | {row['round_wall_s']:.3f} "
            f"| {row['round_wall_s'] / base['round_wall_s']:.2f} "
            f"| {row['transport_wall_s']:.3f} | {rtt} | {row['setup_s']:.1f} | {same} |"
        )
        if row["rejected"] or row["failed"]:
            print(
                f"  !! {row['topology']} {row['transport']}: {row['rejected']} rejected, "
                f"{row['failed']} without an answer"
            )
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))
    ok = all(
        r["hashes"]
        == next(b for b in rows if b["topology"] == r["topology"] and b["transport"] == "direct")[
            "hashes"
        ]
        for r in rows
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
