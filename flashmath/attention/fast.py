"""The fast float32 tile loops: the tiled forward and backward for float32 problems large
enough that their error is a statistic over many outputs (:func:`schedule.fast_path`
decides; smaller ones take the accurate loops of :mod:`flashmath.attention.tiles` and
:mod:`flashmath.attention.backward`).

What this path does differently, and why each step keeps the accuracy rule:

* Tiles are transposed, k q^T (in OpenBLAS ~25% faster than q k^T at these skinny
  shapes), one float32 GEMM each through NumPy's own cblas_sgemm (:mod:`flashmath.blas`:
  the scale as alpha, accumulation as beta = 1, no temporaries). The row shift rides in
  the GEMM as an augmented column ([k, -1] . [q, m] = k . q - m), so the scores of every
  pass are the same bits.
* The forward takes each row's shift from 32 keys that every row of its block sees (the
  block's keys left of a causal diagonal, the middle of a window's band, the first FULL
  tile under a user's mask_mod; with none, the first tile's exact online step finds the
  row max) and runs no row-max pass on its tiles: exp(s - m) may then exceed 1, which
  costs no precision (exp's error is relative); a tile whose row sums leave (0, 2^20] (a
  key far above the shift, inf, NaN) is redone on the exact online step, so nothing
  overflows.
  Where NumPy's float32 exp2 is vectorised (:data:`SIMD_EXP2`: AVX512_SKX, through SVML),
  tiles run exp2 on scores in log2 units: there it is faster than exp and more accurate
  (<= 1 ulp, against 2.4). A masked (PARTIAL) tile is masked after exp, with 0, not
  before it with -inf, because exp2 of -inf takes NumPy's slow path (4-6x slower on a
  half-masked tile; measured at S = 4096, window 512, where every tile is PARTIAL:
  exp2 then 0 was 5-10% faster than -inf then exp). Only the exact online step, rare,
  still masks with -inf (its row max must not see hidden pairs) and runs exp there.
  Elsewhere NumPy's exp2 is libm's scalar exp2f (on an AVX2-only AMD EPYC: 0.19 G/s,
  against 0.4 G/s for NumPy's AVX2 exp, half a fast forward's time), and every tile
  runs exp.
* p's row sums are summed in runs of 32 keys, the runs in float64 (:func:`row_sums`): a
  float32 BLAS matrix-vector product over a tile sums in order, and that error, the
  same in every output of a row, put the output at 2-3x the baselines' (whose softmax
  sums pairwise) on 1% of random problems. p v is float32 GEMMs over 512 keys, summed
  in float64.
* The backward forms each block's probabilities once (a (Sk, block_q) buffer per thread,
  linear in S), normalises them by their own row sums and takes delta = rowsum(do * o)
  from their own output o: the given lse's float32 rounding (|lse| eps / 2 in every p of
  a row) and the given out's rounding (times the row's mean key) put dv at 6x and dq, dk
  at 3-5x the baselines' on random problems with large scores or keys. It skips the
  accurate path's float64 recomputation of the row max and sum.

Why only for large problems: float32 scores carry a rounding of |s| eps, as the baselines'
do, so flashmath's max error is then a draw of the same law as theirs. Over many outputs
the max concentrates near 1x; over a few it is a coin toss (2% of tiny random cases drew
over 2x), which is why the accurate path exists. ``benchmarks/fuzz_attention.py
--medium`` judges this path on random problems just above its threshold.
"""

from __future__ import annotations

import math

import numpy as np

from flashmath import blas
from flashmath.attention import tiles as tp
from flashmath.attention.masks import TileKind
from flashmath.attention.schedule import Block, Plan, Tile, widest

__all__ = ["PIECE", "SIMD_EXP2", "augmented", "backward_unit", "online", "q_rows",
           "row_sums"]

#: A tile on the stale shift is redone when a row sum exceeds this (exp(s - m) <= 2^20).
_LIMIT = 2.0**20
_LOG2E = 1 / math.log(2)


