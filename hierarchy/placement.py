"""Placement policy: which process hosts which logical gateways and device cohorts.

The topology is the logical tree; processes are expensive (every Ray actor is a
process, hundreds of MB once torch is imported), so on one machine many
logical gateways share a few gateway-host actors and many devices share a pool
of cohort trainers sized to the CPUs. On a cluster, a node that advertises the
custom resource ``gateway:<id>`` gets a host actor of its own for that
gateway, so gateways run on their edge servers without code changes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from hierarchy.topology import Topology


@dataclass(frozen=True)
class HostPlan:
    gateways: list[str]
    resources: dict[str, float] = field(default_factory=dict)  # Ray custom resources to request


@dataclass(frozen=True)
class Placement:
    gateway_hosts: list[HostPlan]
    trainers: list[list[int]]  # trainer -> device indices (into topology.devices order)

    def host_of(self) -> dict[str, int]:
        return {g: i for i, h in enumerate(self.gateway_hosts) for g in h.gateways}


def split_contiguous_balanced(weights: Sequence[float], parts: int) -> list[list[int]]:
    """Cut 0..n-1 into ``parts`` contiguous runs of roughly equal total weight.

    Contiguous keeps each trainer's devices under few gateways (fewer
    submissions per round); balancing by weight (sample count) evens out the
    trainers' work. Empty runs are dropped.
    """
    n = len(weights)
    parts = max(1, min(parts, n))
    w = [float(x) for x in weights] if sum(weights) > 0 else [1.0] * n
    total = sum(w)
    out: list[list[int]] = []
    current: list[int] = []
    acc = 0.0
    for i, wi in enumerate(w):
        current.append(i)
        acc += wi
        remaining = parts - len(out) - 1
        if remaining > 0 and acc >= total * (len(out) + 1) / parts and n - i - 1 >= remaining:
            out.append(current)
            current = []
    if current:
        out.append(current)
    return out


def plan_placement(
    topo: Topology,
    *,
    trainers: int,
    gateway_hosts: int,
    device_weights: Sequence[float] | None = None,
    cluster_resources: Mapping[str, float] | None = None,
) -> Placement:
    if trainers < 1 or gateway_hosts < 1:
        raise ValueError("need at least one trainer and one gateway host")
    gateway_ids = list(topo.gateways)
    pinned: list[HostPlan] = []
    packed: list[str] = []
    for g in gateway_ids:
        key = f"gateway:{g}"
        if cluster_resources and cluster_resources.get(key, 0) > 0:
            pinned.append(HostPlan([g], {key: 0.001}))
        else:
            packed.append(g)
    hosts = list(pinned)
    if packed:
        n_hosts = min(gateway_hosts, len(packed))
        hosts += [HostPlan(packed[i::n_hosts]) for i in range(n_hosts)]
    weights = list(device_weights) if device_weights is not None else [1.0] * len(topo.devices)
    if len(weights) != len(topo.devices):
        raise ValueError("device_weights must have one entry per device")
    return Placement(hosts, split_contiguous_balanced(weights, trainers) if weights else [])
