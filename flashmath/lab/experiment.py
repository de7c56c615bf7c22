"""What an experiment is: a module that turns a Context into a Result; the runner owns files.

Every experiment module under ``flashmath/lab/`` defines::

    NAME = "softmax-stability"          # the id used by --only and the output folder
    TITLE = "Break naive softmax ..."   # one line, shown by --list and in report.md
    SEEDS = ("001",)                    # the seed labs it answers (docs/seeds.md)
    TIMED = True                        # optional: it times something (default False)
    PRELOAD = ("torch",)                # optional: slow imports to do ahead of time

    def run(ctx: Context) -> Result: ...

On a machine with 2 or more cores the runner runs the experiments that are not ``TIMED``
two at a time (one in a helper process, :mod:`flashmath.lab.helper`), then each ``TIMED``
one alone, so nothing else shares the machine while it measures; the helper imports the
``PRELOAD`` modules of the timed ones meanwhile. Every experiment draws its random
streams from ``Context.rng``, so its results do not depend on what ran beside it.

``run`` computes; it never writes files. The runner writes ``results.json``
(records + summary), each figure as ``<name>.png``, and ``README.md`` (the
experiment's interpretation, written from the measured numbers). An experiment
that cannot run on this machine (no GPU, an optional package missing) raises
``Skipped("why")``: the runner marks it skipped, not failed.

Determinism: with the same seed, results.json is identical except for the
values whose keys are volatile (timings and machine-dependent speed figures):
keys ending in one of ``VOLATILE_SUFFIXES``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["VOLATILE_SUFFIXES", "Context", "Result", "Skipped", "strip_volatile"]

#: Keys with these endings hold timings, speeds, memory peaks or prose quoting them:
#: excluded from the same-seed guarantee.
VOLATILE_SUFFIXES = (
    "_s", "_ms", "_us", "_seconds", "_gflops", "_tflops", "_per_s", "_ratio_time",
    "peak_bytes",  # tracemalloc peaks wobble by tens of bytes between runs
    "headline",  # prose for report.md, which may quote timings and peaks
    "_from_timing",  # figures derived from a measured throughput (a model fed by timings)
)


@dataclass(frozen=True)
class Context:
    """What the runner hands an experiment.

    seed: the run's seed; ``rng()`` gives a fresh Generator derived from it and the
    experiment's name, so experiments do not disturb each other's streams.
    quick: a smaller grid (``flashmath lab --quick``), still every section of the experiment.
    progress: call with a short message as work advances (drives the progress bar).
    """

    name: str
    seed: int = 0
    quick: bool = False
    progress: Callable[[str], None] = field(default=lambda _msg: None, compare=False)

    def rng(self, stream: int = 0) -> np.random.Generator:
        key = [self.seed, stream, *self.name.encode()]
        return np.random.default_rng(key)


@dataclass
class Result:
    """What an experiment returns.

    records: JSON-ready rows (dicts of str/int/float/bool/None/lists); NaN and inf are
      allowed and written as the strings "nan", "inf", "-inf".
    summary: JSON-ready headline figures.
    figures: name -> matplotlib Figure; written as <name>.png and closed by the runner.
    readme: Markdown that interprets the measured numbers (no hard-coded figures).
    headline: one line for report.md (measured, like the readme); when empty the runner
      uses summary["headline"] or else the readme's first line of prose.
    """

    records: list[dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    readme: str = ""
    headline: str = ""


class Skipped(Exception):
    """Raised by ``run`` when the experiment cannot run here; the message says why."""


def strip_volatile(obj: Any) -> Any:
    """A copy of a JSON-like object without the volatile (timing) keys."""
    if isinstance(obj, dict):
        return {
            k: strip_volatile(v)
            for k, v in obj.items()
            if not (isinstance(k, str) and k.endswith(VOLATILE_SUFFIXES))
        }
    if isinstance(obj, list):
        return [strip_volatile(v) for v in obj]
    return obj
