"""Split-KV decoding ("flash-decoding"): a few queries against a long KV cache, the cache
cut into key ranges that are attended to independently and merged by log-sum-exp.

Legend: B batch, H query heads, H_kv key/value heads (H % H_kv == 0), Sq new queries
(small: 1 for plain decoding), Sk cache capacity, D head dim, Dv value head dim.

Why split: one decoding step has B * H_kv independent (batch, K/V head) slices. When they
are fewer than the cores, the tiled kernel (which parallelises over slices) leaves cores
idle while it streams the whole cache through one of them. Cutting the keys into ranges
gives every core a range; each range returns (out_i, lse_i) and ``fm.merge_outputs``
combines them exactly (the online-softmax rule), so the result does not depend on the
split. Whether it is faster depends on the machine: a one-query step is bound by memory
bandwidth, and a second core only helps where it brings bandwidth of its own (see
MIN_SPLIT_KEYS for what this repository's 2-core machine measured).

Semantics follow flash-attn's ``flash_attn_with_kvcache`` (without appending new keys):
batch entry b attends to the first ``kv_lengths[b]`` keys of its cache (the name every
flashmath backend uses; ``cache_lengths`` is accepted as an alias); later slots are
padding. Non-causal by default: every query sees every valid key. ``causal=True`` aligns
the queries bottom-right to the valid length (query i of Sq sees keys
j <= kv_lengths[b] - Sq + i: the Sq queries are the last Sq tokens of the cache, as in
speculative decoding); ``causal="top_left"`` is torch's (query i sees keys j <= i). An
entry with kv_lengths[b] == 0 gives zeros and lse -inf.

When the query heads share K/V heads (GQA/MQA) and the mask does not depend on the
query's row (non-causal, or Sq == 1), the group's queries are folded into the rows of
one K/V head, as flash-attn's decoding kernels do: the cache is then read once per K/V
head instead of once per query head, and each tile is a matrix product, not a vector one
(2-6x faster in benchmarks/bench_decode.py). Except in float32: there the folded tiles'
float32 matrix products measured up to 4.3x the naive float32 formula's error (GEMM's
long sequential sums, where the one-row product is a dot product), past the accuracy
rule's 2x; float32 keeps one row per query head. float64 is exact either way, and
float16/bfloat16 compute in float32 and round once, so the rounding dominates.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from typing import Any, Literal, overload

import numpy as np

from flashmath import scratch
from flashmath.attention import threads, tiled
from flashmath.attention.mods import at_query_positions
from flashmath.attention.options import (
    Causal,
    Window,
    check_causal,
    check_finite,
    check_lengths,
    check_mods,
    check_positive,
    check_qkv,
    check_shapes,
    check_sinks,
    check_window,
)
from flashmath.attention.paged import (
    append_kv,
    capacity_shapes,
    check_append,
    check_block_table,
    check_paged_cache,
    gather_keys,
)
from flashmath.dtypes import accumulate_dtype, as_float_array
from flashmath.softmax.online import merge_outputs

__all__ = ["MIN_SPLIT_KEYS", "PAGED_CHUNK_BYTES", "PAGED_CHUNK_KEYS", "choose_num_splits",
           "flash_decode"]

#: The shortest key range worth a split of its own. Measured with benchmarks/bench_decode.py
#: on the 2-core CI machine (shared with other jobs): no split count beat one split up to
#: Sk = 262144, one head, Sq = 1 (n=2 at 0.9-1.6x one split's time). Decoding one query is
#: a matrix-vector product, bound by memory bandwidth, and there one thread streamed 10-16
#: GB/s while two streamed 5-10 GB/s in all. So the default splits only beyond the range
#: measured; on machines where each core adds bandwidth (many-core servers) lower it.
MIN_SPLIT_KEYS = 2**19

#: A paged cache is read in ranges of whole pages, each about PAGED_CHUNK_BYTES of keys
#: (B * H_kv * D * itemsize bytes a key position) and at least PAGED_CHUNK_KEYS positions:
#: each range's pages are gathered into one contiguous block that the tiled kernel then
#: reads, so paging costs one gather, not a strided kernel. The block is as large as
#: :mod:`flashmath.scratch` keeps between ranges (and so is a float16 head's float32
#: widening: half the heads, twice the bytes), because each range also costs ~0.4 ms of
#: Python. Measured at 32k keys, D=128, B=1, 2 threads, on a 2-core AMD EPYC (Zen 4),
#: paged / contiguous: 8 MiB ranges 0.68-1.04 in every case alternating in one process,
#: 0.71-1.11 in benchmarks/bench_paged.py's fresh processes; 4 MiB ranges read 1.07-1.14
#: (float32, H_kv=8) and 1.08-1.15 (float16, H_kv=8); 16 MiB (not kept) 1.10-1.24 (float16,
#: H_kv=8); whole-cache ranges (no split) were 1.5-2x slower.
PAGED_CHUNK_BYTES = scratch.MAX_BYTES
PAGED_CHUNK_KEYS = 2048

def choose_num_splits(rows: int, keys: int, *, cores: int | None = None) -> int:
    """The default number of key ranges (flash-attn's heuristic, sized for CPU cores).

    rows: the independent work slices (B * H_kv after folding GQA groups, else B * H);
    keys: the longest valid cache length. One split when the slices already occupy every
    core or the cache is short; else enough splits to give each idle core a range of at
    least MIN_SPLIT_KEYS keys, at most ``cores`` per slice.
    """
    cores = threads.cores() if cores is None else cores
    if rows >= cores or keys < 2 * MIN_SPLIT_KEYS:
        return 1
    want = -(-cores // rows)  # ceil(cores / rows) ranges per slice fill the cores
    return max(1, min(want, keys // MIN_SPLIT_KEYS))


def _lengths(kv_lengths: Any, cache_lengths: Any, b: int, sk: int,
             upper: int | None = None) -> np.ndarray:
    """(B,) int64 valid lengths in [0, upper (default sk)] from ``kv_lengths`` or its alias
    ``cache_lengths`` (errors name the one given); None for both: every cache is full."""
    if kv_lengths is not None and cache_lengths is not None:
        raise TypeError("kv_lengths, cache_lengths: give one (cache_lengths is kv_lengths' "
                        "alias), not both")
    name, given = (("cache_lengths", cache_lengths) if cache_lengths is not None
                   else ("kv_lengths", kv_lengths))
    lengths = check_lengths(given, name, b, sk if upper is None else upper)
    return np.full(b, sk, np.int64) if lengths is None else lengths


def _check_splits(num_splits: Any, sk: int) -> None:
    if num_splits is not None and (
        isinstance(num_splits, bool) or not isinstance(num_splits, (int, np.integer))
        or not 1 <= num_splits <= max(sk, 1)
    ):
        raise ValueError(f"num_splits: expected None or an int in [1, Sk={sk}], got {num_splits!r}")


@overload
def flash_decode(
    q: Any, k_cache: Any, v_cache: Any, *, kv_lengths: Any = ..., block_table: Any = ...,
    k_new: Any = ..., v_new: Any = ..., num_splits: int | None = ...,
    scale: float | None = ..., softcap: float | None = ..., causal: Causal = ...,
    window: Window = ..., alibi_slopes: Any = ..., sinks: Any = ...,
    return_lse: Literal[False] = ..., cache_lengths: Any = ...,
    score_mod: Any = ..., mask_mod: Any = ..., block_mask: Any = ...,
) -> np.ndarray: ...


@overload
def flash_decode(
    q: Any, k_cache: Any, v_cache: Any, *, kv_lengths: Any = ..., block_table: Any = ...,
    k_new: Any = ..., v_new: Any = ..., num_splits: int | None = ...,
    scale: float | None = ..., softcap: float | None = ..., causal: Causal = ...,
    window: Window = ..., alibi_slopes: Any = ..., sinks: Any = ...,
    return_lse: Literal[True], cache_lengths: Any = ...,
    score_mod: Any = ..., mask_mod: Any = ..., block_mask: Any = ...,
) -> tuple[np.ndarray, np.ndarray]: ...


def flash_decode(
    q: Any,
    k_cache: Any,
    v_cache: Any,
    *,
    kv_lengths: Any = None,
    block_table: Any = None,
    k_new: Any = None,
    v_new: Any = None,
    num_splits: int | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    causal: Causal = False,
    window: Window = None,
    alibi_slopes: Any = None,
    sinks: Any = None,
    return_lse: bool = False,
    cache_lengths: Any = None,
    score_mod: Any = None,
    mask_mod: Any = None,
    block_mask: Any = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Attention of a few new queries to a KV cache, the keys split into ranges and merged.

    Parameters
    ----------
    q : (B, H, Sq, D) the new queries (Sq small; any Sq works).
    k_cache, v_cache : the cache, one float dtype with q; H % H_kv == 0 (GQA/MQA).
        Contiguous: (B, H_kv, Sk, D) and (B, H_kv, Sk, Dv). Paged (with ``block_table``):
        (num_pages, H_kv, page_size, D|Dv), see :mod:`flashmath.attention.paged`.
    kv_lengths : (B,) ints: entry b attends to keys [0, kv_lengths[b]) of its cache (before
        any append); None: every cache is full. ``cache_lengths`` is the same argument
        under its older name (give one of the two).
    block_table : (B, max_pages) ints: page p of sequence b is k_cache[block_table[b, p]];
        the capacity Sk is max_pages * page_size. None: a contiguous cache.
    k_new, v_new : (B, H_kv, S_new, D|Dv), optional (both or neither): written into the
        cache in place at positions [kv_lengths[b], kv_lengths[b] + S_new) of each sequence
        before attending (flash_attn_with_kvcache's k, v), so the valid lengths grow by
        S_new. With Sq = S_new new queries and ``causal=True`` this is chunked prefill or
        speculative decoding: query i sees the cache and new keys up to its own position.
    num_splits : how many key ranges [0, max(kv_lengths)) is cut into (equal widths;
        ranges of zero width are dropped, so num_splits up to Sk is allowed). None picks
        ``choose_num_splits`` (one split unless cores would otherwise sit idle).
    scale : score scale, default 1/sqrt(D). softcap : s -> softcap * tanh(s / softcap).
    causal : False (default, as flash_attn_with_kvcache): every valid key; True: the
        queries are the cache's last Sq tokens (bottom-right aligned to the valid length);
        "top_left": query i sees keys j <= i (torch's alignment).
    window : (left, right) keys either side of that diagonal, None unbounded.
    alibi_slopes : (H,) or (B, H) ALiBi slopes (distance to the bottom-right diagonal).
    sinks : (H,) attention-sink logits, counted once in each row's denominator.
    return_lse : also return lse, the merged natural-log log-sum-exp of each row.
    score_mod, mask_mod : FlexAttention-style mods (:mod:`flashmath.attention.mods`) at
        absolute positions: ``kv_idx`` is the key's cache position and ``q_idx`` the
        query's position in its sequence, ``L_b - Sq + i`` for query i of entry b with L_b
        its valid length after any append (``i`` with ``causal="top_left"``). They AND
        with the other masks, as in :func:`flashmath.flash_attention`.
    block_mask : a :func:`flashmath.create_block_mask` over (B|1, H|1, Sk, Sk), absolute
        query and key positions up to the capacity Sk: its EMPTY tiles are skipped.

    Returns
    -------
    out : (B, H, Sq, Dv) in the input dtype: equal to ``fm.attention_reference(q, k, v,
        kv_lengths=..., causal=causal, ...)`` on the (appended, contiguous) cache within the
        accuracy rule, for every num_splits and page size. Ranges with no valid key for a
        row contribute lse = -inf and nothing else; rows with no valid key at all are 0.
        Never NaN unless the input holds NaN/inf.
    lse : (B, H, Sq), float32 (float64 for float64 input), -inf for rows with no valid key
        (the sink's logit with sinks); only with ``return_lse``.

    Narrow inputs (float16, bfloat16) compute in float32 tiles; with several ranges each
    range's result is kept in float32, the ranges merge in float64, and the result is
    rounded to the input dtype at the end.

    Raises
    ------
    ValueError / TypeError naming the argument: shapes and dtypes (as every backend, with
    k_cache, v_cache named), kv_lengths (integers, shape (B,), values in [0, Sk]),
    block_table (shape, a page index out of range or a table too short for a length),
    k_new/v_new (shapes, one without the other, a cache too small for the append, a cache
    that is not a writable NumPy array), num_splits, scale (finite), softcap (finite,
    > 0), window, alibi_slopes, sinks and causal (False, True or "top_left").

    Examples
    --------
    >>> import numpy as np, flashmath as fm
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((1, 8, 1, 64))
    >>> k, v = rng.standard_normal((2, 1, 2, 4096, 64))
    >>> out = fm.flash_decode(q, k, v, kv_lengths=[3000], num_splits=4)
    >>> ref = fm.attention_reference(q, k, v, kv_lengths=[3000])
    >>> bool(np.abs(out - ref).max() < 1e-12)
    True
    """
    # Everything is validated here, once, under decode's own names; the shard API below
    # receives checked arrays and plain options.
    cache = _Cache.build(q, k_cache, v_cache, block_table)
    q = cache.q
    b, h, sq, d = q.shape
    hk, sk, dv = cache.kv_heads, cache.capacity, cache.dv
    # a paged cache's capacity is its table's: a length past it is the table's fault
    upper = None if block_table is None else int(np.iinfo(np.int64).max)
    lengths = _lengths(kv_lengths, cache_lengths, b, sk, upper)
    cache.check_table(lengths)
    lengths = cache.append(k_new, v_new, lengths)
    _check_splits(num_splits, sk)
    alignment = check_causal(causal)
    opts = {"scale": None if scale is None else check_finite(scale, "scale"),
            "softcap": None if softcap is None else check_positive(softcap, "softcap"),
            "window": check_window(window), "alibi_slopes": alibi_slopes}
    sink_logits = check_sinks(sinks, h)
    mods = check_mods(score_mod, mask_mod, block_mask, b, h, sk, sk)
    if mods is not None:  # q_idx: each query's position in its own sequence
        offsets = np.zeros(b, np.int64) if alignment == "top_left" else lengths - sq
        opts["score_mod"], opts["mask_mod"] = at_query_positions(
            mods.score_mod, mods.mask_mod, mods.block_mask, offsets)
    out_dtype = q.dtype
    if alignment == "bottom_right" and sq == 1 and opts["window"] is None:
        alignment = None  # one query is the last token: it sees every valid key
    group = h // hk
    fold = (group > 1 and alignment is None and out_dtype != np.float32
            and opts["window"] is None and alibi_slopes is None and mods is None)
    if fold:  # (B, H, Sq, D) -> (B, H_kv, group * Sq, D): rows of one K/V head together
        q = q.reshape(b, hk, group * sq, d)
    span = int(lengths.max()) if b else 0
    rows = b * (hk if fold or group == 1 else h)
    n = choose_num_splits(rows, span) if num_splits is None else int(num_splits)
    ranges = cache.ranges(span, n)
    lse_dtype = accumulate_dtype(out_dtype)
    if not ranges:  # every cache is empty
        out = np.zeros((b, h, sq, dv), out_dtype)
        lse = np.full((b, h, sq), -np.inf, lse_dtype)
        if sink_logits is not None:
            lse[:] = sink_logits[:, None].astype(lse_dtype)
        return (out, lse) if return_lse else out
    # Several ranges (or a sink to merge): each range's result is written in the accumulate
    # dtype (float32; float64 for float64 input), not rounded to a narrow input's, and the
    # merge rounds once. The tiles compute as one range's would (float16 and bfloat16 in
    # float32 tiles, from keys gathered in the cache's dtype).
    merging = len(ranges) > 1 or sink_logits is not None
    acc = accumulate_dtype(out_dtype) if merging else out_dtype
    parts: list[tuple[np.ndarray, np.ndarray]] = [None] * len(ranges)  # type: ignore[list-item]

    def part(i: int) -> None:
        a, z = ranges[i]
        with cache.keys(a, z) as (ks, vs):
            parts[i] = tiled.tiled_forward(q, ks, vs, kv_lengths=lengths, k_offset=a,
                                           k_total=sk, causal=alignment, out_dtype=acc, **opts)

    # Several ranges run on the thread pool, one range per thread (the kernel inside then
    # runs inline): cores that one range would leave idle get work, and a paged cache's
    # gathers of its pages (a copy as long as the attention itself at 32k keys) overlap
    # too. A contiguous cache measured the same as with the kernel's own threads.
    if len(ranges) > 1:
        threads.run_units(list(range(len(ranges))), part)
    else:
        for i in range(len(ranges)):
            part(i)
    outs, lses = [p[0] for p in parts], [p[1] for p in parts]
    if sink_logits is not None:  # a sink is a state with no value and lse = its logit
        sink_rows = sink_logits[:, None] if not fold else np.repeat(
            sink_logits.reshape(hk, group), sq, axis=1)
        outs.append(np.zeros_like(outs[0]))
        lses.append(np.broadcast_to(sink_rows, lses[0].shape))
    if len(outs) == 1:
        o, lse = outs[0], lses[0]
    else:
        o, lse = merge_outputs(outs, lses, accum_dtype=np.float64)
    out = o.reshape(b, h, sq, dv).astype(out_dtype, copy=False)
    if not return_lse:
        return out
    return out, lse.reshape(b, h, sq).astype(lse_dtype, copy=False)


class _Cache:
    """The KV cache of one decode call, contiguous or paged: validation, appending and
    the keys of a range as contiguous arrays."""

    def __init__(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, given: tuple[Any, Any],
                 table: Any) -> None:
        self.q, self.k, self.v, self.given, self.raw_table = q, k, v, given, table
        self.table: np.ndarray | None = None
        paged = table is not None
        self.kv_heads, self.dv = k.shape[1], v.shape[3]
        self.page = k.shape[2] if paged else 0
        self.capacity = np.shape(table)[1] * self.page if paged else k.shape[2]

    @classmethod
    def build(cls, q: Any, k_cache: Any, v_cache: Any, block_table: Any) -> _Cache:
        if block_table is None:
            q, k, v = check_qkv(q, k_cache, v_cache, names=("q", "k_cache", "v_cache"))
            return cls(q, k, v, (k_cache, v_cache), None)
        k, v = check_paged_cache(k_cache, v_cache)
        q = as_float_array(q, name="q")
        check_shapes(q, *capacity_shapes(k, v, np.shape(block_table)),
                     names=("q", "k_cache", "v_cache"))
        return cls(q, k, v, (k_cache, v_cache), block_table)

    def append(self, k_new: Any, v_new: Any, lengths: np.ndarray) -> np.ndarray:
        """Write k_new, v_new at each sequence's length (in place); the new lengths."""
        if k_new is None and v_new is None:
            return lengths
        if k_new is None or v_new is None:  # check_append says so, naming both
            check_append(self.q, k_new, v_new, self.k, self.v, lengths, self.capacity)
        for name, given, arr in (("k_cache", self.given[0], self.k),
                                 ("v_cache", self.given[1], self.v)):
            if given is not arr or not arr.flags.writeable:
                raise TypeError(f"{name}: appending k_new/v_new writes into the cache in "
                                f"place; it must be a writable NumPy array of the cache's "
                                f"dtype, got {type(given).__name__}")
        kn = as_float_array(k_new, name="k_new")
        vn = as_float_array(v_new, name="v_new")
        new_lengths = check_append(self.q, kn, vn, self.k, self.v, lengths, self.capacity)
        if self.raw_table is not None:
            self.check_table(new_lengths)
        append_kv(self.k, self.v, kn.astype(self.k.dtype, copy=False),
                  vn.astype(self.v.dtype, copy=False), lengths, self.table)
        return new_lengths

    def check_table(self, lengths: np.ndarray) -> None:
        if self.raw_table is not None:
            self.table = check_block_table(self.raw_table, self.q.shape[0], self.k.shape[0],
                                           self.page, lengths)

    def ranges(self, span: int, n: int) -> list[tuple[int, int]]:
        """[0, span) cut into n equal ranges (empty ones dropped); a paged cache's ranges
        are further cut at page boundaries into pieces of about PAGED_CHUNK_BYTES of keys,
        at least PAGED_CHUNK_KEYS positions."""
        edges = np.unique(np.linspace(0, span, n + 1).round().astype(np.int64))
        ranges = [(int(a), int(z)) for a, z in itertools.pairwise(edges) if z > a]
        if self.table is None:
            return ranges
        per_key = self.table.shape[0] * self.kv_heads * self.k.shape[3] * self.k.itemsize
        keys = max(PAGED_CHUNK_KEYS, PAGED_CHUNK_BYTES // max(per_key, 1))
        step = max(self.page, keys // self.page * self.page)
        return [(c, min(c + step - c % step, z)) for a, z in ranges
                for c in _cuts(a, z, step)]

    @contextlib.contextmanager
    def keys(self, a: int, z: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Keys and values [a, z) of every sequence, (B, H_kv, z - a, D|Dv), in the cache's
        dtype, for the ``with`` block: views of a contiguous cache; a paged one's gathered
        into this thread's scratch arrays (:mod:`flashmath.scratch`: a fresh array per
        range faulted its pages in afresh, 2x the decode's time in a new process)."""
        if self.table is None:
            yield self.k[:, :, a:z], self.v[:, :, a:z]
            return
        b, h = self.table.shape[0], self.kv_heads
        with (scratch.borrow("decode.k", (b, h, z - a, self.k.shape[3]), self.k.dtype) as kb,
              scratch.borrow("decode.v", (b, h, z - a, self.dv), self.v.dtype) as vb):
            yield (gather_keys(self.k, self.table, a, z, out=kb),
                   gather_keys(self.v, self.table, a, z, out=vb))


def _cuts(a: int, z: int, step: int) -> list[int]:
    """Starts of the pieces of [a, z) that end on multiples of step."""
    starts = [a]
    nxt = (a // step + 1) * step
    while nxt < z:
        starts.append(nxt)
        nxt += step
    return starts
