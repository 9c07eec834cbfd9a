"""The actor tree's three shells: cohort trainers, gateway hosts, the coordinator.

Plain classes (the backend makes Ray actors of them, or keeps them in-process);
each wraps pure logic from its tier: ``devices.cohort`` for training,
``gateway.partial_aggregate`` for the edge, ``cloud.coordinator`` for the cloud.
Data never travels: every actor rebuilds the same deterministic federated
split from its ``DatasetSpec`` and keeps only what it needs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from gateway.partial_aggregate import PartialAggregate
from hierarchy.backend import Handle, gather
from hierarchy.timeline import close_gateway, device_timing, gateway_uplink, training_flops
from hierarchy.topology import DeviceNode, GatewayNode

# Bytes a model download adds around the float32 parameters (version hash, length, ETag).
MODEL_HEADER_BYTES = 96


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    num_devices: int
    seed: int
    alpha: float
    sizes: tuple[int, ...] | None = None

    def load(self) -> Any:
        from devices.datasets import load_federated

        return load_federated(
            self.name, self.num_devices, seed=self.seed, alpha=self.alpha, sizes=self.sizes
        )


def device_seed(seed: int, round_: int, index: int) -> int:
    """Per-device, per-round training seed, independent of which process trains it."""
    return int(np.random.SeedSequence([seed, round_, index, 7]).generate_state(1)[0])


def model_nbytes(num_params: int) -> int:
    return 4 * num_params + MODEL_HEADER_BYTES


def update_wire_bytes(
    device: str, round_: int, base: str, samples: int, delta: np.ndarray, timestamp: float
) -> int:
    """Exact size of the signed envelope this device would send (f32 codec).

    Built with the real codec and CBOR encoder, so ids, hashes and framing are counted
    as on the wire; only the signing itself is skipped (its size is fixed).
    """
    from devices.codecs import encode
    from devices.envelope import PROTOCOL_VERSION, Envelope, signed_size

    if not np.isfinite(delta).all():
        # A diverged device's f32 payload has the same length; the gateway will refuse it.
        delta = np.zeros_like(delta)
    env = Envelope(
        PROTOCOL_VERSION,
        device,
        round_,
        base,
        bytes(16),
        timestamp,
        max(1, samples),
        [encode("f32", delta)],
    )
    return signed_size(env)


def where() -> dict[str, Any]:
    """Which process and Ray node an actor landed on (for the report's placement section)."""
    import os
    import socket
    import sys

    node = None
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            node = ray.get_runtime_context().get_node_id()
    return {"pid": os.getpid(), "host": socket.gethostname(), "node": node}


class Placed:
    """Mixin: every actor can say where it runs."""

    def where(self) -> dict[str, Any]:
        return where()


class CohortHost(Placed):
    """Trains a pool of logical devices, vectorized, and delivers their updates to gateways."""

    def __init__(
        self,
        spec: DatasetSpec,
        model_name: str,
        device_indices: Sequence[int],
        devices: Sequence[DeviceNode],
        gateways: Mapping[str, Handle],
        threads: int = 1,
    ) -> None:
        import torch

        from devices.cohort import CohortTrainer
        from devices.models import build_model, flops_per_sample

        torch.set_num_threads(threads)
        ds = spec.load()
        self._indices = list(device_indices)
        self._pos = {g: i for i, g in enumerate(self._indices)}
        self._nodes = list(devices)
        self._data = [(ds.devices[i].x_train, ds.devices[i].y_train) for i in self._indices]
        self._gateways = dict(gateways)
        model = build_model(model_name, ds.input_shape, ds.num_classes)
        self._flops = flops_per_sample(model, ds.input_shape)
        self._trainer = CohortTrainer(model)

    def train_round(
        self,
        round_: int,
        params: np.ndarray,
        cfg: Any,
        selected: Sequence[int],
        gateway_start: Mapping[str, float],
        seed: int,
    ) -> dict[str, np.ndarray]:
        """Train the selected devices (global indices), submit updates, return per-device stats."""
        from devices.training import batch_plan

        mine = [i for i in selected if i in self._pos]
        if not mine:
            return _empty_stats()
        pos = [self._pos[i] for i in mine]
        seeds = [device_seed(seed, round_, i) for i in mine]
        res = self._trainer.train(params, [self._data[p] for p in pos], cfg, seeds)
        n = len(mine)
        stats = {
            "device": np.asarray(mine, dtype=np.int64),
            "samples": res.num_samples.astype(np.int64),
            "steps": res.steps.astype(np.int64),
            "loss": res.loss.astype(np.float64),
            "download_s": np.zeros(n),
            "compute_s": np.zeros(n),
            "upload_s": np.zeros(n),
            "start_s": np.zeros(n),
            "arrival_s": np.zeros(n),
            "update_bytes": np.zeros(n, dtype=np.int64),
            "model_bytes": np.zeros(n, dtype=np.int64),
            "retransmitted": np.zeros(n, dtype=np.int64),
        }
        m_bytes = model_nbytes(params.shape[0])
        from cloud.model_store import model_hash

        base = model_hash(params)
        by_gateway: dict[str, list[int]] = {}
        for k, (i, p, s) in enumerate(zip(mine, pos, seeds, strict=True)):
            node = self._nodes[p]
            processed = sum(len(b) for b in batch_plan(int(res.num_samples[k]), cfg, s))
            u_bytes = update_wire_bytes(
                node.id,
                round_,
                base,
                int(res.num_samples[k]),
                res.deltas[k],
                gateway_start[node.gateway],
            )
            t = device_timing(
                node,
                i,
                seed=seed,
                round_=round_,
                start_s=gateway_start[node.gateway],
                model_bytes=m_bytes,
                update_bytes=u_bytes,
                work_flops=training_flops(self._flops, processed),
            )
            stats["download_s"][k] = t.download_s
            stats["compute_s"][k] = t.compute_s
            stats["upload_s"][k] = t.upload_s
            stats["start_s"][k] = t.start_s
            stats["arrival_s"][k] = t.arrival_s
            stats["update_bytes"][k] = u_bytes
            stats["model_bytes"][k] = m_bytes
            stats["retransmitted"][k] = t.retransmitted_packets
            by_gateway.setdefault(node.gateway, []).append(k)
        futures = []
        for g, ks in by_gateway.items():
            futures.append(
                self._gateways[g].call(
                    "submit",
                    round_,
                    g,
                    [self._nodes[pos[k]].id for k in ks],
                    res.deltas[ks],
                    res.num_samples[ks].astype(np.float64),
                    stats["arrival_s"][ks],
                )
            )
        gather(futures)
        return stats


def _empty_stats() -> dict[str, np.ndarray]:
    keys_i = ("device", "samples", "steps", "update_bytes", "model_bytes", "retransmitted")
    keys_f = ("loss", "download_s", "compute_s", "upload_s", "start_s", "arrival_s")
    out: dict[str, np.ndarray] = {k: np.zeros(0, dtype=np.int64) for k in keys_i}
    out.update({k: np.zeros(0, dtype=np.float64) for k in keys_f})
    return out


@dataclass
class _Submission:
    devices: list[str]
    deltas: np.ndarray
    weights: np.ndarray
    arrivals: np.ndarray


class GatewayHost(Placed):
    """Hosts several logical gateways: buffers their devices' updates, closes rounds."""

    def __init__(
        self,
        gateways: Sequence[GatewayNode],
        indices: Mapping[str, int],
        num_params: int,
        seed: int,
    ) -> None:
        self._gateways = {g.id: g for g in gateways}
        self._index = dict(indices)
        self._num_params = num_params
        self._seed = seed
        self._buffer: dict[tuple[int, str], list[_Submission]] = {}

    def submit(
        self,
        round_: int,
        gateway: str,
        devices: list[str],
        deltas: np.ndarray,
        weights: np.ndarray,
        arrivals: np.ndarray,
    ) -> int:
        if gateway not in self._gateways:
            raise KeyError(f"gateway {gateway!r} is not hosted here")
        self._buffer.setdefault((round_, gateway), []).append(
            _Submission(devices, deltas, weights, arrivals)
        )
        return len(devices)

    def close(
        self, round_: int, deadline_s: float | None, starts: Mapping[str, float]
    ) -> list[dict[str, Any]]:
        """Close every hosted gateway's round: aggregate on-time updates, time the uplink."""
        out = []
        for g, node in self._gateways.items():
            subs = self._buffer.pop((round_, g), [])
            devices = [d for s in subs for d in s.devices]
            arrivals = [float(a) for s in subs for a in s.arrivals]
            closed = close_gateway(arrivals, deadline_s, starts[g])
            partial = PartialAggregate.empty(g, round_, self._num_params)
            rejected = 0
            if closed.included and subs:
                deltas = np.concatenate([s.deltas for s in subs])
                weights = np.concatenate([s.weights for s in subs])
                inc = np.asarray(closed.included)
                # A diverged device (NaN/Inf) is refused here, as a real gateway would, so one
                # bad update cannot poison the global model.
                finite = np.isfinite(deltas[inc]).all(axis=1)
                rejected = int((~finite).sum())
                inc = inc[finite]
                partial.add_batch([devices[i] for i in inc], deltas[inc], weights[inc])
            uplink = gateway_uplink(
                node, self._index[g], seed=self._seed, round_=round_, nbytes=partial.nbytes
            )
            out.append(
                {
                    "partial": partial,
                    "close_s": closed.close_s,
                    "uplink_s": uplink,
                    "uplink_bytes": partial.nbytes,
                    "stragglers": len(closed.stragglers),
                    "rejected": rejected,
                }
            )
        # Drop buffers of rounds that were never closed (a crashed driver loop).
        for key in [k for k in self._buffer if k[0] < round_]:
            del self._buffer[key]
        return out


class CoordinatorHost(Placed):
    """The cloud coordinator: applies partial aggregates, versions, evaluates."""

    def __init__(
        self,
        spec: DatasetSpec,
        model_name: str,
        strategy: str,
        server_lr: float,
        momentum: float,
        seed: int,
        threads: int = 1,
    ) -> None:
        import torch

        from cloud.coordinator import Coordinator
        from cloud.strategy import make_strategy
        from devices.models import build_model, init_params

        torch.set_num_threads(threads)
        ds = spec.load()
        self._x_test, self._y_test = ds.x_test, ds.y_test
        self._model = build_model(model_name, ds.input_shape, ds.num_classes)
        initial = init_params(model_name, ds.input_shape, ds.num_classes, seed)
        self._coord = Coordinator(
            initial, make_strategy(strategy, server_lr=server_lr, momentum=momentum)
        )

    def info(self) -> dict[str, Any]:
        return {"num_params": int(self._coord.params.shape[0]), **asdict(self._coord.version)}

    def params(self) -> np.ndarray:
        return self._coord.params

    def apply(self, round_: int, partials: Sequence[PartialAggregate]) -> dict[str, Any]:
        applied = self._coord.apply(round_, partials)
        return {
            "version": applied.version.version,
            "hash": applied.version.hash,
            "devices": applied.devices,
            "gateways": applied.gateways,
            "total_weight": applied.total_weight,
            "update_norm": applied.update_norm,
        }

    def evaluate(self) -> dict[str, float]:
        from cloud.evaluation import evaluate

        ev = evaluate(self._model, self._coord.params, self._x_test, self._y_test)
        return {"accuracy": ev.accuracy, "loss": ev.loss, "samples": ev.samples}