def _simd_exp2() -> bool:
    """Whether this NumPy runs float32 exp2 vectorised, as its dispatcher reports it
    (``numpy.lib.introspect.opt_func_info``: a target other than the baseline). NumPy's
    SIMD exp2 is SVML's, built for AVX-512 (AVX512_SKX) only; elsewhere exp2 calls libm's
    scalar exp2f. False where NumPy does not say."""
    try:
        from numpy.lib.introspect import opt_func_info

        targets = opt_func_info(func_name="^exp2$", signature="float32")["exp2"]
        current = str(next(iter(targets.values()))["current"])
    except (ImportError, KeyError, StopIteration, TypeError):  # older NumPy: no report
        return False
    return not current.startswith("baseline")


#: Tiles run exp2 in log2 units (True) or exp (False): see the module docstring. A
#: switch for measurements and tests; set at import from this machine's NumPy.
SIMD_EXP2: bool = _simd_exp2()


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


def _exp(kind: TileKind, c: float) -> tuple[float, np.ufunc]:
    """(alpha, exp ufunc) for the exact step's tile of scores c (qs . k - shift), masked
    with -inf: exp2 on alpha = c log2 e for FULL tiles where :data:`SIMD_EXP2`; exp on
    alpha = c for PARTIAL ones (their -inf entries take exp2's slow path) and for every
    tile elsewhere."""
    if kind is TileKind.PARTIAL or not SIMD_EXP2:
        return c, np.exp
    return c * _LOG2E, np.exp2


def _tile(plan: Plan, b: int, h: int, a: np.ndarray, bt: np.ndarray, i0: int, j0: int,
          kind: TileKind, buf: np.ndarray, alpha: float) -> np.ndarray:
    """The transposed tile alpha (bt a^T) in buf (nj, ni), masked (-inf where hidden), as
    its (ni, nj) view: k q^T runs ~25% faster than q k^T in OpenBLAS at these shapes."""
    st = buf[: bt.shape[0], : a.shape[0]]
    blas.sgemm(bt, a.T, st, alpha=alpha)
    tp.mask_tile(plan, b, h, st, i0, j0, kind, transposed=True)
    return st.T


def _exp_tile(plan: Plan, b: int, h: int, a: np.ndarray, bt: np.ndarray, i0: int, j0: int,
              kind: TileKind, buf: np.ndarray, c: float) -> np.ndarray:
    """p~ = exp(c (bt a^T)) in buf (nj, ni), 0 where the mask hides a pair, as its (ni, nj)
    view: exp2 on scores in log2 units where :data:`SIMD_EXP2`, else exp. The mask is
    written after exp, as 0, not before it as -inf: exp2 of -inf takes NumPy's slow path
    (4-6x slower on a half-masked tile), and a hidden pair's inf or NaN is overwritten
    like any other value. The fast loops have no score_mod, which would have to come first."""
    alpha, exp = (c * _LOG2E, np.exp2) if SIMD_EXP2 else (c, np.exp)
    st = buf[: bt.shape[0], : a.shape[0]]
    blas.sgemm(bt, a.T, st, alpha=alpha)
    exp(st, out=st)
    tp.mask_tile(plan, b, h, st, i0, j0, kind, transposed=True, fill=0.0)
    return st.T


