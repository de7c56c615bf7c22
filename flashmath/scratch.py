"""Per-thread scratch arrays for the kernels' large, short-lived temporaries.

Why: a decode step gathers each key range of a paged cache and widens it to float32 or
float64 (1-8 MiB a range), then frees it. glibc hands a freed block back to the kernel
once its heap's free top exceeds the trim threshold, which starts at 128 KiB and rises
only as large mmapped blocks are freed; so in a process whose earlier work has not raised
it, every range faults its pages in afresh. Measured in fresh processes at 32k keys
(B=1, H=8, H_kv=2, D=128, 2 threads): a paged float16 decode took 59 ms against the
contiguous cache's 27 (25 000 page faults a call), where a process that had run larger
calls first took 28. Borrowing the arrays from a pool kept per thread keeps their pages.

    with scratch.borrow("decode.k", shape, dtype) as buf:
        ...  # buf: uninitialised, C-contiguous; valid inside the block only

A tag borrowed again before it is returned (a nested call, say from a score_mod that
itself calls flashmath) gets a fresh array, as does a request above MAX_BYTES: nothing is
ever shared between two live borrowers. :func:`release` drops every pool's blocks (a
block still borrowed is freed once its borrower returns it). May import: nothing of
flashmath (a bottom layer, like dtypes).
"""

from __future__ import annotations

import contextlib
import math
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np

__all__ = ["MAX_BYTES", "borrow", "kept_bytes", "release"]

#: Larger requests are not kept (a whole long cache widened at once: such a block raises
#: glibc's thresholds itself, and keeping it would hold tens of MiB per thread).
MAX_BYTES = 8 << 20


class _Pool:
    """One thread's blocks by tag, and the tags now borrowed."""

    def __init__(self) -> None:
        self.blocks: dict[str, np.ndarray] = {}
        self.busy: set[str] = set()


_local = threading.local()
_pools: weakref.WeakSet[_Pool] = weakref.WeakSet()
_lock = threading.Lock()


def _pool() -> _Pool:
    pool: _Pool | None = getattr(_local, "pool", None)
    if pool is None:
        pool = _local.pool = _Pool()
        with _lock:
            _pools.add(pool)
    return pool


@contextlib.contextmanager
def borrow(tag: str, shape: tuple[int, ...], dtype: Any) -> Iterator[np.ndarray]:
    """An uninitialised C-contiguous array of ``shape`` and ``dtype`` for the block's
    duration: this thread's kept block for ``tag`` (grown when too small), or a fresh
    array when the tag is already borrowed or the array needs more than MAX_BYTES.
    Do not keep a reference past the block: the next borrower of the tag overwrites it."""
    dt = np.dtype(dtype)
    nbytes = math.prod(shape) * dt.itemsize
    pool = _pool()
    if nbytes > MAX_BYTES or tag in pool.busy:
        yield np.empty(shape, dt)
        return
    block = pool.blocks.get(tag)
    if block is None or block.nbytes < nbytes:
        block = pool.blocks[tag] = np.empty(max(nbytes, 1), np.uint8)
    pool.busy.add(tag)
    try:
        yield block[:nbytes].view(dt).reshape(shape)
    finally:
        pool.busy.discard(tag)


def kept_bytes() -> int:
    """Bytes the pools of all threads keep now."""
    with _lock:
        return sum(b.nbytes for pool in _pools for b in list(pool.blocks.values()))


def release() -> None:
    """Drop the blocks every thread's pool keeps (they are reallocated on next use)."""
    with _lock:
        for pool in _pools:
            pool.blocks.clear()
