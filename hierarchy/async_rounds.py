"""Asynchronous (FedBuff-style) rounds on the virtual clock: the pure event logic.

There are no rounds. Every reachable device cycles on its own: at its start
time it takes the newest model version its gateway holds, downloads it,
trains, and uploads; the moment the upload lands it starts again. A gateway
buffers what lands and flushes a partial aggregate every ``buffer_size``
updates, each discounted by its staleness (versions the cloud applied between
the one the device trained on and the flush); the flush travels up, the cloud
applies it on arrival (a new version) and pushes that version down to every
gateway.

Exact in virtual-time order, yet trained in batches. Events (a model reaching
a gateway, a flush reaching the cloud, an update reaching a gateway, a device
waking up) are processed from a heap in time order. A device that starts is
not trained at once: it becomes *pending*, with a lower bound on its arrival
(start + exact download + exact compute + the least its upload can take). As
long as the heap's next event is strictly earlier than every pending lower
bound, no pending update can land before it, so it is processed as is.
Otherwise all pending devices are trained together (the environment groups
them by model version), their exact arrivals go into the heap, and the loop
goes on. Which version a device starts from is fixed when its start is
processed: every version available at its gateway at that instant reached it
by an event that is already processed (a version reaching a gateway at ``t``
was applied before ``t``, after a flush before that, at an update arrival
that was processed earlier). Same-instant events are ordered: model arrivals,
then cloud applies, then update arrivals, then wake-ups, then by (device,
cycle) -- so a version arriving at ``t`` is used by a device starting at
``t``, and the outcome never depends on how the training was batched.

Availability: every start draws the device's availability coin; a device
that is not reachable sits out one slot (the environment's ``sit_out_s``,
the emulator uses the device's nominal cycle time) and tries again with a
new coin. A device that is no longer eligible (battery below the threshold)
stops for good.

Pure: the environment (a protocol) does the training, the timing draws and
the aggregation; tests drive this module with a hand-made timeline.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from hierarchy.timeline import staleness_weight

# Event kinds, in the order they are processed when they fall on the same instant.
MODEL, APPLY, DEVICE, WAKE = range(4)


@dataclass(frozen=True)
class Job:
    """A device cycle that has started but is not trained yet."""

    device: int
    cycle: int  # the device's own cycle counter (1, 2, ...); seeds its random streams
    gateway: int
    version: int  # the model version it downloads and trains on
    start_s: float
    earliest_s: float  # lower bound on its update's arrival at the gateway


@dataclass(frozen=True)
class Delivery:
    """A trained update landing at its gateway."""

    device: int
    cycle: int
    gateway: int
    version: int
    start_s: float
    arrival_s: float


@dataclass(frozen=True)
class Flush:
    """A gateway's partial aggregate of ``buffer_size`` updates, on its way to the cloud."""

    gateway: int
    index: int  # this gateway's flush counter (1, 2, ...)
    time_s: float  # when the gateway flushed (the arrival that filled the buffer)
    arrival_s: float  # when the cloud has it
    updates: tuple[Delivery, ...]
    cloud_version: int  # the cloud's version when it flushed
    staleness: tuple[int, ...]  # per update: cloud_version - update.version
    factors: tuple[float, ...]  # per update: staleness_weight(staleness, exponent)
    payload: Any = None  # what the environment's flush returned (the partial aggregate ...)


@dataclass
class Applied:
    """One flush applied at the cloud, and what else happened since the previous apply."""

    index: int  # 1, 2, ...: applied flushes so far
    time_s: float
    previous_s: float  # time of the previous apply (0 for the first)
    flush: Flush
    version: int  # the cloud's version after the apply
    new_version: bool  # False when nothing in the flush could be applied
    deliveries: list[Delivery] = field(default_factory=list)  # landed since the previous apply
    started: list[Job] = field(default_factory=list)  # cycles started since then
    sit_outs: int = 0  # starts where the device was not reachable, since then
    retired: int = 0  # devices that stopped for good (not eligible any more), since then
    train_calls: int = 0  # training batches run since then


