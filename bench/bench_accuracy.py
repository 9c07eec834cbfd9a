"""Learning quality: federated training over a topology vs the same model trained centrally.

Both runs in one process run: the centralized baseline trains the same model on
the pooled training data of every device (plain SGD, same batch size and
learning rate) and is evaluated on the same global test set (the union of the
devices' local test splits for HAPT). Prints both accuracies and the gap.
Target: the federated model within 3 points of centralized.

    .venv/bin/python bench/bench_accuracy.py            # HAPT on metro-5g, FedAvgM
    .venv/bin/python bench/bench_accuracy.py --strategy fedavg --rounds 100
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hierarchy.emulate import EmulationConfig, LocalConfig, run_emulation  # noqa: E402


def centralized(
    dataset: str,
    num_devices: int,
    model: str,
    epochs: int,
    batch: int,
    lr: float,
    seed: int,
    schedule: str = "constant",
    final: float = 0.1,
    max_grad_norm: float | None = None,
    warmup_fraction: float = 0.0,
) -> list[float]:
    """Per-epoch test accuracy of the same model trained on the pooled data.

    ``schedule``/``final`` decay the learning rate over the epochs exactly as
    the federated run decays it over rounds, so a schedule that helps FedAvg
    is given to the baseline too; ``max_grad_norm`` clips its SGD steps as
    the devices' steps are clipped. ``warmup_fraction`` ramps the rate
    linearly over that share of all its SGD steps, step by step, as the
    federated run ramps it over its first ``--lr-warmup-rounds`` rounds (the
    same share of training; epochs are too coarse for a ramp of a few percent).
    """
    import torch

    from cloud.evaluation import evaluate
    from devices.datasets import load_federated
    from devices.lr_schedule import scheduled_lr
    from devices.models import build_model, init_params
    from devices.training import LocalTrainingConfig, batch_plan, num_steps, train_device

    # One thread: the baseline takes ~20 s either way, and a second thread only
    # competes with whatever else shares this 2-core box (float summation order, and
    # so the last digits, can differ from a 2-thread run).
    torch.set_num_threads(1)
    ds = load_federated(dataset, num_devices, seed=seed)
    x, y = ds.pooled_train()
    net = build_model(model, ds.input_shape, ds.num_classes)
    params = init_params(model, ds.input_shape, ds.num_classes, seed)
    accs = []
    warm = round(warmup_fraction * epochs * num_steps(len(y), LocalTrainingConfig(1, batch)))
    done = 0  # SGD steps taken so far
    for ep in range(epochs):
        ep_lr = scheduled_lr(lr, ep + 1, epochs, schedule, final)
        step = LocalTrainingConfig(1, batch, ep_lr, max_grad_norm=max_grad_norm)
        if done >= warm:
            r = train_device(net, params, x, y, step, seed=seed + ep)
            params = params + r.delta
            done += r.steps
        else:
            # The same batches train_device would draw, one step at a time, so each can
            # have its own warm-up rate.
            for idx in batch_plan(len(y), step, seed + ep):
                ramp = min(1.0, (done + 1) / warm)
                one = LocalTrainingConfig(1, len(idx), ep_lr * ramp, max_grad_norm=max_grad_norm)
                params = params + train_device(net, params, x[idx], y[idx], one, seed=0).delta
                done += 1
        accs.append(evaluate(net, params, ds.x_test, ds.y_test).accuracy)
    return accs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--topology", type=Path, default=ROOT / "topologies" / "metro-5g.graphml")
    ap.add_argument("--dataset", default="har")
    ap.add_argument("--model", default="cnn1d")
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=5, help="local epochs per round")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--strategy", default="fedavgm")
    ap.add_argument(
        "--lr-schedule",
        default="constant",
        help="client lr over rounds (constant, cosine, exp, inverse); the "
        "centralized baseline gets the same shape over its epochs",
    )
    ap.add_argument(
        "--lr-final",
        type=float,
        default=0.1,
        help="last round's lr as a fraction of --lr (schedules other than constant)",
    )
    ap.add_argument(
        "--max-grad-norm",
        type=float,
        default=None,
        help="clip every local SGD step's gradient to this L2 norm; the "
        "centralized baseline's steps are clipped the same",
    )
    ap.add_argument(
        "--lr-warmup-rounds",
        type=int,
        default=0,
        help="ramp the client lr linearly over the first rounds; the "
        "centralized baseline ramps over the same share of its steps",
    )
    ap.add_argument(
        "--central-lr",
        type=float,
        default=None,
        help="the centralized baseline's peak lr (default: --lr). A client lr "
        "that FedAvg's averaging tolerates can be too large for one "
        "model on pooled data; this keeps the baseline at its own best "
        "rate (same schedule shape and clipping) instead of weakening it",
    )
    ap.add_argument("--central-epochs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", default="ray", choices=("ray", "local"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from hierarchy.topology import load_topology

    n_dev = len(load_topology(args.topology).devices)
    t0 = time.perf_counter()
    central_lr = args.lr if args.central_lr is None else args.central_lr
    central = centralized(
        args.dataset,
        n_dev,
        args.model,
        args.central_epochs,
        args.batch_size,
        central_lr,
        args.seed,
        args.lr_schedule,
        args.lr_final,
        args.max_grad_norm,
        args.lr_warmup_rounds / args.rounds,
    )
    t_central = time.perf_counter() - t0
    cfg = EmulationConfig(
        topology=args.topology,
        rounds=args.rounds,
        dataset=args.dataset,
        seed=args.seed,
        model=args.model,
        local=LocalConfig(args.epochs, args.batch_size, args.lr, max_grad_norm=args.max_grad_norm),
        strategy=args.strategy,
        backend=args.backend,
        plots=False,
        eval_every=5,
        lr_schedule=args.lr_schedule,
        lr_final=args.lr_final,
        lr_warmup_rounds=args.lr_warmup_rounds,
    )
    t0 = time.perf_counter()
    report = run_emulation(cfg, progress=False)
    t_fed = time.perf_counter() - t0
    fed = report["summary"]["final_accuracy"]
    # "Final" for centralized is its last epoch, like the federated run's last round.
    gap = (central[-1] - fed) * 100
    print(
        f"dataset {args.dataset}, model {args.model}, {n_dev} devices "
        f"({report['topology']['name']})"
    )
    sched = "" if args.lr_schedule == "constant" else f" ({args.lr_schedule} to x{args.lr_final})"
    if args.max_grad_norm is not None:
        sched += f", grad norm clipped to {args.max_grad_norm}"
    if args.lr_warmup_rounds:
        sched += f", linear warm-up over {args.lr_warmup_rounds} rounds"
    print(
        f"centralized  {args.central_epochs} epochs SGD lr {central_lr}{sched} "
        f"batch {args.batch_size}: "
        f"final {central[-1]:.4f} (best {max(central):.4f}), wall {t_central:.1f} s"
    )
    print(
        f"federated    {args.strategy}, {args.rounds} rounds x {args.epochs} local epochs, "
        f"lr {args.lr}{sched}: "
        f"final {fed:.4f} (best {report['summary']['best_accuracy']:.4f}), "
        f"emulated {report['summary']['emulated_time_s']:.1f} s, wall {t_fed:.1f} s"
    )
    print(
        f"gap centralized - federated: {gap:+.2f} points (target <= 3): "
        f"{'met' if gap <= 3 else 'NOT met'}"
    )
    if args.json:
        curve = [(r["round"], r["accuracy"]) for r in report["rounds"] if r["accuracy"] is not None]
        args.json.write_text(
            json.dumps(
                {
                    "centralized": central,
                    "federated": fed,
                    "federated_curve": curve,
                    "gap_points": gap,
                    "config": vars(args),
                },
                default=str,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
