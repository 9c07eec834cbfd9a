"""The emulation driver: a topology becomes an actor tree that trains a real model.

Each round: the coordinator's current model is pushed down (virtual clock:
cloud→gateway, then gateway→device), the selected devices train for real in
vectorized cohorts, their real update bytes are timed over their links, the
gateways aggregate on-time updates and uplink, and the coordinator applies the
result. Wall-clock time is measured separately from the virtual clock.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cloud.downlink import DownlinkConfig
from devices.held_model import RoundDownlink
from devices.lr_schedule import check_lr_schedule, scheduled_lr
from gateway.partial_aggregate import PartialAggregate
from hierarchy.actors import (
    VIRTUAL_EPOCH,
    CohortHost,
    CoordinatorHost,
    DatasetSpec,
    GatewayHost,
)
from hierarchy.backend import Backend, LocalBackend, RayBackend, gather, put
from hierarchy.placement import plan_placement
from hierarchy.privacy import (
    SECURE_MODES,
    DevicePrivacy,
    GatewayPrivacy,
    PrivacyConfig,
    resolve_mode,
    sampling_rate,
    smpc_seconds,
)
from hierarchy.timeline import STREAM_AVAIL, energy_mwh, gateway_model_arrival, quorum_count
from hierarchy.topology import Topology, load_topology
from hierarchy.transport import SOCKET_TRANSPORTS, TRANSPORTS, DeviceTransport, GatewayTransport
from hierarchy.uplink import UplinkConfig

DATASETS = ("har", "fashion", "digits")
BACKENDS = ("ray", "local")
LATE_POLICIES = ("drop", "fold")
MODES = ("sync", "async")
STREAM_SAMPLE = 101
STREAM_DROPOUT = 102


class RunStopped(RuntimeError):
    """The run ended before its last round (privacy budget, or SMPC failed after retries)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class LocalConfig:
    """Mirror of ``devices.training.LocalTrainingConfig`` kept torch-free for the driver."""

    epochs: int = 1
    batch_size: int = 16
    lr: float = 0.05
    max_steps: int | None = None
    # Per-step client gradient clipping (LocalTrainingConfig.max_grad_norm); None = off.
    max_grad_norm: float | None = None


