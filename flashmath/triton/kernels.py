"""The Triton kernels of FlashAttention-2: forward, backward preprocess, dK/dV and dQ.

Shapes (B batch, H query heads, H_kv key/value heads, Sq/Sk lengths, D/Dv head dims)::

    Q (B, H, Sq, D)   K (B, H_kv, Sk, D)   V (B, H_kv, Sk, Dv)   O, dO (B, H, Sq, Dv)
    M2, L2, Delta (B, H, Sq) float32      KvLen (B,) int32

Every kernel takes strides, so no input needs to be contiguous. The host side
(launch, validation, autograd) is ``op.py``; the conventions (layout, masks, lse in
natural log on the host side) are every flashmath backend's.

How the mask family becomes integer arithmetic: query ``i`` may attend key ``j`` iff

    i + diag - win_left  <=  j  <=  i + diag + win_right     and     j < kv_len

where ``diag = kv_len - Sq`` for the bottom-right alignment (``causal=True``, and a
window without ``causal``) and ``0`` for top-left. ``causal`` makes ``win_right`` 0;
an unbounded side is a large sentinel. ``kv_len`` is ``Sk`` without ``kv_lengths``.
This is :class:`flashmath.attention.masks.MaskSpec`'s rule (no q_lengths, no offsets);
its ``key_span``/``query_span``/``classify`` are the NumPy twins of the tile ranges here.

Each program walks a band of tiles in up to three runs: boundary tiles that the mask
cuts (score mask and bounds checks), the full tiles in between (no mask, no bounds
checks on the streamed side: the fast path) and the boundary tiles at the far end.
Tiles the mask leaves empty are never visited; :func:`_key_blocks` and
:func:`_query_blocks` compute the band for the two loop orders. A boundary run that is
empty for every program of a call (no band on that side, lengths the tiles divide) is
not compiled at all (``LEAD``/``TRAIL``, set by :func:`_key_runs`/:func:`_query_runs`):
every run held live through the others costs registers (ptxas: dK/dV at D = 128 spills
with three runs, not with one).

Scores live in log2 units: ``s2 = (q . k) * scale * log2(e)``, one multiply with the
constant folded in, then ``exp2``. The forward stores each row's max ``m2`` and ``l2 =
log2(l)`` (``op.py`` hands users ``lse = (m2 + l2) ln 2``) and the backward recomputes
``P = exp2((s2 - m2) - l2)`` tile by tile. Kept apart, not summed into one lse: rounding
m2 + l2 at its own magnitude would cost the recomputed P several ulps where scores are
large, enough to break the accuracy rule in float32.

A row with nothing to attend to keeps ``m2 = -inf``, ``l = 0``; it finishes as output 0
and ``l2 = -inf`` (lse -inf), and its probabilities are 0 in the backward (never NaN), so
its gradients and its share of dK/dV are exactly 0.

Determinism: no atomics. dK/dV for a key block is owned by one program, which sums
over every query head of its GQA group; dQ has its own pass over key blocks.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = [
    "BWD_DKDV_CONFIGS",
    "BWD_DQ_CONFIGS",
    "FWD_CONFIGS",
    "INTERPRETED",
    "LOG2E",
    "UNBOUNDED",
    "attn_bwd_dkdv",
    "attn_bwd_dkdv_tuned",
    "attn_bwd_dq",
    "attn_bwd_dq_tuned",
    "attn_bwd_preprocess",
    "attn_fwd",
    "attn_fwd_tuned",
    "tanh32",
]

LOG2E = 1.4426950408889634
#: An unbounded window side: larger than any distance between a query and a key.
UNBOUNDED = 1 << 30

#: True when these kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1
#: when this module was imported): they then run on CPU torch tensors, slowly.
INTERPRETED: bool = bool(triton.knobs.runtime.interpret)


# ---------------------------------------------------------------------------------------
# Small helpers shared by every kernel
# ---------------------------------------------------------------------------------------
#
# Dots: operands are cast to DOT, the kernels' matmul input dtype. That is the input dtype
# itself (the casts are no-ops) except in Triton's CPU interpreter with bfloat16, which
# multiplies bfloat16 bit patterns as integers (triton-lang/triton#11584): there DOT is
# float32, exact for bfloat16 values, and probabilities are still rounded to bfloat16 first
# (``p.to(DTYPE).to(DOT)``) so the interpreter computes what the GPU does.


@triton.jit
def tanh32(x):
    """tanh in float32 from exp2, to a few ulps (the interpreter has no libdevice tanh).
    Odd Taylor series to x^9 below |x| = 0.25, where 1 - e^(-2|x|) would cancel."""
    ax = tl.abs(x)
    e = tl.math.exp2(-2.0 * 1.4426950408889634 * ax)
    big = (1.0 - e) / (1.0 + e)
    x2 = x * x
    small = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0
                                                                   + x2 * (62.0 / 2835.0)))))
    return tl.where(ax < 0.25, small, tl.where(x < 0, -big, big))


@triton.jit
def _scores(a, b, qk_scale, cap_scale, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
    """Scores a @ b in log2 units, and t = tanh(scale * a @ b / softcap) for the softcap
    backward (t is the raw product when SOFTCAP is off, and unused).

    qk_scale = scale * log2(e), or softcap * log2(e) with SOFTCAP; cap_scale = scale / softcap.
    """
    qk = tl.dot(a, b, input_precision=PRECISION)
    if SOFTCAP:
        t = tanh32(qk * cap_scale)
        return t * qk_scale, t
    else:
        return qk * qk_scale, qk


@triton.jit
def _allowed(offs_m, offs_n, diag, win_left, win_right, kv_len):
    """The score mask of a tile (True = may attend); offs_m/offs_n arrive broadcastable."""
    rel = offs_n - offs_m - diag  # key position relative to the query's diagonal
    return (rel >= -win_left) & (rel <= win_right) & (offs_n < kv_len)


@triton.jit
def _dim_mask(BLOCK: tl.constexpr, DIM: tl.constexpr):
    """offs < DIM over a head dim padded to BLOCK; a constant True when nothing is padded,
    which the compiler folds away (unpredicated, vectorised loads)."""
    if BLOCK == DIM:
        return tl.full([BLOCK], 1, tl.int1)
    else:
        return tl.arange(0, BLOCK) < DIM


@triton.jit
def _diagonal(KvLen, b, Sk, Sq, HAS_KV_LEN: tl.constexpr, ALIGN_BOTTOM: tl.constexpr):
    """(kv_len, diag) of batch b: the valid key count and the offset of the causal diagonal."""
    if HAS_KV_LEN:
        kv_len = tl.load(KvLen + b)
    else:
        kv_len = Sk
    if ALIGN_BOTTOM:
        diag = kv_len - Sq
    else:
        diag = kv_len * 0
    return kv_len, diag


@triton.jit
def _key_blocks(m0, diag, win_left, win_right, kv_len, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """The key blocks that queries m0 .. m0+BLOCK_M-1 see, as lo <= full_lo <= full_hi <= hi:
    [lo, full_lo) and [full_hi, hi) are cut by the mask, [full_lo, full_hi) are whole."""
    m1 = m0 + BLOCK_M - 1
    lo_key = tl.maximum(m0 + diag - win_left, 0)
    hi_key = tl.maximum(tl.minimum(m1 + diag + win_right + 1, kv_len), lo_key)
    # whole tiles: every row of the block may see every key of the tile
    full_lo_key = tl.maximum(m1 + diag - win_left, lo_key)
    full_hi_key = tl.maximum(tl.minimum(m0 + diag + win_right + 1, kv_len), 0)
    lo = lo_key // BLOCK_N
    hi = (hi_key + BLOCK_N - 1) // BLOCK_N
    full_lo = tl.minimum((full_lo_key + BLOCK_N - 1) // BLOCK_N, hi)
    full_hi = tl.maximum(tl.minimum(full_hi_key // BLOCK_N, hi), full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def _query_blocks(n0, diag, win_left, win_right, kv_len, Sq, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """The query blocks that see keys n0 .. n0+BLOCK_N-1, as lo <= full_lo <= full_hi <= hi
    (same meaning as :func:`_key_blocks`). Whole blocks also lie inside Sq and kv_len."""
    n1 = n0 + BLOCK_N - 1
    lo_q = tl.maximum(n0 - diag - win_right, 0)
    hi_q = tl.minimum(n1 - diag + win_left + 1, Sq)
    hi_q = tl.where(n0 < kv_len, tl.maximum(hi_q, lo_q), lo_q)
    full_lo_q = tl.maximum(n1 - diag - win_right, lo_q)
    full_hi_q = tl.minimum(n0 - diag + win_left + 1, Sq)
    full_hi_q = tl.where(n1 < kv_len, tl.maximum(full_hi_q, 0), 0)
    lo = lo_q // BLOCK_M
    hi = (hi_q + BLOCK_M - 1) // BLOCK_M
    full_lo = tl.minimum((full_lo_q + BLOCK_M - 1) // BLOCK_M, hi)
    full_hi = tl.maximum(tl.minimum(full_hi_q // BLOCK_M, hi), full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def _sequence(CuQ, CuK, b, Sq, Sk, VARLEN: tl.constexpr):
    """(q0, sq, k0, sk): where sequence b's query and key rows start and how many there are.
    Padded tensors: (0, Sq, 0, Sk). Packed (VARLEN): read from cu_seqlens_q/k."""
    if VARLEN:
        q0 = tl.load(CuQ + b).to(tl.int64)
        sq = tl.load(CuQ + b + 1) - q0
        k0 = tl.load(CuK + b).to(tl.int64)
        sk = tl.load(CuK + b + 1) - k0
    else:
        q0 = 0
        sq = Sq
        k0 = 0
        sk = Sk
    return q0, sq, k0, sk


@triton.jit
def _stat_row(b, h, H, Sq, q0, VARLEN: tl.constexpr):
    """Offset of row 0 of (sequence b, head h) in M2/L2/Delta: (B, H, Sq) padded, (H,
    total_q) packed (Sq is then total_q)."""
    if VARLEN:
        return h * Sq + q0
    else:
        return (b * H + h) * Sq


@triton.jit
def _key_rows(offs_n, key_ok, bt_base, stride_n, stride_page, PAGE: tl.constexpr):
    """Offsets of key positions offs_n in K or V: offs_n * stride_n, or through the block
    table with a paged cache (PAGE = page_size > 0): page bt[t // PAGE], row t % PAGE.
    Table entries are read only where key_ok (past a sequence's pages they may be junk)."""
    if PAGE == 0:
        return offs_n * stride_n
    else:
        page = tl.load(bt_base + offs_n // PAGE, mask=key_ok, other=0)
        return page.to(tl.int64) * stride_page + (offs_n % PAGE) * stride_n


@triton.jit
def _live(lo, full_lo, full_hi, hi, live):
    """The tile range, emptied for a program past its sequence's end (live False)."""
    return (tl.where(live, lo, 0), tl.where(live, full_lo, 0), tl.where(live, full_hi, 0),
            tl.where(live, hi, 0))


@triton.jit
def _kind(kind_base, offset, HAS_BLOCK_MASK: tl.constexpr):
    """The block mask's TileKind (0 EMPTY, 1 FULL, 2 PARTIAL) of the tile at ``offset``
    from ``kind_base``; 2 (the mask_mod is applied) without a block mask."""
    if HAS_BLOCK_MASK:
        return tl.load(kind_base + offset).to(tl.int32)
    else:
        return 2


@triton.jit
def _score_mod(s, b, h, qi, ki, ScoreData, SCORE_FN: tl.constexpr,
               HAS_SCORE_MOD: tl.constexpr):
    """Scores in log2 units through the user's score_mod, which sees (and returns) natural
    units: ``score_mod(score, b, h, q_idx, kv_idx, data)``."""
    if HAS_SCORE_MOD:
        return SCORE_FN(s * 0.6931471805599453, b, h, qi, ki, ScoreData) * 1.4426950408889634
    else:
        return s


@triton.jit
def _score_grad(s, b, h, qi, ki, ScoreData, SCORE_GRAD: tl.constexpr,
                HAS_SCORE_MOD: tl.constexpr):
    """d score_mod / d score at the scores s (log2 units before the mod); 1 without one."""
    if HAS_SCORE_MOD:
        return SCORE_GRAD(s * 0.6931471805599453, b, h, qi, ki, ScoreData)
    else:
        return 1.0


@triton.jit
def _mask_mod(x, kind, fill, b, h, qi, ki, MaskData, MASK_FN: tl.constexpr,
              HAS_MASK_MOD: tl.constexpr):
    """x where the user's ``mask_mod(b, h, q_idx, kv_idx, data)`` allows, ``fill`` elsewhere;
    called only on PARTIAL tiles (a block mask's FULL tiles need no mask)."""
    if HAS_MASK_MOD:
        if kind == 2:
            x = tl.where(MASK_FN(b, h, qi, ki, MaskData), x, fill)
    return x


def _even(n: int, block: int) -> bool:
    return n % block == 0


#: Which boundary runs a call over key blocks (forward, dQ) can need: a leading one only
#: with a left window edge; a trailing one unless nothing bounds the right side (no causal
#: or right window edge, no kv_lengths, Sk a multiple of BLOCK_N).
_key_runs = {
    "LEAD": lambda a: a["win_left"] < UNBOUNDED,
    "TRAIL": lambda a: a["win_right"] < UNBOUNDED or a["HAS_KV_LEN"] or a["VARLEN"]
    or not _even(a["Sk"], a["BLOCK_N"]),
}
#: The same for dK/dV's walk over query blocks: leading with a right edge (causal), trailing
#: with a left edge, kv_lengths, or lengths the tiles do not divide. Packed sequences
#: (VARLEN) have lengths of their own: both walks keep the trailing run.
_query_runs = {
    "LEAD": lambda a: a["win_right"] < UNBOUNDED,
    "TRAIL": lambda a: a["win_left"] < UNBOUNDED or a["HAS_KV_LEN"] or a["VARLEN"]
    or not (_even(a["Sq"], a["BLOCK_M"]) and _even(a["Sk"], a["BLOCK_N"])),
}


# ---------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
               offs_m, blk_lo, blk_hi, diag, win_left, win_right, kv_len, qk_scale, cap_scale,
               alibi2, bt_base, stride_kp, stride_vp, b, h, qi, MaskData, ScoreData, kind_base,
               stride_kind, MASK_BLOCK,
               HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
               SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, PRECISION: tl.constexpr,
               DTYPE: tl.constexpr,
               DOT: tl.constexpr, PAGE: tl.constexpr, HAS_MASK_MOD: tl.constexpr,
               HAS_SCORE_MOD: tl.constexpr, HAS_BLOCK_MASK: tl.constexpr,
               MASK_FN: tl.constexpr, SCORE_FN: tl.constexpr, SCORE_GRAD: tl.constexpr):
    """The online-softmax loop over key blocks [blk_lo, blk_hi); returns (acc, l, m). Keys
    at or past kv_len are never loaded (padding may hold anything, NaN included). A block
    mask's EMPTY tiles are skipped; the mask_mod runs on its PARTIAL ones."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = _dim_mask(BLOCK_D, HEAD_DIM)
    dv_ok = _dim_mask(BLOCK_DV, HEAD_DIM_V)
    for blk in tl.range(blk_lo, blk_hi):
        kind = _kind(kind_base, (blk * BLOCK_N // MASK_BLOCK) * stride_kind, HAS_BLOCK_MASK)
        if kind != 0:
            # -- scores of this tile, in log2 units; masked entries -> -inf ---------------
            offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
            key_ok = offs_n < kv_len
            ki = tl.maximum(tl.minimum(offs_n, kv_len - 1), 0)[None, :]  # mods' kv_idx
            k_rows = _key_rows(offs_n, key_ok, bt_base, stride_kn, stride_kp, PAGE)
            kT_ptrs = k_base + k_rows[None, :] + offs_d[:, None] * stride_kd
            if MASKED:
                kT = tl.load(kT_ptrs, mask=d_ok[:, None] & key_ok[None, :], other=0.0)
            else:
                kT = tl.load(kT_ptrs, mask=d_ok[:, None], other=0.0)
            s, _t = _scores(q, kT.to(DOT), qk_scale, cap_scale, SOFTCAP, PRECISION)  # (BM, BN)
            if HAS_ALIBI:  # -slope * |distance to the diagonal|, in log2 units
                s = s - alibi2 * tl.abs(offs_n[None, :] - offs_m[:, None] - diag).to(tl.float32)
            s = _score_mod(s, b, h, qi, ki, ScoreData, SCORE_FN, HAS_SCORE_MOD)
            if MASKED:
                ok = _allowed(offs_m[:, None], offs_n[None, :], diag, win_left, win_right,
                              kv_len)
                s = tl.where(ok, s, float("-inf"))
            s = _mask_mod(s, kind, float("-inf"), b, h, qi, ki, MaskData, MASK_FN,
                          HAS_MASK_MOD)
            # -- new running max; a row that has seen nothing yet subtracts 0, so p = 0 ---
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_sub[:, None])
            alpha = tl.math.exp2(m_i - m_sub)  # rescales what was accumulated so far
            l_i = l_i * alpha + tl.sum(p, 1)
            # -- acc <- acc * alpha + P V -----------------------------------------------------
            v_rows = _key_rows(offs_n, key_ok, bt_base, stride_vn, stride_vp, PAGE)
            v_ptrs = v_base + v_rows[:, None] + offs_dv[None, :] * stride_vd
            if MASKED:
                v = tl.load(v_ptrs, mask=key_ok[:, None] & dv_ok[None, :], other=0.0)
            else:
                v = tl.load(v_ptrs, mask=dv_ok[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(DTYPE).to(DOT), v.to(DOT),
                                                input_precision=PRECISION)
            m_i = m_new
    return acc, l_i, m_i


@triton.heuristics(_key_runs)
@triton.jit
def attn_fwd(Q, K, V, Out, M2, L2, KvLen, Alibi, Sinks, CuQ, CuK, BlockTable, stride_bt,
             MaskData, ScoreData, Kinds, stride_mb, stride_mh, stride_mq, stride_mk, MASK_BQ,
             MASK_BK,
             stride_qb, stride_qh, stride_qm, stride_qd,
             stride_kb, stride_kh, stride_kn, stride_kd,
             stride_vb, stride_vh, stride_vn, stride_vd,
             stride_ob, stride_oh, stride_om, stride_od,
             H, GROUP, Sq, Sk, qk_scale, cap_scale, win_left, win_right,
             HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
             BLOCK_DV: tl.constexpr, ALIGN_BOTTOM: tl.constexpr, HAS_KV_LEN: tl.constexpr,
             SOFTCAP: tl.constexpr, PRECISION: tl.constexpr, DTYPE: tl.constexpr,
             DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             HAS_ALIBI: tl.constexpr, HAS_SINKS: tl.constexpr,
             VARLEN: tl.constexpr, PAGE: tl.constexpr,
             HAS_MASK_MOD: tl.constexpr, HAS_SCORE_MOD: tl.constexpr, HAS_BLOCK_MASK: tl.constexpr,
             MASK_FN: tl.constexpr, SCORE_FN: tl.constexpr, SCORE_GRAD: tl.constexpr,
             LEAD: tl.constexpr, TRAIL: tl.constexpr):
    """One program per (query block, batch * head): O, m2 and l2 of BLOCK_M query rows.
    With VARLEN, b is a packed sequence (rows from cu_seqlens); with PAGE > 0, K and V are
    a paged cache (num_pages, H_kv, PAGE, D) read through BlockTable (B, max_pages). Kinds:
    a block mask's TileKinds (B|1, H|1, nq, nk) of MASK_BQ x MASK_BK tiles (multiples of
    BLOCK_M x BLOCK_N), strides stride_m*."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # offsets in int64: tensors of 2^31 elements
    b = bh // H
    h = bh % H
    hkv = h // GROUP  # GQA: query head h reads K/V head h // (H / H_kv)
    q0, sq, k0, sk = _sequence(CuQ, CuK, b, Sq, Sk, VARLEN)
    kv_len, diag = _diagonal(KvLen, b, sk, sq, HAS_KV_LEN, ALIGN_BOTTOM)
    alibi2 = 0.0
    if HAS_ALIBI:  # slope * log2(e) of (b, h)
        alibi2 = tl.load(Alibi + bh)

    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = _dim_mask(BLOCK_D, HEAD_DIM)
    dv_ok = _dim_mask(BLOCK_DV, HEAD_DIM_V)
    row_ok = offs_m < sq
    q_base = Q + b * stride_qb + h * stride_qh + q0 * stride_qm
    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(DOT)
    if PAGE == 0:
        k_base = K + b * stride_kb + hkv * stride_kh + k0 * stride_kn
        v_base = V + b * stride_vb + hkv * stride_vh + k0 * stride_vn
        bt_base = BlockTable  # unused (None)
    else:  # stride_kb / stride_vb step over pages
        k_base = K + hkv * stride_kh
        v_base = V + hkv * stride_vh
        bt_base = BlockTable + b * stride_bt
    qi = tl.maximum(tl.minimum(offs_m, sq - 1), 0)[:, None]  # the mods' q_idx
    kind_base = Kinds
    if HAS_BLOCK_MASK:
        kind_base = Kinds + b * stride_mb + h * stride_mh + (m0 // MASK_BQ) * stride_mq

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    lo, full_lo, full_hi, hi = _live(*_key_blocks(m0, diag, win_left, win_right, kv_len,
                                                  BLOCK_M, BLOCK_N), m0 < sq)
    # -- leading boundary tiles, whole tiles, trailing boundary tiles ---------------------
    if LEAD:
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd,
                                   stride_vn, stride_vd, offs_m, lo, full_lo, diag, win_left,
                                   win_right, kv_len, qk_scale, cap_scale, alibi2, bt_base,
                                   stride_kb, stride_vb, b, h, qi, MaskData, ScoreData, kind_base,
                                   stride_mk, MASK_BK,
                                   HEAD_DIM, HEAD_DIM_V, BLOCK_D,
                                   BLOCK_DV, BLOCK_N, True, SOFTCAP, HAS_ALIBI, PRECISION, DTYPE,
                                   DOT, PAGE, HAS_MASK_MOD, HAS_SCORE_MOD, HAS_BLOCK_MASK, MASK_FN,
                                   SCORE_FN, SCORE_GRAD)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd,
                               stride_vn, stride_vd, offs_m, full_lo, full_hi, diag, win_left,
                               win_right, kv_len, qk_scale, cap_scale, alibi2, bt_base,
                               stride_kb, stride_vb, b, h, qi, MaskData, ScoreData, kind_base,
                               stride_mk, MASK_BK,
                               HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV,
                               BLOCK_N, False, SOFTCAP, HAS_ALIBI, PRECISION, DTYPE, DOT, PAGE,
                               HAS_MASK_MOD, HAS_SCORE_MOD, HAS_BLOCK_MASK, MASK_FN, SCORE_FN,
                               SCORE_GRAD)
    if TRAIL:
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd,
                                   stride_vn, stride_vd, offs_m, full_hi, hi, diag, win_left,
                                   win_right, kv_len, qk_scale, cap_scale, alibi2, bt_base,
                                   stride_kb, stride_vb, b, h, qi, MaskData, ScoreData, kind_base,
                                   stride_mk, MASK_BK,
                                   HEAD_DIM, HEAD_DIM_V, BLOCK_D,
                                   BLOCK_DV, BLOCK_N, True, SOFTCAP, HAS_ALIBI, PRECISION, DTYPE,
                                   DOT, PAGE, HAS_MASK_MOD, HAS_SCORE_MOD, HAS_BLOCK_MASK, MASK_FN,
                                   SCORE_FN, SCORE_GRAD)

    # -- an attention sink: one more logit in the denominator, with no value ---------------
    if HAS_SINKS:
        sink2 = tl.load(Sinks + h)  # sinks[h] * log2(e)
        m_f = tl.maximum(m_i, sink2)
        m_fs = tl.where(m_f == float("-inf"), 0.0, m_f)
        alpha = tl.math.exp2(m_i - m_fs)
        l_i = l_i * alpha + tl.math.exp2(sink2 - m_fs)
        acc = acc * alpha[:, None]
        m_i = m_f
    # -- epilogue: O = acc / l (0 where nothing was seen), l2 = log2(l) (-inf there) --------
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    stat = _stat_row(b, h, H, Sq, q0, VARLEN) + offs_m
    tl.store(M2 + stat, m_i, mask=row_ok)
    tl.store(L2 + stat, tl.where(empty, float("-inf"), tl.math.log2(l_safe)), mask=row_ok)
    tl.store(Out + b * stride_ob + h * stride_oh + q0 * stride_om
             + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od,
             out.to(DTYPE), mask=row_ok[:, None] & dv_ok[None, :])