def online(plan: Plan, b: int, h: int, qa: np.ndarray, k: np.ndarray, v: np.ndarray,
           i0: int, tiles: list[Tile], buf: np.ndarray, kbuf: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray]:
    """(out rows, lse rows) of query rows i0.. over their tiles, in float64 (0 and -inf for
    a row that sees nothing). qa from :func:`q_rows` (its last column is overwritten),
    k (Sk, D), v (Sk, Dv); kbuf = augmented(zeros((block_k, D)), -1), where each tile's
    [k, -1] is copied (a tile at a time: an augmented copy of all of k cost 1 MiB at
    S = 4096, a third of the forward's scratch).

    exp runs as :func:`_exp_tile` says (alpha = c log2 e in the GEMM for exp2, c for
    exp; c from :func:`_fold`; m is in qs . k units). Each row's shift m comes from a sample of
    keys every row of the block sees (:func:`_shift_keys`, :func:`_sampled_max`), else
    from the first tile itself (the exact online step); the tiles after it subtract m inside their
    GEMM (qa's last column) and are kept unless a row sum leaves (0, _LIMIT], in which
    case the tile is redone on the exact step (the sums are checked before the tile's
    p v joins o, so o needs no per-tile copy). Every tile's k . q comes from the same
    augmented GEMM, so the scores are the same bits in every pass. p v (:func:`_pv`) and
    p's row sums (:func:`row_sums`) are summed over the tiles in float64."""
    ni, c = qa.shape[0], _fold(plan)
    m = np.full(ni, -np.inf, np.float32)  # each row's shift
    o = np.zeros((ni, v.shape[1]), np.float64)  # sum p v
    l = np.zeros(ni, np.float64)  # sum p
    j0, j1 = _shift_keys(plan, b, h, i0, i0 + ni, tiles)
    if j0 < j1:
        m[...] = _sampled_max(qa[:, :-1], k[j0:j1])
        if not np.isfinite(m).all():  # inf or NaN scores: the exact step sorts them out
            m[...] = -np.inf
    stale = bool(np.isfinite(m).all())  # every row's m is finite and sits in qa's last column
    qa[:, -1] = m
    for j0, j1, kind in tiles:
        ka = kbuf[: j1 - j0]
        ka[:, :-1] = k[j0:j1]
        if stale:
            s = _exp_tile(plan, b, h, qa, ka, i0, j0, kind, buf, c)  # exp(c (s - m))
            lt = row_sums(s.T)  # checked before p v joins o: no copy of o per tile
            if float(lt.max()) <= _LIMIT:  # False for NaN: redone below
                _pv(s, v[j0:j1], o)
                l += lt
                continue
        stale = _exact_step(plan, b, h, qa, ka, v[j0:j1], i0, j0, kind, buf, m, o, l)
    np.divide(o, l[:, None], out=o, where=l[:, None] != 0)  # a row that sees nothing: 0
    return o, c * m.astype(np.float64) + np.log(l)


def _exact_step(plan: Plan, b: int, h: int, qa: np.ndarray, ka: np.ndarray, v: np.ndarray,
                i0: int, j0: int, kind: TileKind, buf: np.ndarray,
                m: np.ndarray, o: np.ndarray, l: np.ndarray) -> bool:
    """The online step of one tile (keys j0.. as ka, v): the new row max, the rescale of
    o and l, and the tile's p v and sums added, in place on m, o, l and qa's last column.
    Returns whether every row's m is now finite."""
    c = _fold(plan)
    qa[:, -1] = 0.0
    s = _tile(plan, b, h, qa, ka, i0, j0, kind, buf, 1.0)
    m_new = np.maximum(m, s.max(axis=1))
    shift = np.where(np.isneginf(m_new), np.float32(0), m_new)
    s -= shift[:, None]
    a, exp = _exp(kind, c)
    if a != 1:
        s *= np.float32(a)
    exp(s, out=s)
    with np.errstate(invalid="ignore"):  # -inf - -inf: a row still empty
        factor = np.exp(c * (m.astype(np.float64) - shift))
    factor[np.isneginf(m)] = 0.0
    o *= factor[:, None]
    l *= factor
    _pv(s, v, o)
    l += row_sums(s.T)
    m[...] = m_new
    qa[:, -1] = m
    return bool(np.isfinite(m).all())


def _shift_keys(plan: Plan, b: int, h: int, i0: int, i1: int, tiles: list[Tile]
                ) -> tuple[int, int]:
    """Keys [j0, j1) that every row of the block sees, to sample the rows' shift from
    (j0 >= j1: none, the first tile takes the exact step): the block's shared keys
    (:meth:`MaskSpec.shared_keys`: the whole span of a FULL block, the columns left of a
    causal block's diagonal, the middle of a window's band) ANDed with the mask_mod's
    (:meth:`Mods.shared_keys`), or, where those are unknown (a user's mask_mod), the first
    tile the mods leave FULL."""
    opts = plan.opts
    j0, j1 = opts.spec.shared_keys(b, i0, i1)
    if opts.mods is None or (opts.mods.mask_mod is None and opts.mods.block_mask is None):
        return j0, j1
    mods = opts.mods.shared_keys(b, h, i0 + opts.q_offset, i1 + opts.q_offset)
    if mods is None:
        return next(((a, z) for a, z, kind in tiles if kind is TileKind.FULL), (0, 0))
    return max(j0, mods[0] - opts.k_offset), min(j1, mods[1] - opts.k_offset)


#: Keys whose max is each row's shift (:func:`_sampled_max`).
_SAMPLE_KEYS = 32


