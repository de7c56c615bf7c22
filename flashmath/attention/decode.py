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

import itertools
from typing import Any, Literal, overload

import numpy as np

from flashmath.attention import threads, tiled
from flashmath.attention.options import (
    Causal,
    check_causal,
    check_finite,
    check_lengths,
    check_positive,
    check_qkv,
)
from flashmath.dtypes import accumulate_dtype
from flashmath.softmax.online import merge_outputs

__all__ = ["MIN_SPLIT_KEYS", "choose_num_splits", "flash_decode"]

#: The shortest key range worth a split of its own. Measured with benchmarks/bench_decode.py
#: on the 2-core CI machine (shared with other jobs): no split count beat one split up to
#: Sk = 262144, one head, Sq = 1 (n=2 at 0.9-1.6x one split's time). Decoding one query is
#: a matrix-vector product, bound by memory bandwidth, and there one thread streamed 10-16
#: GB/s while two streamed 5-10 GB/s in all. So the default splits only beyond the range
#: measured; on machines where each core adds bandwidth (many-core servers) lower it.
MIN_SPLIT_KEYS = 2**19

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


def _lengths(kv_lengths: Any, cache_lengths: Any, b: int, sk: int) -> np.ndarray:
    """(B,) int64 valid lengths from ``kv_lengths`` or its alias ``cache_lengths`` (errors
    name the one given); None for both: every cache is full."""
    if kv_lengths is not None and cache_lengths is not None:
        raise TypeError("kv_lengths, cache_lengths: give one (cache_lengths is kv_lengths' "
                        "alias), not both")
    name, given = (("cache_lengths", cache_lengths) if cache_lengths is not None
                   else ("kv_lengths", kv_lengths))
    lengths = check_lengths(given, name, b, sk)
    return np.full(b, sk, np.int64) if lengths is None else lengths


def _check_splits(num_splits: Any, sk: int) -> None:
    if num_splits is not None and (
        isinstance(num_splits, bool) or not isinstance(num_splits, (int, np.integer))
        or not 1 <= num_splits <= max(sk, 1)
    ):
        raise ValueError(f"num_splits: expected None or an int in [1, Sk={sk}], got {num_splits!r}")


@overload
def flash_decode(
    q: Any, k_cache: Any, v_cache: Any, *, kv_lengths: Any = ..., num_splits: int | None = ...,
    scale: float | None = ..., softcap: float | None = ..., causal: Causal = ...,
    return_lse: Literal[False] = ..., cache_lengths: Any = ...,
) -> np.ndarray: ...


@overload
def flash_decode(
    q: Any, k_cache: Any, v_cache: Any, *, kv_lengths: Any = ..., num_splits: int | None = ...,
    scale: float | None = ..., softcap: float | None = ..., causal: Causal = ...,
    return_lse: Literal[True], cache_lengths: Any = ...,
) -> tuple[np.ndarray, np.ndarray]: ...