# ---------------------------------------------------------------------------------------
# Backward: Delta = rowsum(dO * O) - dLse, then dK/dV (per key block) and dQ (per query block)
# ---------------------------------------------------------------------------------------


@triton.jit
def attn_bwd_preprocess(Out, DO, DLse, Delta,
                        stride_ob, stride_oh, stride_om, stride_od,
                        stride_dob, stride_doh, stride_dom, stride_dod,
                        H, Sq, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
                        HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr):
    """Delta_i = sum_d dO[i, d] * O[i, d] (float32), less dLse_i when lse has a gradient:
    d lse_i / d s_ij = P_ij, so that gradient folds into the same correction."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # offsets in int64: tensors of 2^31 elements
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < Sq
    tile_ok = row_ok[:, None] & _dim_mask(BLOCK_DV, HEAD_DIM_V)[None, :]
    o = tl.load(Out + b * stride_ob + h * stride_oh
                + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od,
                mask=tile_ok, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh
                 + offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod,
                 mask=tile_ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(DLse + bh * Sq + offs_m, mask=row_ok, other=0.0)
    tl.store(Delta + bh * Sq + offs_m, delta, mask=row_ok)


@triton.jit
def _dkdv_tiles(dk, dv, k, v, q_base, do_base, m_base, l_base, delta_base,
                stride_qm, stride_qd, stride_dom, stride_dod, offs_n, blk_lo, blk_hi, diag,
                win_left, win_right, kv_len, Sq, qk_scale, cap_scale, alibi2,
                b, h, ki, MaskData, ScoreData, kind_base, stride_kind, MASK_BLOCK,
                HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
                SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, PRECISION: tl.constexpr,
                DTYPE: tl.constexpr,
                DOT: tl.constexpr, HAS_MASK_MOD: tl.constexpr, HAS_SCORE_MOD: tl.constexpr,
                HAS_BLOCK_MASK: tl.constexpr,
                MASK_FN: tl.constexpr, SCORE_FN: tl.constexpr, SCORE_GRAD: tl.constexpr):
    """dK and dV of one key block over query blocks [blk_lo, blk_hi), transposed
    (keys along rows): P^T = exp2((S^T - m2) - l2), dV += P^T dO, dS^T = P^T (dP^T - Delta)
    (times the score_mod's derivative). A block mask's EMPTY tiles are skipped."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = _dim_mask(BLOCK_D, HEAD_DIM)
    dv_ok = _dim_mask(BLOCK_DV, HEAD_DIM_V)
    for blk in tl.range(blk_lo, blk_hi):
        kind = _kind(kind_base, (blk * BLOCK_M // MASK_BLOCK) * stride_kind, HAS_BLOCK_MASK)
        dk, dv = _dkdv_tile(dk, dv, k, v, q_base, do_base, m_base, l_base, delta_base,
                            stride_qm, stride_qd, stride_dom, stride_dod, offs_n, blk, diag,
                            win_left, win_right, kv_len, Sq, qk_scale, cap_scale, alibi2,
                            b, h, ki, MaskData, ScoreData, kind, offs_d, offs_dv, d_ok, dv_ok,
                            BLOCK_M, MASKED, SOFTCAP, HAS_ALIBI, PRECISION, DTYPE, DOT,
                            HAS_MASK_MOD, HAS_SCORE_MOD, MASK_FN, SCORE_FN, SCORE_GRAD)
    return dk, dv


@triton.jit
def _dkdv_tile(dk, dv, k, v, q_base, do_base, m_base, l_base, delta_base,
               stride_qm, stride_qd, stride_dom, stride_dod, offs_n, blk, diag,
               win_left, win_right, kv_len, Sq, qk_scale, cap_scale, alibi2,
               b, h, ki, MaskData, ScoreData, kind, offs_d, offs_dv, d_ok, dv_ok,
               BLOCK_M: tl.constexpr, MASKED: tl.constexpr, SOFTCAP: tl.constexpr,
               HAS_ALIBI: tl.constexpr, PRECISION: tl.constexpr, DTYPE: tl.constexpr,
               DOT: tl.constexpr, HAS_MASK_MOD: tl.constexpr, HAS_SCORE_MOD: tl.constexpr,
               MASK_FN: tl.constexpr, SCORE_FN: tl.constexpr, SCORE_GRAD: tl.constexpr):
    """One tile of :func:`_dkdv_tiles` (nothing when the block mask says EMPTY)."""
    if kind != 0:
        offs_m = blk * BLOCK_M + tl.arange(0, BLOCK_M)
        qi = tl.maximum(tl.minimum(offs_m, Sq - 1), 0)[None, :]  # the mods' q_idx
        qT_ptrs = q_base + offs_m[None, :] * stride_qm + offs_d[:, None] * stride_qd  # (BD, BM)
        do_ptrs = do_base + offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod
        if MASKED:
            row_ok = offs_m < Sq
            qT = tl.load(qT_ptrs, mask=d_ok[:, None] & row_ok[None, :], other=0.0).to(DOT)
            m2 = tl.load(m_base + offs_m, mask=row_ok, other=0.0)
            l2 = tl.load(l_base + offs_m, mask=row_ok, other=0.0)
        else:
            qT = tl.load(qT_ptrs, mask=d_ok[:, None], other=0.0).to(DOT)
            m2 = tl.load(m_base + offs_m)
            l2 = tl.load(l_base + offs_m)
        sT, tT = _scores(k, qT, qk_scale, cap_scale, SOFTCAP, PRECISION)  # (BN, BM)
        if HAS_ALIBI:
            sT = sT - alibi2 * tl.abs(offs_n[:, None] - offs_m[None, :] - diag).to(tl.float32)
        gT = _score_grad(sT, b, h, qi, ki, ScoreData, SCORE_GRAD, HAS_SCORE_MOD)
        sT = _score_mod(sT, b, h, qi, ki, ScoreData, SCORE_FN, HAS_SCORE_MOD)
        pT = tl.math.exp2((sT - m2[None, :]) - l2[None, :])
        if MASKED:  # also drops rows past Sq and rows with m2 = -inf (nothing to attend)
            ok = _allowed(offs_m[None, :], offs_n[:, None], diag, win_left, win_right, kv_len)
            pT = tl.where(ok & row_ok[None, :], pT, 0.0)
        pT = _mask_mod(pT, kind, 0.0, b, h, qi, ki, MaskData, MASK_FN, HAS_MASK_MOD)
        # -- dV += P^T dO -------------------------------------------------------------------
        if MASKED:
            do = tl.load(do_ptrs, mask=row_ok[:, None] & dv_ok[None, :], other=0.0).to(DOT)
            delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        else:
            do = tl.load(do_ptrs, mask=dv_ok[None, :], other=0.0).to(DOT)
            delta = tl.load(delta_base + offs_m)
        dv += tl.dot(pT.to(DTYPE).to(DOT), do, input_precision=PRECISION)
        # -- dS^T = P^T * (dP^T - Delta), through the score_mod and the softcap's tanh --------
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dsT = pT * (dpT - delta[None, :])
        if HAS_SCORE_MOD:
            dsT = dsT * gT
        if SOFTCAP:
            dsT = dsT * (1.0 - tT * tT)
        # -- dK += dS^T Q  (the softmax scale is applied once, at the end) -----------------
        dk += tl.dot(dsT.to(DTYPE).to(DOT), tl.trans(qT), input_precision=PRECISION)
    return dk, dv


@triton.heuristics(_query_runs)
@triton.jit
def attn_bwd_dkdv(Q, K, V, DO, DK, DV, M2, L2, Delta, KvLen, Alibi, CuQ, CuK,
                  MaskData, ScoreData, Kinds, stride_mb, stride_mh, stride_mq, stride_mk, MASK_BQ,
                  MASK_BK,
                  stride_qb, stride_qh, stride_qm, stride_qd,
                  stride_kb, stride_kh, stride_kn, stride_kd,
                  stride_vb, stride_vh, stride_vn, stride_vd,
                  stride_dob, stride_doh, stride_dom, stride_dod,
                  stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                  stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                  H, GROUP, Sq, Sk, qk_scale, cap_scale, sm_scale, win_left, win_right,
                  HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_DV: tl.constexpr, ALIGN_BOTTOM: tl.constexpr, HAS_KV_LEN: tl.constexpr,
                  SOFTCAP: tl.constexpr, PRECISION: tl.constexpr, DTYPE: tl.constexpr,
                  DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  HAS_ALIBI: tl.constexpr, VARLEN: tl.constexpr,
                  HAS_MASK_MOD: tl.constexpr, HAS_SCORE_MOD: tl.constexpr,
                  HAS_BLOCK_MASK: tl.constexpr, MASK_FN: tl.constexpr, SCORE_FN: tl.constexpr,
                  SCORE_GRAD: tl.constexpr,
                  LEAD: tl.constexpr, TRAIL: tl.constexpr):
    """One program per (key block, batch * K/V head): dK, dV of BLOCK_N keys, summed over
    the GROUP query heads that share this K/V head, in registers (deterministic). Keys at
    or past kv_len are never loaded and get dK = dV = 0."""
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1).to(tl.int64)  # offsets in int64: tensors of 2^31 elements
    H_kv = H // GROUP
    b = bhk // H_kv
    hkv = bhk % H_kv
    q0, sq, k0, sk = _sequence(CuQ, CuK, b, Sq, Sk, VARLEN)
    kv_len, diag = _diagonal(KvLen, b, sk, sq, HAS_KV_LEN, ALIGN_BOTTOM)

    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = _dim_mask(BLOCK_D, HEAD_DIM)
    dv_ok = _dim_mask(BLOCK_DV, HEAD_DIM_V)
    key_ok = offs_n < kv_len
    k_off = b * stride_kb + hkv * stride_kh + k0 * stride_kn
    v_off = b * stride_vb + hkv * stride_vh + k0 * stride_vn
    k = tl.load(K + k_off + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=key_ok[:, None] & d_ok[None, :], other=0.0).to(DOT)
    v = tl.load(V + v_off + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                mask=key_ok[:, None] & dv_ok[None, :], other=0.0).to(DOT)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    lo, full_lo, full_hi, hi = _live(*_query_blocks(n0, diag, win_left, win_right, kv_len, sq,
                                                    BLOCK_M, BLOCK_N), n0 < kv_len)
    ki = tl.maximum(tl.minimum(offs_n, kv_len - 1), 0)[:, None]  # the mods' kv_idx
    for g in range(GROUP):
        h = hkv * GROUP + g
        kind_base = Kinds
        if HAS_BLOCK_MASK:
            kind_base = Kinds + b * stride_mb + h * stride_mh + (n0 // MASK_BK) * stride_mk
        q_base = Q + b * stride_qb + h * stride_qh + q0 * stride_qm
        do_base = DO + b * stride_dob + h * stride_doh + q0 * stride_dom
        stat = _stat_row(b, h, H, Sq, q0, VARLEN)
        m_base = M2 + stat
        l_base = L2 + stat
        delta_base = Delta + stat
        alibi2 = 0.0
        if HAS_ALIBI:
            alibi2 = tl.load(Alibi + b * H + h)
        if LEAD:
            dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, m_base, l_base, delta_base,
                                 stride_qm, stride_qd, stride_dom, stride_dod, offs_n, lo,
                                 full_lo, diag, win_left, win_right, kv_len, sq, qk_scale,
                                 cap_scale, alibi2, b, h, ki, MaskData, ScoreData, kind_base,
                                 stride_mq, MASK_BQ,
                                 HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M,
                                 True, SOFTCAP, HAS_ALIBI, PRECISION, DTYPE, DOT, HAS_MASK_MOD,
                                 HAS_SCORE_MOD, HAS_BLOCK_MASK, MASK_FN, SCORE_FN, SCORE_GRAD)
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, m_base, l_base, delta_base,
                             stride_qm, stride_qd, stride_dom, stride_dod, offs_n, full_lo,
                             full_hi, diag, win_left, win_right, kv_len, sq, qk_scale, cap_scale,
                             alibi2, b, h, ki, MaskData, ScoreData, kind_base, stride_mq, MASK_BQ,
                             HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, False, SOFTCAP,
                             HAS_ALIBI, PRECISION, DTYPE, DOT, HAS_MASK_MOD, HAS_SCORE_MOD,
                             HAS_BLOCK_MASK, MASK_FN, SCORE_FN, SCORE_GRAD)
        if TRAIL:
            dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, m_base, l_base, delta_base,
                                 stride_qm, stride_qd, stride_dom, stride_dod, offs_n, full_hi,
                                 hi, diag, win_left, win_right, kv_len, sq, qk_scale, cap_scale,
                                 alibi2, b, h, ki, MaskData, ScoreData, kind_base, stride_mq,
                                 MASK_BQ,
                                 HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, True, SOFTCAP,
                                 HAS_ALIBI, PRECISION, DTYPE, DOT, HAS_MASK_MOD, HAS_SCORE_MOD,
                                 HAS_BLOCK_MASK, MASK_FN, SCORE_FN, SCORE_GRAD)

    dk *= sm_scale
    tl.store(DK + b * stride_dkb + hkv * stride_dkh + k0 * stride_dkn
             + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             dk.to(DTYPE), mask=(offs_n < sk)[:, None] & d_ok[None, :])
    tl.store(DV + b * stride_dvb + hkv * stride_dvh + k0 * stride_dvn
             + offs_n[:, None] * stride_dvn + offs_dv[None, :] * stride_dvd,
             dv.to(DTYPE), mask=(offs_n < sk)[:, None] & dv_ok[None, :])


