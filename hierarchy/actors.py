"""The actor tree's three shells: cohort trainers, gateway hosts, the coordinator.

Plain classes (the backend makes Ray actors of them, or keeps them in-process);
each wraps pure logic from its tier: ``devices.cohort`` for training,
``gateway.partial_aggregate`` for the edge, ``cloud.coordinator`` for the cloud.
Data never travels: every actor rebuilds the same deterministic federated
split from its ``DatasetSpec`` and keeps only what it needs.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from cloud.downlink import DownlinkConfig
from devices.codecs import Encoded, max_encoded_size
from devices.delta_chain import FRAME_BYTES
from devices.held_model import HeldModels, RoundDownlink
from devices.masking import clip_l2
from gateway.partial_aggregate import PartialAggregate
from hierarchy.backend import Handle, gather
from hierarchy.privacy import DevicePrivacy, GatewayPrivacy, clip_check
from hierarchy.timeline import (
    close_gateway,
    device_timing,
    gateway_uplink,
    staleness_weight,
    training_flops,
)
from hierarchy.topology import DeviceNode, GatewayNode
from hierarchy.uplink import ENVELOPE_OVERHEAD_BYTES, UplinkConfig, choose_codec, step_cap

if TYPE_CHECKING:
    from hierarchy.transport import DeviceTransport, GatewayTransport

# Bytes a model download adds around the float32 parameters (version hash, length, ETag).
MODEL_HEADER_BYTES = FRAME_BYTES
# Codecs whose payload size depends only on the vector's length (not on its values).
DENSE_CODECS = frozenset({"f32", "f16", "int8", "int4"})


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


DENSE = frozenset({"f32", "f16"})
_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def device_seed(seed: int, round_: int, index: int) -> int:
    """Per-device, per-round training seed, independent of which process trains it.

    SplitMix64 over (seed, round, index): well mixed and ~10x cheaper than a
    SeedSequence, which matters at thousands of devices per round.
    """
    return _splitmix64(_splitmix64(_splitmix64(seed) ^ round_) ^ index) >> 1


def model_nbytes(num_params: int) -> int:
    return 4 * num_params + MODEL_HEADER_BYTES


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
        transport: DeviceTransport | None = None,
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
        self._feedback: dict[str, Any] = {}  # device id -> ErrorFeedback (its residual)
        self._models = HeldModels()  # the version each hosted device holds
        # device-shares: each device's long-term X25519 sealing key (made on first
        # use), whose cached per-party box keys make a round's sealing ~2 us a box.
        self._sealing: dict[str, Any] = {}
        # Socket transports: the devices' keys and real clients (None: direct hand-over).
        self._links: Any = None
        if transport is not None and transport.kind != "direct":
            from hierarchy.transport_devices import DeviceUplinks

            self._links = DeviceUplinks(transport, [n.id for n in self._nodes])

    def train_round(
        self,
        round_: int,
        downlink: RoundDownlink,
        cfg: Any,
        selected: Sequence[int],
        gateway_start: Mapping[str, float],
        seed: int,
        uplink: UplinkConfig | None = None,
        deadline_s: float | None = None,
        adaptive_work: bool = False,
        privacy: DevicePrivacy | None = None,
        clock_s: float = 0.0,
    ) -> dict[str, np.ndarray]:
        """Train the selected devices (global indices), submit updates, return per-device stats.

        Each device first downloads what ``downlink`` has for the version it holds
        (the delta chain from it, or the full model), rebuilds the model from those
        bytes and verifies its hash; its download is charged their exact size. Each
        then compresses its update with its codec (adding its error-feedback residual
        first), and the exact signed-envelope size is what its uplink is charged
        for. With ``adaptive_work`` and a deadline, slow devices train only as many
        steps as let them make the deadline. ``privacy``: clip to C first (DP), and
        in ``device-shares`` mode mask and seal instead of compressing.
        ``clock_s`` is the emulated time at which the round started: envelopes are
        stamped with it plus their gateway's model arrival. With a socket transport
        each device's envelope is really signed and sent (``_send``). Besides the
        per-device arrays, the result has ``transport_wall_s``: one entry, the wall
        seconds the hand-over to the gateways took.
        """
        uplink = uplink or UplinkConfig()
        privacy = privacy or DevicePrivacy("none")
        party_keys = None
        if privacy.mode == "device-shares":
            from devices.masking import PartyPublicKeys

            party_keys = PartyPublicKeys.from_hex(privacy.party_keys)
        mine = [i for i in selected if i in self._pos]
        if not mine:
            return {**_empty_stats(), "transport_wall_s": np.zeros(1)}
        pos = [self._pos[i] for i in mine]
        seeds = [device_seed(seed, round_, i) for i in mine]
        got = self._models.receive(mine, downlink)
        params = got.params
        num_params = int(params.shape[0])
        codecs = [choose_codec(self._nodes[p], num_params, uplink) for p in pos]
        caps: list[int | None] | None = None
        if adaptive_work and deadline_s is not None:
            caps = []
            for p, (codec, cparams), down in zip(pos, codecs, got.nbytes, strict=True):
                node = self._nodes[p]
                up = max_encoded_size(codec, num_params, **cparams) + ENVELOPE_OVERHEAD_BYTES
                comm = 2 * node.link.latency_ms / 1e3 + 8 * (
                    int(down) / (node.link.down_mbps * 1e6) + up / (node.link.up_mbps * 1e6)
                )
                caps.append(
                    step_cap(
                        node,
                        start_s=gateway_start[node.gateway],
                        deadline_s=deadline_s,
                        forward_flops=self._flops,
                        batch_size=cfg.batch_size,
                        comm_s=comm,
                    )
                )
        res = self._trainer.train(params, [self._data[p] for p in pos], cfg, seeds, caps)
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
            "model_bytes": got.nbytes.copy(),
            "download_full": got.full.astype(np.int64),
            "download_steps": got.steps.copy(),
            "retransmitted": np.zeros(n, dtype=np.int64),
            "transport_rtt_s": np.zeros(n),
            "transport_failed": np.zeros(n, dtype=np.int64),
        }
        base = downlink.hash
        by_gateway: dict[str, list[int]] = {}
        updates: list[Any] = []
        sealed: list[bytes] = []
        weights = np.ones(n) if privacy.uniform_weights else res.num_samples.astype(np.float64)
        boxes = 0
        if party_keys is not None:
            from devices.masking import SealingKey, masked_update_bytes, seeded_parties

            boxes = len(seeded_parties(party_keys.parties, privacy.seal_to_party0))
            for p in pos:  # each device's long-term sealing key, made on first use
                if self._nodes[p].id not in self._sealing:
                    self._sealing[self._nodes[p].id] = SealingKey()
        plain: list[Encoded] | None = None
        if (
            codecs
            and party_keys is None
            and privacy.clip_norm is None
            and all(c == "f32" and not cp for c, cp in codecs)
        ):
            from devices.codecs import encode_f32_rows

            # Lossless: the same bytes each device would encode alone, in one pass.
            plain = encode_f32_rows(res.deltas)
        for k, (i, p) in enumerate(zip(mine, pos, strict=True)):
            node = self._nodes[p]
            if party_keys is not None:
                # Masked ring values cannot be compressed: the update is P int64 + the
                # sealed seeds, inside a signed envelope.
                u_bytes = masked_update_bytes(node.id, num_params, boxes) + ENVELOPE_OVERHEAD_BYTES
            else:
                delta = res.deltas[k]
                if privacy.clip_norm is not None:
                    delta = clip_l2(delta, privacy.clip_norm)
                codec, cparams = codecs[k]
                # Stochastic rounding needs randomness; dense codecs do not (skip the ~8 µs).
                rng = np.random.default_rng([seed, round_, i, 11]) if codec not in DENSE else None
                enc = (
                    plain[k]
                    if plain is not None
                    else self._compress(node.id, delta, codec, cparams, rng, uplink)
                )
                updates.append(enc)
                stamp = clock_s + gateway_start[node.gateway]
                samples = int(res.num_samples[k])
                u_bytes = envelope_bytes(node.id, round_, base, samples, enc, stamp)
                if self._links is not None:
                    sealed.append(
                        self._links.seal(node.id, round_, base, samples, enc, VIRTUAL_EPOCH + stamp)
                    )
                    if len(sealed[-1]) != u_bytes:  # the size the virtual clock charged is exact
                        raise RuntimeError(
                            f"{node.id}: sealed envelope has {len(sealed[-1])} bytes, "
                            f"envelope_bytes() said {u_bytes}"
                        )
            processed = samples_processed(
                int(res.num_samples[k]), int(res.steps[k]), cfg.batch_size
            )
            t = device_timing(
                node,
                i,
                seed=seed,
                round_=round_,
                start_s=gateway_start[node.gateway],
                model_bytes=int(got.nbytes[k]),
                update_bytes=u_bytes,
                work_flops=training_flops(self._flops, processed),
            )
            stats["download_s"][k] = t.download_s
            stats["compute_s"][k] = t.compute_s
            stats["upload_s"][k] = t.upload_s
            stats["start_s"][k] = t.start_s
            stats["arrival_s"][k] = t.arrival_s
            stats["update_bytes"][k] = u_bytes
            stats["retransmitted"][k] = t.retransmitted_packets
            by_gateway.setdefault(node.gateway, []).append(k)
        masked = None
        if party_keys is not None:
            from devices.masking import mask_cohort

            # One gateway's devices at a time: masked in one pass, and each block
            # goes to its gateway host as it is (no gather, no copy).
            masked = {}
            for g, ks in by_gateway.items():
                ids = [self._nodes[pos[k]].id for k in ks]
                masked[g] = mask_cohort(
                    ids,
                    round_,
                    res.deltas[ks],
                    party_keys,
                    weights=weights[ks],
                    clip_norm=privacy.clip_norm,
                    seal_to_party0=privacy.seal_to_party0,
                    senders=[self._sealing[d] for d in ids],
                )
        t0 = time.perf_counter()
        if self._links is not None:
            if party_keys is not None:
                raise RuntimeError("device-shares updates cannot travel in codec envelopes")
            nodes = [self._nodes[p] for p in pos]
            self._send(round_, nodes, sealed, by_gateway, weights, stats)
        else:
            futures = []
            for g, ks in by_gateway.items():
                payload = masked[g] if masked is not None else [updates[k] for k in ks]
                futures.append(
                    self._gateways[g].call(
                        "submit",
                        round_,
                        g,
                        [self._nodes[pos[k]].id for k in ks],
                        payload,
                        weights[ks],
                        stats["arrival_s"][ks],
                    )
                )
            gather(futures)
        stats["transport_wall_s"] = np.array([time.perf_counter() - t0])
        return stats

    def _send(
        self,
        round_: int,
        nodes: Sequence[DeviceNode],
        sealed: Sequence[bytes],
        by_gateway: Mapping[str, list[int]],
        weights: np.ndarray,
        stats: dict[str, np.ndarray],
    ) -> None:
        """Upload every sealed envelope over the socket transport, then tell each gateway host
        when (on the virtual clock) its devices' updates arrived.

        The gateway host buffers only what its intake accepted; the arrival times
        travel out of band because the virtual clock, not the socket, says when an
        update reached its gateway, and so do the round's aggregation weights (the
        sample counts the devices signed, or 1 each under DP's uniform weighting).
        Devices that heard no answer are counted in ``transport_failed`` (the
        gateway may still have accepted them).
        """
        from hierarchy.transport_devices import Upload

        results = self._links.send(
            [Upload(n.gateway, n.id, env) for n, env in zip(nodes, sealed, strict=True)]
        )
        stats["transport_rtt_s"] = np.array([r.rtt_s for r in results])
        stats["transport_failed"] = np.array([r.status == "failed" for r in results], np.int64)
        gather(
            [
                self._gateways[g].call(
                    "deliver",
                    round_,
                    g,
                    [nodes[k].id for k in ks],
                    weights[ks],
                    stats["arrival_s"][ks],
                )
                for g, ks in by_gateway.items()
            ]
        )

    def stop_transport(self) -> None:
        """Close the devices' real clients (socket transports; a no-op for direct)."""
        if self._links is not None:
            self._links.close()
            self._links = None

    def cycle_profile(
        self, cfg: Any, uplink: UplinkConfig, num_params: int
    ) -> dict[str, np.ndarray]:
        """Asynchronous mode: what each hosted device's cycle costs, known before training.

        Per device (global index): training samples, exact compute seconds of one
        cycle (its step count is fixed by its data and ``cfg``), and a lower bound
        on its update's payload bytes (exact for dense codecs, 0 for top-k whose
        index coding varies). The driver turns these into lower bounds on arrivals.
        """
        from devices.training import num_steps

        n = len(self._indices)
        out = {
            "device": np.asarray(self._indices, dtype=np.int64),
            "samples": np.zeros(n, dtype=np.int64),
            "compute_s": np.zeros(n),
            "min_update_bytes": np.zeros(n, dtype=np.int64),
        }
        for p, node in enumerate(self._nodes):
            count = len(self._data[p][1])
            processed = samples_processed(count, num_steps(count, cfg), cfg.batch_size)
            out["samples"][p] = count
            out["compute_s"][p] = training_flops(self._flops, processed) / node.flops
            codec, cparams = choose_codec(node, num_params, uplink)
            if codec in DENSE_CODECS:
                out["min_update_bytes"][p] = max_encoded_size(codec, num_params, **cparams)
        return out

    def train_devices(
        self,
        params: np.ndarray,
        devices: Sequence[int],
        cycles: Sequence[int],
        starts: Sequence[float],
        cfg: Any,
        seed: int,
        uplink: UplinkConfig | None = None,
    ) -> dict[str, np.ndarray]:
        """Asynchronous mode: train these devices (global indices) from one model version.

        Device ``devices[k]`` runs its cycle ``cycles[k]``, started at virtual time
        ``starts[k]``; the cycle number plays the sync round's part in every seeded
        stream (training seed, codec randomness, link jitter and loss), so results
        do not depend on which process trains it or with whom. Each update is
        compressed (with the device's error-feedback residual), timed with its exact
        envelope size, and handed to its gateway host keyed by (device, cycle).
        """
        from cloud.model_store import model_hash

        uplink = uplink or UplinkConfig()
        if not len(devices) == len(cycles) == len(starts):
            raise ValueError("train_devices: devices, cycles and starts differ in length")
        if not devices:
            return {**_empty_stats(), "cycle": np.zeros(0, dtype=np.int64)}
        pos = [self._pos[int(i)] for i in devices]
        seeds = [device_seed(seed, int(c), int(i)) for i, c in zip(devices, cycles, strict=True)]
        num_params = int(params.shape[0])
        m_bytes = model_nbytes(num_params)
        res = self._trainer.train(params, [self._data[p] for p in pos], cfg, seeds)
        n = len(devices)
        stats = {
            "device": np.asarray(devices, dtype=np.int64),
            "cycle": np.asarray(cycles, dtype=np.int64),
            "samples": res.num_samples.astype(np.int64),
            "steps": res.steps.astype(np.int64),
            "loss": res.loss.astype(np.float64),
            "download_s": np.zeros(n),
            "compute_s": np.zeros(n),
            "upload_s": np.zeros(n),
            "start_s": np.asarray(starts, dtype=np.float64),
            "arrival_s": np.zeros(n),
            "update_bytes": np.zeros(n, dtype=np.int64),
            "model_bytes": np.full(n, m_bytes, dtype=np.int64),
            "download_full": np.ones(n, dtype=np.int64),
            "download_steps": np.zeros(n, dtype=np.int64),
            "retransmitted": np.zeros(n, dtype=np.int64),
            "transport_rtt_s": np.zeros(n),
            "transport_failed": np.zeros(n, dtype=np.int64),
        }
        base = model_hash(params)
        by_gateway: dict[str, list[int]] = {}
        updates: list[Encoded] = []
        for k, (i, c, p) in enumerate(zip(devices, cycles, pos, strict=True)):
            node = self._nodes[p]
            codec, cparams = choose_codec(node, num_params, uplink)
            enc = self._compress(
                node.id,
                res.deltas[k],
                codec,
                cparams,
                np.random.default_rng([seed, int(c), int(i), 11]),
                uplink,
            )
            updates.append(enc)
            start = float(starts[k])
            u_bytes = envelope_bytes(node.id, int(c), base, int(res.num_samples[k]), enc, start)
            processed = samples_processed(
                int(res.num_samples[k]), int(res.steps[k]), cfg.batch_size
            )
            t = device_timing(
                node,
                int(i),
                seed=seed,
                round_=int(c),
                start_s=start,
                model_bytes=m_bytes,
                update_bytes=u_bytes,
                work_flops=training_flops(self._flops, processed),
            )
            stats["download_s"][k] = t.download_s
            stats["compute_s"][k] = t.compute_s
            stats["upload_s"][k] = t.upload_s
            stats["arrival_s"][k] = t.arrival_s
            stats["update_bytes"][k] = u_bytes
            stats["retransmitted"][k] = t.retransmitted_packets
            by_gateway.setdefault(node.gateway, []).append(k)
        gather(
            [
                self._gateways[g].call(
                    "receive",
                    g,
                    [(int(devices[k]), int(cycles[k])) for k in ks],
                    [self._nodes[pos[k]].id for k in ks],
                    [updates[k] for k in ks],
                    res.num_samples[ks].astype(np.float64),
                )
                for g, ks in by_gateway.items()
            ]
        )
        return stats

    def _compress(
        self,
        device: str,
        delta: np.ndarray,
        codec: str,
        cparams: dict[str, int],
        rng: np.random.Generator | None,
        uplink: UplinkConfig,
    ) -> Encoded:
        """Encode as the device would; a diverged (non-finite) update goes out raw as f32."""
        from devices.codecs import CodecError, encode
        from devices.compression import ErrorFeedback

        try:
            if uplink.error_feedback and codec != "f32":
                ef = self._feedback.get(device)
                if ef is None:
                    ef = self._feedback[device] = ErrorFeedback(dtype=np.float32)
                return ef.compress(delta, codec, rng=rng, **cparams)
            return encode(codec, delta, rng=rng, **cparams)
        except CodecError:
            # A real device would send whatever it computed; the gateway refuses it.
            return Encoded("f32", delta.shape, np.ascontiguousarray(delta, "<f4").tobytes(), {})