def flash_decode(
    q: Any,
    k_cache: Any,
    v_cache: Any,
    *,
    kv_lengths: Any = None,
    num_splits: int | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    causal: Causal = False,
    return_lse: bool = False,
    cache_lengths: Any = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Attention of a few new queries to a KV cache, the keys split into ranges and merged.

    Parameters
    ----------
    q : (B, H, Sq, D) the new queries (Sq small; any Sq works).
    k_cache, v_cache : (B, H_kv, Sk, D) and (B, H_kv, Sk, Dv); one float dtype with q;
        H % H_kv == 0 (GQA/MQA).
    kv_lengths : (B,) ints in [0, Sk]: entry b attends to keys [0, kv_lengths[b]); None:
        every cache is full. ``cache_lengths`` is the same argument under its older name
        (give one of the two).
    num_splits : how many key ranges [0, max(kv_lengths)) is cut into (equal widths;
        ranges of zero width are dropped, so num_splits up to Sk is allowed). None picks
        ``choose_num_splits`` (one split unless cores would otherwise sit idle).
    scale : score scale, default 1/sqrt(D). softcap : s -> softcap * tanh(s / softcap).
    causal : False (default, as flash_attn_with_kvcache): every valid key; True: the
        queries are the cache's last Sq tokens (bottom-right aligned to kv_lengths[b]);
        "top_left": query i sees keys j <= i (torch's alignment).
    return_lse : also return lse, the merged natural-log log-sum-exp of each row.

    Returns
    -------
    out : (B, H, Sq, Dv) in the input dtype: equal to ``fm.attention_reference(q, k_cache,
        v_cache, kv_lengths=kv_lengths, causal=causal, ...)`` within the accuracy rule, for
        every num_splits. Ranges with no valid key for a row contribute lse = -inf and
        nothing else; rows with no valid key at all are 0. Never NaN unless the input
        holds NaN/inf.
    lse : (B, H, Sq), float32 (float64 for float64 input), -inf for rows with no valid key;
        only with ``return_lse``.

    Narrow inputs (float16, bfloat16) compute in float32; ranges merge in float64; the
    result rounds once to the input dtype.

    Raises
    ------
    ValueError / TypeError naming the argument: shapes and dtypes (as every backend, with
    k_cache, v_cache named), kv_lengths (integers, shape (B,), values in [0, Sk]),
    num_splits, scale (finite), softcap (finite, > 0) and causal (False, True or
    "top_left"; "bogus" or 2 are refused).

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
    q, k, v = check_qkv(q, k_cache, v_cache, names=("q", "k_cache", "v_cache"))
    b, h, sq, d = q.shape
    hk, sk, dv = k.shape[1], k.shape[2], v.shape[3]
    lengths = _lengths(kv_lengths, cache_lengths, b, sk)
    _check_splits(num_splits, sk)
    alignment = check_causal(causal)
    scale = None if scale is None else check_finite(scale, "scale")
    softcap = None if softcap is None else check_positive(softcap, "softcap")
    out_dtype = q.dtype
    if alignment == "bottom_right" and sq == 1:
        alignment = None  # one query is the last token: it sees every valid key
    group = h // hk
    fold = group > 1 and alignment is None and out_dtype != np.float32
    if fold:  # (B, H, Sq, D) -> (B, H_kv, group * Sq, D): rows of one K/V head together
        q = q.reshape(b, hk, group * sq, d)
    span = int(lengths.max()) if b else 0
    rows = b * (hk if fold or group == 1 else h)
    n = choose_num_splits(rows, span) if num_splits is None else int(num_splits)
    edges = np.unique(np.linspace(0, span, n + 1).round().astype(np.int64))
    ranges = [(int(a), int(z)) for a, z in itertools.pairwise(edges) if z > a]
    lse_dtype = accumulate_dtype(out_dtype)
    if not ranges:  # every cache is empty
        out = np.zeros((b, h, sq, dv), out_dtype)
        return (out, np.full((b, h, sq), -np.inf, lse_dtype)) if return_lse else out
    # Narrow inputs with several ranges: upcast (exactly) so that the ranges' results are
    # not rounded before the merge; one range leaves the upcast to the kernel.
    acc = accumulate_dtype(out_dtype) if len(ranges) > 1 else out_dtype
    q = q.astype(acc, copy=False)
    parts: list[tuple[np.ndarray, np.ndarray]] = [None] * len(ranges)  # type: ignore[list-item]

    def part(i: int) -> None:
        a, z = ranges[i]
        ks, vs = k[:, :, a:z].astype(acc, copy=False), v[:, :, a:z].astype(acc, copy=False)
        parts[i] = tiled.tiled_forward(q, ks, vs, kv_lengths=lengths, k_offset=a, k_total=sk,
                                       causal=alignment, scale=scale, softcap=softcap)

    if len(ranges) > 1 and rows < threads.cores():  # idle cores: the ranges run on a thread each
        threads.run_units(list(range(len(ranges))), part)
    else:
        for i in range(len(ranges)):
            part(i)
    if len(parts) == 1:
        o, lse = parts[0]
    else:
        o, lse = merge_outputs([p[0] for p in parts], [p[1] for p in parts],
                               accum_dtype=np.float64)
    out = o.reshape(b, h, sq, dv).astype(out_dtype, copy=False)
    if not return_lse:
        return out
    return out, lse.reshape(b, h, sq).astype(lse_dtype, copy=False)