def _sampled_max(qs: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Each row's max of qs . k over _SAMPLE_KEYS keys spread evenly over k (nj, D), keys
    every row sees, as (ni,) float32: a shift at most the row's max, so its p sum to >= 1."""
    step = max(1, k.shape[0] // _SAMPLE_KEYS)
    ks = k[::step][:_SAMPLE_KEYS]
    return np.matmul(qs, ks.T).max(axis=1)


#: Keys per float32 GEMM of p v; the pieces are summed in float64 (:func:`_pv`). One GEMM
#: over a 1024-key tile accumulates in order and put the output over 2x the
#: PyTorch-style baseline's (MKL) on ~0.5% of random problems; 512 cost no time measured.
PIECE = 512


def _pv(p: np.ndarray, v: np.ndarray, into: np.ndarray) -> None:
    """into += p @ v ((ni, n) float64) from float32 GEMMs over PIECE keys each (p is
    (ni, nj), v (nj, n))."""
    piece = np.empty(into.shape, np.float32)
    for c0 in range(0, p.shape[1], PIECE):
        blas.sgemm(p[:, c0 : c0 + PIECE], v[c0 : c0 + PIECE], piece)
        into += piece


#: Keys summed in float32 per run of :func:`row_sums` (the runs are summed in float64).
_RUN = 32


def row_sums(pt: np.ndarray) -> np.ndarray:
    """Column sums of pt (nj, ni) float32, i.e. the row sums of p, as (ni,) float64: runs of
    _RUN keys in float32, the runs in float64 (an error of ~sqrt(_RUN) eps / 2, where a
    float32 BLAS matrix-vector product over a 1024-key tile summed in order and put the
    output at 3x the baselines', whose softmax sums pairwise)."""
    nj = pt.shape[0]
    full = nj // _RUN * _RUN
    runs = pt[:full].reshape(full // _RUN, _RUN, pt.shape[1]).sum(axis=1)
    return runs.sum(axis=0, dtype=np.float64) + pt[full:].sum(axis=0, dtype=np.float64)


def backward_unit(
    plan: Plan, b: int, h: int, blocks: list[Block], k: np.ndarray, v: np.ndarray,
    dout: np.ndarray, lse: np.ndarray, dq: np.ndarray, dk: np.ndarray, dv: np.ndarray,
    dlse: np.ndarray | None = None,
) -> None:
    """Gradients of the row blocks ``blocks`` of slice (b, h), whose keys and values are
    k, v (float32, :func:`tp.kv`), as the accurate ``_backward_unit`` of
    :mod:`flashmath.attention.backward`, on transposed tiles.

    Per block of rows, a first pass (:func:`_probabilities`) forms every tile's
    p~^T = exp(c (k qs^T - lse / c)) once (:func:`_exp_tile`), keeps them (a (Sk, block_q)
    float32 buffer per thread: linear in S) and sums p~ v and p~ in float64, giving each row's
    normaliser f = 1 / sum p~ and its output o f; delta = rowsum(do * o f) then comes
    from these very probabilities. The second pass, per tile: dp^T - delta = [v, -1]
    [do, delta]^T in one GEMM; dv += p~^T (f do); ds~^T = p~^T (dp^T - delta);
    dq += f (ds~ k); dk += ds~^T (f qs) (qs from :func:`q_rows`). dk, dv are this unit's
    float64 accumulators, fed in float32 over _FLUSH query blocks at a time. The
    given out is not read: delta from it carried the forward's own rounding (a float32
    output's error times the row's mean key), which put dq and dk at 3-5x the baselines'
    on random problems with large keys."""
    opts, c = plan.opts, _fold(plan)
    ka, va = augmented(k, -1.0), augmented(v, -1.0)  # this slice's [k, -1], [v, -1]
    pbuf = np.empty((opts.sk, plan.bq), np.float32)  # p~^T of one block's tiles, by key
    blocks = tp.visible_blocks(plan, b, h, blocks)
    dbuf = np.empty((widest(blocks), plan.bq), np.float32)  # ds~^T
    dk_h, dv_h = dk[b, h], dv[b, h]
    dk32, dv32 = np.zeros(dk_h.shape, np.float32), np.zeros(dv_h.shape, np.float32)
    for n, (i0, i1, tiles) in enumerate(blocks):
        if n and n % _FLUSH == 0:
            _flush(dk32, dk_h)
            _flush(dv32, dv_h)
        if not tiles:
            continue
        ni = i1 - i0
        qa = q_rows(plan, b, h, i0, i1)
        qs = qa[:, :-1]
        lse64 = np.asarray(lse[b, h, i0:i1], np.float64)
        qa[:, -1] = np.where(np.isneginf(lse64), 0.0, lse64) / c
        do = np.asarray(dout[b, h, i0:i1], np.float32)
        f, o = _probabilities(plan, b, h, qa, ka, v, i0, tiles, pbuf)
        doa = augmented(do, 0.0)
        doa[:, -1] = _delta(o, do)
        if dlse is not None:  # d lse / d s = p: the lse cotangent joins dp - delta
            doa[:, -1] -= np.asarray(dlse[b, h, i0:i1], np.float32)
        do_f, qs_f = do * f[:, None], qs * f[:, None]
        dq_blk = np.zeros((ni, opts.d), np.float32)
        for j0, j1, _ in tiles:
            pt = pbuf[j0:j1, :ni]
            blas.sgemm(pt, do_f, dv32[j0:j1], beta=1.0)
            dst = dbuf[: j1 - j0, :ni]
            blas.sgemm(va[j0:j1], doa.T, dst)  # dp^T - delta
            dst *= pt
            blas.sgemm(dst.T, k[j0:j1], dq_blk, beta=1.0)
            blas.sgemm(dst, qs_f, dk32[j0:j1], beta=1.0)
        dq[b, h, i0:i1] = dq_blk * (f * opts.scale)[:, None]
    _flush(dk32, dk_h)
    _flush(dv32, dv_h)


#: Query blocks summed into dk, dv in float32 GEMMs (beta = 1) before the float32 sums are
#: added to the float64 accumulators: all 2300 blocks in float32 put dk at 3.6x the
#: PyTorch-style baseline's; a float64 add per tile cost 4% of the backward.
_FLUSH = 8


def _flush(acc32: np.ndarray, acc64: np.ndarray) -> None:
    """acc64 += acc32; acc32 <- 0."""
    acc64 += acc32
    acc32[...] = 0.0


def _probabilities(plan: Plan, b: int, h: int, qa: np.ndarray, ka: np.ndarray,
                   v: np.ndarray, i0: int, tiles: list[Tile], pbuf: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The backward's first pass over a block's tiles: p~^T = exp(s - lse) of each tile
    into pbuf[j0:j1] (masked pairs 0), and (f, o f): f = 1 / sum_j p~ per row, float32
    (0 for an empty row), and the row's output o f = sum_j p~ v_j f, float32 (0 there).

    f undoes the given lse's float32 rounding (|lse| eps / 2 in every p of a row alike;
    where one key dominates, large scores and |lse| in the hundreds, dv, which sums p
    without the cancellation that protects dq and dk, was up to 6x the baselines' error)."""
    o = np.zeros((qa.shape[0], v.shape[1]), np.float64)  # sum p~ v
    r = np.zeros(qa.shape[0], np.float64)  # sum p~
    c = _fold(plan)
    for j0, j1, kind in tiles:
        pt = _exp_tile(plan, b, h, qa, ka[j0:j1], i0, j0, kind, pbuf[j0:], c).T
        _pv(pt.T, v[j0:j1], o)
        r += row_sums(pt)
    f = np.divide(1.0, r, out=np.zeros_like(r), where=r != 0)
    return f.astype(np.float32), (o * f[:, None]).astype(np.float32)


def _delta(out: np.ndarray, do: np.ndarray) -> np.ndarray:
    """delta = rowsum(do * out), (ni,) float32, from the same float32 GEMM kernel as the
    tiles' dp = v . do (the diagonal of out do^T): a row that sees one key has out = v
    exactly, and dp - delta is then exactly 0, as dq and dk of that row are (a float64
    delta rounded once differs from the GEMM's dp by an ulp, and with large keys that put
    dq at 4x the baselines', who get 0 there)."""
    prod = np.empty((out.shape[0], out.shape[0]), np.float32)
    blas.sgemm(out, do.T, prod)
    return np.diagonal(prod).copy()
