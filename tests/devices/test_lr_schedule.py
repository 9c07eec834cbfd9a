"""Client learning-rate schedules: the endpoints, the shapes in between, and bad input."""

from __future__ import annotations

import itertools
import math

import pytest

from devices.lr_schedule import LR_SCHEDULES, check_lr_schedule, scheduled_lr


@pytest.mark.parametrize("schedule", ["cosine", "exp", "inverse"])
def test_decaying_schedules_run_from_lr_to_lr_times_final_monotonically(schedule: str) -> None:
    lrs = [scheduled_lr(0.3, r, 50, schedule, 0.1) for r in range(1, 51)]
    assert lrs[0] == pytest.approx(0.3, rel=1e-12)
    assert lrs[-1] == pytest.approx(0.03, rel=1e-12)
    assert all(a > b for a, b in itertools.pairwise(lrs))


def test_midpoints_match_the_closed_forms() -> None:
    # 5 rounds: round 3 is t = 1/2.
    assert scheduled_lr(0.2, 3, 5, "cosine", 0.1) == pytest.approx((0.2 + 0.02) / 2)
    assert scheduled_lr(0.2, 3, 5, "exp", 0.1) == pytest.approx(0.2 * math.sqrt(0.1))
    # Li et al.'s 1/(t + gamma): halfway, 1 + (10 - 1) / 2 = 5.5.
    assert scheduled_lr(0.2, 3, 5, "inverse", 0.1) == pytest.approx(0.2 / 5.5)
    # Cosine is flat at the ends: the first step down is far smaller than the middle one.
    c = [scheduled_lr(1.0, r, 101, "cosine", 0.01) for r in (1, 2, 51, 52)]
    assert (c[0] - c[1]) < (c[2] - c[3]) / 50
    # exp multiplies by the same factor every round.
    e = [scheduled_lr(1.0, r, 11, "exp", 0.5) for r in range(1, 12)]
    ratios = [b / a for a, b in itertools.pairwise(e)]
    assert ratios == pytest.approx([0.5**0.1] * 10)


def test_constant_ignores_final_and_one_round_trains_at_lr() -> None:
    assert [scheduled_lr(0.05, r, 7, "constant", 0.1) for r in range(1, 8)] == [0.05] * 7
    for schedule in LR_SCHEDULES:
        assert scheduled_lr(0.05, 1, 1, schedule, 0.1) == 0.05
    # final = 1 is "no decay" for every shape.
    assert scheduled_lr(0.05, 4, 9, "inverse", 1.0) == pytest.approx(0.05)


def test_bad_schedule_final_or_round_is_named() -> None:
    with pytest.raises(ValueError, match="unknown lr-schedule 'linear'"):
        check_lr_schedule("linear", 0.1)
    for final in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="lr-final must be in \\(0, 1\\]"):
            check_lr_schedule("cosine", final)
    with pytest.raises(ValueError, match="round 0 of 5"):
        scheduled_lr(0.1, 0, 5, "cosine", 0.1)
    with pytest.raises(ValueError, match="round 6 of 5"):
        scheduled_lr(0.1, 6, 5, "cosine", 0.1)


def test_warmup_ramps_linearly_to_the_peak_then_the_schedule_decays_from_there() -> None:
    lrs = [scheduled_lr(0.4, r, 20, "cosine", 0.1, warmup=4) for r in range(1, 21)]
    assert lrs[:4] == pytest.approx([0.1, 0.2, 0.3, 0.4])  # round 4 is the peak
    assert lrs[-1] == pytest.approx(0.04)
    assert all(a > b for a, b in itertools.pairwise(lrs[3:]))
    # The decay runs over rounds 4..20: its midpoint (round 12) is halfway down.
    assert lrs[11] == pytest.approx((0.4 + 0.04) / 2)
    # Constant with warm-up: the ramp, then flat.
    assert [scheduled_lr(1.0, r, 5, "constant", 0.1, warmup=2) for r in range(1, 6)] == [
        0.5,
        1.0,
        1.0,
        1.0,
        1.0,
    ]
    # warmup 0 and 1 are both "no ramp": round 1 already trains at lr.
    for w in (0, 1):
        assert [scheduled_lr(0.2, r, 6, "exp", 0.1, warmup=w) for r in range(1, 7)] == [
            scheduled_lr(0.2, r, 6, "exp", 0.1) for r in range(1, 7)
        ]
    # A warm-up as long as the run ends at the peak.
    assert scheduled_lr(0.3, 5, 5, "cosine", 0.1, warmup=5) == pytest.approx(0.3)


def test_bad_warmup_is_named() -> None:
    with pytest.raises(ValueError, match="lr-warmup-rounds must be >= 0"):
        check_lr_schedule("cosine", 0.1, warmup=-1)
    with pytest.raises(ValueError, match=r"warmup-rounds \(6\) must not exceed the rounds \(5\)"):
        scheduled_lr(0.1, 1, 5, "cosine", 0.1, warmup=6)
