"""The fast float32 tile loops: the tiled forward and backward for float32 problems large
enough that their error is a statistic over many outputs.

What the accurate path (:mod:`flashmath.attention.tiles`, :mod:`flashmath.attention.backward`)
spends to stay inside the accuracy rule on tiny problems, this path leaves out:

* scores are one float32 GEMM per tile (no float64 product and rounding residual);
* the forward keeps each row's shift from its first tile and skips the row-max pass on the
  later ones: exp(s - m) may then exceed 1, which costs no precision (exp's error is
  relative); a tile whose row sums leave ``(0, _LIMIT]`` (a new max far above the old,
  inf or NaN) is redone on the exact online step, so nothing overflows;
* the backward takes p = exp(s - lse) and delta = rowsum(dout * out) from the given lse
  and out instead of recomputing them (one online pass less per block of rows), and
  dp = dout v^T in float32.

Why only for large problems: each of those savings leaves flashmath's rounding errors
distributed like the baselines' (the naive formula's and the PyTorch-style one's: float32
scores, p from a float32 lse), so the max error over an output is a statistic of the same
law for all three. Over a few outputs that is a coin toss (the accurate path exists because
2% of tiny random cases drew over 2x); over many it concentrates near 1x.
``benchmarks/fuzz_attention.py --medium`` measures this path on random problems just above
:data:`MIN_OUTPUTS`. The backward's check of the given out and lse against a recomputation
needs that recomputation, so this path checks only their shapes and dtypes.
"""

from __future__ import annotations

import math

import numpy as np

from flashmath import blas
from flashmath.attention import tiles as tp
from flashmath.attention.masks import TileKind
from flashmath.attention.schedule import Block, Plan, Tile

__all__ = ["augmented", "backward_unit", "online", "q_rows"]

#: A tile on the stale shift is redone when a row sum exceeds this (exp(s - m) <= 2^20).
_LIMIT = 2.0**20
_LOG2E = 1 / math.log(2)


def augmented(x: np.ndarray, last: float) -> np.ndarray:
    """[x, last]: x (..., n, d) as float32 with one more column, filled with ``last``; a
    shift placed there in the other operand is subtracted inside the GEMM."""
    out = np.empty((*x.shape[:-1], x.shape[-1] + 1), np.float32)
    out[..., :-1] = x
    out[..., -1] = last
    return out


def q_rows(plan: Plan, b: int, h: int, i0: int, i1: int) -> np.ndarray:
    """[qs, 0] in float32, (ni, D + 1), qs = :func:`tp.q_block` (scale q when the scale is
    a power of two, else q: see :func:`_fold`)."""
    return augmented(tp.q_block(plan, b, h, i0, i1), 0.0)


def _fold(plan: Plan) -> float:
    """c with natural-log scores = c (qs . k): 1 when the scale folds into q, else scale
    (applied as the GEMM's alpha: rounding q * scale element by element put the output
    at up to 1.8x the baselines' error)."""
    return 1.0 if tp.folds_scale(plan) else plan.opts.scale


def _tile(plan: Plan, b: int, h: int, a: np.ndarray, bt: np.ndarray, i0: int, j0: int,
          kind: TileKind, buf: np.ndarray, alpha: float) -> np.ndarray:
    """The transposed tile alpha (bt a^T) in buf (nj, ni), masked (-inf where hidden), as
    its (ni, nj) view: k q^T runs ~25% faster than q k^T in OpenBLAS at these shapes."""
    st = buf[: bt.shape[0], : a.shape[0]]
    blas.sgemm(bt, a.T, st, alpha=alpha)
    tp.mask_tile(plan, b, h, st.T, i0, j0, kind)
    return st.T


