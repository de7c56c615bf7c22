"""The tiled backward: dq, dk, dv (and the sinks' gradient) recomputed tile by tile from
the forward's statistics, never storing the probability matrix.

The loop is the forward's (:func:`flashmath.attention.schedule.schedule`); per block of
query rows one extra online pass recomputes the row max, sum and output, from which the
probabilities and delta = rowsum(dout * out) are built (see :func:`_probabilities`); then
per tile: p = exp(s - shift) * f; dv += p^T do; ds = p (do v^T - delta); dq += ds k;
dk += ds^T q. ``dlse``, the cotangent of lse, joins delta. The public entry points are
:func:`flashmath.attention.tiled.flash_attention_backward` and ``tiled_backward``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from flashmath.attention import fast
from flashmath.attention import tiles as tp  # the shared tile pieces
from flashmath.attention.options import AttentionOptions, check_backward_inputs
from flashmath.attention.schedule import Block, Plan, Tile, Unit, work_units
from flashmath.attention.threads import cores, run_units
from flashmath.dtypes import finfo
from flashmath.softmax.rule import row_shift

__all__ = ["tiled_backward"]


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
        with tp.kv(plan, unit.b, unit.h) as (k, v):
            if plan.fast:
                fast.backward_unit(plan, unit.b, unit.h, unit.blocks, k, v, dout, lse, dq,
                                   dk[unit.part], dv[unit.part], dlse)
            else:
                _backward_unit(plan, unit.b, unit.h, unit.blocks, k, v, dout, out, lse, dq,
                               dk[unit.part], dv[unit.part], dlse)

    run_units(todo, work)
    dk, dv = (x[0] if parts == 1 else x.sum(axis=0) for x in (dk, dv))
    if not tp.folds_scale(plan):
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
    plan: Plan, b: int, h: int, blocks: list[Block], k: np.ndarray, v: np.ndarray,
    dout: np.ndarray, out: np.ndarray, lse: np.ndarray, dq: np.ndarray, dk: np.ndarray,
    dv: np.ndarray, dlse: np.ndarray | None = None,
) -> None:
    """Gradients of the row blocks ``blocks`` of slice (b, h), whose keys and values are
    k, v (:func:`tp.kv`): their dq[b, h] rows, and their contributions to this head's
    dk[b, h], dv[b, h].

    With p = exp(s - shift) * f (f per row, see :func:`_probabilities`), the row factor f
    is folded into the small operands instead of the tile: dv += p~^T (f do),
    ds~ = p~ (dp - delta), dq = scale f (ds~ k), dk += ds~^T (f scale q).
    """
    acc, st, opts = plan.acc, plan.state, plan.opts
    buf = np.empty((plan.bq, plan.bk), acc)  # scores, then p~
    dbuf = np.empty((plan.bq, plan.bk), acc)  # dp, then ds~
    tanh_buf = None if opts.softcap is None else np.empty((plan.bq, plan.bk), acc)
    lo_buf = tp.lo_buffer(plan)
    dk_h, dv_h = dk[b, h], dv[b, h]  # (Sk, D), (Sk, Dv) accumulators
    # float32 input: dp = do v^T and dp - delta in float64, rounded once (see _probabilities)
    v64 = np.asarray(v, np.float64) if tp.wide_float32(plan) else None
    dp64 = None if v64 is None else np.empty((plan.bq, plan.bk), np.float64)
    v_max = float(np.max(np.abs(v), initial=0.0)) if opts.all_keys else 0.0
    dmod_buf = np.empty((plan.bq, plan.bk), acc) if tp.has_score_mod(opts) else None
    for i0, i1, tiles in tp.visible_blocks(plan, b, h, blocks):
        if not tiles:
            continue
        ni = i1 - i0
        qs = tp.q_block(plan, b, h, i0, i1)  # (ni, D), scaled if folded
        qs_s = tp.score_rows(plan, b, h, i0, i1, qs)
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
            p, lo = tp.scores(plan, b, h, qs_s, k, i0, i1, j0, j1, kind, buf, tanh_buf, lo_buf,
                            dmod_buf)
            tp.shift_scores(p, lo, shift, pr.lo_shift)
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
    m, l, o, hl = tp.online(plan, b, h, qs, k, v if opts.all_keys else None, i0, i1, tiles,
                          buf, sum64=tp.wide_float32(plan), lo_buf=lo_buf)
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
