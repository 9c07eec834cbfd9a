"""Client learning-rate schedules over rounds: the local SGD step size of round ``r``.

Why a schedule at all: with a constant client learning rate, FedAvg on
non-IID data does not converge to the optimum of the pooled loss but to a
neighbourhood of it whose size grows with the learning rate times the local
steps (client drift: every device walks toward its own optimum before the
average is taken). Li et al., "On the Convergence of FedAvg on Non-IID Data"
(ICLR 2020) show that a decaying learning rate is *necessary* for FedAvg to
converge there. A schedule lets the early rounds take large steps (fast
progress while the model is far from any optimum) and the late rounds small
ones (little drift, so the average settles near the pooled optimum), while
the server stays plain FedAvg (server learning rate 1, no momentum).

Every schedule starts at ``lr`` in round 1 and ends at ``lr * final`` in the
last round; the shapes differ in between:

- ``constant``: ``lr`` every round (``final`` is ignored).
- ``cosine``: ``lr_end + (lr - lr_end) * (1 + cos(pi * t)) / 2`` -- flat at
  both ends, fastest decay in the middle.
- ``exp``: ``lr * final ** t`` -- the same factor every round.
- ``inverse``: ``lr / (1 + (1 / final - 1) * t)`` -- the ``1 / (t + gamma)``
  decay of Li et al.'s convergence theorem.

with ``t = (r - 1) / (rounds - 1)`` running from 0 to 1 (``t = 0`` when there
is one round).

Optional linear warm-up over the first ``warmup`` rounds (Goyal et al.,
"Accurate, Large Minibatch SGD", 2017): round ``r <= warmup`` trains at
``lr * r / warmup``, so the peak ``lr`` is reached in round ``warmup`` and the
decay then runs over rounds ``warmup .. rounds`` (``t = (r - warmup) /
(rounds - warmup)``). Why: at a large client rate the first rounds, taken from
a random model, give the largest and least aligned device updates; a ramp
lets the average find a common direction first (on HAPT with clipped steps
it did not pay off -- bench/RESULTS.md -- but it is the standard remedy for
an unstable start). ``warmup = 0`` is the plain schedule above.

Pure functions of their arguments, no torch: the driver computes each
round's rate and hands it to the trainers as a plain number, so a cohort
trained with ``vmap`` and devices trained one by one see the same rate by
construction.
"""

from __future__ import annotations

import math

LR_SCHEDULES = ("constant", "cosine", "exp", "inverse")


def check_lr_schedule(
    schedule: str, final: float, warmup: int = 0, rounds: int | None = None
) -> None:
    """Raise ``ValueError`` naming what is wrong with a schedule and its end fraction."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(
            f"unknown lr-schedule {schedule!r}; choose one of {', '.join(LR_SCHEDULES)}"
        )
    # 0 would make exp/inverse undefined and waste cosine's last round on a zero step.
    if not (math.isfinite(final) and 0 < final <= 1):
        raise ValueError(f"lr-final must be in (0, 1] (a fraction of --lr), got {final}")
    if warmup < 0:
        raise ValueError(f"lr-warmup-rounds must be >= 0, got {warmup}")
    if rounds is not None and warmup > rounds:
        raise ValueError(f"lr-warmup-rounds ({warmup}) must not exceed the rounds ({rounds})")


def scheduled_lr(
    lr: float, round_: int, rounds: int, schedule: str, final: float, warmup: int = 0
) -> float:
    """The client learning rate of round ``round_`` (1-based) of ``rounds``."""
    check_lr_schedule(schedule, final, warmup, max(rounds, 0))
    if rounds < 1 or not 1 <= round_ <= rounds:
        raise ValueError(f"scheduled_lr: need 1 <= round <= rounds, got round {round_} of {rounds}")
    if round_ < warmup:
        return lr * round_ / warmup
    if schedule == "constant":
        return lr
    start = max(warmup, 1)  # the round that trains at the peak lr
    t = (round_ - start) / (rounds - start) if rounds > start else 0.0
    if schedule == "cosine":
        end = lr * final
        return end + (lr - end) * (1.0 + math.cos(math.pi * t)) / 2.0
    if schedule == "exp":
        return lr * final**t
    return lr / (1.0 + (1.0 / final - 1.0) * t)  # inverse
