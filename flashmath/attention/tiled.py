"""FlashAttention in NumPy: exact tiled attention, forward and backward, that never
materialises the Sq x Sk score matrix.

Legend: B batch, H query heads, H_kv key/value heads, Sq/Sk query/key lengths, D the q/k
head dim, Dv the v head dim; a tile is ``block_q`` query rows x ``block_k`` keys.

The loop (one shape for forward and backward, :func:`flashmath.attention.schedule.schedule`)::

    for each (batch b, query head h), in parallel threads:
        for each block of query rows (clipped to the valid rows):
            for each key tile the mask leaves non-empty (clipped to the band):
                s = scale * q k^T -> softcap -> + bias -> mask (PARTIAL tiles only)
                forward:  online softmax (m, l, o) with flashmath.softmax.online's rule
                backward: p = exp(s - m) / l (m, l, out recomputed, see _probabilities);
                          dv += p^T do; ds = p (do v^T - delta);
                          dq += ds k; dk += ds^T q     (delta = rowsum(do * out))

Tiles that a causal, window or length mask leaves empty are skipped (never read,
never computed); FULL tiles build no mask (:class:`~flashmath.attention.masks.MaskSpec`).
Speed: the scale is folded into q (when a power of two), exp runs in place in a reused
tile buffer, row sums are BLAS matrix-vector products, the matmuls are BLAS calls on
whole tiles, and the (b, h) slices (cut by query blocks into parts when they are too
few for the cores, :func:`~flashmath.attention.schedule.work_units`) run on a thread
per core (NumPy releases the GIL in BLAS and in ufunc loops; BLAS itself runs one
thread per worker, see :mod:`flashmath.attention.threads`). Extra memory is a few tile
buffers per thread plus per-block accumulators: linear in S.

Dtypes: float64 computes in float64; float32, float16, bfloat16 and float8 compute the
tiles in float32 (``accum_dtype`` overrides) and return the input dtype; what is summed
across tiles (m, l, o; dq, dk, dv) is float64 unless ``accum_dtype`` is narrower than
float32. lse is float32 (float64 for float64 input). The backward rejects float8.

Accuracy (the rule of docs/conventions.md, against the naive same-dtype formula and a
PyTorch-style baseline; measured by benchmarks/fuzz_attention.py): narrow inputs meet it
with room (median errors 0.1-0.4x the baselines'). float32 input computes its scores in
float64 and keeps them as a float32 value plus its float32 rounding residual
(:func:`_exact_scores`, :func:`_scores`): the shift by the row max is then exact where it
matters, so p = exp(s - m) carries eps / 2 relative error however large the scores; a
float32 score GEMM's rounding, |s| eps, is the largest error in p whenever scores are
large, and the baselines carry it too, so without this flashmath's error was a coin toss
against theirs. The backward spends one
extra pass per row block recomputing the row max, sum and output (float64 sums), from
which it builds p and delta rather than from the given, rounded lse and out (see
:func:`_probabilities`). Rows whose visible keys fit one tile take :func:`_one_tile`,
which forms P and P V in the state dtype and rounds once.

Shards (the public shard API, used by ring attention and split-KV decoding):

``tiled_forward(q, k, v, *, <options>, block_q, block_k, accum_dtype, q_offset=0,
k_offset=0, q_total=None, k_total=None) -> (out, lse)`` and
``tiled_backward(dout, q, k, v, out, lse, *, <same>) -> (dq, dk, dv)``
    q_offset / k_offset: global position of the local q row 0 / k row 0, for arrays that
    are shards of longer sequences: causal, window and lengths are evaluated at global
    positions. q_total / k_total: the global lengths (default offset + local length);
    they place the bottom-right diagonal, so pass them whenever the shards do not end at
    the sequence end. q_lengths / kv_lengths are global; mask and bias are local (sliced
    to the shard). For the backward of a shard pass the merged (global) out and lse of
    its query rows: the gradients are then the shard's exact contributions (sum dk, dv
    over query shards; sum dq over key shards).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from flashmath.attention.masks import TileKind
from flashmath.attention.mods import and_kinds
from flashmath.attention.options import AttentionOptions, check_backward_inputs
from flashmath.attention.schedule import (
    DEFAULT_BLOCK_K,
    DEFAULT_BLOCK_Q,
    Block,
    Plan,
    Tile,
    Unit,
    work_units,
)
from flashmath.attention.threads import cores, run_units
from flashmath.dtypes import finfo
from flashmath.softmax.rule import rescale, row_shift

__all__ = [
    "DEFAULT_BLOCK_K",
    "DEFAULT_BLOCK_Q",
    "flash_attention",
    "flash_attention_backward",
    "tiled_backward",
    "tiled_forward",
]


def flash_attention(
    q: Any,
    k: Any,
    v: Any,
    *,
    causal: bool | str = False,
    window: tuple[int | None, int | None] | None = None,
    mask: Any = None,
    bias: Any = None,
    kv_lengths: Any = None,
    q_lengths: Any = None,
    softcap: float | None = None,
    scale: float | None = None,
    alibi_slopes: Any = None,
    sinks: Any = None,
    score_mod: Any = None,
    mask_mod: Any = None,
    block_mask: Any = None,
    block_q: int | None = None,
    block_k: int | None = None,
    accum_dtype: Any = None,
    return_lse: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Exact attention, tiled: never materialises the (Sq, Sk) scores.

    Parameters
    ----------
    q : (B, H, Sq, D); k : (B, H_kv, Sk, D); v : (B, H_kv, Sk, Dv)
        One float dtype; H % H_kv == 0 (GQA/MQA: query head h reads head h // (H // H_kv)).
    causal, window, mask, bias, kv_lengths, q_lengths, softcap, scale, alibi_slopes, sinks,
    score_mod, mask_mod, block_mask
        As :func:`flashmath.attention_reference` (mods: docs/mods.md; EMPTY tiles of the
        mask_mod or block mask are skipped, FULL ones build no mask): causal True is
        bottom-right aligned (query i sees key j iff j <= i + Sk - Sq; with lengths,
        i + kv_len - q_len),
        "top_left" is torch's; scores are softcap(scale * q . k) + bias, then masked.
    block_q, block_k : tile sizes (default DEFAULT_BLOCK_Q, DEFAULT_BLOCK_K; both halved
        when B * H slices are too few to keep every core busy and are cut by query blocks).
    accum_dtype : the dtype of the tile arithmetic (default float32, float64 for float64;
        float32 input computes its scores q k^T in float64, rounded to float32 once).
    return_lse : also return lse, the natural-log log-sum-exp of each row's scores.

    Returns
    -------
    out : (B, H, Sq, Dv) in the input dtype; rows with nothing to attend to are 0.
    lse : (B, H, Sq), float32 (float64 for float64 input); -inf for those rows.

    Raises
    ------
    TypeError
        q, k, v not of one float dtype; a mask that is not boolean or a boolean bias;
        window sides, block sizes or lengths of the wrong type; accum_dtype not a float.
    ValueError
        q, k, v not 4-D or with mismatched B, D, (H_kv, Sk), or H not a multiple of H_kv;
        D = 0; a mask or bias that does not broadcast to (B, H, Sq, Sk); a negative window
        side; lengths outside [0, Sk] (kv_lengths) or [0, Sq] (q_lengths) or not of shape
        (B,); a non-finite or non-positive softcap, a non-finite scale; block sizes < 1;
        an unknown causal value. Every message names the argument.

    NaN policy
    ----------
    Masked pairs get probability exactly 0 and are never read when a whole tile is masked
    (padding beyond q_lengths / kv_lengths may hold anything, NaN included). A row with
    nothing to attend to gives out 0 and lse -inf, never NaN. A +inf or NaN among a row's
    visible scores (from NaN/inf in q, in a visible key, or in the bias) makes that row's
    out (and lse) NaN; other rows are untouched. A -inf score is a masked pair. NaN or inf
    in v reaches the rows that read it; within a partly masked tile this can include rows
    that mask that key (0 * NaN in the tile's matrix product), as in any GEMM kernel.

    Examples
    --------
    The oracle materialises 1 x 2 x 3000 x 3000 scores; the tiles hold 256 x 1024 at a time:

    >>> import numpy as np, flashmath as fm
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((1, 2, 3000, 16)) for _ in range(3))
    >>> out = fm.flash_attention(q, k, v, causal=True)
    >>> float(np.abs(out - fm.attention_reference(q, k, v, causal=True)).max()) < 1e-13
    True
    """
    out, lse = tiled_forward(
        q, k, v, causal=causal, window=window, mask=mask, bias=bias, kv_lengths=kv_lengths,
        q_lengths=q_lengths, softcap=softcap, scale=scale, alibi_slopes=alibi_slopes,
        sinks=sinks, score_mod=score_mod, mask_mod=mask_mod, block_mask=block_mask,
        block_q=block_q, block_k=block_k, accum_dtype=accum_dtype,
    )
    return (out, lse) if return_lse else out


