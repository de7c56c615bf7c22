"""The tile pieces the tiled forward and backward share: what a plan means for the
kernels (dtypes, the folded scale, exact float32 scores), the score tile (softcap, bias and
ALiBi, mods, masks), the row max and shift, and the online softmax over a block's tiles.

Legend as :mod:`flashmath.attention.tiled`: a tile is ``block_q`` query rows x ``block_k``
keys; ``qs`` a block of (scaled) query rows, ``k``/``v`` one slice's keys and values.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from flashmath import scratch
from flashmath.attention.masks import TileKind
from flashmath.attention.mods import and_kinds
from flashmath.attention.options import AttentionOptions
from flashmath.attention.schedule import Block, Plan, Tile
from flashmath.rounding import cast
from flashmath.softmax.rule import rescale, row_shift

__all__ = [
    "EXACT_SCORES",
    "exact_scores",
    "folds_scale",
    "has_score_mod",
    "kv",
    "lo_buffer",
    "mask_tile",
    "mod_tiles",
    "one_tile",
    "online",
    "q_block",
    "row_max",
    "score_rows",
    "scores",
    "shift_scores",
    "visible_blocks",
    "wide_float32",
]
def wide_float32(plan: Plan) -> bool:
    """float32 tiles (float32, float16, bfloat16 input by default): the backward then forms
    the few quantities that decide its error in float64: the row sums, dp = do v^T and
    dp - delta, rounded once (see :func:`_probabilities`). For float32 input flashmath and
    the naive formula share a dtype, so this is what keeps dq, dk inside the rule; for
    narrower input it keeps a row with one visible key at dq = dk = 0 exactly."""
    return plan.acc == np.float32


def folds_scale(plan: Plan) -> bool:
    """Whether the scale is folded into q: only when it is a power of two, so that
    scale * q is exact (D = 16, 64, 256). Otherwise rounding each q element once
    perturbs every score of the row alike, and with large scores that made the
    output up to 10x less accurate than the naive formula; the scale is then applied
    to the score tile instead (one more pass over it)."""
    return abs(math.frexp(plan.opts.scale)[0]) == 0.5


def q_block(plan: Plan, b: int, h: int, i0: int, i1: int) -> np.ndarray:
    """q[b, h, i0:i1] in the accumulate dtype, (ni, D), times the scale if folded."""
    factor = plan.opts.scale if folds_scale(plan) else 1.0
    return np.multiply(plan.q[b, h, i0:i1], factor, dtype=plan.acc)


#: float32 input: the score GEMM runs in float64 and is rounded once (see exact_scores).
#: A switch for measurements of the accurate loops (off: float32 score GEMMs).
EXACT_SCORES = True


def exact_scores(plan: Plan) -> bool:
    """float32 input in float32 tiles: s = scale q k^T is computed in float64 (products of
    float32 numbers are exact there) and kept as its float32 rounding plus the rounding
    residual (see :func:`scores`). A float32 GEMM's rounding of s, about |s| sqrt(D) eps,
    is the largest error in p whenever scores are large; the naive and the PyTorch-style
    baselines carry it too, as independent draws, so with float32 scores flashmath's max
    error was a coin toss against theirs (2% of random cases over 2x the PyTorch-style
    baseline; 0.5% with s rounded once). Costs a float64 GEMM and three passes per tile."""
    return EXACT_SCORES and plan.opts.dtype == np.float32 and plan.acc == np.float32


def lo_buffer(plan: Plan) -> np.ndarray | None:
    """The tile buffer for exact scores' rounding residuals (see :func:`scores`), or None."""
    return np.empty((plan.bq, plan.bk), plan.acc) if exact_scores(plan) else None