@triton.jit
def _dq_tiles(dq, q, do, m2, l2, delta, k_base, v_base, stride_kn, stride_kd, stride_vn,
              stride_vd, offs_m, blk_lo, blk_hi, diag, win_left, win_right, kv_len,
              qk_scale, cap_scale, alibi2,
              b, h, qi, MaskData, ScoreData, kind_base, stride_kind, MASK_BLOCK,
              HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
              SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, PRECISION: tl.constexpr,
              DTYPE: tl.constexpr,
              DOT: tl.constexpr, HAS_MASK_MOD: tl.constexpr, HAS_SCORE_MOD: tl.constexpr,
              HAS_BLOCK_MASK: tl.constexpr, MASK_FN: tl.constexpr, SCORE_FN: tl.constexpr,
              SCORE_GRAD: tl.constexpr):
    """dQ of one query block over key blocks [blk_lo, blk_hi): dQ += dS K (dS through the
    score_mod's derivative). A block mask's EMPTY tiles are skipped."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = _dim_mask(BLOCK_D, HEAD_DIM)
    dv_ok = _dim_mask(BLOCK_DV, HEAD_DIM_V)
    for blk in tl.range(blk_lo, blk_hi):
        kind = _kind(kind_base, (blk * BLOCK_N // MASK_BLOCK) * stride_kind, HAS_BLOCK_MASK)
        if kind != 0:
            offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
            ki = tl.maximum(tl.minimum(offs_n, kv_len - 1), 0)[None, :]  # the mods' kv_idx
            kT_ptrs = k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
            vT_ptrs = v_base + offs_n[None, :] * stride_vn + offs_dv[:, None] * stride_vd
            if MASKED:
                key_ok = offs_n < kv_len
                kT = tl.load(kT_ptrs, mask=d_ok[:, None] & key_ok[None, :], other=0.0).to(DOT)
                vT = tl.load(vT_ptrs, mask=dv_ok[:, None] & key_ok[None, :], other=0.0).to(DOT)
            else:
                kT = tl.load(kT_ptrs, mask=d_ok[:, None], other=0.0).to(DOT)
                vT = tl.load(vT_ptrs, mask=dv_ok[:, None], other=0.0).to(DOT)
            s, t = _scores(q, kT, qk_scale, cap_scale, SOFTCAP, PRECISION)  # (BM, BN)
            if HAS_ALIBI:
                s = s - alibi2 * tl.abs(offs_n[None, :] - offs_m[:, None] - diag).to(tl.float32)
            g = _score_grad(s, b, h, qi, ki, ScoreData, SCORE_GRAD, HAS_SCORE_MOD)
            s = _score_mod(s, b, h, qi, ki, ScoreData, SCORE_FN, HAS_SCORE_MOD)
            p = tl.math.exp2((s - m2[:, None]) - l2[:, None])
            if MASKED:
                ok = _allowed(offs_m[:, None], offs_n[None, :], diag, win_left, win_right,
                              kv_len)
                p = tl.where(ok, p, 0.0)
            p = _mask_mod(p, kind, 0.0, b, h, qi, ki, MaskData, MASK_FN, HAS_MASK_MOD)
            dp = tl.dot(do, vT, input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            if HAS_SCORE_MOD:
                ds = ds * g
            if SOFTCAP:
                ds = ds * (1.0 - t * t)
            dq += tl.dot(ds.to(DTYPE).to(DOT), tl.trans(kT), input_precision=PRECISION)
    return dq


@triton.heuristics(_key_runs)
@triton.jit
def attn_bwd_dq(Q, K, V, DO, DQ, M2, L2, Delta, KvLen, Alibi, CuQ, CuK,
                MaskData, ScoreData, Kinds, stride_mb, stride_mh, stride_mq, stride_mk, MASK_BQ,
                MASK_BK,
                stride_qb, stride_qh, stride_qm, stride_qd,
                stride_kb, stride_kh, stride_kn, stride_kd,
                stride_vb, stride_vh, stride_vn, stride_vd,
                stride_dob, stride_doh, stride_dom, stride_dod,
                stride_dqb, stride_dqh, stride_dqm, stride_dqd,
                H, GROUP, Sq, Sk, qk_scale, cap_scale, sm_scale, win_left, win_right,
                HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_DV: tl.constexpr, ALIGN_BOTTOM: tl.constexpr, HAS_KV_LEN: tl.constexpr,
                SOFTCAP: tl.constexpr, PRECISION: tl.constexpr, DTYPE: tl.constexpr,
                DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                HAS_ALIBI: tl.constexpr, VARLEN: tl.constexpr,
                HAS_MASK_MOD: tl.constexpr, HAS_SCORE_MOD: tl.constexpr,
                HAS_BLOCK_MASK: tl.constexpr, MASK_FN: tl.constexpr, SCORE_FN: tl.constexpr,
                SCORE_GRAD: tl.constexpr,
                LEAD: tl.constexpr, TRAIL: tl.constexpr):
    """One program per (query block, batch * head): dQ of BLOCK_M rows (no atomics)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # offsets in int64: tensors of 2^31 elements
    b = bh // H
    h = bh % H
    hkv = h // GROUP
    q0, sq, k0, sk = _sequence(CuQ, CuK, b, Sq, Sk, VARLEN)
    kv_len, diag = _diagonal(KvLen, b, sk, sq, HAS_KV_LEN, ALIGN_BOTTOM)
    alibi2 = 0.0
    if HAS_ALIBI:
        alibi2 = tl.load(Alibi + bh)

    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = _dim_mask(BLOCK_D, HEAD_DIM)
    dv_ok = _dim_mask(BLOCK_DV, HEAD_DIM_V)
    row_ok = offs_m < sq
    q = tl.load(Q + b * stride_qb + h * stride_qh + q0 * stride_qm
                + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(DOT)
    do = tl.load(DO + b * stride_dob + h * stride_doh + q0 * stride_dom
                 + offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod,
                 mask=row_ok[:, None] & dv_ok[None, :], other=0.0).to(DOT)
    stat = _stat_row(b, h, H, Sq, q0, VARLEN) + offs_m
    m2 = tl.load(M2 + stat, mask=row_ok, other=0.0)
    l2 = tl.load(L2 + stat, mask=row_ok, other=0.0)
    delta = tl.load(Delta + stat, mask=row_ok, other=0.0)
    k_base = K + b * stride_kb + hkv * stride_kh + k0 * stride_kn
    v_base = V + b * stride_vb + hkv * stride_vh + k0 * stride_vn

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, full_lo, full_hi, hi = _live(*_key_blocks(m0, diag, win_left, win_right, kv_len,
                                                  BLOCK_M, BLOCK_N), m0 < sq)
    qi = tl.maximum(tl.minimum(offs_m, sq - 1), 0)[:, None]  # the mods' q_idx
    kind_base = Kinds
    if HAS_BLOCK_MASK:
        kind_base = Kinds + b * stride_mb + h * stride_mh + (m0 // MASK_BQ) * stride_mq
    if LEAD:
        dq = _dq_tiles(dq, q, do, m2, l2, delta, k_base, v_base, stride_kn, stride_kd,
                       stride_vn, stride_vd, offs_m, lo, full_lo, diag, win_left, win_right,
                       kv_len, qk_scale, cap_scale, alibi2, b, h, qi, MaskData, ScoreData,
                       kind_base, stride_mk, MASK_BK,
                       HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV,
                       BLOCK_N, True, SOFTCAP, HAS_ALIBI, PRECISION, DTYPE, DOT, HAS_MASK_MOD,
                       HAS_SCORE_MOD, HAS_BLOCK_MASK, MASK_FN, SCORE_FN, SCORE_GRAD)
    dq = _dq_tiles(dq, q, do, m2, l2, delta, k_base, v_base, stride_kn, stride_kd, stride_vn,
                   stride_vd, offs_m, full_lo, full_hi, diag, win_left, win_right, kv_len,
                   qk_scale, cap_scale, alibi2, b, h, qi, MaskData, ScoreData, kind_base, stride_mk,
                   MASK_BK,
                   HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N,
                   False, SOFTCAP, HAS_ALIBI, PRECISION, DTYPE, DOT, HAS_MASK_MOD, HAS_SCORE_MOD,
                   HAS_BLOCK_MASK, MASK_FN, SCORE_FN, SCORE_GRAD)
    if TRAIL:
        dq = _dq_tiles(dq, q, do, m2, l2, delta, k_base, v_base, stride_kn, stride_kd,
                       stride_vn, stride_vd, offs_m, full_hi, hi, diag, win_left, win_right,
                       kv_len, qk_scale, cap_scale, alibi2, b, h, qi, MaskData, ScoreData,
                       kind_base, stride_mk, MASK_BK,
                       HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV,
                       BLOCK_N, True, SOFTCAP, HAS_ALIBI, PRECISION, DTYPE, DOT, HAS_MASK_MOD,
                       HAS_SCORE_MOD, HAS_BLOCK_MASK, MASK_FN, SCORE_FN, SCORE_GRAD)

    dq *= sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + q0 * stride_dqm
             + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             dq.to(DTYPE), mask=row_ok[:, None] & d_ok[None, :])


# ---------------------------------------------------------------------------------------
# Autotuning (GPU): block sizes, warps and pipeline stages, pruned by shared-memory need
# ---------------------------------------------------------------------------------------


def _configs(*specs: tuple[int, int, int, int]) -> list[triton.Config]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) -> triton.Config."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
            for bm, bn, w, st in specs]