def flash_attention_backward(
    dout: Any,
    q: Any,
    k: Any,
    v: Any,
    out: Any,
    lse: Any,
    *,
    causal: bool | str = False,
    window: tuple[int | None, int | None] | None = None,
    mask: Any = None,
    bias: Any = None,
    kv_lengths: Any = None,
    q_lengths: Any = None,
    softcap: float | None = None,
    scale: float | None = None,
    alibi_slopes: Any = None,
    sinks: Any = None,
    score_mod: Any = None,
    mask_mod: Any = None,
    block_mask: Any = None,
    dlse: Any = None,
    block_q: int | None = None,
    block_k: int | None = None,
    accum_dtype: Any = None,
) -> tuple[np.ndarray, ...]:
    """Gradients (dq, dk, dv) of sum(dout * out), recomputing the scores tile by tile.

    Parameters
    ----------
    dout : (B, H, Sq, Dv), the gradient of the loss with respect to out.
    q, k, v : as :func:`flash_attention` (float64, float32, float16 or bfloat16; float8
        is rejected with a TypeError).
    out : (B, H, Sq, Dv) and lse : (B, H, Sq)
        The forward's, ``flash_attention(..., return_lse=True)``, for these very inputs
        and options. What is done with them: the backward runs one extra pass per block
        of query rows that recomputes the row max, the row sum (hence lse) and the row
        output in float64 sums, and builds the probabilities p = exp(s - m) / l and
        delta = rowsum(dout * out) from that recomputation, not from the given arrays:
        the given lse is rounded to float32 and the given out to the input dtype, and
        building p or delta from them put dq and dk over the accuracy rule (up to 10x
        the naive formula's error in float32, 3x in float16). The given out and lse are
        checked against the recomputation instead: NaN where it is not NaN (an all-NaN
        out or lse, for instance), a wrong shape, or values off by more than rounding
        (2 * out, lse + 1) raise ValueError naming ``out`` or ``lse`` (the size check is
        skipped for accum_dtype narrower than float32). The shard API
        (:func:`tiled_backward` with k_offset / k_total) uses the given global lse and
        out, which it cannot recompute from a shard of the keys.
    causal, window, mask, bias, kv_lengths, q_lengths, softcap, scale, alibi_slopes, sinks,
    score_mod, mask_mod, block_mask
        The forward's options, unchanged (gradients flow through a score_mod's derivative).
    dlse : (B, H, Sq), optional: the cotangent of the returned lse, so the gradients are
        those of sum(dout * out) + sum(dlse * lse) (through ``fm.merge_outputs``, split-KV
        or ring merges); d lse / d s = p, so each row's dp - delta gains dlse.
    block_q, block_k, accum_dtype
        As :func:`flash_attention` (the tiles need not be the forward's).

    Returns
    -------
    dq (B, H, Sq, D), dk (B, H_kv, Sk, D), dv (B, H_kv, Sk, Dv) in the input dtype; dk and
    dv sum the query heads sharing a key/value head. With ``sinks``, a fourth result:
    dsinks (H,), float32 (float64 for float64 input). Padding queries, rows with nothing
    to attend to and keys no query sees get exactly 0. The bias and ALiBi are constants
    (no gradient).

    Raises
    ------
    TypeError, ValueError
        As :func:`flash_attention`, and for dout, out, lse as above.
    """
    return tiled_backward(
        dout, q, k, v, out, lse, causal=causal, window=window, mask=mask, bias=bias,
        kv_lengths=kv_lengths, q_lengths=q_lengths, softcap=softcap, scale=scale,
        alibi_slopes=alibi_slopes, sinks=sinks, score_mod=score_mod, mask_mod=mask_mod,
        block_mask=block_mask, dlse=dlse, block_q=block_q, block_k=block_k,
        accum_dtype=accum_dtype,
    )


