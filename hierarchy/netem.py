"""Software network emulation: how long a transfer of N real bytes takes over a link.

There is no ``tc netem`` on the machines this runs on, and an emulation of
thousands of devices cannot afford real sockets per link anyway, so transfers
are charged on the virtual clock instead. The model is deliberately simple and
documented so users can reason about it:

* one-way latency ``latency_ms`` plus a jitter sample ``|N(0, jitter_ms)|``;
* serialization ``bytes * 8 / bandwidth`` in the direction of travel;
* packet loss: the payload is cut into MTU-sized packets, each lost with
  probability ``loss``; every loss burst costs one retransmission timeout
  (an RTT) plus re-sending the lost packets, repeated until all arrive.

All randomness comes from the caller's ``numpy.random.Generator`` so the same
seed gives the same timeline whichever process computes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from hierarchy.topology import Link

MTU_BYTES = 1400
MAX_RETRANSMIT_ROUNDS = 64
Direction = Literal["up", "down"]


@dataclass(frozen=True)
class Transfer:
    seconds: float
    retransmitted_packets: int


def serialization_s(nbytes: int, mbps: float) -> float:
    return nbytes * 8.0 / (mbps * 1e6)


def is_random(link: Link) -> bool:
    """Whether a transfer over ``link`` draws random numbers (jitter or loss)."""
    return link.jitter_ms > 0 or link.loss > 0


def transfer_time(
    nbytes: int, link: Link, direction: Direction, rng: np.random.Generator | None
) -> Transfer:
    """Virtual seconds to move ``nbytes`` over ``link`` toward the cloud ("up") or away ("down").

    ``rng`` may be None only for a link without jitter and loss (nothing to draw).
    """
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    mbps = link.up_mbps if direction == "up" else link.down_mbps
    latency = link.latency_ms / 1e3
    if rng is None and is_random(link):
        raise ValueError("a link with jitter or loss needs a random generator")
    jitter = abs(rng.normal(0.0, link.jitter_ms / 1e3)) if rng and link.jitter_ms > 0 else 0.0
    seconds = latency + jitter + serialization_s(nbytes, mbps)
    retransmitted = 0
    if rng is not None and link.loss > 0 and nbytes > 0:
        pending = int(rng.binomial(max(1, math.ceil(nbytes / MTU_BYTES)), link.loss))
        rounds = 0
        while pending > 0 and rounds < MAX_RETRANSMIT_ROUNDS:
            retransmitted += pending
            # A loss is noticed after a retransmission timeout of about one RTT.
            seconds += 2 * latency + serialization_s(pending * MTU_BYTES, mbps)
            pending = int(rng.binomial(pending, link.loss))
            rounds += 1
    return Transfer(seconds, retransmitted)
