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
Two sets of loops share this shape. Large float32 problems over the whole key sequence
(:func:`~flashmath.attention.schedule.fast_path` says which) take the fast loops of
:mod:`flashmath.attention.fast` (transposed tiles through NumPy's own cblas_sgemm, a stale
row max, exp2 where NumPy vectorises it, a backward that forms each block's probabilities
once); everything else takes the accurate loops below. Both run the (b, h) slices (cut by
query blocks into parts when they are too few for the cores,
:func:`~flashmath.attention.schedule.work_units`) on a thread per core (NumPy releases the
GIL in BLAS and in ufunc loops; BLAS itself runs one thread per worker, see
:mod:`flashmath.attention.threads`). Extra memory is a few tile buffers per thread plus
per-block accumulators: linear in S.

Dtypes: float64 computes in float64; float32, float16, bfloat16 and float8 compute the
tiles in float32 (``accum_dtype`` overrides) and return the input dtype, except that a
small float32 call (at most :data:`~flashmath.attention.schedule.SMALL_PAIRS` query-key
pairs, off the fast loops) computes its tiles in float64 and rounds each result once; what is summed
across tiles (m, l, o; dq, dk, dv) is float64 unless ``accum_dtype`` is narrower than
float32. lse is float32 (float64 for float64 input). The backward rejects float8.

Accuracy (the rule of docs/conventions.md, against the naive same-dtype formula and a
PyTorch-style baseline; measured by benchmarks/fuzz_attention.py, and with ``--medium`` on
the fast loops' sizes): narrow inputs meet it with room (median errors 0.1-0.4x the
baselines'). On the accurate loops, float32 input computes its scores in float64 and keeps
them as a float32 value plus its float32 rounding residual (:func:`tp.exact_scores`,
:func:`tp.scores`): the shift by the row max is then exact where it matters, so
p = exp(s - m) carries eps / 2 relative error however large the scores; a float32 score
GEMM's rounding, |s| eps, is the largest error in p whenever scores are large, and the
baselines carry it too, so on tiny problems flashmath's error was otherwise a coin toss
against theirs. The accurate backward spends one extra pass per row block recomputing
the row max, sum and output (float64 sums), from which it builds p and delta rather than
from the given, rounded lse and out (see :func:`_probabilities`). Rows whose visible keys
fit one tile take :func:`tp.one_tile`, which forms P and P V in the state dtype and
rounds once. The fast loops' errors are the baselines' kind (float32 scores), with the
output and the backward's delta and row sums formed as :mod:`flashmath.attention.fast`
explains.

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

from typing import Any

import numpy as np

from flashmath.attention import fast
from flashmath.attention import tiles as tp  # the shared tile pieces
from flashmath.attention.backward import tiled_backward
from flashmath.attention.options import Causal, Window
from flashmath.attention.schedule import (
    DEFAULT_BLOCK_K,
    DEFAULT_BLOCK_Q,
    Block,
    Plan,
    Unit,
    widest,
    work_units,
)
from flashmath.attention.threads import cores, run_units
from flashmath.softmax.rule import row_shift

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
    causal: Causal = False,
    window: Window = None,
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
    accum_dtype : the dtype of the tile arithmetic (default float32, float64 for float64
        and for small float32 calls, see the module docs; float32 input in float32 tiles
        computes its scores q k^T in float64, rounded to float32 once).
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
    causal: Causal = False,
    window: Window = None,
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
        skipped for accum_dtype narrower than float32). The fast loops (large float32
        problems, see the module docs) recompute p and out too, in float32 tiles, and
        check only the shapes of out and lse: a wrong lse is normalised away there, and
        out is not read. The shard API
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


# --- Forward ---


def tiled_forward(
    q: Any, k: Any, v: Any, *, block_q: int | None = None, block_k: int | None = None,
    accum_dtype: Any = None, out_dtype: Any = None, **options: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """The tiled forward: (out (B, H, Sq, Dv) in ``out_dtype``, default the input dtype,
    lse (B, H, Sq)).

    ``options`` are :func:`flash_attention`'s plus the shard positions q_offset, k_offset,
    q_total, k_total (see the module docs). ``out_dtype`` wider than the input keeps each
    row's result unrounded (a shard's output that is merged before rounding once, as
    flash_decode's key ranges are). Raises as :func:`flash_attention`."""
    plan = Plan.build(q, k, v, block_q=block_q, block_k=block_k, accum_dtype=accum_dtype,
                       **options)
    opts = plan.opts
    out = np.zeros((opts.batch, opts.heads, opts.sq, opts.dv),
                   opts.dtype if out_dtype is None else out_dtype)
    lse = np.full((opts.batch, opts.heads, opts.sq), -np.inf, opts.lse_dtype)

    def work(unit: Unit) -> None:
        with tp.kv(plan, unit.b, unit.h) as (k, v):
            _forward_unit(plan, unit.b, unit.h, unit.blocks, k, v, out, lse)

    run_units(work_units(plan, cores()), work)
    return out, lse


def _forward_unit(plan: Plan, b: int, h: int, blocks: list[Block], k: np.ndarray,
                  v: np.ndarray, out: np.ndarray, lse: np.ndarray) -> None:
    """Forward of the row blocks ``blocks`` of slice (b, h), whose keys and values are k, v
    (:func:`tp.kv`): out[b, h] and lse[b, h] for the rows that see any key."""
    blocks = tp.visible_blocks(plan, b, h, blocks)
    width = widest(blocks)
    buf = np.empty((plan.bq, width), plan.acc)  # the score tile, reused
    # the fast loops' [k, -1] tile (see fast.online)
    ka = fast.augmented(np.zeros((width, plan.opts.d), np.float32), -1.0) if plan.fast \
        else None
    buf_t = buf.reshape(width, plan.bq)  # fast.online's transposed tiles
    lo_buf = tp.lo_buffer(plan) if ka is None else None
    sink = None if plan.opts.sinks is None or not plan.opts.all_keys else plan.opts.sinks[h]
    for i0, i1, tiles in blocks:
        if not tiles:  # nothing visible: out stays 0, lse -inf (the sink's, with a sink)
            if sink is not None:
                lse[b, h, i0:i1] = sink
            continue
        if ka is not None:
            out[b, h, i0:i1], lse[b, h, i0:i1] = fast.online(
                plan, b, h, fast.q_rows(plan, b, h, i0, i1), k, v, i0, tiles, buf_t, ka)
            continue
        qs = tp.score_rows(plan, b, h, i0, i1, tp.q_block(plan, b, h, i0, i1))
        if len(tiles) == 1:
            m, l, o = tp.one_tile(plan, b, h, qs, k, v, i0, i1, tiles[0], buf, lo_buf)
        else:
            m, l, o, _ = tp.online(plan, b, h, qs, k, v, i0, i1, tiles, buf, lo_buf=lo_buf)
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
