"""argparse types shared by the commands: a bad value becomes argparse's one-line
"invalid <name> value" error and exit 2 (the function's __name__ is the name shown)."""

from __future__ import annotations

import math

__all__ = ["non_negative", "positive", "seconds"]


def positive(text: str) -> int:
    """An integer >= 1."""
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def non_negative(text: str) -> int:
    """An integer >= 0."""
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def seconds(text: str) -> float:
    """A finite number of seconds > 0."""
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(text)
    return value


positive.__name__ = "positive integer"
non_negative.__name__ = "non-negative integer"
seconds.__name__ = "positive number of seconds"
