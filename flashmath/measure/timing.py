"""The one timing helper: seconds per call of several functions, measured side by side.

Timings on a shared machine are noisy; what flashmath reports is a ratio of two
functions timed in the same rounds, so a burst of load hits both alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

__all__ = ["time_calls"]


def time_calls(
    fns: dict[str, Callable[[], Any]], repeat: int = 3, *, budget: float | None = None,
    warmup: bool = True,
) -> dict[str, list[float]]:
    """Seconds per call of each fn, by name: one warm-up call each (unless ``warmup`` is
    False), then ``repeat`` rounds taking them in turn, so a burst of load on the machine
    hits all of them alike. With ``budget`` (seconds), rounds after the second stop once
    that long has passed since timing began: at least min(2, repeat) rounds, at most
    ``repeat``. ``repeat`` below 1 counts as 1. Callers take min (best) or the median of
    each list."""
    if warmup:
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    for r in range(max(1, repeat)):
        if budget is not None and r >= 2 and time.perf_counter() - start >= budget:
            break
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times
