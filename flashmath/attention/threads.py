"""How the NumPy kernels use the cores: one worker thread per core, BLAS single-threaded in each.

The tiled loops split work into independent units (a (batch, head) slice) and run them on
the package's one thread pool (:mod:`flashmath.parallel`). NumPy releases the GIL inside
BLAS calls and inside ufunc loops on large arrays, so the threads really run in parallel.
Each worker limits OpenBLAS to one thread for its own calls
(``openblas_set_num_threads_local``, OpenBLAS >= 0.3.27): OpenBLAS's own threads on top of
ours oversubscribe the cores, and on a busy machine its spinning threads made the forward
2-10x slower in measurements. The limit is thread-local and restored after each unit;
where NumPy's BLAS is not such an OpenBLAS the limiter does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np

from flashmath import parallel
from flashmath.blas import openblas_paths
from flashmath.parallel import cores

__all__ = ["cores", "one_blas_thread", "run_units"]

U = TypeVar("U")


@functools.cache
def _set_local_threads() -> Callable[[int], int] | None:
    """OpenBLAS's thread-local ``openblas_set_num_threads_local`` from the library NumPy
    loaded (:func:`flashmath.blas.openblas_paths`), or None."""
    for path in openblas_paths():
        try:
            fn: Any = ctypes.CDLL(path).openblas_set_num_threads_local
        except (OSError, AttributeError):
            continue
        fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
        return fn
    return None


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """Within the block, BLAS calls of this thread use one thread (no-op without OpenBLAS)."""
    set_local = _set_local_threads()
    if set_local is None:
        yield
        return
    previous = set_local(1)
    try:
        yield
    finally:
        set_local(previous)


def run_units(units: Sequence[U], work: Callable[[U], None]) -> None:
    """work(unit) for every unit, on the shared pool (:func:`flashmath.parallel.run_units`:
    one thread per core, inline for one unit or from inside the pool).

    The units must write disjoint outputs (no locks are taken). Each runs with BLAS on
    one thread and with NumPy's floating-point warnings off: the kernels produce NaN rows
    for NaN/inf input and log(0) = -inf for empty rows by contract (np.errstate is per
    thread, so it is set here, inside each worker).
    """

    def quiet(unit: U) -> None:
        with one_blas_thread(), np.errstate(all="ignore"):
            work(unit)

    parallel.run_units(units, quiet)
