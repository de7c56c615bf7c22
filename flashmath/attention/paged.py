"""A paged KV cache (vLLM / flash-attention ``block_table`` style): validation, gathering
a key range into contiguous tiles, and appending new keys in place.

Layout (chosen so that one page of one K/V head is a contiguous (page_size, D) block)::

    k_cache: (num_pages, H_kv, page_size, D)      v_cache: (num_pages, H_kv, page_size, Dv)
    block_table: (B, max_pages) int32: page p of sequence b is k_cache[block_table[b, p]]
    key position t of sequence b lives in page block_table[b, t // page_size], row
    t % page_size

flash-attention stores (num_blocks, page_size, H_kv, D); flashmath keeps heads before the
page rows, as its contiguous cache keeps (B, H_kv, Sk, D), so a gathered range needs one
transpose of whole pages, never of rows. Entries of block_table past a sequence's last
used page are never read (they may hold anything, -1 included).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flashmath.attention.options import check_shapes
from flashmath.dtypes import as_float_array
from flashmath.rounding import cast

__all__ = ["append_kv", "capacity_shapes", "check_append", "check_block_table",
           "check_paged_cache", "check_paged_shapes", "gather_keys"]


def check_paged_cache(k_cache: Any, v_cache: Any) -> tuple[np.ndarray, np.ndarray]:
    """k_cache (num_pages, H_kv, page_size, D), v_cache (num_pages, H_kv, page_size, Dv):
    one float dtype, same pages, heads and page size. Returns them as arrays (no copy)."""
    k = as_float_array(k_cache, name="k_cache")
    v = as_float_array(v_cache, name="v_cache")
    check_paged_shapes(k, v)
    return k, v


def check_paged_shapes(k_cache: Any, v_cache: Any) -> None:
    """The paged-cache rule of :func:`check_paged_cache` on anything with ``.shape`` and
    ``.dtype`` (NumPy arrays, torch tensors; nothing is converted)."""
    k, v = tuple(k_cache.shape), tuple(v_cache.shape)
    for name, shape, legend in (("k_cache", k, "D"), ("v_cache", v, "Dv")):
        if len(shape) != 4:
            raise ValueError(f"{name}: a paged cache is 4-D (num_pages, H_kv, page_size, "
                             f"{legend}), got shape {shape}")
    if k[:3] != v[:3]:
        raise ValueError(f"v_cache: (num_pages, H_kv, page_size) {v[:3]} differs from "
                         f"k_cache's {k[:3]}")
    if k_cache.dtype != v_cache.dtype:
        raise TypeError(f"k_cache, v_cache must share one dtype; got {k_cache.dtype}, "
                        f"{v_cache.dtype}")
    if k[2] == 0:
        raise ValueError(f"k_cache: page_size must be positive, got shape {k}")


class _Shape:
    """A stand-in with .shape and .dtype, to run the one (B, H, S, D) rule on a paged cache."""

    def __init__(self, shape: tuple[int, ...], dtype: Any) -> None:
        self.shape, self.dtype = shape, dtype


def capacity_shapes(k_cache: Any, v_cache: Any, table_shape: tuple[int, ...]
                    ) -> tuple[Any, Any]:
    """A paged cache (checked by :func:`check_paged_shapes`) as (B, H_kv, Sk, D|Dv)
    stand-ins for :func:`~flashmath.attention.options.check_shapes`, Sk = max_pages *
    page_size being the capacity; ``table_shape`` must be (B, max_pages)."""
    if len(table_shape) != 2:
        raise ValueError(f"block_table: expected shape (B, max_pages), got {table_shape}")
    b, cap = table_shape[0], table_shape[1] * k_cache.shape[2]
    return (_Shape((b, k_cache.shape[1], cap, k_cache.shape[3]), k_cache.dtype),
            _Shape((b, v_cache.shape[1], cap, v_cache.shape[3]), v_cache.dtype))


def check_append(q: Any, k_new: Any, v_new: Any, k_cache: Any, v_cache: Any,
                 lengths: np.ndarray, capacity: int) -> np.ndarray:
    """k_new, v_new (B, H_kv, S_new, D|Dv) fit the cache (heads and head dims of
    k_cache/v_cache, contiguous or paged, and lengths + S_new <= capacity); anything with
    ``.shape`` and ``.dtype``. Returns the lengths after the append."""
    if k_new is None or v_new is None:
        raise ValueError("k_new, v_new: give both (the new keys and their values) or neither")
    check_shapes(q, k_new, v_new, names=("q", "k_new", "v_new"))
    h_kv, d, dv = k_cache.shape[1], k_cache.shape[3], v_cache.shape[3]
    if k_new.shape[1] != h_kv or k_new.shape[3] != d or v_new.shape[3] != dv:
        raise ValueError(f"k_new, v_new: expected (B, H_kv, S_new, D|Dv) with H_kv={h_kv}, "
                         f"D={d}, Dv={dv}; got {tuple(k_new.shape)}, {tuple(v_new.shape)}")
    s_new = k_new.shape[2]
    full = lengths + s_new > capacity
    if full.any():
        i = int(np.flatnonzero(full)[0])
        raise ValueError(f"k_new: sequence {i} has {lengths[i]} keys and {s_new} new ones, "
                         f"more than the cache holds ({capacity})")
    return lengths + s_new


def check_block_table(block_table: Any, batch: int, num_pages: int, page_size: int,
                      lengths: np.ndarray) -> np.ndarray:
    """block_table (B, max_pages) ints: every page that holds one of sequence b's first
    lengths[b] keys must be a valid page index and the table long enough for them.
    Returns it as int64. Errors name block_table and the offending sequence."""
    table = np.asarray(block_table)
    if table.dtype.kind not in "iu":
        raise TypeError(f"block_table: expected integers, got dtype {table.dtype}")
    if table.ndim != 2 or table.shape[0] != batch:
        raise ValueError(f"block_table: expected shape (B, max_pages) with B={batch}, "
                         f"got {table.shape}")
    table = table.astype(np.int64)
    need = -(-np.asarray(lengths, np.int64) // page_size)  # pages used per sequence
    for b in range(batch):
        if need[b] > table.shape[1]:
            raise ValueError(f"block_table: sequence {b} needs {need[b]} pages for "
                             f"{lengths[b]} keys (page_size {page_size}), the table has "
                             f"{table.shape[1]}")
        used = table[b, : need[b]]
        bad = (used < 0) | (used >= num_pages)
        if bad.any():
            p = int(np.flatnonzero(bad)[0])
            raise ValueError(f"block_table[{b}, {p}] = {used[p]} is not a page index in "
                             f"[0, {num_pages})")
    return table


def gather_keys(cache: np.ndarray, table: np.ndarray, start: int, stop: int,
                dtype: Any = None, out: np.ndarray | None = None) -> np.ndarray:
    """Key positions [start, stop) of every sequence as a contiguous (B, H_kv, stop - start,
    D) array in ``dtype`` (default the cache's): the pages that hold them copied once,
    straight into place, then cast by :func:`flashmath.rounding.cast` (float16 widens 3x
    faster than NumPy's cast, which is also slow on strided data). ``out``: a C-contiguous
    array of that shape in the cache's dtype to gather into (``dtype`` None), returned.
    Pages of _LOOP_PAGE positions or more are copied one by one; smaller ones by one
    ``np.take`` per sequence and head (no Python loop per page). Positions past a
    sequence's pages read page 0 (callers mask them with lengths: they are never
    attended)."""
    page = cache.shape[2]
    p0, p1 = start // page, -(-stop // page)
    pages = table[:, p0:p1]
    pages = np.where((pages >= 0) & (pages < cache.shape[0]), pages, 0)
    if pages.shape[1] < p1 - p0:  # the range runs past the table: padding pages
        pages = np.pad(pages, ((0, 0), (0, p1 - p0 - pages.shape[1])))
    b, h, d = table.shape[0], cache.shape[1], cache.shape[3]
    shape = (b, h, stop - start, d)
    if out is None:
        out = np.empty(shape, cache.dtype)
    elif out.shape != shape or out.dtype != cache.dtype or not out.flags.c_contiguous:
        raise ValueError(f"gather_keys: out must be a C-contiguous {shape} {cache.dtype} "
                         f"array, got {out.shape} {out.dtype}")
    if page < _LOOP_PAGE and cache.flags.c_contiguous:
        _take_pages(cache, pages, start - p0 * page, out)
    else:
        for i in range(b):
            for n, pg in enumerate(pages[i].tolist()):
                lo = max(start, (p0 + n) * page)  # this page's positions within [start, stop)
                hi = min(stop, (p0 + n + 1) * page)
                if lo < hi:
                    out[i, :, lo - start : hi - start] = cache[pg, :, lo - (p0 + n) * page :
                                                               hi - (p0 + n) * page]
    return out if dtype is None else cast(out, dtype)


def _take_pages(cache: np.ndarray, pages: np.ndarray, off: int, out: np.ndarray) -> None:
    """out[i, hh] = rows [off, off + L) of sequence i's pages ``pages[i]`` of head hh,
    laid end to end (L = out.shape[2]). The whole pages go through one np.take each, on
    the C-contiguous cache seen as (num_pages * H_kv, page_size * D) rows (a strided
    view would make np.take copy the whole cache first); the cut first and last pages
    are copied apart."""
    page, h, d = cache.shape[2], cache.shape[1], cache.shape[3]
    rows = cache.reshape(cache.shape[0] * h, page * d)
    end = off + out.shape[2]
    k0, k1 = -(-off // page), end // page  # the pages that lie whole in [off, end)
    first = min(page, end) if off % page else 0  # a cut first page: its rows [off, first)
    last = end % page and k1 * page >= off  # a cut last page k1 (not that same first page)
    for i in range(pages.shape[0]):
        for hh in range(h):
            dst = out[i, hh]
            if k0 < k1:
                np.take(rows, pages[i, k0:k1] * h + hh, axis=0, mode="clip",
                        out=dst[k0 * page - off : k1 * page - off].reshape(k1 - k0, page * d))
            if first:
                dst[: first - off] = cache[pages[i, 0], hh, off:first]
            if last:
                dst[k1 * page - off :] = cache[pages[i, k1], hh, : end - k1 * page]


#: Pages of at least this many positions are copied one by one (one read, one write of
#: each element); smaller ones in one fancy-indexed gather (the loop's per-page Python
#: cost would dominate: 2048 pages of 16 at 32k positions).
_LOOP_PAGE = 64


def append_kv(k_cache: np.ndarray, v_cache: np.ndarray, k_new: Any, v_new: Any,
              lengths: np.ndarray, table: np.ndarray | None = None) -> None:
    """Write k_new, v_new (B, H_kv, S_new, D|Dv) at positions [lengths[b], lengths[b] +
    S_new) of each sequence's cache, in place: a contiguous cache (B, H_kv, Sk, D) when
    table is None, else the paged cache through the block table. Capacity and the table's
    pages must already be checked for lengths + S_new."""
    k_new = np.asarray(k_new)
    v_new = np.asarray(v_new)
    s_new = k_new.shape[2]
    for b, start in enumerate(np.asarray(lengths, np.int64).tolist()):
        if table is None:
            k_cache[b, :, start : start + s_new] = k_new[b]
            v_cache[b, :, start : start + s_new] = v_new[b]
            continue
        page, t0 = k_cache.shape[2], start
        while t0 < start + s_new:  # page by page: the first and last may be partial
            p, r = divmod(t0, page)
            n = min(page - r, start + s_new - t0)
            k_cache[table[b, p], :, r : r + n] = k_new[b, :, t0 - start : t0 - start + n]
            v_cache[table[b, p], :, r : r + n] = v_new[b, :, t0 - start : t0 - start + n]
            t0 += n