class Environment(Protocol):
    """What the event logic asks of the emulator (or of a test's hand-made timeline)."""

    def eligible(self, device: int) -> bool:
        """May the device start another cycle at all (battery)?"""
        ...

    def available(self, device: int, cycle: int) -> bool:
        """The device's availability coin for this cycle."""
        ...

    def sit_out_s(self, device: int, cycle: int) -> float:
        """How long an unreachable device waits before trying again (> 0)."""
        ...

    def earliest_arrival_s(self, device: int, cycle: int, start_s: float) -> float:
        """A lower bound on when this cycle's update can land (must never exceed the truth)."""
        ...

    def train(self, jobs: Sequence[Job]) -> Sequence[float]:
        """Train these cycles for real; return each update's exact arrival time, in order."""
        ...

    def delivered(self, delivery: Delivery) -> None:
        """An update landed (the emulator charges the device's energy here)."""
        ...

    def flush(
        self, gateway: int, index: int, updates: Sequence[Delivery], factors: Sequence[float]
    ) -> tuple[float, Any]:
        """Aggregate these updates with these staleness factors: (uplink seconds, payload)."""
        ...

    def apply(self, flush: Flush) -> int:
        """Apply the flush at the cloud; return the cloud's version afterwards."""
        ...

    def push_s(self, version: int) -> Sequence[float]:
        """Per gateway: seconds from the version's apply until the gateway holds it."""
        ...


