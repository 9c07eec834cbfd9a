"""Asynchronous (FedBuff-style) emulation: the actor glue around ``hierarchy.async_rounds``.

``tierfl emulate TOPOLOGY --mode async --buffer-size B`` runs the same actor
tree, the same vectorized training, codecs, gateway decoding and virtual clock
as the synchronous driver; only the schedule differs (see
:mod:`hierarchy.async_rounds` for the event logic and why it is exact):
every reachable device cycles on its own, each gateway flushes every ``B``
updates (weighted samples x ``(1 + staleness)^-a``), the cloud applies each
flush on arrival and pushes the new version down.

Placement-independent random streams. Device ``i``'s cycle ``c`` plays the
part of the synchronous round: its training seed, codec randomness, download
and upload draws are ``(seed, c, i, purpose)``, and its availability coin is
``rng_for(seed, c, i, STREAM_AVAIL)``. Version ``v``'s push to the gateways
uses the streams of round ``v + 1`` (so version 0 reaches them exactly as in
synchronous round 1), and a gateway's ``k``-th flush its uplink stream ``k``.

Choices, documented:

* An unreachable device sits out one *slot* = its nominal cycle time (one-way
  latency + model bytes / downlink, compute, latency + least update bytes /
  uplink: the cycle without jitter or loss), then draws a new coin. It is a
  function of the device alone, so it does not depend on history.
* Staleness = versions the cloud had applied by the flush minus the version
  the device trained on. The public total weight counts samples at full
  weight, so a stale update shrinks the cloud's step (FedBuff), not only its
  share of the flush.
* Devices without training data, and devices whose battery fell below
  ``min_battery_mwh``, stop cycling.
* A record per applied flush ("round" = applied flushes so far), in the
  synchronous report's schema: ``latency_s`` is the virtual time since the
  previous apply and ``time_s`` the apply's time; ``participants`` the updates
  in the flush, ``stragglers`` 0; ``bytes``, ``energy_mwh`` and retransmissions
  account for everything the fleet did since the previous apply (cycles
  started: downloads; updates landed: uploads and energy), so they add up
  over the run. ``breakdown_critical_s`` follows the update that filled the
  buffer from its base version's apply to this apply (it sums to that span,
  not to ``latency_s``); ``gateway_wait`` is how long that version sat at the
  gateway before the device (busy with its previous cycle) picked it up.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, replace
from typing import Any

import numpy as np

from hierarchy.actors import model_nbytes
from hierarchy.async_rounds import Applied, AsyncTimeline, Delivery, Flush, Job
from hierarchy.backend import gather, put
from hierarchy.emulate import (
    Emulation,
    EmulationConfig,
    _merge_stats,
    _percentiles,
    announce,
    build_report,
    drive,
    write_report,
)
from hierarchy.netem import transfer_time
from hierarchy.timeline import (
    STREAM_AVAIL,
    STREAM_DOWN,
    STREAM_UP,
    energy_mwh,
    gateway_model_arrival,
    rng_for,
)
from hierarchy.topology import Topology

MIN_SIT_OUT_S = 1e-3


def default_buffer_size(num_devices: int, num_gateways: int) -> int:
    """Half the devices behind a gateway (on average), at least one."""
    return max(1, num_devices // max(1, num_gateways) // 2)


class AsyncEmulation(Emulation):
    """The synchronous emulation's actor tree, driven by the asynchronous event loop.

    It is the :class:`~hierarchy.async_rounds.Environment` of its timeline: it
    draws coins and link times, trains pending cycles through the cohort
    trainers (one vectorized call per trainer and model version), flushes at
    the gateway hosts and applies at the coordinator.
    """

    def __init__(self, cfg: EmulationConfig, topo: Topology | None = None) -> None:
        super().__init__(cfg, topo)
        try:
            self._prepare()
        except BaseException:
            self.backend.shutdown()
            raise

    def _prepare(self) -> None:
        from devices.training import LocalTrainingConfig

        cfg = self.cfg
        self.local = LocalTrainingConfig(**asdict(cfg.local))
        self._nodes = list(self.topo.devices.values())
        self._gw_ids = list(self.topo.gateways)
        self._gw_nodes = list(self.topo.gateways.values())
        self.m_bytes = model_nbytes(self.num_params)
        self.buffer_size = cfg.buffer_size or default_buffer_size(
            len(self._nodes), len(self._gw_ids)
        )
        prof = _merge_stats(
            gather(
                [
                    t.call("cycle_profile", self.local, cfg.uplink, self.num_params)
                    for t in self.trainers
                ]
            )
        )
        self._samples = prof["samples"]
        self._compute_s = prof["compute_s"]
        self._min_up = prof["min_update_bytes"]
        self._trainer_of = np.zeros(len(self._nodes), dtype=np.int64)
        for ti, idx in enumerate(self.placement.trainers):
            self._trainer_of[idx] = ti
        host_of = self.placement.host_of()
        self._host_of_gw = [host_of[g] for g in self._gw_ids]
        params0 = gather([self.coordinator.call("params")])[0]
        self._params: dict[int, Any] = {0: put(params0)}
        self._cycles: dict[tuple[int, int], dict[str, float]] = {}
        self._applied: dict[str, Any] = {}
        self._applies = 0
        self._wall_train = 0.0
        self.timeline = AsyncTimeline(
            self._gateway_of.tolist(), self.buffer_size, cfg.staleness_exponent
        )

    # --- the timeline's environment ------------------------------------------------

    def eligible(self, device: int) -> bool:
        return bool(self._samples[device] > 0 and self.battery[device] >= self.cfg.min_battery_mwh)

    def available(self, device: int, cycle: int) -> bool:
        u = rng_for(self.cfg.seed, cycle, device, STREAM_AVAIL).random()
        return bool(u < self._availability[device])

    def sit_out_s(self, device: int, cycle: int) -> float:
        link = self._nodes[device].link
        nominal = (
            2 * link.latency_ms / 1e3
            + 8 * self.m_bytes / (link.down_mbps * 1e6)
            + float(self._compute_s[device])
            + 8 * float(self._min_up[device]) / (link.up_mbps * 1e6)
        )
        return max(nominal, MIN_SIT_OUT_S)

    def earliest_arrival_s(self, device: int, cycle: int, start_s: float) -> float:
        # Summed in DeviceTiming.arrival_s's order from the same draws: float addition is
        # monotone, so a smaller upload term gives a bound that never exceeds the truth.
        node, seed = self._nodes[device], self.cfg.seed
        down = transfer_time(
            self.m_bytes, node.link, "down", rng_for(seed, cycle, device, STREAM_DOWN)
        ).seconds
        # Same jitter draw (it comes first), no loss, the least payload: a lower bound.
        up = transfer_time(
            int(self._min_up[device]),
            replace(node.link, loss=0.0),
            "up",
            rng_for(seed, cycle, device, STREAM_UP),
        ).seconds
        return start_s + down + float(self._compute_s[device]) + up

    def train(self, jobs: Sequence[Job]) -> list[float]:
        wall0 = time.perf_counter()
        groups: dict[tuple[int, int], list[int]] = {}
        for k, job in enumerate(jobs):
            groups.setdefault((int(self._trainer_of[job.device]), job.version), []).append(k)
        futures = [
            self.trainers[ti].call(
                "train_devices",
                self._params[version],
                [jobs[k].device for k in ks],
                [jobs[k].cycle for k in ks],
                [jobs[k].start_s for k in ks],
                self.local,
                self.cfg.seed,
                self.cfg.uplink,
            )
            for (ti, version), ks in groups.items()
        ]
        arrivals = [0.0] * len(jobs)
        for ks, stats in zip(groups.values(), gather(futures), strict=True):
            for row, k in enumerate(ks):
                job = jobs[k]
                if int(stats["device"][row]) != job.device:
                    raise RuntimeError("a trainer returned its devices out of order")
                self._cycles[(job.device, job.cycle)] = {
                    key: float(v[row]) for key, v in stats.items()
                }
                arrivals[k] = float(stats["arrival_s"][row])
        # Versions no gateway holds any more are never trained on again.
        held = [v for v in self.timeline.latest if v is not None]
        oldest = min(held, default=0)
        for v in [v for v in self._params if v < oldest]:
            del self._params[v]
        self._wall_train += time.perf_counter() - wall0
        return arrivals

    def delivered(self, delivery: Delivery) -> None:
        row = self._cycles[(delivery.device, delivery.cycle)]
        row["energy_mwh"] = energy_mwh(
            float(self._power[delivery.device]),
            row["compute_s"],
            row["download_s"] + row["upload_s"],
        )
        self.battery[delivery.device] -= row["energy_mwh"]

    def flush(
        self, gateway: int, index: int, updates: Sequence[Delivery], factors: Sequence[float]
    ) -> tuple[float, Any]:
        host = self.hosts[self._host_of_gw[gateway]]
        keys = [(u.device, u.cycle) for u in updates]
        res = gather(
            [host.call("flush", self._gw_ids[gateway], index, keys, [float(f) for f in factors])]
        )[0]
        return float(res["uplink_s"]), res

    def apply(self, flush: Flush) -> int:
        self._applies += 1
        applied = gather(
            [self.coordinator.call("apply", self._applies, [flush.payload["partial"]])]
        )[0]
        self._applied = applied
        version = int(applied["version"])
        if version not in self._params:
            self._params[version] = put(gather([self.coordinator.call("params")])[0])
        return version

    def push_s(self, version: int) -> list[float]:
        return [
            gateway_model_arrival(
                node, i, seed=self.cfg.seed, round_=version + 1, model_bytes=self.m_bytes
            )
            for i, node in enumerate(self._gw_nodes)
        ]

    # --- the run ---------------------------------------------------------------------

    def run(self) -> Iterator[dict[str, Any]]:
        """One record per applied flush, until ``cfg.rounds`` are applied."""
        cfg = self.cfg
        wall0 = time.perf_counter()
        for a in self.timeline.run(self, cfg.rounds):
            evaluation: dict[str, float] = {}
            if a.index % cfg.eval_every == 0 or a.index == cfg.rounds:
                evaluation = gather([self.coordinator.call("evaluate")])[0]
            now = time.perf_counter()
            rec = self._version_record(a, evaluation, now - wall0, self._wall_train)
            wall0, self._wall_train = now, 0.0
            for u in a.flush.updates:
                del self._cycles[(u.device, u.cycle)]
            yield rec

    def _version_record(
        self, a: Applied, evaluation: dict[str, float], wall: float, wall_train: float
    ) -> dict[str, Any]:
        f, applied, tl = a.flush, self._applied, self.timeline
        res = f.payload
        g = f.gateway
        rows = [self._cycles[(u.device, u.cycle)] for u in f.updates]
        landed = [self._cycles[(d.device, d.cycle)] for d in a.deliveries]

        def col(rs: list[dict[str, float]], key: str) -> np.ndarray:
            return np.array([r[key] for r in rs], dtype=np.float64)

        samples = col(rows, "samples")
        # The update that filled the buffer, from its base version's apply to this apply.
        last, lrow = f.updates[-1], rows[-1]
        push = tl.push_delay[(last.version, g)]
        crit = {
            "cloud_to_gateway": push,
            "device_download": lrow["download_s"],
            "device_compute": lrow["compute_s"],
            "device_upload": lrow["upload_s"],
            "gateway_wait": max(0.0, last.start_s - tl.version_time[last.version] - push),
            "gateway_to_cloud": f.arrival_s - f.time_s,
        }
        energy = col(landed, "energy_mwh")
        up_bytes = col(landed, "update_bytes")
        power = self._power
        return {
            "round": a.index,
            "time_s": a.time_s,
            "accuracy": evaluation.get("accuracy"),
            "loss": evaluation.get("loss"),
            "train_loss": float(np.average(col(rows, "loss"), weights=np.maximum(samples, 1))),
            "model_version": applied["version"],
            "model_hash": applied["hash"],
            "update_norm": applied["update_norm"],
            "selected": len(f.updates),
            "unavailable": a.sit_outs,
            "battery_skipped": int(np.sum(self.battery < self.cfg.min_battery_mwh)),
            "participants": int(applied["devices"]),
            "folded_late": 0,
            "stragglers": 0,
            "rejected": int(res["rejected"]),
            "rejected_by_reason": dict(res["rejected_by_reason"]),
            "gateways_delivered": int(applied["gateways"]),
            "latency_s": a.time_s - a.previous_s,
            "device_latency_s": _percentiles(
                np.array([u.arrival_s - u.start_s for u in f.updates])
            ),
            "breakdown_critical_s": crit,
            "breakdown_mean_s": {
                "cloud_to_gateway": float(
                    np.mean([tl.push_delay[(u.version, g)] for u in f.updates])
                ),
                "device_download": float(col(rows, "download_s").mean()),
                "device_compute": float(col(rows, "compute_s").mean()),
                "device_upload": float(col(rows, "upload_s").mean()),
                "gateway_to_cloud": crit["gateway_to_cloud"],
            },
            "bytes": {
                "device_up": int(up_bytes.sum()),
                "device_down": self.m_bytes * len(a.started),
                "gateway_up": int(res["uplink_bytes"]),
                "gateway_down": self.m_bytes * len(self._gw_ids) if a.new_version else 0,
                "update_bytes_mean": float(up_bytes.mean()) if landed else 0.0,
                "update_bytes_max": int(up_bytes.max()) if landed else 0,
            },
            # Async downloads are always the full model (--downlink delta is sync-only).
            "downlink": {
                "cloud_to_gateway": {
                    "bytes_each": self.m_bytes if a.new_version else 0,
                    "gateways": len(self._gw_ids),
                    "kind": "full",
                },
                "gateway_to_device": {
                    "bytes_mean": float(self.m_bytes) if a.started else 0.0,
                    "bytes_max": self.m_bytes if a.started else 0,
                    "full": len(a.started),
                    "delta": 0,
                    "chain_steps_max": 0,
                },
            },
            "retransmitted_packets": int(col(landed, "retransmitted").sum()),
            "energy_mwh": {
                "total": float(energy.sum()),
                "mean": float(energy.mean()) if landed else 0.0,
                "max": float(energy.max()) if landed else 0.0,
                "compute_total": float(
                    sum(
                        power[d.device] * r["compute_s"] / 3.6
                        for d, r in zip(a.deliveries, landed, strict=True)
                    )
                ),
            },
            "steps_mean": float(col(rows, "steps").mean()),
            "wall_s": wall,
            "wall_train_s": wall_train,
            # Asynchronous-only fields.
            "gateway": self._gw_ids[g],
            "flush": f.index,
            "devices": [self._nodes[u.device].id for u in f.updates],
            "staleness": {
                "mean": float(np.mean(f.staleness)),
                "max": int(max(f.staleness)),
                "values": list(f.staleness),
            },
            "staleness_weight_min": float(min(f.factors)),
            "updates_landed": len(a.deliveries),
            "cycles_started": len(a.started),
            "train_calls": a.train_calls,
        }


def run_async_emulation(
    cfg: EmulationConfig,
    progress: bool = True,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    topo: Topology | None = None,
) -> dict[str, Any]:
    """``run_emulation`` for ``mode="async"``: same report, one record per applied flush."""
    t_start = time.perf_counter()
    announce(cfg, progress)
    emu = AsyncEmulation(cfg, topo)
    initial, rounds = drive(
        emu,
        emu.run,
        progress=progress,
        on_round=on_round,
        desc=f"emulate {emu.topo.name} (async)",
        unit="version",
        postfix=lambda rec: {"t": f"{rec['time_s']:.1f}s"},
    )
    if not rounds:
        raise RuntimeError(
            f"{emu.topo.name}: no update could ever be applied (no device with data and battery)"
        )
    if len(rounds) < cfg.rounds:
        print(
            f"warning: every device stopped (battery or no data) after {len(rounds)} versions",
            file=sys.stderr,
        )
    report = build_report(emu, rounds, initial, time.perf_counter() - t_start)
    tl = emu.timeline
    report["summary"]["async"] = {
        "buffer_size": emu.buffer_size,
        "train_calls": tl.train_calls,
        "cycles_trained": tl.trained,
        "cycles_per_train_call": tl.trained / tl.train_calls if tl.train_calls else 0.0,
    }
    if cfg.out is not None:
        write_report(report, cfg.out, plots=cfg.plots)
    return report
