"""``tierfl`` command line: emulate a fleet, generate and inspect topologies."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from devices.argtypes import number as _number


def _add_emulate(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from devices.lr_schedule import LR_SCHEDULES
    from hierarchy.emulate import BACKENDS, DATASETS
    from hierarchy.transport import TRANSPORTS

    p = sub.add_parser(
        "emulate",
        help="run a federated-learning emulation on a topology",
        description=(
            "Emulate a fleet: the GraphML topology becomes a tree of Ray actors (cloud "
            "coordinator, gateway hosts, device-cohort trainers). Training and aggregation are "
            "real; the network is emulated on a virtual clock. Writes OUT/report.json and plots."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("topology", type=Path, help="GraphML topology file (see topologies/)")
    p.add_argument("--rounds", type=_number(int, minimum=1), default=5, help="federated rounds")
    p.add_argument(
        "--dataset",
        choices=DATASETS,
        default="har",
        help="har: UCI HAPT by subject; fashion: Fashion-MNIST, Dirichlet split; "
        "digits: scikit-learn digits (tiny)",
    )
    p.add_argument(
        "--seed",
        type=_number(int, minimum=0),
        default=0,
        help="seed for data split, model init, training and network; same seed, same report",
    )
    p.add_argument("--out", type=Path, default=Path("runs/latest"), help="output directory")
    p.add_argument(
        "--model",
        choices=("mlp", "cnn1d", "cnn2d"),
        default=None,
        help="model (default: cnn1d for har, cnn2d for fashion, mlp for digits)",
    )
    p.add_argument(
        "--alpha",
        type=_number(float, minimum=0, strict=True),
        default=0.5,
        help="Dirichlet concentration for fashion/digits label skew (smaller = more non-IID)",
    )
    p.add_argument(
        "--epochs", type=_number(int, minimum=1), default=1, help="local epochs per round"
    )
    p.add_argument(
        "--batch-size", type=_number(int, minimum=1), default=16, help="local batch size"
    )
    p.add_argument(
        "--lr",
        type=_number(float, minimum=0, strict=True),
        default=0.05,
        help="local SGD learning rate",
    )
    p.add_argument(
        "--lr-schedule",
        choices=LR_SCHEDULES,
        default="constant",
        help="client lr over rounds: round 1 at --lr, the last at --lr x --lr-final "
        "(cosine, exp, or inverse = Li et al.'s 1/(t+gamma)); FedAvg on non-IID data "
        "needs a decaying lr to settle (sync mode only)",
    )
    p.add_argument(
        "--lr-final",
        type=_number(float, minimum=0, strict=True),
        default=0.1,
        help="last round's client lr as a fraction of --lr, in (0, 1] (with --lr-schedule)",
    )
    p.add_argument(
        "--lr-warmup-rounds",
        type=_number(int, minimum=0),
        default=0,
        help="ramp the client lr linearly up to --lr over the first rounds, then follow "
        "--lr-schedule from there (sync mode only; 0 = no warm-up)",
    )
    p.add_argument(
        "--max-steps",
        type=_number(int, minimum=1),
        default=None,
        help="cap on local SGD steps per round (bounds work on data-rich devices)",
    )
    p.add_argument(
        "--max-grad-norm",
        type=_number(float, minimum=0, strict=True),
        default=None,
        help="clip each local SGD step's gradient to this L2 norm (all parameters together), "
        "so a larger --lr stays stable; an optimizer setting, unlike the DP --clip-norm",
    )
    p.add_argument(
        "--strategy", choices=("fedavg", "fedavgm"), default="fedavg", help="server optimizer"
    )
    p.add_argument(
        "--server-lr",
        type=_number(float, minimum=0, strict=True),
        default=1.0,
        help="server learning rate",
    )
    p.add_argument(
        "--server-momentum",
        type=_number(float, minimum=0),
        default=0.9,
        help="FedAvgM momentum (in [0, 1))",
    )
    p.add_argument(
        "--deadline-s",
        type=_number(float, minimum=0, strict=True),
        default=None,
        help="round deadline in emulated seconds; later updates are stragglers (dropped)",
    )
    p.add_argument(
        "--eval-every",
        type=_number(int, minimum=1),
        default=1,
        help="evaluate the global model every N rounds (and after the last)",
    )
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default="ray",
        help="ray: one process per actor; local: everything in this process",
    )
    p.add_argument(
        "--trainers",
        type=_number(int, minimum=1),
        default=None,
        help="cohort-trainer actors (default: one per CPU)",
    )
    p.add_argument(
        "--gateway-hosts",
        type=_number(int, minimum=1),
        default=None,
        help="gateway-host actors that the logical gateways are packed onto",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        help="join an existing Ray cluster (e.g. 'auto' on a `ray up` head node)",
    )
    from hierarchy.uplink import CODEC_CHOICES

    rt = p.add_argument_group("real-time rounds")
    rt.add_argument(
        "--codec",
        choices=CODEC_CHOICES,
        default="f32",
        help="update encoding; 'adaptive' fits each device's uplink budget "
        "(bandwidth x --upload-budget-s, capped at 50 KB)",
    )
    rt.add_argument(
        "--topk-ratio",
        type=_number(float, minimum=0, strict=True),
        default=0.1,
        help="share of entries a top-k codec keeps",
    )
    rt.add_argument(
        "--no-error-feedback",
        action="store_true",
        help="drop what compression lost instead of carrying it to the next round",
    )
    rt.add_argument(
        "--upload-budget-s",
        type=_number(float, minimum=0, strict=True),
        default=0.5,
        help="adaptive codec: seconds of uplink an update may take",
    )
    rt.add_argument(
        "--quorum",
        type=_number(float, minimum=0, strict=True),
        default=None,
        help="a gateway closes once this fraction of its selected devices reported "
        "(or at the deadline)",
    )
    rt.add_argument(
        "--late",
        choices=("drop", "fold"),
        default="drop",
        help="stragglers' updates: drop, or fold into the next round with a staleness weight",
    )
    rt.add_argument(
        "--staleness-exponent",
        type=_number(float, minimum=0),
        default=0.5,
        help="late-update weight (1 + staleness)^-a",
    )
    rt.add_argument(
        "--participation",
        type=_number(float, minimum=0, strict=True),
        default=1.0,
        help="fraction of eligible devices selected per round",
    )
    rt.add_argument(
        "--over-select",
        action="store_true",
        help="select more devices to offset expected dropouts (availability)",
    )
    rt.add_argument(
        "--min-battery-mwh",
        type=_number(float, minimum=0),
        default=0.0,
        help="skip devices whose remaining battery is below this",
    )
    rt.add_argument(
        "--adaptive-work",
        action="store_true",
        help="slow devices train fewer local steps so they meet --deadline-s",
    )
    from devices.delta_chain import DELTA_CODECS

    dl = p.add_argument_group("model downlink")
    dl.add_argument(
        "--downlink",
        choices=("full", "delta"),
        default=argparse.SUPPRESS,  # the real default depends on --mode
        help="full: every download is the whole float32 model; delta: the cloud compresses "
        "each global step (--downlink-codec, with server-side error feedback) and a device "
        "holding a recent version gets the chain of steps from it, hash-verified (the full "
        "model when its version is unknown, too old, or the chain is bigger) "
        "(default: delta; full with --mode async, which supports only full)",
    )
    dl.add_argument(
        "--downlink-codec",
        choices=DELTA_CODECS,
        default=argparse.SUPPRESS,  # the real default depends on --mode
        help="delta: encoding of the broadcast step (default: int8)",
    )
    dl.add_argument(
        "--downlink-topk-ratio",
        type=_number(float, minimum=0, strict=True),
        default=argparse.SUPPRESS,  # the real default depends on --mode
        help="delta with a top-k codec: share of the parameters a step changes (default: 0.1)",
    )
    dl.add_argument(
        "--downlink-history",
        type=_number(int, minimum=1),
        default=argparse.SUPPRESS,  # the real default depends on --mode
        help="delta: how many versions back a chain may start (older holders get the full "
        "model; default: 8)",
    )
    am = p.add_argument_group("asynchronous rounds")
    am.add_argument(
        "--mode",
        choices=("sync", "async"),
        default="sync",
        help="sync: rounds with a deadline/quorum; async: FedBuff-style, every device cycles "
        "on its own, gateways flush every --buffer-size updates, each applied flush is a "
        "version (--rounds counts versions)",
    )
    am.add_argument(
        "--buffer-size",
        type=_number(int, minimum=1),
        default=None,
        help="async: updates a gateway buffers before it flushes (default: half its devices)",
    )
    pv = p.add_argument_group(
        "privacy (secure aggregation and differential privacy)",
        "By default (Ray backend, sync rounds) gateways secret-share their partial aggregates "
        "to K CrypTen aggregator parties, one process each, which reveal only the (noisy) sum.",
    )
    pv.add_argument(
        "--privacy",
        choices=("auto", "gateway-trusted", "device-shares", "none"),
        default="auto",
        help="gateway-trusted: gateways secret-share their sums; device-shares: devices mask "
        "their updates so the gateway learns nothing either; none: plaintext sums; auto: "
        "gateway-trusted on the Ray backend in sync mode, none otherwise (the report says why)",
    )
    pv.add_argument(
        "--no-smpc",
        action="store_true",
        help="same as --privacy none: plaintext partial aggregates, to compare against",
    )
    pv.add_argument(
        "--smpc-parties",
        type=_number(int, minimum=2),
        default=3,
        help="K cloud aggregator parties (2-7)",
    )
    pv.add_argument(
        "--clip-norm",
        type=_number(float, minimum=0, strict=True),
        default=None,
        help="C: devices clip their update to this L2 norm; gateways check it again",
    )
    pv.add_argument(
        "--noise-multiplier",
        type=_number(float, minimum=0),
        default=0.0,
        help="sigma: the parties jointly add N(0, sigma^2 C^2) to the revealed sum (needs "
        "--clip-norm; devices then weigh 1 each, so one device moves the sum by <= C)",
    )
    pv.add_argument(
        "--epsilon-budget",
        type=_number(float, minimum=0, strict=True),
        default=None,
        help="stop (keeping the last model) before a round would take epsilon past this",
    )
    pv.add_argument(
        "--delta",
        type=_number(float, minimum=0, strict=True),
        default=1e-5,
        help="the delta of the (epsilon, delta) reported per round",
    )
    pv.add_argument(
        "--secure-clip",
        type=_number(float, minimum=0, strict=True),
        default=None,
        help="bound each gateway's (device-shares: each device's) contribution to this L2 "
        "norm inside SMPC, with CrypTen comparisons: a scaled-up contribution cannot dominate",
    )
    pv.add_argument(
        "--smpc-retries",
        type=_number(int, minimum=0),
        default=1,
        help="a round whose SMPC fails is retried this many times on a fresh party group",
    )
    pv.add_argument(
        "--dropout",
        type=_number(float, minimum=0),
        default=0.0,
        help="share of selected, reachable devices that drop out before reporting",
    )
    p.add_argument(
        "--transport",
        choices=TRANSPORTS,
        default="direct",
        help="how device updates reach their gateways: direct (in-process hand-over, fastest); "
        "coap / mqtt: every device signs its real encoded update (Ed25519) and uploads it with "
        "the real device client over loopback to real gateway servers (aiocoap per gateway / "
        "a mosquitto broker started for the run), which validate it; the virtual clock still "
        "times the links. Sync mode only",
    )
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_emulate)


def _run_emulate(args: argparse.Namespace) -> int:
    from cloud.downlink import DownlinkConfig
    from hierarchy.emulate import EmulationConfig, LocalConfig, run_emulation
    from hierarchy.privacy import PrivacyConfig
    from hierarchy.topology import TopologyError, load_topology
    from hierarchy.uplink import UplinkConfig

    if args.server_momentum >= 1:
        print("error: --server-momentum must be < 1", file=sys.stderr)
        return 2
    # Unset --downlink* flags are absent from args (SUPPRESS): their defaults depend on --mode.
    delta_flags = {
        "--downlink-codec": getattr(args, "downlink_codec", None),
        "--downlink-topk-ratio": getattr(args, "downlink_topk_ratio", None),
        "--downlink-history": getattr(args, "downlink_history", None),
    }
    chosen = getattr(args, "downlink", None)
    mode = chosen or ("full" if args.mode == "async" else "delta")
    given = [flag for flag, v in delta_flags.items() if v is not None]
    if mode == "full" and given:
        print(f"error: {given[0]} applies to --downlink delta only", file=sys.stderr)
        return 2
    defaults = DownlinkConfig()
    downlink = None
    if chosen is not None or given:
        downlink = DownlinkConfig(
            mode=mode,
            codec=delta_flags["--downlink-codec"] or defaults.codec,
            topk_ratio=delta_flags["--downlink-topk-ratio"] or defaults.topk_ratio,
            history=delta_flags["--downlink-history"] or defaults.history,
        )
    try:
        topo = load_topology(args.topology)
    except TopologyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = EmulationConfig(
        topology=args.topology,
        rounds=args.rounds,
        dataset=args.dataset,
        seed=args.seed,
        out=args.out,
        model=args.model,
        alpha=args.alpha,
        local=LocalConfig(
            args.epochs, args.batch_size, args.lr, args.max_steps, args.max_grad_norm
        ),
        strategy=args.strategy,
        server_lr=args.server_lr,
        server_momentum=args.server_momentum,
        lr_schedule=args.lr_schedule,
        lr_final=args.lr_final,
        lr_warmup_rounds=args.lr_warmup_rounds,
        deadline_s=args.deadline_s,
        eval_every=args.eval_every,
        backend=args.backend,
        trainers=args.trainers,
        gateway_hosts=args.gateway_hosts,
        ray_address=args.ray_address,
        plots=not args.no_plots,
        uplink=UplinkConfig(
            codec=args.codec,
            topk_ratio=args.topk_ratio,
            error_feedback=not args.no_error_feedback,
            upload_budget_s=args.upload_budget_s,
        ),
        quorum=args.quorum,
        late_policy=args.late,
        staleness_exponent=args.staleness_exponent,
        participation=args.participation,
        over_select=args.over_select,
        min_battery_mwh=args.min_battery_mwh,
        adaptive_work=args.adaptive_work,
        mode=args.mode,
        buffer_size=args.buffer_size,
        privacy=PrivacyConfig(
            mode="none" if args.no_smpc else args.privacy,
            parties=args.smpc_parties,
            noise_multiplier=args.noise_multiplier,
            clip_norm=args.clip_norm,
            secure_clip=args.secure_clip,
            epsilon_budget=args.epsilon_budget,
            delta=args.delta,
            retries=args.smpc_retries,
        ),
        dropout=args.dropout,
        transport=args.transport,
        downlink=downlink,
    )
    if args.no_smpc and args.privacy not in ("auto", "none"):
        print(f"error: --no-smpc contradicts --privacy {args.privacy}", file=sys.stderr)
        return 2
    try:
        cfg.validate()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = run_emulation(cfg, progress=not args.quiet, topo=topo)
    s = report["summary"]
    acc = s["final_accuracy"]
    pv = report["privacy"]
    eps = f", epsilon {pv['epsilon']:.3f} (delta {pv['delta']:g})" if pv["epsilon"] else ""
    print(
        f"privacy: {pv['mode']}"
        + (f" with {pv['parties']} SMPC parties" if pv["parties"] else "")
        + (f" ({pv['why']})" if pv["why"] else "")
        + eps
    )
    stopped = report.get("stopped")
    if stopped:
        print(f"stopped: {stopped['message']}")
    if not report["rounds"]:
        print(f"no round ran; report: {args.out / 'report.json'}")
        return 1 if stopped and stopped["kind"] == "smpc-failure" else 0
    print(
        f"{report['topology']['devices']} devices, {report['topology']['gateways']} gateways, "
        f"{len(report['rounds'])} rounds: final accuracy {acc:.4f}, "
        f"round latency p50 {s['round_latency_p50_s']:.2f} s"
        f" / p95 {s['round_latency_p95_s']:.2f} s "
        f"(emulated), wall {s['wall_total_s']:.1f} s"
    )
    dl = s["downlink"]
    print(
        f"downlink {report['config']['downlink']['mode']}: "
        f"{dl['device_bytes_mean'] / 1e3:.1f} KB per device download "
        f"({dl['device_delta']} delta chains, {dl['device_full']} full models)"
    )
    print(f"report: {args.out / 'report.json'}")
    return 1 if stopped and stopped["kind"] == "smpc-failure" else 0


def _add_unavailable(sub: argparse._SubParsersAction, name: str, err: ImportError) -> None:  # type: ignore[type-arg]
    """A subcommand whose dependencies are not installed: say which extra provides them."""
    p = sub.add_parser(
        name, help=f"(needs tierfl[emulation]: {err.name} is not installed)", add_help=False
    )
    p.add_argument("rest", nargs=argparse.REMAINDER)

    def fail(args: argparse.Namespace) -> int:
        print(
            f"error: 'tierfl {name}' needs the emulation extra "
            f"(pip install 'tierfl[emulation]'): {err}",
            file=sys.stderr,
        )
        return 2

    p.set_defaults(func=fail)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tierfl",
        description="Three-tier federated learning: devices -> edge gateways -> cloud.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    # An edge server installs only tierfl[gateway] (no networkx, torch or Ray): the
    # emulation commands then explain what is missing, and the gateway commands still work.
    try:
        _add_emulate(sub)
    except ImportError as e:
        _add_unavailable(sub, "emulate", e)
    try:
        from hierarchy.cli_topology import add_topology_parser

        add_topology_parser(sub)
    except ImportError as e:
        _add_unavailable(sub, "topology", e)
    from devices.client import add_device_parser
    from devices.keys import add_keys_parser
    from gateway.cli import add_gateway_parser

    add_keys_parser(sub)
    add_gateway_parser(sub)
    add_device_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