# --- The shared pieces: what the plan means for these kernels, scores ---


def _wide_float32(plan: Plan) -> bool:
    """float32 tiles (float32, float16, bfloat16 input by default): the backward then forms
    the few quantities that decide its error in float64: the row sums, dp = do v^T and
    dp - delta, rounded once (see :func:`_probabilities`). For float32 input flashmath and
    the naive formula share a dtype, so this is what keeps dq, dk inside the rule; for
    narrower input it keeps a row with one visible key at dq = dk = 0 exactly."""
    return plan.acc == np.float32


def _folds_scale(plan: Plan) -> bool:
    """Whether the scale is folded into q: only when it is a power of two, so that
    scale * q is exact (D = 16, 64, 256). Otherwise rounding each q element once
    perturbs every score of the row alike, and with large scores that made the
    output up to 10x less accurate than the naive formula; the scale is then applied
    to the score tile instead (one more pass over it)."""
    return abs(math.frexp(plan.opts.scale)[0]) == 0.5


def _q_block(plan: Plan, b: int, h: int, i0: int, i1: int) -> np.ndarray:
    """q[b, h, i0:i1] in the accumulate dtype, (ni, D), times the scale if folded."""
    factor = plan.opts.scale if _folds_scale(plan) else 1.0
    return np.multiply(plan.q[b, h, i0:i1], factor, dtype=plan.acc)


#: float32 input: the score GEMM runs in float64 and is rounded once (see _exact_scores).
#: A switch for measurements (benchmarks/bench_attention.py --no-exact-scores).
EXACT_SCORES = True


def _exact_scores(plan: Plan) -> bool:
    """float32 input in float32 tiles: s = scale q k^T is computed in float64 (products of
    float32 numbers are exact there) and kept as its float32 rounding plus the rounding
    residual (see :func:`_scores`). A float32 GEMM's rounding of s, about |s| sqrt(D) eps,
    is the largest error in p whenever scores are large; the naive and the PyTorch-style
    baselines carry it too, as independent draws, so with float32 scores flashmath's max
    error was a coin toss against theirs (2% of random cases over 2x the PyTorch-style
    baseline; 0.5% with s rounded once). Costs a float64 GEMM and three passes per tile."""
    return EXACT_SCORES and plan.opts.dtype == np.float32 and plan.acc == np.float32


def _lo_buffer(plan: Plan) -> np.ndarray | None:
    """The tile buffer for exact scores' rounding residuals (see :func:`_scores`), or None."""
    return np.empty((plan.bq, plan.bk), plan.acc) if _exact_scores(plan) else None


def _row_max(s: np.ndarray, lo: np.ndarray | None
             ) -> tuple[np.ndarray, np.ndarray | None]:
    """Each row's max of s and, with exact scores' residuals lo, the residual at that
    entry (0 for an empty row): the shift (m, lo_m) makes the max entry's
    (s - m) + lo - lo_m exactly 0, so a row with one visible key has p = 1 exactly."""
    if lo is None:
        return s.max(axis=1), None
    rows = np.arange(s.shape[0])
    at = s.argmax(axis=1)
    m = s[rows, at]
    return m, np.where(np.isfinite(m), lo[rows, at], np.zeros((), lo.dtype))


def _shift(s: np.ndarray, lo: np.ndarray | None, m: np.ndarray,
           lo_m: np.ndarray | None) -> None:
    """s <- (s - m) + lo - lo_m in place, row by row (m already made safe by row_shift);
    without residuals s - m."""
    s -= m[:, None]
    if lo is not None and lo_m is not None:
        s += lo
        s -= lo_m[:, None]


