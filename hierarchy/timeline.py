"""One round on the virtual clock: per-device phases and the gateway/cloud critical path.

A round starts when the coordinator pushes the model. Per device:

    gateway has model (cloud→gateway downlink)
      → device downloads it (gateway→device)
      → trains (work / device FLOP/s)
      → uploads its real encoded update (device→gateway)

A gateway closes at its last on-time arrival (or at the deadline), then uplinks
its partial aggregate; the round ends when the cloud has every gateway's
uplink. Pure functions: the actors call them, tests check them by hand.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from hierarchy.netem import is_random, transfer_time
from hierarchy.topology import DeviceNode, GatewayNode, Link

# Forward + backward ≈ 3× the forward FLOPs (the usual rule of thumb for dense nets).
TRAIN_FLOPS_PER_FORWARD = 3.0


def rng_for(seed: int, round_: int, index: int, stream: int) -> np.random.Generator:
    """Independent, placement-independent random stream per (seed, round, node, purpose)."""
    return np.random.default_rng([seed, round_, index, stream])


def _link_rng(
    link: Link, seed: int, round_: int, index: int, stream: int
) -> np.random.Generator | None:
    # Building a generator costs ~8 µs; ideal links (no jitter, no loss) draw nothing.
    return rng_for(seed, round_, index, stream) if is_random(link) else None


STREAM_DOWN, STREAM_UP, STREAM_GW_DOWN, STREAM_GW_UP, STREAM_AVAIL = range(5)


@dataclass(frozen=True)
class DeviceTiming:
    start_s: float  # when its gateway held the model
    download_s: float
    compute_s: float
    upload_s: float
    retransmitted_packets: int

    @property
    def arrival_s(self) -> float:
        """Time since round start at which the gateway has the update."""
        return self.start_s + self.download_s + self.compute_s + self.upload_s


def training_flops(forward_flops_per_sample: float, samples_processed: int) -> float:
    return TRAIN_FLOPS_PER_FORWARD * forward_flops_per_sample * samples_processed


def device_timing(
    device: DeviceNode,
    index: int,
    *,
    seed: int,
    round_: int,
    start_s: float,
    model_bytes: int,
    update_bytes: int,
    work_flops: float,
) -> DeviceTiming:
    down = transfer_time(
        model_bytes, device.link, "down", _link_rng(device.link, seed, round_, index, STREAM_DOWN)
    )
    up = transfer_time(
        update_bytes, device.link, "up", _link_rng(device.link, seed, round_, index, STREAM_UP)
    )
    return DeviceTiming(
        start_s=start_s,
        download_s=down.seconds,
        compute_s=work_flops / device.flops,
        upload_s=up.seconds,
        retransmitted_packets=down.retransmitted_packets + up.retransmitted_packets,
    )


def gateway_model_arrival(
    gateway: GatewayNode, index: int, *, seed: int, round_: int, model_bytes: int
) -> float:
    """Cloud→gateway push of the model: when the gateway can start serving it."""
    rng = _link_rng(gateway.link, seed, round_, index, STREAM_GW_DOWN)
    return transfer_time(model_bytes, gateway.link, "down", rng).seconds


def gateway_uplink(
    gateway: GatewayNode, index: int, *, seed: int, round_: int, nbytes: int
) -> float:
    rng = _link_rng(gateway.link, seed, round_, index, STREAM_GW_UP)
    return transfer_time(nbytes, gateway.link, "up", rng).seconds


@dataclass(frozen=True)
class GatewayClose:
    close_s: float  # when the gateway stopped waiting
    included: list[int]  # positions (into the arrivals given) of on-time updates
    stragglers: list[int]  # positions of late updates


def close_gateway(
    arrivals: Sequence[float],
    deadline_s: float | None,
    start_s: float,
    quorum_count: int | None = None,
) -> GatewayClose:
    """When a gateway stops waiting, and which updates made it.

    It closes at the earliest of: the deadline (``deadline_s`` after round
    start), the arrival that completes the quorum (``quorum_count`` updates),
    and the last arrival (nobody else is coming). With late devices and no
    quorum it closes exactly at the deadline (it cannot know nobody else will
    come). A gateway with no device at all closes as soon as it has the model.
    Updates arriving after the close are stragglers.
    """
    order = sorted(range(len(arrivals)), key=lambda i: (arrivals[i], i))
    if not order:
        return GatewayClose(start_s, [], [])
    close = arrivals[order[-1]]
    if quorum_count is not None and 0 < quorum_count <= len(order):
        close = min(close, arrivals[order[quorum_count - 1]])
    if deadline_s is not None and close > deadline_s:
        close = deadline_s
    included = [i for i in range(len(arrivals)) if arrivals[i] <= close]
    late = [i for i in range(len(arrivals)) if arrivals[i] > close]
    return GatewayClose(close, included, late)


def quorum_count(quorum: float | None, selected: int) -> int | None:
    """Updates a gateway waits for: the quorum fraction of the devices selected behind it."""
    if quorum is None or selected == 0:
        return None
    return max(1, math.ceil(quorum * selected - 1e-9))


def staleness_weight(staleness: int | float, exponent: float) -> float:
    """FedBuff-style discount for an update computed on a model ``staleness`` versions old."""
    if staleness < 0:
        raise ValueError(f"staleness must be >= 0, got {staleness}")
    return float((1.0 + staleness) ** -exponent)


def energy_mwh(power_w: float, compute_s: float, radio_s: float) -> float:
    """Device energy for a round: its power draw over compute and radio time (1 mWh = 3.6 J)."""
    return power_w * (compute_s + radio_s) / 3.6