# The configs are the ones ptxas compiles for sm_90 without (or with a few bytes of)
# register spills at D = 64 or 128, causal or not (4-warp tiles of 128 rows spill at
# D = 128). Few on purpose: every config is a compile per dtype, head dim and mask shape,
# and the benchmark grid must autotune within a GPU session.
#: Forward: wide query blocks (one Q tile resident), key tiles streamed (FA2's split).
FWD_CONFIGS = _configs((64, 64, 4, 3), (64, 64, 8, 2), (64, 64, 8, 3), (128, 32, 8, 3),
                       (128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2))
#: dK/dV: a key block resident, query tiles streamed: the mirror of the forward.
BWD_DKDV_CONFIGS = _configs((32, 64, 4, 2), (32, 64, 8, 2), (32, 64, 8, 3), (64, 64, 8, 2),
                            (32, 128, 8, 2), (64, 128, 8, 2))
#: dQ: a query block resident, key tiles streamed.
BWD_DQ_CONFIGS = _configs((64, 32, 4, 2), (64, 64, 8, 2), (64, 64, 8, 3), (128, 32, 8, 2),
                          (128, 64, 8, 2))

#: Shared memory a streamed tile may take: what an H100/H200 SM offers (228 KiB), less headroom.
_SMEM_BUDGET = 200 * 1024


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop configs whose resident tile and pipelined stages cannot fit in shared memory."""
    args = {**named_args, **kwargs}
    d = max(int(args.get("BLOCK_D", 128)), int(args.get("BLOCK_DV", 128)))
    kept = []
    mask_bq, mask_bk = int(args.get("MASK_BQ", 1)), int(args.get("MASK_BK", 1))
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        smem = 2 * d * (max(bm, bn) + c.num_stages * 2 * min(bm, bn))  # 2-byte elements
        if args.get("HAS_BLOCK_MASK") and (mask_bq % bm or mask_bk % bn):
            continue  # a tile must lie inside one block of the block mask
        if smem <= _SMEM_BUDGET:
            kept.append(c)
    if kept:
        return kept
    # nothing fits: the first config, its tiles shrunk into the block mask's (powers of two)
    first = configs[0]
    bm, bn = first.kwargs["BLOCK_M"], first.kwargs["BLOCK_N"]
    if args.get("HAS_BLOCK_MASK"):
        bm, bn = min(bm, mask_bq), min(bn, mask_bk)
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=first.num_warps,
                          num_stages=first.num_stages)]


#: What a tuned config is kept for: causal and windowed calls (win_*) tune apart from full ones.
_TUNE_KEY = ["Sq", "Sk", "HEAD_DIM", "HEAD_DIM_V", "ALIGN_BOTTOM", "HAS_KV_LEN", "SOFTCAP",
             "HAS_ALIBI", "GROUP", "win_left", "win_right", "VARLEN", "PAGE", "HAS_MASK_MOD",
             "HAS_SCORE_MOD", "HAS_BLOCK_MASK", "MASK_BQ", "MASK_BK"]

attn_fwd_tuned = triton.autotune(FWD_CONFIGS, key=_TUNE_KEY,
                                 prune_configs_by={"early_config_prune": _prune})(attn_fwd)
attn_bwd_dkdv_tuned = triton.autotune(BWD_DKDV_CONFIGS, key=_TUNE_KEY,
                                      prune_configs_by={"early_config_prune": _prune}
                                      )(attn_bwd_dkdv)
attn_bwd_dq_tuned = triton.autotune(BWD_DQ_CONFIGS, key=_TUNE_KEY,
                                    prune_configs_by={"early_config_prune": _prune})(attn_bwd_dq)