def samples_processed(num_samples: int, steps: int, batch_size: int) -> int:
    """Samples seen in a batch plan's first ``steps`` steps (an epoch's last batch is partial)."""
    if num_samples <= 0 or steps <= 0:
        return 0
    per_epoch = -(-num_samples // batch_size)
    epochs, rest = divmod(steps, per_epoch)
    return epochs * num_samples + rest * batch_size


# Envelope timestamps are wall-clock seconds: the virtual clock starts at this epoch, so a
# timestamp is a float64 on the wire just as on a real device.
VIRTUAL_EPOCH = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def _int_class(v: int) -> int:
    """CBOR's length class of a non-negative integer (0: inline, 1, 2, 4 or 8 extra bytes)."""
    return 0 if v < 24 else 1 if v < 256 else 2 if v < 65536 else 4 if v < 2**32 else 8


_SIZE_CACHE: dict[tuple[Any, ...], int] = {}


def envelope_bytes(
    device: str, round_: int, base: str, samples: int, enc: Encoded, timestamp: float
) -> int:
    """Exact size of the signed envelope carrying ``enc``.

    Built with the real CBOR encoder, so ids, hashes, codec meta and framing are
    counted as on the wire; only the signing itself is skipped (its size is fixed).
    The size depends on the values only through the lengths of what is encoded,
    so it is cached by those (a cache miss encodes for real).
    """
    from devices.envelope import PROTOCOL_VERSION, Envelope, signed_size

    samples = max(1, samples)
    ts = VIRTUAL_EPOCH + timestamp
    key = (
        device,
        _int_class(round_),
        len(base),
        _int_class(samples),
        enc.codec,
        enc.shape,
        len(enc.payload),
        tuple(sorted(enc.meta.items())),
        np.float32(ts) == ts,
    )
    size = _SIZE_CACHE.get(key)
    if size is None:
        if len(_SIZE_CACHE) > 200_000:
            _SIZE_CACHE.clear()
        env = Envelope(PROTOCOL_VERSION, device, round_, base, bytes(16), ts, samples, [enc])
        size = _SIZE_CACHE[key] = signed_size(env)
    return size


def _empty_stats() -> dict[str, np.ndarray]:
    keys_i = (
        "device",
        "samples",
        "steps",
        "update_bytes",
        "model_bytes",
        "download_full",
        "download_steps",
        "retransmitted",
        "transport_failed",
    )
    keys_f = (
        "loss",
        "download_s",
        "compute_s",
        "upload_s",
        "start_s",
        "arrival_s",
        "transport_rtt_s",
    )
    out: dict[str, np.ndarray] = {k: np.zeros(0, dtype=np.int64) for k in keys_i}
    out.update({k: np.zeros(0, dtype=np.float64) for k in keys_f})
    return out


@dataclass
class _Submission:
    devices: list[str]
    updates: list[Encoded]
    weights: np.ndarray
    arrivals: np.ndarray


@dataclass
class _Late:
    """A straggler's decoded update, kept to be folded into a later round."""

    device: str
    delta: np.ndarray
    weight: float
    round: int


class GatewayHost(Placed):
    """Hosts several logical gateways: buffers their devices' updates, closes rounds.

    Updates arrive encoded (as on the wire) and are decoded here with the same
    codec registry a real gateway uses, so a malformed or non-finite update is
    refused with a reason rather than poisoning the aggregate.
    """

    def __init__(
        self,
        gateways: Sequence[GatewayNode],
        indices: Mapping[str, int],
        num_params: int,
        seed: int,
        transport: GatewayTransport | None = None,
    ) -> None:
        self._gateways = {g.id: g for g in gateways}
        self._index = dict(indices)
        self._num_params = num_params
        self._seed = seed
        self._buffer: dict[tuple[int, str], list[_Submission]] = {}
        self._late: dict[str, list[_Late]] = {g: [] for g in self._gateways}
        # Secure modes: what went to the cloud parties, kept until the round is done (a
        # retry with a fresh party group needs it again).
        self._sent: dict[tuple[int, str], list[Any]] = {}
        # Asynchronous mode: updates held until a flush, keyed by (gateway, (device, cycle)).
        self._held: dict[tuple[str, tuple[int, int]], tuple[str, Encoded, float]] = {}
        # Socket transports: real gateway intakes, one per hosted logical gateway.
        self._intakes: Any = None
        if transport is not None and transport.kind != "direct":
            from hierarchy.transport_gateway import GatewayIntakes

            self._intakes = GatewayIntakes(transport, num_params, VIRTUAL_EPOCH)

    def submit(
        self,
        round_: int,
        gateway: str,
        devices: list[str],
        updates: list[Encoded],
        weights: np.ndarray,
        arrivals: np.ndarray,
    ) -> int:
        if gateway not in self._gateways:
            raise KeyError(f"gateway {gateway!r} is not hosted here")
        self._buffer.setdefault((round_, gateway), []).append(
            _Submission(devices, list(updates), weights, arrivals)
        )
        return len(devices)

    # --- socket transports ------------------------------------------------------------

    def _require_intakes(self) -> Any:
        if self._intakes is None:
            raise RuntimeError("this gateway host has no socket transport (it was built direct)")
        return self._intakes

    def endpoints(self) -> dict[str, str]:
        """Gateway id -> the URL its devices upload to (empty for the direct transport)."""
        return self._intakes.endpoints() if self._intakes is not None else {}

    def open_round(self, round_: int, params: np.ndarray, opened_at: Mapping[str, float]) -> str:
        """Publish the round's model on every hosted gateway's real intake.

        ``opened_at`` is each gateway's virtual Unix time of model arrival (its
        service's clock for the round). Returns the model's version hash.
        """
        return str(self._require_intakes().open_round(round_, params, opened_at))

    def deliver(
        self,
        round_: int,
        gateway: str,
        devices: list[str],
        weights: np.ndarray,
        arrivals: np.ndarray,
    ) -> int:
        """Buffer the updates ``gateway``'s intake accepted from ``devices``, as ``submit`` does.

        ``weights`` and ``arrivals`` are the devices' aggregation weights and virtual
        arrival times (out of band: the virtual clock, not the socket, decides
        on-time vs late). The update is the one the intake decoded and validated,
        handed on as float32 (decoding it again gives the same values). A device
        whose update was refused is skipped (its reason is in ``end_round``).
        Returns how many were buffered.
        """
        got = self._require_intakes().take(round_, gateway, devices)
        keep = [k for k, a in enumerate(got) if a is not None]
        if not keep:
            return 0
        return self.submit(
            round_,
            gateway,
            [devices[k] for k in keep],
            [Encoded("f32", (self._num_params,), got[k].delta.tobytes(), {}) for k in keep],
            np.asarray(weights, dtype=np.float64)[keep],
            np.asarray(arrivals, dtype=np.float64)[keep],
        )

    def end_round(self, round_: int) -> dict[str, dict[str, int]]:
        """Close the round on the real intakes; per gateway, its rejections by reason code."""
        return dict(self._require_intakes().end_round(round_))

    def enroll(self, gateway: str, device: str, public_key: str) -> None:
        """Register (or replace) a device's public key (hex or PEM) at a hosted gateway."""
        self._require_intakes().enroll(gateway, device, public_key)

    def revoke(self, gateway: str, device: str) -> None:
        """Remove a device's key at a hosted gateway (``unknown-device`` from then on)."""
        self._require_intakes().revoke(gateway, device)

    def stop_transport(self) -> None:
        """Stop the real servers/intakes (a no-op for the direct transport)."""
        if self._intakes is not None:
            self._intakes.stop()
            self._intakes = None

    def close(
        self,
        round_: int,
        deadline_s: float | None,
        starts: Mapping[str, float],
        quorum_counts: Mapping[str, int | None] | None = None,
        late_policy: str = "drop",
        staleness_exponent: float = 0.5,
        privacy: GatewayPrivacy | None = None,
    ) -> list[dict[str, Any]]:
        """Close every hosted gateway's round: aggregate on-time updates, uplink, time it.

        Late updates are dropped, or with ``late_policy="fold"`` kept and added to
        the next round's aggregate with a staleness-discounted weight. With a
        secure ``privacy`` mode the gateway sends its shares (or, in
        ``device-shares`` mode, its masked sum and device lists) straight to the
        cloud parties and returns only public totals: no plaintext sum leaves it.
        """
        privacy = privacy or GatewayPrivacy("none")
        out: list[dict[str, Any]] = []
        for g, node in self._gateways.items():
            subs = self._buffer.pop((round_, g), [])
            devices = [d for s in subs for d in s.devices]
            updates = [u for s in subs for u in s.updates]
            weights = [float(w) for s in subs for w in s.weights]
            arrivals = [float(a) for s in subs for a in s.arrivals]
            q = (quorum_counts or {}).get(g)
            closed = close_gateway(arrivals, deadline_s, starts[g], q)
            rejected: dict[str, int] = {}
            if privacy.mode == "device-shares":
                folded = 0
                messages, count, weight = self._masked_uplink(
                    g, round_, [updates[i] for i in closed.included], privacy, rejected
                )
                partial = None
            else:
                partial, folded = self._aggregate(
                    g,
                    round_,
                    closed,
                    devices,
                    updates,
                    weights,
                    late_policy,
                    staleness_exponent,
                    privacy,
                    rejected,
                )
                count, weight = partial.count, partial.total_weight
                messages = []
                if privacy.mode == "gateway-trusted" and partial.count > 0:
                    from gateway.secret_sharing import share_partial_compact

                    messages = share_partial_compact(partial, len(privacy.parties))
            if privacy.mode == "none":
                assert partial is not None
                nbytes = partial.nbytes
            else:
                nbytes = sum(m.nbytes for m in messages)
                self._sent[(round_, g)] = messages
                partial = None  # the plaintext sum never leaves the gateway
            uplink = gateway_uplink(
                node, self._index[g], seed=self._seed, round_=round_, nbytes=nbytes
            )
            out.append(
                {
                    "gateway": g,
                    "partial": partial,
                    "count": count,
                    "total_weight": weight,
                    "close_s": closed.close_s,
                    "uplink_s": uplink,
                    "uplink_bytes": nbytes,
                    "undelivered_parties": [],
                    "stragglers": len(closed.stragglers),
                    "rejected": sum(rejected.values()),
                    "rejected_by_reason": rejected,
                    "folded": folded,
                }
            )
        if privacy.mode != "none":
            # All hosted gateways' shares at once: one call per party, all in flight together.
            failed = _deliver(
                [m for (r, _g), ms in self._sent.items() if r == round_ for m in ms],
                privacy.parties,
            )
            for c in out:
                c["undelivered_parties"] = failed
        # Drop buffers of rounds that were never closed (a crashed driver loop), and
        # shares kept for a retry of rounds the cloud has finished.
        for key in [k for k in self._buffer if k[0] < round_]:
            del self._buffer[key]
        for key in [k for k in self._sent if k[0] < round_]:
            del self._sent[key]
        return out

    def resubmit(self, round_: int, parties: Sequence[Handle]) -> list[int]:
        """Send this round's shares/forwards again, to a fresh party group; failed ranks."""
        return _deliver(
            [m for (r, _g), ms in self._sent.items() if r == round_ for m in ms], parties
        )

    def _aggregate(
        self,
        g: str,
        round_: int,
        closed: Any,
        devices: list[str],
        updates: list[Any],
        weights: list[float],
        late_policy: str,
        staleness_exponent: float,
        privacy: GatewayPrivacy,
        rejected: dict[str, int],
    ) -> tuple[PartialAggregate, int]:
        """Decode, check and sum the on-time updates (plus folded late ones) of gateway ``g``."""
        from devices.codecs import decode_rows

        partial = PartialAggregate.empty(g, round_, self._num_params)
        folded = 0
        for late in self._late[g]:
            w = late.weight * staleness_weight(round_ - late.round, staleness_exponent)
            partial.add(late.device, late.delta, w)
            folded += 1
        self._late[g] = []
        keep = [(i, True) for i in closed.included]
        if late_policy == "fold":
            keep += [(i, False) for i in closed.stragglers]
        # One pass over the block for plain f32 updates, one by one for the rest.
        decoded, kept, errors = decode_rows([updates[i] for i, _ in keep], self._num_params)
        for _, e in errors:
            rejected[e.reason] = rejected.get(e.reason, 0) + 1
        take: list[int] = []  # rows of `decoded` summed this round
        for j, k in enumerate(kept):
            i, on_time = keep[k]
            if privacy.clip_norm is not None:
                clipped = clip_check(decoded[j], privacy.clip_norm)
                if clipped is None:  # the device did not clip: refuse, as a real gateway would
                    rejected["norm-bound"] = rejected.get("norm-bound", 0) + 1
                    continue
                decoded[j] = clipped  # float32 either way: the same values as before
            if on_time:
                take.append(j)
            else:  # a copy, so the round's block is not held until the next round
                self._late[g].append(_Late(devices[i], decoded[j].copy(), weights[i], round_))
        if take:
            idx = [keep[kept[j]][0] for j in take]
            partial.add_batch([devices[i] for i in idx], decoded[take], np.asarray(weights)[idx])
        return partial, folded

    def _masked_uplink(
        self,
        g: str,
        round_: int,
        updates: list[Any],
        privacy: GatewayPrivacy,
        rejected: dict[str, int],
    ) -> tuple[list[Any], int, float]:
        """``device-shares``: sum the on-time masked updates blind; the per-party forwards."""
        from devices.reasons import Rejection
        from gateway.masked_sum import MaskedSum

        ms = MaskedSum(
            g,
            round_,
            self._num_params,
            len(privacy.parties),
            seal_to_party0=privacy.seal_to_party0,
        )
        for u in updates:
            try:
                ms.add(u)
            except Rejection as e:
                rejected[e.reason] = rejected.get(e.reason, 0) + 1
        return ms.forwards(per_device=privacy.per_device_units), ms.count, ms.total_weight

    def receive(
        self,
        gateway: str,
        keys: list[tuple[int, int]],
        devices: list[str],
        updates: list[Encoded],
        weights: np.ndarray,
    ) -> int:
        """Asynchronous mode: hold updates, keyed by (device index, cycle), until a flush."""
        if gateway not in self._gateways:
            raise KeyError(f"gateway {gateway!r} is not hosted here")
        for key, dev, enc, w in zip(keys, devices, updates, weights, strict=True):
            self._held[(gateway, (int(key[0]), int(key[1])))] = (dev, enc, float(w))
        return len(keys)

    def flush(
        self,
        gateway: str,
        index: int,
        keys: Sequence[tuple[int, int]],
        factors: Sequence[float],
    ) -> dict[str, Any]:
        """Asynchronous mode: aggregate held updates, each weighted samples x staleness factor.

        The public total weight counts the samples at full weight, so the cloud's
        division leaves a stale update shrunk by its factor (FedBuff's
        ``sum s(tau_i) delta_i``), instead of merely losing share to fresher ones.
        The uplink is timed with this gateway's ``index``-th flush stream.
        """
        from devices.codecs import decode_rows

        if gateway not in self._gateways:
            raise KeyError(f"gateway {gateway!r} is not hosted here")
        if len(factors) != len(keys):
            raise ValueError(f"{len(keys)} updates but {len(factors)} staleness factors")
        partial = PartialAggregate.empty(gateway, index, self._num_params)
        held = [self._held.pop((gateway, (int(k[0]), int(k[1])))) for k in keys]
        decoded, kept, errors = decode_rows([enc for _, enc, _ in held], self._num_params)
        rejected: dict[str, int] = {}
        for _, e in errors:
            rejected[e.reason] = rejected.get(e.reason, 0) + 1
        if kept:
            ws = np.array([held[j][2] for j in kept])
            partial.add_batch(
                [held[j][0] for j in kept], decoded, ws * np.asarray(factors, dtype=float)[kept]
            )
            partial.total_weight = float(sum(ws.tolist()))
        node = self._gateways[gateway]
        uplink = gateway_uplink(
            node, self._index[gateway], seed=self._seed, round_=index, nbytes=partial.nbytes
        )
        return {
            "partial": partial,
            "uplink_s": uplink,
            "uplink_bytes": partial.nbytes,
            "rejected": sum(rejected.values()),
            "rejected_by_reason": rejected,
        }


def _deliver(messages: Sequence[Any], parties: Sequence[Handle]) -> list[int]:
    """Send shares / seed shares / forwards to their parties; the ranks that did not take them.

    One ``submit_batch`` call per party carries everything for it, and all are
    in flight at once. A dead or failing party is reported, not raised: the
    cloud's agreement then excludes what it lacks, or the round fails there
    cleanly and is retried.
    """
    by_party: dict[int, list[Any]] = {}
    for m in messages:
        by_party.setdefault(int(m.party), []).append(m)
    calls = [(k, parties[k].call("submit_batch", ms)) for k, ms in sorted(by_party.items())]
    failed: set[int] = set()
    for rank, ref in calls:
        try:
            gather([ref])
        except Exception:  # the party died or refused: the cloud phase deals with it
            failed.add(rank)
    return sorted(failed)


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
        downlink: DownlinkConfig | None = None,
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
            initial,
            make_strategy(strategy, server_lr=server_lr, momentum=momentum),
            downlink=downlink,
        )

    def info(self) -> dict[str, Any]:
        return {"num_params": int(self._coord.params.shape[0]), **asdict(self._coord.version)}

    def params(self) -> np.ndarray:
        return self._coord.params

    def downloads(self, bases: Sequence[str | None]) -> RoundDownlink:
        """The current version for holders of ``bases``: chains or the full model."""
        return self._coord.downloads(bases)

    def apply(
        self,
        round_: int,
        partials: Sequence[PartialAggregate],
        noise_std: float = 0.0,
        noise_seed: int = 0,
    ) -> dict[str, Any]:
        """Plaintext path (``--no-smpc``): combine partials; central DP noise if asked for."""
        return self._applied(self._coord.apply(round_, partials, noise_std, noise_seed))

    def apply_sum(
        self, round_: int, total: np.ndarray, weight: float, count: int, gateways: int
    ) -> dict[str, Any]:
        """Secure path: the parties' revealed (noisy) sum with the gateways' public totals."""
        return self._applied(
            self._coord.apply_sum(round_, np.asarray(total, np.float64), weight, count, gateways)
        )

    @staticmethod
    def _applied(applied: Any) -> dict[str, Any]:
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
