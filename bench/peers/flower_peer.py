"""Flower (flwr[simulation]) side of bench_vs_peers: FedAvg on the shared workload.

Runs in bench/.venvs/flower. Message API (ServerApp + ClientApp + strategy
FedAvg) on the Ray simulation engine, one Ray actor per CPU (client resources
num_cpus=1). Every client is sampled every round; the server evaluates the
global model on the test split after each round (``evaluate_fn``), which is
where the per-round wall-clock stamps come from.

usage: python flower_peer.py --npz WORKLOAD.npz --rounds 5 --out RESULT.json
"""

from __future__ import annotations

import argparse
import os
from functools import cache

import flwr
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation
from peer_common import RoundLog, Workload, accuracy, build_mlp, train_local

client_app = ClientApp()


@cache
def _workload(path: str) -> Workload:
    """Loaded once per Ray actor process, like a dataset cached on a real device."""
    torch.set_num_threads(1)
    return Workload(path)


@cache
def _model() -> torch.nn.Module:
    return build_mlp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = msg.content["config"]
    w = _workload(str(cfg["npz"]))
    pid = int(context.node_config["partition-id"])
    x, y = w.client(pid)
    model = _model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    n = train_local(model, x, y, w, seed=int(cfg["server-round"]) * 1_000_003 + pid)
    reply = RecordDict(
        {"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord({"num-examples": n})}
    )
    return Message(reply, reply_to=msg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--npz", required=True)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    w = Workload(args.npz)
    log = RoundLog()
    cpus = os.cpu_count() or 1
    config = (
        f"flwr {flwr.__version__} run_simulation, Ray backend, {cpus} actors "
        "(client_resources num_cpus=1), Message API FedAvg weighted by num-examples, "
        "fraction_train=1, no client-side evaluation, server-side test evaluation each round"
    )

    server_app = ServerApp()

    @server_app.main()
    def server(grid: Grid, context: Context) -> None:
        model = build_mlp()

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            model.load_state_dict(arrays.to_torch_state_dict())
            acc = accuracy(model, w)
            if server_round > 0:
                log.stamp(acc)
            return MetricRecord({"accuracy": acc})

        strategy = FedAvg(
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=w.num_clients,
            min_available_nodes=w.num_clients,
        )
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(model.state_dict()),
            num_rounds=args.rounds,
            train_config=ConfigRecord({"npz": args.npz}),
            evaluate_fn=evaluate,
        )

    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=w.num_clients,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            # "local": a private Ray instance; a bare ray.init() would join any
            # cluster someone started on this machine with `ray start`.
            "init_args": {"address": "local", "num_cpus": cpus},
        },
    )
    if len(log.round_end) != args.rounds:
        raise SystemExit(f"flower_peer: expected {args.rounds} rounds, saw {len(log.round_end)}")
    log.write(args.out, "flower", flwr.__version__, config)


if __name__ == "__main__":
    # Ray pickles the ClientApp into every task. Imported as a module (as `flwr run` does)
    # its functions pickle by reference; defined in __main__ they would go by value.
    import flower_peer

    flower_peer.main()
