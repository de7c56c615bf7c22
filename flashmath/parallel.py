"""Independent pieces of work on the cores: the one thread pool, and row blocks.

NumPy releases the GIL inside ufunc loops and reductions on arrays of more than a few
thousand elements, so threads working on disjoint slices of one array really run in
parallel. Two primitives:

- :func:`run_units` runs ``work(unit)`` for every unit on a shared pool of one thread per
  core (:func:`cores`), or in the calling thread when there is one unit, one core, or the
  caller already is one of the pool's threads (nested parallelism would wait on itself).
  The units must write disjoint outputs: nothing is locked.
- :func:`row_blocks` cuts ``rows`` rows of ``row_size`` elements into contiguous blocks
  of about ``block`` elements (at least one row each): small enough that a block's
  temporaries stay in a core's cache, and the natural unit for :func:`run_units`. A
  function that computes each row from that row alone gives the same bits whatever the
  blocks are, so the split never changes results.

NumPy's floating-point error state is per thread: a work function sets its own
``np.errstate``. May import: nothing of flashmath (a bottom layer, like dtypes).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

__all__ = ["cores", "row_blocks", "run_units"]

U = TypeVar("U")

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_inside = threading.local()  # .active is True in the pool's own threads


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _mark_inside() -> None:
    _inside.active = True


def _shared_pool() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(cores(), thread_name_prefix="flashmath",
                                       initializer=_mark_inside)
        return _pool


def run_units(units: Sequence[U], work: Callable[[U], None], *, parallel: bool = True) -> None:
    """``work(unit)`` for every unit, on up to one thread per core.

    ``parallel=False`` (or a single unit, a single core, or a call from inside the pool)
    runs them in order in the calling thread, with no thread overhead. The first
    exception raised by a unit is re-raised here after every unit has finished.
    """
    serial = not parallel or len(units) <= 1 or cores() <= 1 or getattr(_inside, "active", False)
    if serial:
        for unit in units:
            work(unit)
        return
    futures = [_shared_pool().submit(work, unit) for unit in units]
    errors = [f.exception() for f in futures]  # waits for all
    for error in errors:
        if error is not None:
            raise error


def row_blocks(rows: int, row_size: int, *, block: int = 1 << 16) -> list[slice]:
    """Slices ``[r0, r1)`` covering ``range(rows)`` in order, each of about ``block``
    elements (``max(1, block // row_size)`` rows; the last may be shorter).

    ``rows`` and ``row_size`` are >= 0; no rows give no slices."""
    if rows < 0 or row_size < 0 or block < 1:
        raise ValueError(f"row_blocks: expected rows, row_size >= 0 and block >= 1, got "
                         f"{rows}, {row_size}, {block}")
    step = max(1, block // max(row_size, 1))
    return [slice(r0, min(r0 + step, rows)) for r0 in range(0, rows, step)]
