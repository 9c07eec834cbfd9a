"""pfl-research side of bench_vs_peers: FedAvg on the shared workload.

Runs in bench/.venvs/pfl. ``FederatedAveraging`` over a ``SimulatedBackend``,
``PyTorchModel`` with local SGD and a central SGD optimizer with lr 1.0,
statistics weighted by data points (``WeightByDatapoints``), every user once
per round (``MinimizeReuseUserSampler`` with cohort = population). With
``--workers K > 1`` this process launches K pfl workers on localhost the way
pfl documents it (PFL_WORKER_ADDRESSES / PFL_WORKER_RANK, torch.distributed
gloo); each trains its share of the cohort and rank 0 writes the result.

usage: python pfl_peer.py --npz WORKLOAD.npz --rounds 5 --out RESULT.json [--workers K]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys


def _launch(workers: int) -> int:
    """Start ``workers`` copies of this script as pfl workers; wait for all of them."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "PFL_WORKER_ADDRESSES": ",".join(f"localhost:{port + r}" for r in range(workers)),
    }
    procs = [
        subprocess.Popen([sys.executable, *sys.argv], env={**env, "PFL_WORKER_RANK": str(r)})
        for r in range(workers)
    ]
    return max(p.wait() for p in procs)


def run(args: argparse.Namespace) -> None:
    # pfl sets up torch.distributed when pfl.model.pytorch is imported: env first, then import.
    import numpy as np
    import pfl
    import torch
    from peer_common import RoundLog, Workload, accuracy, build_mlp
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.aggregate.weighting import WeightByDatapoints
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.base import TrainingProcessCallback
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.data.pytorch import PyTorchTensorDataset
    from pfl.data.sampling import MinimizeReuseUserSampler
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.internal.ops.selector import get_default_framework_module
    from pfl.metrics import Metrics, Weighted
    from pfl.model.pytorch import PyTorchModel

    torch.set_num_threads(args.threads)
    w = Workload(args.npz)
    rank = get_default_framework_module().distributed.global_rank
    world = get_default_framework_module().distributed.world_size

    class MLP(torch.nn.Sequential):
        """The shared 64-64-10 MLP plus the loss/metrics hooks pfl's PyTorchModel calls."""

        def __init__(self) -> None:
            super().__init__(*build_mlp())

        def loss(self, x: torch.Tensor, y: torch.Tensor, eval: bool = False) -> torch.Tensor:
            self.eval() if eval else self.train()
            return torch.nn.functional.cross_entropy(self(x), y)

        @torch.no_grad()
        def metrics(self, x: torch.Tensor, y: torch.Tensor, eval: bool = False) -> dict:
            self.eval()
            loss = torch.nn.functional.cross_entropy(self(x), y, reduction="sum")
            return {"loss": Weighted(float(loss), len(y))}

    shuffle = np.random.default_rng(rank)

    def make_user(uid: int) -> PyTorchTensorDataset:
        # pfl batches a user's data in stored order; shuffle it like the other peers do.
        x, y = w.client(uid)
        perm = torch.from_numpy(shuffle.permutation(len(y)))
        return PyTorchTensorDataset((x[perm], y[perm]), user_id=uid)

    np.random.seed(0)  # pfl draws its sampling seeds from numpy's global state; same on all ranks
    users = list(range(w.num_clients))
    # No user_id_to_weight: it only balances workers when users differ a lot in size, and
    # here they hold 1..45 samples; without it pfl shards the cohort in-process (faster).
    train_data = FederatedDataset(make_user, MinimizeReuseUserSampler(users))

    net = MLP()
    model = PyTorchModel(
        net,
        local_optimizer_create=torch.optim.SGD,
        central_optimizer=torch.optim.SGD(net.parameters(), lr=1.0),
    )
    log = RoundLog()

    class Stamp(TrainingProcessCallback):
        def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
            log.stamp(accuracy(net, w))
            return False, Metrics()

    backend = SimulatedBackend(
        training_data=train_data, val_data=None, postprocessors=[WeightByDatapoints()]
    )
    FederatedAveraging().run(
        algorithm_params=NNAlgorithmParams(
            central_num_iterations=args.rounds,
            evaluation_frequency=args.rounds,
            train_cohort_size=w.num_clients,
            val_cohort_size=0,
        ),
        backend=backend,
        model=model,
        model_train_params=NNTrainHyperParams(
            local_num_epochs=w.epochs, local_learning_rate=w.lr, local_batch_size=w.batch_size
        ),
        model_eval_params=NNEvalHyperParams(local_batch_size=None),
        callbacks=[Stamp()],
    )

    if rank == 0:
        config = (
            f"pfl {pfl.__version__} SimulatedBackend, {world} worker process(es) x "
            f"{args.threads} torch thread(s), FederatedAveraging + WeightByDatapoints, "
            "central SGD lr 1.0, cohort = all users"
        )
        log.write(args.out, "pfl", pfl.__version__, config)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--npz", required=True)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", required=True)
    ap.add_argument("--workers", type=int, default=1, help="pfl worker processes")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    args = ap.parse_args()
    if args.workers > 1 and "PFL_WORKER_RANK" not in os.environ:
        sys.exit(_launch(args.workers))
    run(args)


if __name__ == "__main__":
    main()