@dataclass(frozen=True)
class EmulationConfig:
    topology: Path
    rounds: int = 5
    dataset: str = "har"
    seed: int = 0
    out: Path | None = None
    model: str | None = None
    alpha: float = 0.5
    local: LocalConfig = field(default_factory=LocalConfig)
    strategy: str = "fedavg"
    server_lr: float = 1.0
    server_momentum: float = 0.9
    deadline_s: float | None = None
    eval_every: int = 1
    backend: str = "ray"
    trainers: int | None = None
    gateway_hosts: int | None = None
    ray_address: str | None = None
    plots: bool = True
    uplink: UplinkConfig = field(default_factory=UplinkConfig)
    quorum: float | None = None
    late_policy: str = "drop"
    staleness_exponent: float = 0.5
    participation: float = 1.0
    over_select: bool = False
    min_battery_mwh: float = 0.0
    adaptive_work: bool = False
    # Client learning rate over rounds (devices.lr_schedule): round 1 trains at local.lr,
    # the last round at local.lr * lr_final. FedAvg on non-IID data needs the decay to settle.
    lr_schedule: str = "constant"
    lr_final: float = 0.1
    # Linear ramp to local.lr over the first rounds (devices.lr_schedule); 0 = none.
    lr_warmup_rounds: int = 0
    mode: str = "sync"  # "async": FedBuff-style buffered rounds (hierarchy.async_emulate)
    buffer_size: int | None = None  # async: updates per gateway flush (default: half its devices)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    dropout: float = 0.0  # share of reachable selected devices that drop before reporting
    # How updates reach the gateways: "direct" (in-process hand-over), or each device's real
    # signed envelope over real CoAP / MQTT on loopback (hierarchy.transport).
    transport: str = "direct"
    # None: the mode's default (delta chains in sync mode; async supports full only).
    downlink: DownlinkConfig | None = None

    @property
    def effective_downlink(self) -> DownlinkConfig:
        """The downlink this run uses (``downlink``, or the mode's default)."""
        if self.downlink is not None:
            return self.downlink
        return DownlinkConfig(mode="full" if self.mode == "async" else "delta")

    def validate(self) -> None:
        """Name the first bad field; the CLI turns this into exit code 2."""
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        if self.dataset not in DATASETS:
            raise ValueError(
                f"unknown dataset {self.dataset!r}; choose one of {', '.join(DATASETS)}"
            )
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if self.local.epochs < 1 or self.local.batch_size < 1 or not self.local.lr > 0:
            raise ValueError("epochs and batch-size must be >= 1 and lr > 0")
        if self.local.max_steps is not None and self.local.max_steps < 1:
            raise ValueError("max-steps must be >= 1")
        g = self.local.max_grad_norm
        if g is not None and not (math.isfinite(g) and g > 0):
            raise ValueError(f"max-grad-norm must be finite and > 0, got {g}")
        check_lr_schedule(self.lr_schedule, self.lr_final, self.lr_warmup_rounds, self.rounds)
        if self.deadline_s is not None and not self.deadline_s > 0:
            raise ValueError(f"deadline must be > 0 seconds, got {self.deadline_s}")
        if self.eval_every < 1:
            raise ValueError("eval-every must be >= 1")
        if self.backend not in BACKENDS:
            raise ValueError(
                f"unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)}"
            )
        self.uplink.validate()
        if self.quorum is not None and not 0 < self.quorum <= 1:
            raise ValueError(f"quorum must be in (0, 1], got {self.quorum}")
        if self.late_policy not in LATE_POLICIES:
            raise ValueError(
                f"unknown late policy {self.late_policy!r}; "
                f"choose one of {', '.join(LATE_POLICIES)}"
            )
        if self.staleness_exponent < 0:
            raise ValueError(f"staleness-exponent must be >= 0, got {self.staleness_exponent}")
        if not 0 < self.participation <= 1:
            raise ValueError(f"participation must be in (0, 1], got {self.participation}")
        if self.min_battery_mwh < 0:
            raise ValueError(f"min-battery-mwh must be >= 0, got {self.min_battery_mwh}")
        if self.adaptive_work and self.deadline_s is None:
            raise ValueError("adaptive-work needs a deadline (--deadline-s) to adapt to")
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.buffer_size is not None and self.buffer_size < 1:
            raise ValueError(f"buffer-size must be >= 1, got {self.buffer_size}")
        if self.transport not in TRANSPORTS:
            raise ValueError(
                f"unknown transport {self.transport!r}; choose one of {', '.join(TRANSPORTS)}"
            )
        if self.mode == "async" and self.transport != "direct":
            # The gateway intake validates every update against the round it serves and
            # the model it published; async devices train from different versions at once.
            raise ValueError(
                f"--transport {self.transport} with --mode async is not supported: the real "
                "gateway intake takes updates for one round and model version at a time; "
                "use --transport direct for async runs"
            )
        if self.transport != "direct" and self.privacy.mode == "device-shares":
            raise ValueError(
                f"--transport {self.transport} carries codec-encoded updates in signed envelopes; "
                "device-shares updates are masked ring values: use --privacy gateway-trusted or "
                "--no-smpc with it"
            )
        if self.transport != "direct" and self.ray_address:
            raise ValueError(
                f"--transport {self.transport} runs its gateway servers on loopback, so every "
                "actor must be on this machine; it cannot be combined with --ray-address"
            )
        if self.mode == "sync" and self.buffer_size is not None:
            raise ValueError("buffer-size applies to --mode async only")
        self.effective_downlink.validate()
        if self.mode == "async" and self.effective_downlink.mode != "full":
            raise ValueError(
                "--downlink delta is not supported with --mode async yet; use --downlink full"
            )
        if self.mode == "async":
            for flag, used in (
                ("deadline-s", self.deadline_s is not None),
                ("quorum", self.quorum is not None),
                ("late fold", self.late_policy != "drop"),
                ("participation", self.participation < 1.0),
                ("over-select", self.over_select),
                ("adaptive-work", self.adaptive_work),
                # An async device trains whenever it is free, against whichever version
                # it holds: there is no round index to schedule by.
                ("lr-schedule", self.lr_schedule != "constant"),
                ("lr-warmup-rounds", self.lr_warmup_rounds > 0),
            ):
                if used:
                    raise ValueError(f"{flag} is a synchronous-round option; not with --mode async")
        self.privacy.validate()
        resolve_mode(self.privacy, self.backend, self.mode == "async")  # impossible combinations
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.mode == "async" and self.dropout > 0:
            raise ValueError("dropout is a synchronous-round option; not with --mode async")
        if self.privacy.mode == "device-shares":
            if self.late_policy != "drop":
                raise ValueError(
                    "device-shares masks are bound to their round: late updates cannot be "
                    "folded into the next one (use --late drop)"
                )
            if self.uplink.codec != "f32":
                raise ValueError(
                    "device-shares devices send masked ring values, which no codec can "
                    f"compress: drop --codec {self.uplink.codec}"
                )
        for name in ("trainers", "gateway_hosts"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {v}")


def default_model(dataset: str) -> str:
    return {"har": "cnn1d", "fashion": "cnn2d", "digits": "mlp"}[dataset]


def _percentiles(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {"p50": 0.0, "p95": 0.0, "max": 0.0}
    return {
        "p50": float(np.percentile(values, 50)),
        "p95": float(np.percentile(values, 95)),
        "max": float(values.max()),
    }


def _merge_stats(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.argsort(merged["device"], kind="stable")
    return {k: v[order] for k, v in merged.items()}


def downlink_record(
    stats: dict[str, np.ndarray], gw_download: dict[str, Any], gateways: int
) -> dict[str, Any]:
    """Per-tier download detail of one round: what each gateway and device received."""
    down = stats["model_bytes"]
    full = stats["download_full"].astype(bool)
    n = int(down.size)
    return {
        "cloud_to_gateway": {
            "bytes_each": int(gw_download["bytes"]),
            "gateways": gateways,
            "kind": "full" if gw_download["full"] else "delta",
        },
        "gateway_to_device": {
            "bytes_mean": float(down.mean()) if n else 0.0,
            "bytes_max": int(down.max()) if n else 0,
            "full": int(full.sum()),
            "delta": int(n - full.sum()),
            "chain_steps_max": int(stats["download_steps"].max()) if n else 0,
        },
    }


def downlink_summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Downloads over the whole run: bytes per device download, full vs delta counts."""
    dev = [r["downlink"]["gateway_to_device"] for r in rounds]
    count = sum(d["full"] + d["delta"] for d in dev)
    return {
        "device_bytes_mean": float(sum(r["bytes"]["device_down"] for r in rounds) / count)
        if count
        else 0.0,
        "device_bytes_max": max((d["bytes_max"] for d in dev), default=0),
        "device_full": sum(d["full"] for d in dev),
        "device_delta": sum(d["delta"] for d in dev),
        "gateway_bytes_mean": float(
            np.mean([r["downlink"]["cloud_to_gateway"]["bytes_each"] for r in rounds])
        )
        if rounds
        else 0.0,
    }


def _make_backend(cfg: EmulationConfig) -> Backend:
    if cfg.backend == "local":
        return LocalBackend()
    return RayBackend(address=cfg.ray_address)


class Emulation:
    """Builds the actor tree for one topology and runs rounds on it."""

    def __init__(self, cfg: EmulationConfig, topo: Topology | None = None) -> None:
        cfg.validate()
        self.cfg = cfg
        self.topo = topo if topo is not None else load_topology(cfg.topology)
        if not self.topo.devices:
            raise ValueError(f"topology {self.topo.name!r} has no devices")
        self.model_name = cfg.model or default_model(cfg.dataset)
        nodes = list(self.topo.devices.values())
        self._availability = np.array([d.availability for d in nodes])
        self._power = np.array([d.power_w for d in nodes])
        self.battery = np.array([d.battery_mwh for d in nodes], dtype=np.float64)
        # The model version (hash) each device and the gateways last downloaded: None = nothing.
        self._held: list[str | None] = [None] * len(nodes)
        self._gateway_held: str | None = None
        gw_pos = {g: i for i, g in enumerate(self.topo.gateways)}
        self._gateway_of = np.array([gw_pos[d.gateway] for d in nodes], dtype=np.int64)
        sizes = [d.samples for d in self.topo.devices.values()]
        self.spec = DatasetSpec(
            cfg.dataset,
            len(self.topo.devices),
            cfg.seed,
            cfg.alpha,
            tuple(int(s) for s in sizes) if all(s is not None for s in sizes) else None,  # type: ignore[arg-type]
        )
        self.clock_s = 0.0  # emulated seconds before the next round (envelope timestamps)
        self.broker: Any = None  # the MQTT transport's mosquitto (owned by this driver)
        self.privacy, self.privacy_note = resolve_mode(
            cfg.privacy, cfg.backend, cfg.mode == "async"
        )
        self.secure: Any = None  # cloud.secure_aggregator.SecureAggregator when SMPC is on
        self._party_keys: tuple[str, ...] = ()
        self.accountant: Any = None
        if cfg.privacy.dp:
            from cloud.accountant import PrivacyAccountant

            self.accountant = PrivacyAccountant(
                cfg.privacy.noise_multiplier,
                sampling_rate(cfg.participation, cfg.over_select, float(self._availability.mean())),
                cfg.privacy.delta,
            )
        t0 = time.perf_counter()
        self.backend = _make_backend(cfg)
        try:
            self._build()
        except BaseException:
            try:
                self._stop_transport()
            finally:
                self.backend.shutdown()
            raise
        self.setup_wall_s = time.perf_counter() - t0

    @property
    def sockets(self) -> bool:
        """True when updates travel over real CoAP/MQTT instead of the direct hand-over."""
        return self.cfg.transport in SOCKET_TRANSPORTS

    def _build(self) -> None:
        cfg, topo = self.cfg, self.topo
        cpus = os.cpu_count() or 1
        n_trainers = cfg.trainers or max(1, min(cpus, len(topo.devices)))
        if cfg.backend == "local":
            n_trainers = 1 if cfg.trainers is None else cfg.trainers
        n_hosts = cfg.gateway_hosts or max(1, min(cpus // 2 or 1, len(topo.gateways)))
        self.placement = plan_placement(
            topo,
            trainers=n_trainers,
            gateway_hosts=n_hosts,
            cluster_resources=self.backend.cluster_resources(),
        )
        self.coordinator = self.backend.spawn(
            CoordinatorHost,
            self.spec,
            self.model_name,
            cfg.strategy,
            cfg.server_lr,
            cfg.server_momentum,
            cfg.seed,
            downlink=cfg.effective_downlink,
        )
        info = gather([self.coordinator.call("info")])[0]
        self.num_params = int(info["num_params"])
        self.initial_hash = str(info["hash"])
        gw_index = {g: i for i, g in enumerate(topo.gateways)}
        if cfg.transport == "mqtt":
            from gateway.broker import MosquittoBroker

            # One broker for the fleet, as an operator would run; stopped by its PID in close().
            self.broker = MosquittoBroker().start()
        members: dict[str, list[str]] = {g: [] for g in topo.gateways}
        for d in topo.devices.values():
            members[d.gateway].append(d.id)
        self.hosts = [
            self.backend.spawn(
                GatewayHost,
                [topo.gateways[g] for g in plan.gateways],
                gw_index,
                self.num_params,
                cfg.seed,
                resources=plan.resources,
                **self._host_transport(plan.gateways, members),
            )
            for plan in self.placement.gateway_hosts
        ]
        host_of = self.placement.host_of()
        gateway_handles = {g: self.hosts[host_of[g]] for g in topo.gateways}
        device_transport: dict[str, Any] = {}
        if self.sockets:
            endpoints: dict[str, str] = {}
            for eps in gather([h.call("endpoints") for h in self.hosts]):
                endpoints.update(eps)
            device_transport["transport"] = DeviceTransport(cfg.transport, cfg.seed, endpoints)
        nodes = list(topo.devices.values())
        self.trainers = [
            self.backend.spawn(
                CohortHost,
                self.spec,
                self.model_name,
                idx,
                [nodes[i] for i in idx],
                gateway_handles,
                # One torch thread per trainer: a second thread measured 3-8x slower per
                # round on a shared 2-core machine (the small per-device kernels spin).
                threads=1,
                num_cpus=1 if cfg.backend == "ray" else 0,
                **device_transport,
            )
            for idx in self.placement.trainers
        ]
        if self.privacy in SECURE_MODES:
            self._start_parties()
        # Wait until every actor is up (trainers have loaded their data) so set-up time is
        # honest, and record where each landed.
        spots = gather([a.call("where") for a in [self.coordinator, *self.hosts, *self.trainers]])
        self._where = {
            "coordinator": spots[0],
            "hosts": spots[1 : 1 + len(self.hosts)],
            "trainers": spots[1 + len(self.hosts) :],
            "parties": gather([h.call("where") for h in self.secure.party_handles])
            if self.secure is not None
            else [],
        }

    def _host_transport(self, gateways: list[str], members: dict[str, list[str]]) -> dict[str, Any]:
        """The ``transport`` argument of a gateway host (none for the direct transport)."""
        if not self.sockets:
            return {}
        spec = GatewayTransport(
            self.cfg.transport,
            self.cfg.seed,
            {g: tuple(members[g]) for g in gateways},
            broker=self.broker.url if self.broker is not None else None,
        )
        return {"transport": spec}

    def _stop_transport(self) -> None:
        """Close the devices' clients, then the gateways' servers, then the broker (by PID)."""
        try:
            if self.sockets:
                for group in (getattr(self, "trainers", []), getattr(self, "hosts", [])):
                    try:
                        gather([a.call("stop_transport") for a in group])
                    except Exception as e:  # a dead actor must not keep the broker alive
                        print(f"warning: stopping the transport: {e}", file=sys.stderr)
        finally:
            if self.broker is not None:
                self.broker.close()
                self.broker = None

    def _start_parties(self) -> None:
        """K CrypTen aggregator parties (one process each; + a dealer for the secure clip)."""
        pc = self.cfg.privacy
        kwargs: dict[str, Any] = dict(
            parties=pc.parties, norm_bounding=pc.secure_clip is not None, threads=1
        )
        if self.cfg.ray_address:
            # On a cluster the parties run on the driver's (head, "cloud") node: rank 0
            # serves the gloo rendezvous at this node's address, which the others dial.
            be: Any = self.backend
            kwargs.update(host=be.driver_node_ip(), pin_node=be.driver_node_id())
        if self.privacy == "device-shares":
            from cloud.party_keys import generate_party_keys, public_keys
            from cloud.unmask import DeviceSharesAggregator

            keys = generate_party_keys(pc.parties)
            self._party_keys = tuple(k.hex() for k in public_keys(keys).keys)
            self.secure = DeviceSharesAggregator(
                self.backend, keys=keys, seal_to_party0=pc.seal_to_party0, **kwargs
            )
        else:
            from cloud.secure_aggregator import SecureAggregator

            self.secure = SecureAggregator(self.backend, **kwargs)

    def device_privacy(self) -> DevicePrivacy:
        pc = self.cfg.privacy
        return DevicePrivacy(
            self.privacy,
            clip_norm=pc.clip_norm,
            uniform_weights=pc.dp,
            party_keys=self._party_keys,
            seal_to_party0=pc.seal_to_party0,
        )

    def gateway_privacy(self) -> GatewayPrivacy:
        pc = self.cfg.privacy
        return GatewayPrivacy(
            self.privacy,
            parties=tuple(self.secure.party_handles) if self.secure is not None else (),
            clip_norm=pc.clip_norm if self.privacy != "device-shares" else None,
            uniform_weights=pc.dp,
            per_device_units=self.privacy == "device-shares" and pc.secure_clip is not None,
            seal_to_party0=pc.seal_to_party0,
        )

    def describe_placement(self) -> dict[str, Any]:
        """Which process/node hosts what: the logical tree mapped onto actors."""
        return {
            "backend": self.backend.name,
            "coordinator": self._where["coordinator"],
            "gateway_hosts": [
                {"gateways": plan.gateways, **w}
                for plan, w in zip(self.placement.gateway_hosts, self._where["hosts"], strict=True)
            ],
            "trainers": [
                {"devices": len(idx), **w}
                for idx, w in zip(self.placement.trainers, self._where["trainers"], strict=True)
            ],
            "smpc_parties": self._where["parties"],
        }

    def select(self, round_: int) -> dict[str, Any]:
        """Who is asked to train this round, and who of those is reachable.

        Devices below the battery threshold are skipped; of the rest a
        ``participation`` share is sampled (enlarged by the expected dropout
        when over-selecting, so the expected number of reachable devices meets
        the target); each sampled device is then reachable with its
        ``availability`` (a seeded coin). Placement-independent.
        """
        cfg = self.cfg
        avail = self._availability
        eligible = np.flatnonzero(self.battery >= cfg.min_battery_mwh)
        sampled = eligible
        if cfg.participation < 1.0 or cfg.over_select:
            want = cfg.participation * eligible.size
            if cfg.over_select and eligible.size:
                want /= max(float(avail[eligible].mean()), 1e-6)
            k = min(eligible.size, max(1, int(np.ceil(want - 1e-9))))
            rng = np.random.default_rng([cfg.seed, round_, STREAM_SAMPLE])
            sampled = np.sort(rng.choice(eligible, size=k, replace=False)) if k else eligible[:0]
        u = np.random.default_rng([cfg.seed, round_, STREAM_AVAIL]).random(avail.size)
        reachable = sampled[u[sampled] < avail[sampled]]
        dropped = 0
        if cfg.dropout > 0:
            # Selected and reachable, but gone before reporting (app killed, out of
            # coverage): counted in the quorum's denominator, never heard from.
            v = np.random.default_rng([cfg.seed, round_, STREAM_DROPOUT]).random(avail.size)
            stay = reachable[v[reachable] >= cfg.dropout]
            dropped = int(reachable.size - stay.size)
            reachable = stay
        return {
            "sampled": sampled,
            "reachable": [int(i) for i in reachable],
            "unavailable": int(sampled.size - reachable.size) - dropped,
            "dropped": dropped,
            "battery_skipped": int(avail.size - eligible.size),
        }

    def plan_downlink(self, devices: Sequence[int]) -> RoundDownlink:
        """Ask the cloud for the current version's downloads for these devices and the gateways.

        The versions come from what the devices (and gateways) last downloaded;
        the trainers hosting the devices check them again against what each
        device really holds, so a disagreement fails the round.
        """
        bases = {self._held[i] for i in devices} | {self._gateway_held}
        return gather([self.coordinator.call("downloads", sorted(bases, key=str))])[0]

    def run_round(self, round_: int) -> dict[str, Any]:
        from devices.training import LocalTrainingConfig

        cfg, topo = self.cfg, self.topo
        wall0 = time.perf_counter()
        sel = self.select(round_)
        selected = sel["reachable"]
        downlink = self.plan_downlink(selected)
        downlink_ref = put(downlink)
        # Every gateway holds the version the previous round pushed (sync: all get each push).
        gw_bytes = downlink.nbytes_for(self._gateway_held)
        starts = {
            g: gateway_model_arrival(node, i, seed=cfg.seed, round_=round_, model_bytes=gw_bytes)
            for i, (g, node) in enumerate(topo.gateways.items())
        }
        if self.sockets:
            # Each gateway's intake opens the round at the virtual instant it has the model.
            params_ref = put(gather([self.coordinator.call("params")])[0])
            opened = {g: VIRTUAL_EPOCH + self.clock_s + s for g, s in starts.items()}
            gather([h.call("open_round", round_, params_ref, opened) for h in self.hosts])
        lr = scheduled_lr(
            cfg.local.lr, round_, cfg.rounds, cfg.lr_schedule, cfg.lr_final, cfg.lr_warmup_rounds
        )
        local = LocalTrainingConfig(**{**asdict(cfg.local), "lr": lr})
        parts = gather(
            [
                t.call(
                    "train_round",
                    round_,
                    downlink_ref,
                    local,
                    selected,
                    starts,
                    cfg.seed,
                    cfg.uplink,
                    cfg.deadline_s,
                    cfg.adaptive_work,
                    self.device_privacy(),
                    self.clock_s,
                )
                for t in self.trainers
            ]
        )
        # Trainers hand over in parallel (on Ray): the longest one is the round's cost.
        wall_transport = max(float(p.pop("transport_wall_s", np.zeros(1))[0]) for p in parts)
        stats = _merge_stats(parts)
        for d in stats["device"]:
            self._held[int(d)] = downlink.hash
        gw_full = self._gateway_held not in downlink.chains
        self._gateway_held = downlink.hash
        wall_train = time.perf_counter() - wall0
        # Quorum counts are per gateway, of the devices it was told to expect (sampled),
        # including those that will never report.
        per_gw = np.bincount(self._gateway_of[sel["sampled"]], minlength=len(topo.gateways))
        quorums = {g: quorum_count(cfg.quorum, int(per_gw[i])) for i, g in enumerate(topo.gateways)}
        closes = [
            c
            for cs in gather(
                [
                    h.call(
                        "close",
                        round_,
                        cfg.deadline_s,
                        starts,
                        quorums,
                        cfg.late_policy,
                        cfg.staleness_exponent,
                        self.gateway_privacy(),
                    )
                    for h in self.hosts
                ]
            )
            for c in cs
        ]
        if self.sockets:
            self._add_intake_rejections(round_, closes)
        energy = np.array(
            [
                energy_mwh(self._power[d], c, dl + ul)
                for d, c, dl, ul in zip(
                    stats["device"],
                    stats["compute_s"],
                    stats["download_s"],
                    stats["upload_s"],
                    strict=True,
                )
            ]
        )
        stats["energy_mwh"] = energy
        self.battery[stats["device"]] -= energy
        wall_close = time.perf_counter() - wall0 - wall_train
        if self.secure is not None:
            applied, secure = self._secure_apply(round_, closes)
        else:
            partials: list[PartialAggregate] = [c["partial"] for c in closes]
            noise = cfg.privacy.noise_std  # --no-smpc with DP: central noise, the cloud sees sums
            applied = gather([self.coordinator.call("apply", round_, partials, noise, cfg.seed)])[0]
            secure = {"mode": "none", "smpc_s": 0.0}
        if self.accountant is not None:
            secure["epsilon"] = self.accountant.step()
            secure["delta"] = self.accountant.delta
        # Wall time by phase: training (+ device-side compression/masking), gateway close
        # (+ sharing), cloud (SMPC or plaintext apply).
        wall_phases = {
            "wall_train_s": wall_train,
            "wall_close_s": wall_close,
            "wall_cloud_s": time.perf_counter() - wall0 - wall_train - wall_close,
        }
        evaluation: dict[str, float] = {}
        if round_ % cfg.eval_every == 0 or round_ == cfg.rounds:
            evaluation = gather([self.coordinator.call("evaluate")])[0]
        wall = time.perf_counter() - wall0
        rec = self._record(
            round_,
            stats,
            closes,
            starts,
            applied,
            evaluation,
            sel,
            wall,
            wall_train,
            {"bytes": gw_bytes, "full": gw_full},
            secure,
            wall_phases,
        )
        rec["lr"] = lr
        rec["wall_transport_s"] = wall_transport
        rec["transport_rtt_s"] = _percentiles(stats["transport_rtt_s"])
        rec["transport_failed"] = int(stats["transport_failed"].sum())
        self.clock_s += rec["latency_s"]
        return rec

    def _add_intake_rejections(self, round_: int, closes: list[dict[str, Any]]) -> None:
        """Close the round on the real intakes and count what they refused, by reason code.

        Those updates never reached a gateway host's buffer, so ``close`` did not see them.
        """
        refused: dict[str, dict[str, int]] = {}
        for per_gateway in gather([h.call("end_round", round_) for h in self.hosts]):
            refused.update(per_gateway)
        for c in closes:
            gateway = c["gateway"] if "gateway" in c else c["partial"].gateway
            for reason, n in refused.get(gateway, {}).items():
                c["rejected_by_reason"][reason] = c["rejected_by_reason"].get(reason, 0) + n
                c["rejected"] += n

    def check_budget(self, round_: int) -> None:
        """Before a round: stop if running it would take epsilon past the budget."""
        budget = self.cfg.privacy.epsilon_budget
        if self.accountant is None or budget is None or not self.accountant.would_exceed(budget):
            return
        done = self.accountant.rounds
        raise RunStopped(
            "privacy-budget",
            f"privacy budget reached: round {round_} would take epsilon to "
            f"{self.accountant.epsilon_after(done + 1):.3f} > {budget:g} "
            f"(delta {self.accountant.delta:g}); stopped after {done} round(s) at epsilon "
            f"{self.accountant.epsilon():.3f}, the last model is kept",
        )

    def _secure_apply(
        self, round_: int, closes: list[dict[str, Any]]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The cloud phase: the parties agree, sum, add noise, reveal; retry on a fresh group.

        A round whose SMPC fails (a party died, timed out or errored) reveals
        nothing; the group is replaced, the gateways resend what they sent, and
        the round is tried again up to ``retries`` times, then the run stops.
        """
        from cloud.secure_aggregator import SecureAggregationError

        pc = self.cfg.privacy
        info: dict[str, Any] = {"mode": self.privacy, "parties": pc.parties, "restarts": 0}
        if not any(c["count"] > 0 for c in closes):
            for h in self.secure.party_handles:
                h.call("drop_round", round_)
            applied = gather(
                [self.coordinator.call("apply_sum", round_, np.zeros(self.num_params), 0.0, 0, 0)]
            )[0]
            return applied, {**info, "smpc_s": 0.0, "smpc_wall_s": 0.0, "party_bytes": 0}
        errors: list[str] = []
        while True:
            try:
                res = self.secure.aggregate(round_, None, pc.noise_std, pc.secure_clip)
                break
            except SecureAggregationError as exc:
                errors.append(str(exc))
                if len(errors) > pc.retries:
                    raise RunStopped(
                        "smpc-failure",
                        f"round {round_}: secure aggregation failed "
                        f"{len(errors)} time(s), nothing was revealed; last error: {exc}",
                    ) from exc
                self.secure.restart()
                gather([h.call("resubmit", round_, self.secure.party_handles) for h in self.hosts])
                info["restarts"] += 1
        info["errors"] = errors
        applied = gather(
            [
                self.coordinator.call(
                    "apply_sum", round_, res.values, res.total_weight, res.count, len(res.gateways)
                )
            ]
        )[0]
        info.update(
            smpc_s=smpc_seconds(
                res.comm_rounds, res.party_bytes, pc.party_latency_ms, pc.party_mbps
            ),
            smpc_wall_s=res.seconds,
            party_bytes=res.party_bytes,
            comm_rounds=res.comm_rounds,
            excluded=res.excluded,
            noise_std=res.noise_std,
        )
        return applied, info

    def _record(
        self,
        round_: int,
        stats: dict[str, np.ndarray],
        closes: list[dict[str, Any]],
        starts: dict[str, float],
        applied: dict[str, Any],
        evaluation: dict[str, float],
        sel: dict[str, Any],
        wall: float,
        wall_train: float,
        gw_download: dict[str, Any],
        secure: dict[str, Any] | None = None,
        wall_phases: dict[str, float] | None = None,
    ) -> dict[str, Any]:
        secure = secure or {"mode": "none", "smpc_s": 0.0}
        arrivals = stats["arrival_s"]
        ends = {c["gateway"]: c["close_s"] + c["uplink_s"] for c in closes}
        # The parties start once the last uplink has landed; their protocol is on the clock.
        smpc_s = float(secure.get("smpc_s", 0.0))
        round_s = (max(ends.values()) if ends else 0.0) + smpc_s
        # Critical path: the gateway whose uplink lands last, and its slowest on-time device.
        last_gw = max(ends, key=lambda g: ends[g]) if ends else None
        crit = {
            "cloud_to_gateway": 0.0,
            "device_download": 0.0,
            "device_compute": 0.0,
            "device_upload": 0.0,
            "gateway_wait": 0.0,
            "gateway_to_cloud": 0.0,
            "cloud_smpc": smpc_s,
        }
        if last_gw is not None:
            close = next(c for c in closes if c["gateway"] == last_gw)
            crit["cloud_to_gateway"] = starts[last_gw]
            crit["gateway_to_cloud"] = close["uplink_s"]
            nodes = list(self.topo.devices.values())
            on_gw = np.array(
                [nodes[int(d)].gateway == last_gw for d in stats["device"]], dtype=bool
            )
            ontime = on_gw & (arrivals <= close["close_s"] + 1e-12)
            if ontime.any():
                k = int(np.flatnonzero(ontime)[np.argmax(arrivals[ontime])])
                crit["device_download"] = float(stats["download_s"][k])
                crit["device_compute"] = float(stats["compute_s"][k])
                crit["device_upload"] = float(stats["upload_s"][k])
            used = sum(
                crit[k]
                for k in ("cloud_to_gateway", "device_download", "device_compute", "device_upload")
            )
            crit["gateway_wait"] = max(0.0, close["close_s"] - used)
        n = int(stats["device"].size)
        folded = int(sum(c["folded"] for c in closes))
        rejected: dict[str, int] = {}
        for c in closes:
            for reason, k in c["rejected_by_reason"].items():
                rejected[reason] = rejected.get(reason, 0) + k
        energy = stats["energy_mwh"]
        return {
            "round": round_,
            "accuracy": evaluation.get("accuracy"),
            "loss": evaluation.get("loss"),
            "train_loss": float(np.average(stats["loss"], weights=np.maximum(stats["samples"], 1)))
            if n
            else None,
            "model_version": applied["version"],
            "model_hash": applied["hash"],
            "update_norm": applied["update_norm"],
            "selected": int(sel["sampled"].size),
            "unavailable": sel["unavailable"],
            "dropped": sel.get("dropped", 0),
            "battery_skipped": sel["battery_skipped"],
            "participants": int(applied["devices"]) - folded,
            "folded_late": folded,
            "stragglers": int(sum(c["stragglers"] for c in closes)),
            "rejected": int(sum(c["rejected"] for c in closes)),
            "rejected_by_reason": rejected,
            "gateways_delivered": int(applied["gateways"]),
            "latency_s": round_s,
            "device_latency_s": _percentiles(arrivals),
            "breakdown_critical_s": crit,
            "breakdown_mean_s": {
                "cloud_to_gateway": float(np.mean(list(starts.values()))) if starts else 0.0,
                "device_download": float(stats["download_s"].mean()) if n else 0.0,
                "device_compute": float(stats["compute_s"].mean()) if n else 0.0,
                "device_upload": float(stats["upload_s"].mean()) if n else 0.0,
                "gateway_to_cloud": float(np.mean([c["uplink_s"] for c in closes]))
                if closes
                else 0.0,
                "cloud_smpc": smpc_s,
            },
            "bytes": {
                "device_up": int(stats["update_bytes"].sum()),
                "device_down": int(stats["model_bytes"].sum()),
                "gateway_up": int(sum(c["uplink_bytes"] for c in closes)),
                "cloud_parties": int(secure.get("party_bytes", 0)),
                "gateway_down": int(gw_download["bytes"]) * len(self.topo.gateways),
                "update_bytes_mean": float(stats["update_bytes"].mean()) if n else 0.0,
                "update_bytes_max": int(stats["update_bytes"].max()) if n else 0,
            },
            "downlink": downlink_record(stats, gw_download, len(self.topo.gateways)),
            "retransmitted_packets": int(stats["retransmitted"].sum()),
            "energy_mwh": {
                "total": float(energy.sum()),
                "mean": float(energy.mean()) if n else 0.0,
                "max": float(energy.max()) if n else 0.0,
                "compute_total": float(
                    sum(
                        self._power[d] * c / 3.6
                        for d, c in zip(stats["device"], stats["compute_s"], strict=True)
                    )
                ),
            },
            "steps_mean": float(stats["steps"].mean()) if n else 0.0,
            "privacy": secure,
            "epsilon": secure.get("epsilon"),
            "wall_s": wall,
            **(wall_phases or {"wall_train_s": wall_train}),
        }

    def close(self) -> None:
        try:
            try:
                self._stop_transport()
            finally:
                if self.secure is not None:
                    self.secure.shutdown()
        finally:
            self.backend.shutdown()


def run_emulation(
    cfg: EmulationConfig,
    progress: bool = True,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    topo: Topology | None = None,
) -> dict[str, Any]:
    """Run a whole emulation; write ``report.json`` (and plots) into ``cfg.out`` if given."""
    if cfg.mode == "async":
        from hierarchy.async_emulate import run_async_emulation

        return run_async_emulation(cfg, progress=progress, on_round=on_round, topo=topo)
    t_start = time.perf_counter()
    announce(cfg, progress)
    emu = Emulation(cfg, topo)

    stopped: dict[str, Any] = {}

    def records() -> Iterator[dict[str, Any]]:
        t = 0.0
        for r in range(1, cfg.rounds + 1):
            try:
                emu.check_budget(r)
                rec = emu.run_round(r)
            except RunStopped as exc:
                # A clean stop: what ran is reported, the last applied model is kept.
                stopped.update(kind=exc.kind, round=r, message=str(exc))
                if progress:
                    print(f"\n{exc}", file=sys.stderr, flush=True)
                return
            t += rec["latency_s"]
            rec["time_s"] = t
            yield rec

    initial, rounds = drive(
        emu,
        records,
        progress=progress,
        on_round=on_round,
        desc=f"emulate {emu.topo.name}",
        unit="round",
        postfix=lambda rec: {"lat": f"{rec['latency_s']:.2f}s"},
    )
    report = build_report(emu, rounds, initial, time.perf_counter() - t_start)
    report["stopped"] = stopped or None
    if cfg.out is not None:
        write_report(report, cfg.out, plots=cfg.plots and bool(rounds))
    return report


def announce(cfg: EmulationConfig, progress: bool) -> None:
    """Say what is happening before the (possibly long) actor start-up."""
    if progress:
        print(
            f"starting the {cfg.backend} backend and building the actor tree ...",
            file=sys.stderr,
            flush=True,
        )


def drive(
    emu: Emulation,
    records: Callable[[], Iterator[dict[str, Any]]],
    *,
    progress: bool,
    on_round: Callable[[dict[str, Any]], None] | None,
    desc: str,
    unit: str,
    postfix: Callable[[dict[str, Any]], dict[str, str]],
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Evaluate the initial model, collect every record (with a progress bar), close ``emu``.

    Shared by the sync and async drivers: only where records come from differs.
    """
    rounds: list[dict[str, Any]] = []
    try:
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=emu.cfg.rounds, desc=desc, unit=unit, dynamic_ncols=True)
        initial = gather([emu.coordinator.call("evaluate")])[0]
        for rec in records():
            rounds.append(rec)
            if on_round:
                on_round(rec)
            if bar is not None:
                acc = rec["accuracy"]
                bar.set_postfix(
                    acc=f"{acc:.3f}" if acc is not None else "-", **postfix(rec), refresh=False
                )
                bar.update(1)
        if bar is not None:
            bar.close()
    finally:
        emu.close()
    return initial, rounds


def build_report(
    emu: Emulation, rounds: list[dict[str, Any]], initial: dict[str, float], total_wall: float
) -> dict[str, Any]:
    cfg = emu.cfg
    accs = [r["accuracy"] for r in rounds if r["accuracy"] is not None]
    steady = rounds[1:] if len(rounds) > 1 else rounds
    steady_wall = sum(r["wall_s"] for r in steady)
    lat = [r["latency_s"] for r in rounds] or [0.0]
    eps = [r["epsilon"] for r in rounds if r.get("epsilon") is not None]
    return {
        "tierfl": "0.1.0",
        "config": {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
            "downlink": asdict(cfg.effective_downlink),
            "model": emu.model_name,
        },
        "topology": {
            "name": emu.topo.name,
            "cloud": emu.topo.cloud,
            "gateways": len(emu.topo.gateways),
            "devices": len(emu.topo.devices),
        },
        "model": {
            "name": emu.model_name,
            "params": emu.num_params,
            "initial_hash": emu.initial_hash,
        },
        "placement": emu.describe_placement(),
        "privacy": {
            "mode": emu.privacy,
            "why": emu.privacy_note,
            "parties": cfg.privacy.parties if emu.privacy != "none" else 0,
            "noise_multiplier": cfg.privacy.noise_multiplier,
            "clip_norm": cfg.privacy.clip_norm,
            "secure_clip": cfg.privacy.secure_clip,
            "delta": cfg.privacy.delta if emu.accountant is not None else None,
            "sampling_rate": emu.accountant.sampling_rate if emu.accountant is not None else None,
            "epsilon": eps[-1] if eps else (0.0 if emu.accountant is not None else None),
            "epsilon_budget": cfg.privacy.epsilon_budget,
        },
        "initial": initial,
        "rounds": rounds,
        "summary": {
            "final_accuracy": accs[-1] if accs else None,
            "best_accuracy": max(accs) if accs else None,
            "emulated_time_s": float(sum(r["latency_s"] for r in rounds)),
            "round_latency_p50_s": float(np.median(lat)),
            "round_latency_p95_s": float(np.percentile(lat, 95)),
            "total_bytes_up": int(
                sum(r["bytes"]["device_up"] + r["bytes"]["gateway_up"] for r in rounds)
            ),
            "total_bytes_down": int(
                sum(r["bytes"]["device_down"] + r["bytes"]["gateway_down"] for r in rounds)
            ),
            "downlink": downlink_summary(rounds),
            "stragglers": int(sum(r["stragglers"] for r in rounds)),
            "wall_setup_s": emu.setup_wall_s,
            "wall_transport_s": float(sum(r.get("wall_transport_s", 0.0) for r in rounds)),
            "wall_total_s": total_wall,
            "client_updates_per_s": (sum(r["participants"] for r in steady) / steady_wall)
            if steady_wall > 0
            else None,
        },
    }


def write_report(report: dict[str, Any], out: Path, plots: bool = True) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.json"
    path.write_text(json.dumps(report, indent=2))
    if plots:
        from hierarchy.plots import plot_report

        plot_report(report, out)
    return path