#: Keys per float64 piece of an exact score tile.
_EXACT_CHUNK = 128


def _score_rows(plan: Plan, b: int, h: int, i0: int, i1: int, qs: np.ndarray) -> np.ndarray:
    """The query rows for the score GEMM: qs (from _q_block), or scale * q in float64
    with exact scores."""
    if not _exact_scores(plan):
        return qs
    return np.multiply(plan.q[b, h, i0:i1], plan.opts.scale, dtype=np.float64)


def _kv(plan: Plan, b: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    """k[b, kv head], v[b, kv head] in the accumulate dtype (views when no cast is needed)."""
    hk = h // plan.opts.group
    return np.asarray(plan.k[b, hk], plan.acc), np.asarray(plan.v[b, hk], plan.acc)


def _has_score_mod(opts: AttentionOptions) -> bool:
    return opts.mods is not None and opts.mods.score_mod is not None


def _mod_tiles(plan: Plan, b: int, h: int, i0: int, i1: int, tiles: list[Tile]) -> list[Tile]:
    """The tiles of rows [i0, i1) of slice (b, h) once the mask_mod / block mask has its
    say (:meth:`Mods.kind` ANDed with the built-in mask's kind): EMPTY ones dropped."""
    mods = plan.opts.mods
    if mods is None or (mods.mask_mod is None and mods.block_mask is None):
        return tiles
    qo, ko = plan.opts.q_offset, plan.opts.k_offset
    kept: list[Tile] = []
    for j0, j1, kind in tiles:
        both = TileKind(int(and_kinds(kind, mods.kind(b, h, i0 + qo, i1 + qo, j0 + ko,
                                                      j1 + ko))))
        if both is not TileKind.EMPTY:
            kept.append((j0, j1, both))
    return kept


def _scores(
    plan: Plan, b: int, h: int, qs: np.ndarray, k: np.ndarray, i0: int, i1: int,
    j0: int, j1: int, kind: TileKind, buf: np.ndarray, tanh_buf: np.ndarray | None = None,
    lo_buf: np.ndarray | None = None, dmod_buf: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The tile's scores softcap(scale q k^T) + bias, masked with -inf, in ``buf``.

    qs is the query block (ni, D) from :func:`_score_rows`, k the slice's keys (Sk, D).
    Returns (s, lo): s the (ni, nj) view of buf; lo None, or, with exact scores, no
    softcap and lo_buf given, the (ni, nj) view of lo_buf holding the rounding residual
    s_exact - s of the float64 product (0 where it is not finite), so that a shift by a
    nearby row max is exact: (s - m) + lo is s_exact - m rounded once, and p = exp of
    it has relative error eps / 2 however large the scores are (rounding s itself costs
    |s| eps / 2 in every p). With a softcap and tanh_buf given, tanh(scale q k^T / c) is
    kept there for the backward.
    """
    opts = plan.opts
    s = buf[: i1 - i0, : j1 - j0]
    lo = None
    if qs.dtype != s.dtype:  # exact scores: scale q k^T in float64, rounded once
        if lo_buf is not None and opts.softcap is None and not _has_score_mod(opts):
            lo = lo_buf[: i1 - i0, : j1 - j0]
        for c0 in range(j0, j1, _EXACT_CHUNK):  # float64 pieces stay small (memory)
            c1 = min(c0 + _EXACT_CHUNK, j1)
            s64 = np.matmul(qs, np.asarray(k[c0:c1], np.float64).T)
            hi = s[:, c0 - j0 : c1 - j0]
            np.copyto(hi, s64, casting="same_kind")
            if lo is not None:
                np.subtract(s64, hi, out=s64)
                lo_c = lo[:, c0 - j0 : c1 - j0]
                np.copyto(lo_c, s64, casting="same_kind")
                if not math.isfinite(float(np.add.reduce(lo_c, axis=None))):
                    np.copyto(lo_c, 0.0, where=~np.isfinite(lo_c))  # inf/NaN scores
    else:
        np.matmul(qs, k[j0:j1].T, out=s)
        if not _folds_scale(plan):
            s *= opts.scale
    if opts.softcap is not None:
        s *= 1.0 / opts.softcap
        np.tanh(s, out=s)
        if tanh_buf is not None:
            np.copyto(tanh_buf[: i1 - i0, : j1 - j0], s)
        s *= opts.softcap
    if opts.has_bias:  # the bias and ALiBi
        s += opts.bias_block(b, h, i0, i1, j0, j1)
    if opts.mods is not None:  # score_mod (and its derivative), then mask_mod on PARTIAL
        dmod = None if dmod_buf is None else dmod_buf[: i1 - i0, : j1 - j0]
        opts.mods.apply(s, b, h, i0 + opts.q_offset, j0 + opts.k_offset, kind, dmod)
    if kind is TileKind.PARTIAL:
        for c0, c1 in opts.spec.masked_columns(b, i0, i1, j0, j1):
            np.copyto(s[:, c0 - j0 : c1 - j0], -np.inf,
                      where=~opts.spec.block(b, h, i0, i1, c0, c1))
    return s, lo


# --- Forward ---


def tiled_forward(
    q: Any, k: Any, v: Any, *, block_q: int | None = None, block_k: int | None = None,
    accum_dtype: Any = None, **options: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """The tiled forward: (out (B, H, Sq, Dv) input dtype, lse (B, H, Sq)).

    ``options`` are :func:`flash_attention`'s plus the shard positions q_offset, k_offset,
    q_total, k_total (see the module docs). Raises as :func:`flash_attention`."""
    plan = Plan.build(q, k, v, block_q=block_q, block_k=block_k, accum_dtype=accum_dtype,
                       **options)
    opts = plan.opts
    out = np.zeros((opts.batch, opts.heads, opts.sq, opts.dv), opts.dtype)
    lse = np.full((opts.batch, opts.heads, opts.sq), -np.inf, opts.lse_dtype)

    def work(unit: Unit) -> None:
        _forward_unit(plan, unit.b, unit.h, unit.blocks, out, lse)

    run_units(work_units(plan, cores()), work)
    return out, lse


def _forward_unit(plan: Plan, b: int, h: int, blocks: list[Block], out: np.ndarray,
                  lse: np.ndarray) -> None:
    """Forward of the row blocks ``blocks`` of slice (b, h): out[b, h] and lse[b, h] for
    the rows that see any key."""
    k, v = _kv(plan, b, h)
    buf = np.empty((plan.bq, plan.bk), plan.acc)  # the score tile, reused
    lo_buf = _lo_buffer(plan)
    sink = None if plan.opts.sinks is None or not plan.opts.all_keys else plan.opts.sinks[h]
    for i0, i1, tiles in blocks:
        tiles = _mod_tiles(plan, b, h, i0, i1, tiles)
        if not tiles:  # nothing visible: out stays 0, lse -inf (the sink's, with a sink)
            if sink is not None:
                lse[b, h, i0:i1] = sink
            continue
        qs = _score_rows(plan, b, h, i0, i1, _q_block(plan, b, h, i0, i1))
        if len(tiles) == 1:
            m, l, o = _one_tile(plan, b, h, qs, k, v, i0, i1, tiles[0], buf, lo_buf)
        else:
            m, l, o, _ = _online(plan, b, h, qs, k, v, i0, i1, tiles, buf, lo_buf=lo_buf)
            # o / l; an empty row (l = 0, m = -inf) gives 0
            o = np.divide(o, l[:, None], out=np.zeros_like(o), where=l[:, None] != 0)
        row_lse = m + np.log(l)  # -inf for an empty row
        if sink is not None:  # a value-less state with lse = sink, merged exactly
            with_sink = np.logaddexp(row_lse, sink)
            keep = np.exp(row_lse - row_shift(with_sink))  # 0 for a row with neither
            o = o * keep[:, None]
            row_lse = with_sink
        out[b, h, i0:i1] = o
        lse[b, h, i0:i1] = row_lse


#: Elements of P converted to the state dtype at a time in _one_tile (64 KiB in float64).
_ONE_TILE_CHUNK = 8192


def _one_tile(
    plan: Plan, b: int, h: int, qs: np.ndarray, k: np.ndarray, v: np.ndarray,
    i0: int, i1: int, tile: Tile, buf: np.ndarray, lo_buf: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows [i0, i1) that see a single tile: the online rule has nothing to merge, so
    P = exp(s - m) / l and P @ V are formed in the state dtype (float64 for float32
    tiles) and the output is rounded once. The online path's float32 o, rounded again
    in o / l, put float32 outputs at up to 6x the naive formula's error on short rows
    (DESIGN.md's rule allows 2x); this costs a float64 P @ V on problems that fit one
    tile (Sk <= block_k), not on long ones, whose tiles take the online path.

    Returns (m, l, out rows) in the state dtype.
    """
    j0, j1, kind = tile
    st = plan.state
    s, lo = _scores(plan, b, h, qs, k, i0, i1, j0, j1, kind, buf, lo_buf=lo_buf)  # (ni, nj)
    m_hi, lo_m = _row_max(s, lo)
    _shift(s, lo, row_shift(m_hi), lo_m)
    np.exp(s, out=s)  # exp(s - m), in place
    m = m_hi.astype(st) if lo_m is None else np.add(m_hi, lo_m, dtype=st)
    l = s.sum(axis=1, dtype=st)
    inv = 1 / np.where(l == 0, 1, l)  # an empty row (l = 0) stays 0
    o = np.zeros((i1 - i0, v.shape[1]), st)
    # P @ V in st by pieces of _ONE_TILE_CHUNK elements (keys outer, rows inner), so the
    # converted copies stay small: peak memory is the online path's.
    keys = min(j1 - j0, 256)
    rows = max(1, _ONE_TILE_CHUNK // keys)
    for c0 in range(j0, j1, keys):
        c1 = min(c0 + keys, j1)
        vs = v[c0:c1].astype(st, copy=False)
        for r0 in range(0, i1 - i0, rows):
            p = s[r0 : r0 + rows, c0 - j0 : c1 - j0].astype(st)
            p *= inv[r0 : r0 + rows, None]
            o[r0 : r0 + rows] += p @ vs
    return m, l, o


def _online(
    plan: Plan, b: int, h: int, qs: np.ndarray, k: np.ndarray, v: np.ndarray | None,
    i0: int, i1: int, tiles: list[Tile], buf: np.ndarray,
    sum64: bool = False, lo_buf: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """The online softmax of query rows [i0, i1) over their tiles (flashmath.softmax.online's rule).

    Returns (m, l, o) in the state dtype: the row max, sum_j exp(s_j - m) and, given v,
    sum_j exp(s_j - m) v_j ((ni, 0) without v). v may be float64 (the backward's float32
    path): o is then summed in float64. sum64: each tile's row sums in float64 (a reduction
    with a float64 accumulator) instead of the tile-dtype BLAS matrix-vector product.
    """
    acc, st, ni = plan.acc, plan.state, i1 - i0
    dv = 0 if v is None else v.shape[1]
    m = np.full(ni, -np.inf, st)  # running max (values of acc: exact in st)
    m_hi = np.full(ni, -np.inf, acc)  # with exact scores' residuals: m = m_hi + lo_m
    lo_m: np.ndarray | None = None
    l = np.zeros(ni, st)  # running sum of exp(s - m)
    o = np.zeros((ni, dv), st)  # running sum of exp(s - m) v
    ones = np.ones(plan.bk, acc)  # row sums as a BLAS matrix-vector product
    for j0, j1, kind in tiles:
        s, lo = _scores(plan, b, h, qs, k, i0, i1, j0, j1, kind, buf, lo_buf=lo_buf)
        t_hi, t_lo = _row_max(s, lo)
        if t_lo is None:
            m_new = np.maximum(m, t_hi)
            shift = row_shift(m_new).astype(acc)
        else:
            t_m = np.add(t_hi, t_lo, dtype=st)
            up = t_m > m
            m_new = np.where(up, t_m, m)
            m_hi = np.where(up, t_hi, m_hi)
            lo_m = np.where(up, t_lo, t_lo if lo_m is None else lo_m)
            shift = row_shift(m_hi)
        alpha = rescale(m, m_new)
        _shift(s, lo, shift, lo_m)
        np.exp(s, out=s)  # p~ = exp(s - m_new), in place
        l *= alpha
        if sum64:
            l += s.sum(axis=1, dtype=np.float64)
        else:
            l += s @ ones[: j1 - j0]
        if v is not None:
            o *= alpha[:, None]
            o += s @ v[j0:j1]
        m = m_new
    return m, l, o, (None if lo_m is None else (m_hi, lo_m))


# --- Backward ---


def tiled_backward(
    dout: Any, q: Any, k: Any, v: Any, out: Any, lse: Any, *, block_q: int | None = None,
    block_k: int | None = None, accum_dtype: Any = None, dlse: Any = None, **options: Any,
) -> tuple[np.ndarray, ...]:
    """The tiled backward: (dq, dk, dv) in the input dtype, as
    :func:`flash_attention_backward` (and dsinks with ``sinks``); ``options`` may hold the
    shard positions as :func:`tiled_forward` (then pass the merged, global out and lse of
    the shard's rows, and the sinks to no shard: they count once)."""
    plan = Plan.build(q, k, v, block_q=block_q, block_k=block_k, accum_dtype=accum_dtype,
                       **options)
    opts = plan.opts
    dout, out, lse = check_backward_inputs(opts, dout=dout, out=out, lse=lse)
    if dlse is not None:
        (dlse,) = check_backward_inputs(opts, dlse=dlse)
    dq = np.zeros(plan.q.shape, opts.dtype)
    todo = work_units(plan, cores())
    parts = todo[0].parts if todo else 1
    # Per query head and part; summed over parts and each group of heads below (disjoint
    # writes per thread).
    dk = np.zeros((parts, opts.batch, opts.heads, opts.sk, opts.d), plan.state)
    dv = np.zeros((parts, opts.batch, opts.heads, opts.sk, opts.dv), plan.state)

    def work(unit: Unit) -> None:
        _backward_unit(plan, unit.b, unit.h, unit.blocks, dout, out, lse, dq,
                       dk[unit.part], dv[unit.part], dlse)

    run_units(todo, work)
    dk, dv = (x[0] if parts == 1 else x.sum(axis=0) for x in (dk, dv))
    if not _folds_scale(plan):
        dk *= opts.scale
    shape = (opts.batch, opts.kv_heads, opts.group, opts.sk)
    dk = dk.reshape(*shape, opts.d).sum(axis=2) if opts.group > 1 else dk
    dv = dv.reshape(*shape, opts.dv).sum(axis=2) if opts.group > 1 else dv
    grads = (dq, dk.astype(opts.dtype), dv.astype(opts.dtype))
    if opts.sinks is None:
        return grads
    return (*grads, _sink_gradient(opts, dout, out, lse, dlse))


def _sink_gradient(opts: AttentionOptions, dout: np.ndarray, out: np.ndarray,
                   lse: np.ndarray, dlse: np.ndarray | None) -> np.ndarray:
    """dsinks (H,): d out_i / d sink = -p_sink out_i and d lse_i / d sink = p_sink, so
    dsink = -sum over batch and rows of p_sink (rowsum(dO O) - dlse), p_sink =
    exp(sink - lse), in float64 (rows with lse -inf, the padding, add nothing)."""
    assert opts.sinks is not None
    delta = np.einsum("bhid,bhid->bhi", dout, out, dtype=np.float64)
    if dlse is not None:
        delta -= np.asarray(dlse, np.float64)
    lse64 = np.asarray(lse, np.float64)
    with np.errstate(invalid="ignore"):  # -inf - -inf: a padding row of a sink-less head
        p_sink = np.exp(opts.sinks[None, :, None] - lse64)
    p_sink = np.where(np.isfinite(lse64), p_sink, 0.0)
    return (-np.sum(p_sink * delta, axis=(0, 2))).astype(opts.lse_dtype)


def _backward_unit(
    plan: Plan, b: int, h: int, blocks: list[Block], dout: np.ndarray, out: np.ndarray,
    lse: np.ndarray, dq: np.ndarray, dk: np.ndarray, dv: np.ndarray,
    dlse: np.ndarray | None = None,
) -> None:
    """Gradients of the row blocks ``blocks`` of slice (b, h): their dq[b, h] rows, and
    their contributions to this head's dk[b, h], dv[b, h].

    With p = exp(s - shift) * f (f per row, see :func:`_probabilities`), the row factor f
    is folded into the small operands instead of the tile: dv += p~^T (f do),
    ds~ = p~ (dp - delta), dq = scale f (ds~ k), dk += ds~^T (f scale q).
    """
    acc, st, opts = plan.acc, plan.state, plan.opts
    k, v = _kv(plan, b, h)
    buf = np.empty((plan.bq, plan.bk), acc)  # scores, then p~
    dbuf = np.empty((plan.bq, plan.bk), acc)  # dp, then ds~
    tanh_buf = None if opts.softcap is None else np.empty((plan.bq, plan.bk), acc)
    lo_buf = _lo_buffer(plan)
    dk_h, dv_h = dk[b, h], dv[b, h]  # (Sk, D), (Sk, Dv) accumulators
    # float32 input: dp = do v^T and dp - delta in float64, rounded once (see _probabilities)
    v64 = np.asarray(v, np.float64) if _wide_float32(plan) else None
    dp64 = None if v64 is None else np.empty((plan.bq, plan.bk), np.float64)
    v_max = float(np.max(np.abs(v), initial=0.0)) if opts.all_keys else 0.0
    dmod_buf = np.empty((plan.bq, plan.bk), acc) if _has_score_mod(opts) else None
    for i0, i1, tiles in blocks:
        tiles = _mod_tiles(plan, b, h, i0, i1, tiles)
        if not tiles:
            continue
        ni = i1 - i0
        qs = _q_block(plan, b, h, i0, i1)  # (ni, D), scaled if folded
        qs_s = _score_rows(plan, b, h, i0, i1, qs)
        do = np.asarray(dout[b, h, i0:i1], acc)  # (ni, Dv)
        pr = _probabilities(plan, b, h, qs_s, k, i0, i1, tiles, lse[b, h, i0:i1], buf,
                            (v if v64 is None else v64) if opts.all_keys else None, lo_buf)
        shift, f = pr.shift, pr.f
        if pr.o is not None and f is not None:  # delta from this pass's own out, in float64
            o = pr.o * f[:, None]
            _check_given(plan, "out", out[b, h, i0:i1], o, v_max)
            if pr.lse is not None:
                _check_given(plan, "lse", lse[b, h, i0:i1], pr.lse, 0.0)
            delta = np.einsum("id,id->i", do, o, dtype=st)
            delta = (delta if v64 is not None else delta.astype(acc))[:, None]
        else:
            delta = np.einsum("id,id->i", do, out[b, h, i0:i1], dtype=st)
            delta = (delta if v64 is not None else delta.astype(acc))[:, None]
        if dlse is not None:  # d lse / d s = p: the lse cotangent joins dp - delta
            delta = delta - np.asarray(dlse[b, h, i0:i1], delta.dtype)[:, None]
        do64 = None if v64 is None else np.asarray(do, np.float64)
        do_f = do if f is None else np.multiply(do, f[:, None], dtype=acc)
        qs_f = qs if f is None else np.multiply(qs, f[:, None], dtype=acc)
        dq_blk = np.zeros((ni, opts.d), st)
        for j0, j1, kind in tiles:
            nj = j1 - j0
            p, lo = _scores(plan, b, h, qs_s, k, i0, i1, j0, j1, kind, buf, tanh_buf, lo_buf,
                            dmod_buf)
            _shift(p, lo, shift, pr.lo_shift)
            np.exp(p, out=p)  # p~ = exp(s - shift)
            dv_h[j0:j1] += p.T @ do_f
            if v64 is not None and do64 is not None and dp64 is not None:
                dp = np.matmul(do64, v64[j0:j1].T, out=dp64[:ni, :nj])
                dp -= delta
                ds = dbuf[:ni, :nj]
                np.copyto(ds, dp, casting="same_kind")  # dp - delta, rounded once
            else:
                ds = np.matmul(do, v[j0:j1].T, out=dbuf[:ni, :nj])  # dp
                ds -= delta
            ds *= p  # ds~ = p~ (dp - delta)
            if dmod_buf is not None:  # through the score_mod: d mod / d s
                ds *= dmod_buf[:ni, :nj]
            if tanh_buf is not None:  # through the softcap: d(c tanh(x / c)) = 1 - tanh^2
                t = tanh_buf[:ni, :nj]
                np.multiply(t, t, out=t)
                np.subtract(1, t, out=t)
                ds *= t
            dq_blk += ds @ k[j0:j1]
            dk_h[j0:j1] += ds.T @ qs_f  # f ds~^T q (times scale: folded, or below)
        if f is not None:
            dq_blk *= f[:, None]
        dq[b, h, i0:i1] = dq_blk * opts.scale


#: The given out and lse must match the backward's own recomputation within their
#: rounding to the stored dtype plus this many tile-dtype epsilons times sqrt(Sk) (sums
#: of Sk terms computed in another order; see :func:`_check_given`).
_GIVEN_TOLERANCE = 16


def _check_given(plan: Plan, name: str, given: np.ndarray, want: np.ndarray,
                 v_max: float) -> None:
    """Raise ValueError when the given out or lse rows do not belong to these inputs.

    want: the backward's own recomputation (float64). NaN in ``given`` where ``want`` is
    not NaN (an all-NaN out or lse, for instance), or a non-finite value where ``want``
    is finite, is always an error. So is a deviation beyond eps_stored |want| +
    _GIVEN_TOLERANCE sqrt(Sk) eps_tile * scale, with eps_stored the epsilon of the dtype
    the value was stored in (lse: float32 or float64; out: the input dtype), scale
    1 + |lse| for lse and the row's max |out| plus the slice's max |v| for out; this size
    check runs only when the tiles are float32 or wider (narrower tile sums drift)."""
    g = np.asarray(given, np.float64)
    fin = np.isfinite(want)
    wrong = (np.isnan(g) & ~np.isnan(want)) | (fin & ~np.isfinite(g))
    wrong |= np.isneginf(want) & ~np.isneginf(g)
    if plan.acc.itemsize >= 4:
        stored = plan.opts.lse_dtype if name == "lse" else plan.opts.dtype
        w = np.abs(np.where(fin, want, 0.0))
        noise = _GIVEN_TOLERANCE * math.sqrt(plan.opts.sk) * float(finfo(plan.acc).eps)
        if name == "lse":
            scale = 1 + w
        else:
            scale = np.max(w, axis=-1, keepdims=True) + v_max
        bound = float(finfo(stored).eps) * w + noise * scale
        wrong |= np.abs(np.where(fin, g - want, 0.0)) > bound
    if wrong.any():
        raise ValueError(
            f"{name}: {int(wrong.sum())} value(s) differ from the forward of these q, k, v "
            f"and options (NaN or off by more than rounding); pass the out and lse that "
            f"flash_attention(..., return_lse=True) returned for the same inputs"
        )


class _RowProbs(NamedTuple):
    """What :func:`_probabilities` returns for a block of rows: p = exp(s - shift) * f."""

    shift: np.ndarray  # (ni,), tile dtype
    lo_shift: np.ndarray | None  # (ni,) the max entry's residual with exact scores
    f: np.ndarray | None  # (ni,), state dtype; None: 1
    o: np.ndarray | None  # (ni, Dv) sum_j exp(s_j - shift) v_j, state dtype; or None
    lse: np.ndarray | None  # (ni,) the recomputed lse (float64), or None


def _probabilities(
    plan: Plan, b: int, h: int, qs: np.ndarray, k: np.ndarray, i0: int, i1: int,
    tiles: list[Tile], lse: np.ndarray, buf: np.ndarray,
    v: np.ndarray | None = None, lo_buf: np.ndarray | None = None,
) -> _RowProbs:
    """How the backward rebuilds a row block's probabilities, p = exp(s - shift) * f.

    When the keys are the whole sequence (not a shard), one online pass over the block's
    tiles recomputes the row max m, l = sum exp(s - m) and, given v, o = sum exp(s - m) v
    (state dtype: float64 for float32 and wider tiles): shift = m, f = 1 / l, and the
    backward forms delta = rowsum(do * o f) from these very probabilities. The given lse
    and out are then only checked against this recomputation (:func:`_check_given`), not
    used: exp(s - lse) would carry lse's float32 rounding (|lse| eps / 2) into every p of
    a row, and delta from the given out its rounding to the input dtype (for float16 and
    bfloat16 about 1e-3 |do| |out| per term), which the near-cancelling dp - delta of a
    dominant key turned into dq, dk up to 3x (float16) and 10x (float32) the naive
    formula's error. Empty rows get shift 0 and f 0.

    For a shard (not all keys), the row sums over the local keys are not 1: shift = m and
    f = exp(m - lse) with the given (global) lse for float32 and wider inputs, shift = lse
    and f = None for narrower ones; o is None and delta comes from the given (global) out.
    """
    opts = plan.opts
    if not opts.all_keys and opts.dtype.itemsize < opts.lse_dtype.itemsize:
        return _RowProbs(row_shift(np.asarray(lse, plan.acc)), None, None, None, None)
    m, l, o, hl = _online(plan, b, h, qs, k, v if opts.all_keys else None, i0, i1, tiles,
                          buf, sum64=_wide_float32(plan), lo_buf=lo_buf)
    shift, lo_shift = (row_shift(m).astype(plan.acc), None) if hl is None else \
        (row_shift(hl[0]), hl[1])
    if not opts.all_keys:
        f = np.exp(m - row_shift(np.asarray(lse, plan.state)))  # 0 where m = -inf
        return _RowProbs(shift, lo_shift, f, None, None)
    if opts.sinks is not None:  # the sink's exp(sink - m) joins each row's denominator
        sink = opts.sinks[h]
        m_f = np.maximum(m, sink)
        l = l * np.exp(m - row_shift(m_f)) + np.exp(sink - row_shift(m_f))
        m_eff = m_f
        f = np.divide(np.exp(m - row_shift(m_f)), l, out=np.zeros_like(l), where=l != 0)
    else:
        m_eff = m
        f = np.divide(1, l, out=np.zeros_like(l), where=l != 0)
    lse_re = np.asarray(m_eff, np.float64) + np.log(np.asarray(l, np.float64))
    return _RowProbs(shift, lo_shift, f, o if v is not None else None, lse_re)