def row_max(s: np.ndarray, lo: np.ndarray | None
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


def shift_scores(s: np.ndarray, lo: np.ndarray | None, m: np.ndarray,
           lo_m: np.ndarray | None) -> None:
    """s <- (s - m) + lo - lo_m in place, row by row (m already made safe by row_shift);
    without residuals s - m."""
    s -= m[:, None]
    if lo is not None and lo_m is not None:
        s += lo
        s -= lo_m[:, None]


#: Keys per float64 piece of an exact score tile.
_EXACT_CHUNK = 128


def score_rows(plan: Plan, b: int, h: int, i0: int, i1: int, qs: np.ndarray) -> np.ndarray:
    """The query rows for the score GEMM: qs (from q_block), or scale * q in float64
    with exact scores."""
    if not exact_scores(plan):
        return qs
    return np.multiply(plan.q[b, h, i0:i1], plan.opts.scale, dtype=np.float64)


@contextlib.contextmanager
def kv(plan: Plan, b: int, h: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(k[b, kv head], v[b, kv head]) in the accumulate dtype, for the ``with`` block: views
    when no cast is needed, else widened (float16 and bfloat16 through
    :func:`flashmath.rounding.cast`, 3x NumPy's cast) into this thread's scratch arrays
    (:mod:`flashmath.scratch`: a decode's key ranges freed and reallocated each time
    faulted their pages in afresh)."""
    hk = h // plan.opts.group
    with contextlib.ExitStack() as stack:
        yield (_widened(stack, "kv.k", plan.k[b, hk], plan.acc),
               _widened(stack, "kv.v", plan.v[b, hk], plan.acc))


def _widened(stack: contextlib.ExitStack, tag: str, x: np.ndarray,
             dtype: np.dtype[Any]) -> np.ndarray:
    """x itself if it has ``dtype``, else its cast into a scratch array kept by stack."""
    if x.dtype == dtype:
        return x
    return cast(x, dtype, out=stack.enter_context(scratch.borrow(tag, x.shape, dtype)))


def has_score_mod(opts: AttentionOptions) -> bool:
    return opts.mods is not None and opts.mods.score_mod is not None


def mod_tiles(plan: Plan, b: int, h: int, i0: int, i1: int, tiles: list[Tile]) -> list[Tile]:
    """The tiles of rows [i0, i1) of slice (b, h) once the mask_mod / block mask has its
    say: each clipped to the keys the mods let these rows see (:meth:`Mods.key_span`: a
    window's band, a block mask's non-EMPTY blocks), its kind :meth:`Mods.kind` ANDed
    with the built-in mask's; EMPTY ones dropped."""
    mods = plan.opts.mods
    if mods is None or (mods.mask_mod is None and mods.block_mask is None):
        return tiles
    qo, ko = plan.opts.q_offset, plan.opts.k_offset
    kept: list[Tile] = []
    for j0, j1, kind in tiles:
        a, z = mods.key_span(b, h, i0 + qo, i1 + qo, j0 + ko, j1 + ko)
        a, z = a - ko, z - ko
        if a >= z:
            continue
        if (a, z) != (j0, j1):
            kind = plan.opts.spec.classify(b, i0, i1, a, z)
        both = TileKind(int(and_kinds(kind, mods.kind(b, h, i0 + qo, i1 + qo, a + ko,
                                                      z + ko))))
        if both is not TileKind.EMPTY:
            kept.append((a, z, both))
    return kept


def visible_blocks(plan: Plan, b: int, h: int, blocks: list[Block]) -> list[Block]:
    """``blocks`` of slice (b, h) with each block's tiles through :func:`mod_tiles`: what
    the loops visit, and what their buffers are sized by (:func:`schedule.widest`)."""
    return [(i0, i1, mod_tiles(plan, b, h, i0, i1, tiles)) for i0, i1, tiles in blocks]


def scores(
    plan: Plan, b: int, h: int, qs: np.ndarray, k: np.ndarray, i0: int, i1: int,
    j0: int, j1: int, kind: TileKind, buf: np.ndarray, tanh_buf: np.ndarray | None = None,
    lo_buf: np.ndarray | None = None, dmod_buf: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The tile's scores softcap(scale q k^T) + bias, masked with -inf, in ``buf``.

    qs is the query block (ni, D) from :func:`score_rows`, k the slice's keys (Sk, D).
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
        if lo_buf is not None and opts.softcap is None and not has_score_mod(opts):
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
        if not folds_scale(plan):
            s *= opts.scale
    if opts.softcap is not None:
        s *= 1.0 / opts.softcap
        np.tanh(s, out=s)
        if tanh_buf is not None:
            np.copyto(tanh_buf[: i1 - i0, : j1 - j0], s)
        s *= opts.softcap
    if opts.has_bias:  # the bias and ALiBi
        s += opts.bias_block(b, h, i0, i1, j0, j1)
    dmod = None if dmod_buf is None else dmod_buf[: i1 - i0, : j1 - j0]
    mask_tile(plan, b, h, s, i0, j0, kind, dmod)
    return s, lo


def mask_tile(plan: Plan, b: int, h: int, s: np.ndarray, i0: int, j0: int, kind: TileKind,
              dmod: np.ndarray | None = None, transposed: bool = False,
              fill: float = -np.inf) -> None:
    """The score_mod (and its derivative into dmod), then ``fill`` (-inf) where the mask_mod
    or the built-in mask hides a pair of a PARTIAL tile, in place on the (ni, nj) tile s of
    rows i0.. and keys j0.. (FULL tiles build no mask). transposed: s is the (nj, ni) tile
    (keys first, row-major, as the fast loops hold it); the built-in mask is then written
    in that order (into the transposed view it took 12% of a causal forward). ``fill=0``
    masks a tile of probabilities, after exp (the fast loops, which have no score_mod)."""
    opts = plan.opts
    rows = s.T if transposed else s  # (ni, nj)
    i1, j1 = i0 + rows.shape[0], j0 + rows.shape[1]
    if opts.mods is not None:
        opts.mods.apply(rows, b, h, i0 + opts.q_offset, j0 + opts.k_offset, kind, dmod,
                        fill=fill)
    if kind is TileKind.PARTIAL:
        for c0, c1 in opts.spec.masked_columns(b, i0, i1, j0, j1):
            hidden = opts.spec.hidden(b, h, i0, i1, c0, c1, transposed)
            np.copyto(s[c0 - j0 : c1 - j0] if transposed else s[:, c0 - j0 : c1 - j0],
                      fill, where=hidden)



#: Elements of P converted to the state dtype at a time in one_tile (64 KiB in float64).
_ONE_TILE_CHUNK = 8192


def one_tile(
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
    s, lo = scores(plan, b, h, qs, k, i0, i1, j0, j1, kind, buf, lo_buf=lo_buf)  # (ni, nj)
    m_hi, lo_m = row_max(s, lo)
    shift_scores(s, lo, row_shift(m_hi), lo_m)
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


def online(
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
        s, lo = scores(plan, b, h, qs, k, i0, i1, j0, j1, kind, buf, lo_buf=lo_buf)
        t_hi, t_lo = row_max(s, lo)
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
        shift_scores(s, lo, shift, lo_m)
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
