"""argparse ``type=`` converters shared by every ``tierfl`` subcommand (stdlib only).

One place decides what a numeric flag accepts, so ``tierfl emulate``,
``tierfl topology`` and ``tierfl device`` word their errors the same way and
none of them lets ``nan`` or ``inf`` through (``float("inf") > 0`` is true:
a bound check alone accepts it, and a server learning rate of inf crashed a
run before this existed).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import TypeVar

__all__ = ["number", "positive_float"]

N = TypeVar("N", int, float)


def number(
    kind: type[N],
    *,
    minimum: float | None = None,
    strict: bool = False,
) -> Callable[[str], N]:
    """A converter to ``kind`` (int or float) that names what a value broke.

    ``minimum``: the lower bound, inclusive unless ``strict``. Floats must be
    finite. The errors read ``must be >= 1, got 0``, ``must be an integer, got
    'x'``: argparse prefixes them with the flag.
    """
    what = "an integer" if kind is int else "a number"
    rel = ">" if strict else ">="

    def parse(text: str) -> N:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if minimum is not None and (value <= minimum if strict else value < minimum):
            raise argparse.ArgumentTypeError(f"must be {rel} {minimum:g}, got {text}")
        return value

    # argparse names the type in some messages ("invalid int value").
    parse.__name__ = kind.__name__
    return parse


positive_float = number(float, minimum=0, strict=True)