class AsyncTimeline:
    """The event loop. ``run`` yields one :class:`Applied` per flush applied at the cloud."""

    def __init__(
        self, gateway_of: Sequence[int], buffer_size: int, staleness_exponent: float
    ) -> None:
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
        if staleness_exponent < 0:
            raise ValueError(f"staleness_exponent must be >= 0, got {staleness_exponent}")
        self.gateway_of = [int(g) for g in gateway_of]
        if any(g < 0 for g in self.gateway_of):
            raise ValueError("gateway indices must be >= 0")
        self.num_gateways = max(self.gateway_of, default=-1) + 1
        self.buffer_size = buffer_size
        self.exponent = staleness_exponent
        self.now = 0.0
        self.cloud_version = 0
        self.version_time: dict[int, float] = {0: 0.0}  # apply time of each version
        self.push_delay: dict[tuple[int, int], float] = {}  # (version, gateway) -> push seconds
        self.latest: list[int | None] = [None] * self.num_gateways  # newest version held
        self.train_calls = 0
        self.trained = 0
        self._heap: list[tuple[float, int, int, int, int, Any]] = []
        self._seq = 0
        self._pending: dict[tuple[int, int], Job] = {}
        self._pending_min = math.inf
        self._buffers: list[list[Delivery]] = [[] for _ in range(self.num_gateways)]
        self._flushes = [0] * self.num_gateways
        self._cycles = [0] * len(self.gateway_of)
        self._waiting: list[list[int]] = [[] for _ in range(self.num_gateways)]
        for d, g in enumerate(self.gateway_of):
            self._waiting[g].append(d)
        # What happened since the previous apply (reported with the next one).
        self._deliveries: list[Delivery] = []
        self._started: list[Job] = []
        self._sit_outs = 0
        self._retired = 0
        self._calls_since = 0
        self._last_apply = 0.0
        self._ran = False

    @property
    def pending(self) -> list[Job]:
        return list(self._pending.values())

    def buffered(self, gateway: int) -> list[Delivery]:
        return list(self._buffers[gateway])

    def _push(self, time_s: float, kind: int, a: int, b: int, payload: Any = None) -> None:
        if not time_s >= self.now or not math.isfinite(time_s):
            raise ValueError(f"event at {time_s} is before the clock ({self.now}) or not finite")
        self._seq += 1
        heapq.heappush(self._heap, (time_s, kind, a, b, self._seq, payload))

    def run(self, env: Environment, versions: int) -> Iterator[Applied]:
        """Process events until ``versions`` flushes have been applied (or nothing can happen)."""
        if self._ran:
            raise RuntimeError("an AsyncTimeline runs once")
        self._ran = True
        self._publish(env, 0, 0.0)
        applied = 0
        while applied < versions:
            nxt = self._heap[0][0] if self._heap else math.inf
            if self._pending and not nxt < self._pending_min:
                self._train(env)
                continue
            if not self._heap:
                return  # every device stopped: nothing can ever happen again
            t, kind, a, b, _, payload = heapq.heappop(self._heap)
            self.now = t
            if kind == MODEL:
                self._model_arrives(env, a, b)
            elif kind == APPLY:
                applied += 1
                yield self._apply(env, payload, applied)
            elif kind == DEVICE:
                self._deliver(env, payload)
            else:
                self._start(env, a)

    def _publish(self, env: Environment, version: int, time_s: float) -> None:
        delays = list(env.push_s(version))
        if len(delays) != self.num_gateways:
            raise ValueError(f"push_s gave {len(delays)} delays for {self.num_gateways} gateways")
        for g, d in enumerate(delays):
            if not d >= 0:
                raise ValueError(f"push delay of version {version} to gateway {g} is {d}")
            self.push_delay[(version, g)] = float(d)
            self._push(time_s + d, MODEL, g, version)

    def _model_arrives(self, env: Environment, gateway: int, version: int) -> None:
        held = self.latest[gateway]
        self.latest[gateway] = version if held is None else max(held, version)
        waiting, self._waiting[gateway] = self._waiting[gateway], []
        for d in waiting:  # devices that had no model yet start now
            self._start(env, d)

    def _start(self, env: Environment, device: int) -> None:
        t = self.now
        if not env.eligible(device):
            self._retired += 1
            return
        self._cycles[device] += 1
        c = self._cycles[device]
        if not env.available(device, c):
            self._sit_outs += 1
            wait = float(env.sit_out_s(device, c))
            if not wait > 0:
                raise ValueError(f"sit_out_s of device {device} must be > 0, got {wait}")
            self._push(t + wait, WAKE, device, c)
            return
        g = self.gateway_of[device]
        version = self.latest[g]
        if version is None:  # cannot happen: devices start only once their gateway has a model
            raise RuntimeError(f"device {device} started before gateway {g} had a model")
        earliest = float(env.earliest_arrival_s(device, c, t))
        if not earliest >= t:
            raise ValueError(
                f"earliest arrival of device {device} cycle {c} ({earliest}) is before "
                f"its start ({t})"
            )
        job = Job(device, c, g, version, t, earliest)
        self._pending[(device, c)] = job
        self._pending_min = min(self._pending_min, earliest)
        self._started.append(job)

    def _train(self, env: Environment) -> None:
        jobs = sorted(self._pending.values(), key=lambda j: (j.device, j.cycle))
        arrivals = list(env.train(jobs))
        if len(arrivals) != len(jobs):
            raise ValueError(f"train returned {len(arrivals)} arrivals for {len(jobs)} jobs")
        for job, a in zip(jobs, arrivals, strict=True):
            if not a >= job.earliest_s:
                raise RuntimeError(
                    f"device {job.device} cycle {job.cycle} arrived at {a}, before its lower "
                    f"bound {job.earliest_s}: the event order would not be exact"
                )
            delivery = Delivery(job.device, job.cycle, job.gateway, job.version, job.start_s, a)
            self._push(float(a), DEVICE, job.device, job.cycle, delivery)
        self._pending.clear()
        self._pending_min = math.inf
        self.train_calls += 1
        self._calls_since += 1
        self.trained += len(jobs)

    def _deliver(self, env: Environment, delivery: Delivery) -> None:
        env.delivered(delivery)
        self._deliveries.append(delivery)
        g = delivery.gateway
        self._buffers[g].append(delivery)
        if len(self._buffers[g]) >= self.buffer_size:
            self._flush(env, g)
        self._start(env, delivery.device)  # restarts right away, with a fresh coin

    def staleness(self, updates: Sequence[Delivery]) -> list[int]:
        """Versions the cloud applied since each update's base version (as of now)."""
        return [self.cloud_version - u.version for u in updates]

    def _flush(self, env: Environment, gateway: int) -> None:
        updates, self._buffers[gateway] = self._buffers[gateway], []
        self._flushes[gateway] += 1
        idx = self._flushes[gateway]
        stale = self.staleness(updates)
        factors = [staleness_weight(s, self.exponent) for s in stale]
        uplink_s, payload = env.flush(gateway, idx, updates, factors)
        if not uplink_s >= 0:
            raise ValueError(f"flush uplink of gateway {gateway} took {uplink_s} s")
        t = self.now
        flush = Flush(
            gateway,
            idx,
            t,
            t + float(uplink_s),
            tuple(updates),
            self.cloud_version,
            tuple(stale),
            tuple(factors),
            payload,
        )
        self._push(flush.arrival_s, APPLY, gateway, idx, flush)

    def _apply(self, env: Environment, flush: Flush, index: int) -> Applied:
        version = int(env.apply(flush))
        new = version != self.cloud_version
        if new:
            if version < self.cloud_version:
                raise ValueError(f"apply went back from version {self.cloud_version} to {version}")
            self.cloud_version = version
            self.version_time[version] = self.now
            self._publish(env, version, self.now)
        out = Applied(
            index=index,
            time_s=self.now,
            previous_s=self._last_apply,
            flush=flush,
            version=version,
            new_version=new,
            deliveries=self._deliveries,
            started=self._started,
            sit_outs=self._sit_outs,
            retired=self._retired,
            train_calls=self._calls_since,
        )
        self._last_apply = self.now
        self._deliveries, self._started = [], []
        self._sit_outs = self._retired = self._calls_since = 0
        return out