def online(plan: Plan, b: int, h: int, qa: np.ndarray, ka: np.ndarray, v: np.ndarray,
           i0: int, tiles: list[Tile], buf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(out rows, lse rows) of query rows i0.. over their tiles, in float64 (0 and -inf for
    a row that sees nothing). qa from :func:`q_rows` (its last column is overwritten),
    ka = augmented(k, -1).

    exp2 runs on scores in log2 units (alpha = c log2 e in the GEMM, c from :func:`_fold`;
    m is in qs . k units). The first tile (and any redone one) finds the row max m; later
    tiles subtract it inside their GEMM (qa's last column) and are kept unless a row sum
    leaves (0, _LIMIT]. Every tile's k . q comes from the same augmented GEMM, so the
    scores are the same bits in every pass."""
    ni, c = qa.shape[0], _fold(plan)
    a2 = c * _LOG2E
    m = np.full(ni, -np.inf, np.float32)  # each row's shift
    l = np.zeros(ni, np.float64)
    o = np.zeros((ni, v.shape[1]), np.float32)
    ones = np.ones(plan.bk, np.float32)  # row sums as a BLAS product: ones @ p^T
    stale = False  # whether every row has a finite m, subtracted inside the GEMM
    for j0, j1, kind in tiles:
        if stale:
            s = _tile(plan, b, h, qa, ka[j0:j1], i0, j0, kind, buf, a2)  # a2 (s - m)
            np.exp2(s, out=s)
            lt = ones[: j1 - j0] @ s.T
            if float(lt.max()) <= _LIMIT:  # False for NaN: redone below
                l += lt
                blas.sgemm(s, v[j0:j1], o, beta=1.0)
                continue
        qa[:, -1] = 0.0
        s = _tile(plan, b, h, qa, ka[j0:j1], i0, j0, kind, buf, 1.0)
        m_new = np.maximum(m, s.max(axis=1))
        shift = np.where(np.isneginf(m_new), np.float32(0), m_new)
        s -= shift[:, None]
        s *= np.float32(a2)
        np.exp2(s, out=s)
        with np.errstate(invalid="ignore"):  # -inf - -inf: a row still empty
            factor = np.exp(c * (m.astype(np.float64) - shift))
        factor[np.isneginf(m)] = 0.0
        l *= factor
        l += ones[: j1 - j0] @ s.T
        o *= factor[:, None].astype(np.float32)
        blas.sgemm(s, v[j0:j1], o, beta=1.0)
        m = m_new
        stale = bool(np.isfinite(m).all())
        qa[:, -1] = m
    out = np.divide(o, l[:, None], out=np.zeros(o.shape), where=l[:, None] != 0)
    return out, c * m.astype(np.float64) + np.log(l)


def backward_unit(
    plan: Plan, b: int, h: int, blocks: list[Block], aug: tuple[np.ndarray, np.ndarray],
    dout: np.ndarray, out: np.ndarray, lse: np.ndarray, dq: np.ndarray, dk: np.ndarray,
    dv: np.ndarray, dlse: np.ndarray | None = None,
) -> None:
    """Gradients of the row blocks ``blocks`` of slice (b, h), as the accurate
    ``_backward_unit`` of :mod:`flashmath.attention.backward`, on transposed tiles:
    p~^T = exp(c (k qs^T - lse / c)) and dp^T - delta = v do^T - delta in one GEMM each
    (the shifts as an augmented column), p = p~ f (:func:`_normalizers`); dv += p^T do;
    ds^T = p^T (dp^T - delta); dq += ds k; dk += ds^T qs (qs from :func:`q_rows`).
    aug: augmented(k, -1), augmented(v, -1) of every slice; dk, dv are this unit's
    float32 accumulators."""
    opts, c = plan.opts, _fold(plan)
    k = tp.kv(plan, b, h)[0]
    ka, va = (x[b, h // opts.group] for x in aug)
    buf = np.empty((plan.bk, plan.bq), np.float32)  # p^T
    dbuf = np.empty((plan.bk, plan.bq), np.float32)  # ds^T
    dk_h, dv_h = dk[b, h], dv[b, h]
    for i0, i1, tiles in blocks:
        tiles = tp.mod_tiles(plan, b, h, i0, i1, tiles)
        if not tiles:
            continue
        ni = i1 - i0
        qa = q_rows(plan, b, h, i0, i1)
        qs = qa[:, :-1]
        lse64 = np.asarray(lse[b, h, i0:i1], np.float64)
        qa[:, -1] = np.where(np.isneginf(lse64), 0.0, lse64) / c
        do = np.asarray(dout[b, h, i0:i1], np.float32)
        delta = np.einsum("id,id->i", do, out[b, h, i0:i1], dtype=np.float64)
        if dlse is not None:  # d lse / d s = p: the lse cotangent joins dp - delta
            delta -= np.asarray(dlse[b, h, i0:i1], np.float64)
        doa = augmented(do, 0.0)
        doa[:, -1] = delta
        f = _normalizers(plan, b, h, qa, ka, i0, tiles, buf)
        do_f, qs_f = do * f[:, None], qs * f[:, None]
        dq_blk = np.zeros((ni, opts.d), np.float32)
        for t, (j0, j1, kind) in enumerate(tiles):
            pt = buf[: j1 - j0, :ni]  # a single tile's p~^T is still there
            if t or len(tiles) > 1:
                _tile(plan, b, h, qa, ka[j0:j1], i0, j0, kind, buf, c)
                np.exp(pt, out=pt)
            blas.sgemm(pt, do_f, dv_h[j0:j1], beta=1.0)
            dst = dbuf[: j1 - j0, :ni]
            blas.sgemm(va[j0:j1], doa.T, dst)  # dp^T - delta
            dst *= pt
            blas.sgemm(dst.T, k[j0:j1], dq_blk, beta=1.0)
            blas.sgemm(dst, qs_f, dk_h[j0:j1], beta=1.0)
        dq[b, h, i0:i1] = dq_blk * (f * opts.scale)[:, None]


def _normalizers(plan: Plan, b: int, h: int, qa: np.ndarray, ka: np.ndarray, i0: int,
                 tiles: list[Tile], buf: np.ndarray) -> np.ndarray:
    """f = 1 / sum_j exp(s_j - lse) per row, float32 (0 for an empty row): p = p~ f with
    p~ = exp(s - lse) from the given float32 lse. Its rounding (|lse| eps / 2) would
    otherwise scale every p of a row alike, and where one key dominates (large scores,
    |lse| in the hundreds) dv, which sums p without the cancellation that protects dq
    and dk, was up to 6x the baselines' error. One GEMM, exp and row sum per tile; the
    last tile's p~^T stays in buf."""
    r, c = np.zeros(qa.shape[0], np.float64), _fold(plan)
    for j0, j1, kind in tiles:
        pt = _tile(plan, b, h, qa, ka[j0:j1], i0, j0, kind, buf, c).T
        np.exp(pt, out=pt)
        r += np.ones(j1 - j0, np.float32) @ pt
    return np.divide(1.0, r, out=np.zeros_like(r), where=r != 0).astype(np.float32)
