"""``flash_attention`` on torch tensors: validation, kernel launches, the autograd Function.

The launches (:func:`forward`, :func:`attend`, :class:`Layout`) and the argument checks are
shared with the packed (``varlen.py``) and KV-cache (``decode.py``) entry points, which only
describe where their rows live.

The option rules and their messages are the NumPy API's (:mod:`flashmath.attention.options`:
the shape rule, causal, window, lengths, scale, softcap) and the band is
:func:`flashmath.attention.masks.band`; only what the kernels add (tensor type, device,
supported dtypes, head dims up to 256, tile sizes) is checked here.

Shape legend: B batch, H query heads, H_kv key/value heads (H % H_kv == 0), Sq/Sk query/key
lengths, D the q/k head dim, Dv the v head dim. The kernels are in ``kernels.py``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import triton
import triton.language as tl

from flashmath.attention.masks import band
from flashmath.attention.options import (
    Causal,
    Window,
    check_alibi_slopes,
    check_blocks,
    check_causal,
    check_finite,
    check_lengths,
    check_positive,
    check_shapes,
    check_sinks,
    check_window,
)
from flashmath.triton import kernels
from flashmath.triton.mods import NO_MODS, KernelMods, check_tiles, kernel_mods

__all__ = [
    "MAX_HEAD_DIM",
    "SUPPORTED_DTYPES",
    "Blocks",
    "Layout",
    "attend",
    "check_alibi",
    "check_head_dims",
    "check_sink_tensor",
    "check_tensors",
    "fixed_blocks",
    "flash_attention",
    "forward",
    "host_ints",
    "make_spec",
    "sink_logits2",
    "tile_sizes",
]

#: Input dtypes the kernels take; float32 runs exact float32 dots (no TF32), slower.
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: The largest head dim (D and Dv); smaller ones are padded to a power of two >= 16 in-kernel.
MAX_HEAD_DIM = 256
_LN2 = math.log(2.0)
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


# ---------------------------------------------------------------------------------------
# Tile sizes: autotuned on a GPU; fixed in the interpreter or when a caller pins them
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Blocks:
    """Fixed tile sizes for every kernel: ``block_q`` query rows and ``block_k`` keys per
    tile (the kernels' BLOCK_M and BLOCK_N), each a power of two >= 16."""

    block_q: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        check_blocks(self.block_q, self.block_k)
        for name in ("block_q", "block_k"):
            size = getattr(self, name)
            if size < 16 or size & (size - 1):
                raise ValueError(f"{name}: tile sizes are powers of two >= 16, got {size}")


#: What the interpreter uses when nothing is pinned (autotuning there would only cost time).
_INTERPRETER_BLOCKS = Blocks(32, 32)
#: A side given alone (block_q or block_k) pairs with this on a GPU.
_DEFAULT_SIDE = 64
_pinned: Blocks | None = None


@contextlib.contextmanager
def fixed_blocks(block_q: int, block_k: int) -> Iterator[Blocks]:
    """Within the block, every call runs with these tile sizes instead of autotuning, as if
    it were given ``block_q=`` and ``block_k=``; the backward of a forward run inside the
    block uses them too, wherever it runs. Kept for existing callers: per call, pass
    ``flash_attention(..., block_q=, block_k=)``, which takes precedence over it."""
    global _pinned
    previous, _pinned = _pinned, Blocks(block_q, block_k)
    try:
        yield _pinned
    finally:
        _pinned = previous


def tile_sizes(block_q: int | None = None, block_k: int | None = None) -> Blocks | None:
    """The tiles a call uses: its own ``block_q`` / ``block_k`` (a side left None takes the
    pinned or interpreter size, else 64), pinned ones, the interpreter's, or None (autotune)."""
    default = _pinned or (_INTERPRETER_BLOCKS if kernels.INTERPRETED else None)
    if block_q is None and block_k is None:
        return default
    return Blocks(block_q or (default.block_q if default else _DEFAULT_SIDE),
                  block_k or (default.block_k if default else _DEFAULT_SIDE))


def _launch(kernel: Any, tuned: Any, fixed: Blocks | None, length: int, axis_block: str,
            programs: int, *args: Any, **consts: Any) -> None:
    """Launch over (ceil(length / axis_block), programs); autotuned unless blocks are fixed."""
    if length == 0 or programs == 0:
        return
    if fixed is None:
        tuned[lambda meta: (triton.cdiv(length, meta[axis_block]), programs)](*args, **consts)
        return
    meta = {"BLOCK_M": fixed.block_q, "BLOCK_N": fixed.block_k}
    kernel[(triton.cdiv(length, meta[axis_block]), programs)](
        *args, **consts, **meta, num_warps=fixed.num_warps, num_stages=fixed.num_stages)


# ---------------------------------------------------------------------------------------
# Options -> kernel arguments
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    """The validated options, as the kernels take them."""

    align_bottom: bool  # diagonal at kv_len - Sq (True) or at 0 (top-left)
    win_left: int  # keys allowed left of the diagonal (kernels.UNBOUNDED: all)
    win_right: int  # keys allowed right of the diagonal (0 when causal)
    scale: float
    softcap: float | None

    def scalars(self) -> tuple[float, float]:
        """(qk_scale, cap_scale): scores in log2 units are qk * qk_scale, or with a softcap
        tanh(qk * cap_scale) * qk_scale."""
        if self.softcap is None:
            return self.scale * kernels.LOG2E, 1.0
        return self.softcap * kernels.LOG2E, self.scale / self.softcap


@dataclass(frozen=True)
class Layout:
    """Where a call's rows live, for the kernels: padded (B, H, S, D) tensors (the
    default), packed sequences (``cu_q``/``cu_k``: flash_attn_varlen_func's (total, H, D)
    tensors and (B + 1,) int32 prefix sums) or a paged K/V cache (``table``: (B, max_pages)
    int32, ``page`` > 0 rows per page, the cache (num_pages, H_kv, page, D)).

    batch: B (sequences); heads/kv_heads: H, H_kv; sq/sk: the kernels' Sq and Sk (rows
    and keys per sequence, the cache's capacity when paged; total_q/total_k when packed);
    max_q/max_k: the longest sequence, which sizes the launch grids."""

    batch: int
    heads: int
    kv_heads: int
    sq: int
    sk: int
    max_q: int
    max_k: int
    cu_q: torch.Tensor | None = None
    cu_k: torch.Tensor | None = None
    table: torch.Tensor | None = None
    page: int = 0

    @property
    def packed(self) -> bool:
        return self.cu_q is not None

    @classmethod
    def padded(cls, q: torch.Tensor, k: torch.Tensor) -> Layout:
        B, H, Sq, _ = q.shape
        return cls(B, H, k.shape[1], Sq, k.shape[2], Sq, k.shape[2])

    def strides(self, t: torch.Tensor) -> tuple[int, ...]:
        """(batch, head, row, dim) strides of t: packed tensors (total, H, D) step over
        sequences by cu_seqlens, not a stride (0); a paged cache's first stride is its
        page stride."""
        if self.packed:
            return (0, t.stride(1), t.stride(0), t.stride(2))
        return tuple(t.stride())

    def rows(self, d: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An empty output: (B, H, Sq, d), or (total_q, H, d) when packed."""
        shape = (self.sq, self.heads, d) if self.packed else (self.batch, self.heads, self.sq, d)
        return torch.empty(shape, dtype=dtype, device=device)

    def stats(self, device: torch.device) -> torch.Tensor:
        """An empty float32 per-row statistic: (B, H, Sq), or (H, total_q) when packed."""
        shape = (self.heads, self.sq) if self.packed else (self.batch, self.heads, self.sq)
        return torch.empty(shape, dtype=torch.float32, device=device)

    def pointers(self) -> tuple[Any, ...]:
        """CuQ, CuK (the kernels' varlen arguments; None when padded)."""
        return self.cu_q, self.cu_k

    def consts(self) -> dict[str, Any]:
        """The kernels' compile-time switch for packed rows."""
        return {"VARLEN": self.packed}


def _consts(q: torch.Tensor, v: torch.Tensor, spec: _Spec, kv_len: torch.Tensor | None,
            alibi: torch.Tensor | None, layout: Layout,
            mods: KernelMods = NO_MODS) -> dict[str, Any]:
    d, dv = q.shape[-1], v.shape[-1]
    return layout.consts() | mods.consts() | {
        "HEAD_DIM": d,
        "HEAD_DIM_V": dv,
        "BLOCK_D": max(16, triton.next_power_of_2(d)),
        "BLOCK_DV": max(16, triton.next_power_of_2(dv)),
        "ALIGN_BOTTOM": spec.align_bottom,
        "HAS_KV_LEN": kv_len is not None,
        "SOFTCAP": spec.softcap is not None,
        "HAS_ALIBI": alibi is not None,
        "PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
        "DTYPE": _TL_DTYPES[q.dtype],
        # the interpreter multiplies bfloat16 bit patterns (see kernels.py): dots in float32
        "DOT": tl.float32 if kernels.INTERPRETED else _TL_DTYPES[q.dtype],
    }


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: torch.Tensor | None,
            alibi: torch.Tensor | None, sinks2: torch.Tensor | None, spec: _Spec,
            blocks: Blocks | None, layout: Layout, mods: KernelMods = NO_MODS,
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out in q's dtype, m2 and l2 float32), shaped as ``layout`` says ((B, H, Sq, Dv) and
    (B, H, Sq) padded): each row's max score and log2 of its softmax denominator, in log2
    units (kernels.py: why they stay apart). The launch shared by every Triton entry point."""
    L = layout
    out = L.rows(v.shape[-1], q.dtype, q.device)
    m2, l2 = L.stats(q.device), L.stats(q.device)
    qk_scale, cap_scale = spec.scalars()
    table = L.table
    _launch(kernels.attn_fwd, kernels.attn_fwd_tuned, blocks, L.max_q, "BLOCK_M",
            L.batch * L.heads,
            q, k, v, out, m2, l2, kv_len, alibi, sinks2, *L.pointers(), table,
            0 if table is None else table.stride(0), *mods.args(),
            *L.strides(q), *L.strides(k), *L.strides(v), *L.strides(out),
            L.heads, L.heads // L.kv_heads, L.sq, L.sk, qk_scale, cap_scale, spec.win_left,
            spec.win_right, HAS_SINKS=sinks2 is not None, PAGE=L.page,
            **_consts(q, v, spec, kv_len, alibi, L, mods))
    return out, m2, l2


def _backward(do: torch.Tensor, dlse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor, out: torch.Tensor, m2: torch.Tensor, l2: torch.Tensor,
              kv_len: torch.Tensor | None, alibi: torch.Tensor | None, spec: _Spec,
              blocks: Blocks | None, layout: Layout, mods: KernelMods = NO_MODS,
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, Delta): the Delta preprocess (rowsum(dO * O) - dlse, shaped as m2), then
    the dK/dV and dQ passes (no atomics)."""
    L = layout
    consts = _consts(q, v, spec, kv_len, alibi, L, mods)
    delta = torch.empty_like(m2)
    # Delta is per row: packed rows are one sequence of total_q rows to the preprocess
    rows, bh = (L.sq, L.heads) if L.packed else (L.sq, L.batch * L.heads)
    if rows and bh:
        kernels.attn_bwd_preprocess[(triton.cdiv(rows, 64), bh)](
            out, do, dlse, delta, *L.strides(out), *L.strides(do), L.heads, rows,
            HEAD_DIM_V=consts["HEAD_DIM_V"], BLOCK_DV=consts["BLOCK_DV"],
            HAS_DLSE=dlse is not None, BLOCK_M=64)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    qk_scale, cap_scale = spec.scalars()
    scalars = (L.heads, L.heads // L.kv_heads, L.sq, L.sk, qk_scale, cap_scale, spec.scale,
               spec.win_left, spec.win_right)
    _launch(kernels.attn_bwd_dkdv, kernels.attn_bwd_dkdv_tuned, blocks, L.max_k, "BLOCK_N",
            L.batch * L.kv_heads,
            q, k, v, do, dk, dv, m2, l2, delta, kv_len, alibi, *L.pointers(), *mods.args(),
            *L.strides(q), *L.strides(k), *L.strides(v), *L.strides(do), *L.strides(dk),
            *L.strides(dv), *scalars, **consts)
    _launch(kernels.attn_bwd_dq, kernels.attn_bwd_dq_tuned, blocks, L.max_q, "BLOCK_M",
            L.batch * L.heads,
            q, k, v, do, dq, m2, l2, delta, kv_len, alibi, *L.pointers(), *mods.args(),
            *L.strides(q), *L.strides(k), *L.strides(v), *L.strides(do), *L.strides(dq),
            *scalars, **consts)
    return dq, dk, dv, delta


def sink_logits2(sinks: torch.Tensor | None) -> torch.Tensor | None:
    """The kernels' form of the sinks: sinks * log2(e), float32, contiguous."""
    return None if sinks is None else (sinks.detach().float() * kernels.LOG2E).contiguous()


class _FlashAttention(torch.autograd.Function):
    """out, lse = f(q, k, v, sinks); the backward recomputes P from each row's max and
    log2-sum (m2, l2), tile by tile: the probability matrix is never stored."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                sinks: torch.Tensor | None, kv_len: torch.Tensor | None,
                alibi: torch.Tensor | None, spec: _Spec, blocks: Blocks | None,
                layout: Layout, mods: KernelMods) -> tuple[torch.Tensor, torch.Tensor]:
        # the backward tiles as the forward did
        out, m2, l2 = forward(q, k, v, kv_len, alibi, sink_logits2(sinks), spec, blocks, layout,
                              mods)
        ctx.save_for_backward(q, k, v, out, m2, l2, kv_len, alibi, sinks)
        ctx.spec, ctx.blocks, ctx.layout, ctx.mods = spec, blocks, layout, mods
        ctx.set_materialize_grads(False)
        return out, (m2 + l2) * _LN2  # users get the natural log, as every backend

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor | None, dlse: torch.Tensor | None,
                 ) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, m2, l2, kv_len, alibi, sinks = ctx.saved_tensors
        if dout is None:  # only lse was used downstream
            dout = torch.zeros_like(out)
        if dlse is not None:
            dlse = dlse.to(torch.float32).contiguous()
        layout, mods = ctx.layout, ctx.mods
        if mods.score_fn is not None and mods.score_grad is None:
            raise ValueError("score_mod: its derivative is needed for the backward; give "
                             "flashmath.triton.Mod(..., grad=) (d score_mod / d score)")
        dq, dk, dv, delta = _backward(dout, dlse, q, k, v, out, m2, l2, kv_len, alibi,
                                      ctx.spec, ctx.blocks, layout, mods)
        dsinks = None
        if sinks is not None and ctx.needs_input_grad[3]:
            # d out / d sink = -p_sink out, d lse / d sink = p_sink: dsink = -sum p_sink Delta
            # (Delta = rowsum(dO * O) - dlse), p_sink = exp(sink - lse)
            per_head = sinks.float()[:, None] if layout.packed else sinks.float()[None, :, None]
            p_sink = torch.exp(per_head - (m2 + l2) * _LN2)
            rows = (1,) if layout.packed else (0, 2)
            dsinks = -(p_sink * delta).sum(dim=rows).to(sinks.dtype)
        return dq, dk, dv, dsinks, None, None, None, None, None, None


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor | None,
           kv_len: torch.Tensor | None, alibi: torch.Tensor | None, spec: _Spec,
           blocks: Blocks | None, layout: Layout, mods: KernelMods = NO_MODS,
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse), differentiable in q, k, v, sinks and through lse: the autograd entry
    point of every differentiable Triton API (validated arguments, kernel forms)."""
    return _FlashAttention.apply(q, k, v, sinks, kv_len, alibi, spec, blocks, layout, mods)


# ---------------------------------------------------------------------------------------
# The public function
# ---------------------------------------------------------------------------------------


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: Causal = False,
    window: Window = None,
    kv_lengths: torch.Tensor | Sequence[int] | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    alibi_slopes: Any = None,
    sinks: torch.Tensor | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    return_lse: bool = False,
    score_mod: Any = None,
    mask_mod: Any = None,
    block_mask: Any = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact attention ``softmax(scale * q k^T + mask) v`` by Triton kernels, differentiable.

    Shapes: q (B, H, Sq, D), k (B, H_kv, Sk, D), v (B, H_kv, Sk, Dv) -> out (B, H, Sq, Dv);
    query head h reads K/V head ``h // (H // H_kv)`` (GQA, MQA). lse: (B, H, Sq), natural log,
    float32.

    dtypes: float16, bfloat16 (float32 accumulators, output in the input dtype) and float32
    (exact float32 dots, no TF32). D and Dv go up to 256; any size is padded in-kernel to the
    next power of two (at least 16), so 64 and 128 waste nothing.

    Options (the same names and meanings as ``flashmath.flash_attention``)::

        causal=True / "bottom_right"   the last query sees every key    (FlashAttention >= 2.1)
        causal="top_left"              query i sees keys 0..i           (torch SDPA's is_causal)

            Sq=2, Sk=4:   bottom_right   1 1 1 0      top_left   1 0 0 0
                                         1 1 1 1                 1 1 0 0

        window=(left, right)  keys within left before .. right after the same diagonal;
                              None for an unbounded side (causal caps right at 0)
        kv_lengths            (B,) ints: keys >= kv_lengths[b] are padding; the diagonal is
                              kv_lengths[b] - Sq for the bottom-right alignment
        softcap               scores s -> softcap * tanh(s / softcap), s already scaled
        scale                 defaults to 1 / sqrt(D)
        alibi_slopes          (H,) or (B, H): pair (i, j) gets -slope * |j - i - diagonal|,
                              added after the softcap (flash-attention's alibi_slopes)
        sinks                 (H,) attention-sink logits (gpt-oss): one more logit in each
                              row's denominator with no value; lse includes it, and the
                              sinks get a gradient when they require one
        block_q, block_k      tile sizes (powers of two >= 16); None autotunes on a GPU
                              (the interpreter uses 32); one side alone pairs with 64
        return_lse            also return lse (it is differentiable too)
        score_mod, mask_mod   FlexAttention-style mods as @triton.jit functions
                              (flashmath.triton.mods: a Mod, or a bare jit function):
                              the score_mod after softcap and ALiBi, its derivative
                              (Mod.grad) for the backward; the mask_mod ANDed with the
                              masks above
        block_mask            fm.create_block_mask(mask_mod.numpy, ...) over (B|1, H|1,
                              Sq, Sk): EMPTY tiles are skipped, FULL ones call no
                              mask_mod; its tiles must be multiples of the kernel's

    A query row with no key to attend gives output 0, lse -inf and zero gradients, never NaN.
    The backward is deterministic (no atomics): GQA's dK/dV are summed per K/V head in-kernel.

    Raises TypeError / ValueError naming the argument and the shapes it got.
    """
    check_tensors(("q", q), ("k", k), ("v", v))
    check_shapes(q, k, v)
    check_head_dims(q.shape[3], v.shape[3], f"q {tuple(q.shape)}, k {tuple(k.shape)}, "
                                            f"v {tuple(v.shape)}")
    spec = make_spec(q.shape[3], causal, window, softcap, scale)
    kv_len = _kv_lengths(kv_lengths, q.shape[0], k.shape[2], q.device)
    alibi = check_alibi(alibi_slopes, q.shape[0], q.shape[1], q.device)
    sinks = check_sink_tensor(sinks, q.shape[1], q.device)
    mods = kernel_mods(score_mod, mask_mod, block_mask, q.shape[0], q.shape[1], q.shape[2],
                       k.shape[2], q.device)
    blocks = tile_sizes(block_q, block_k)
    if blocks is not None:
        check_tiles(mods, blocks.block_q, blocks.block_k)
    out, lse = attend(q, k, v, sinks, kv_len, alibi, spec, blocks, Layout.padded(q, k), mods)
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------
# Validation shared by every Triton entry point (flash_attention, the varlen and decode APIs)
# ---------------------------------------------------------------------------------------


def check_tensors(*named: tuple[str, Any]) -> None:
    """Each (name, value) is a torch.Tensor, all on one device that the kernels can use, the
    first of a dtype they take. Errors name the argument."""
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    (first, t0), devices = named[0], {t.device for _, t in named}
    if t0.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{first}: dtype {t0.dtype} is not supported by flashmath.triton (float16, "
            f"bfloat16, float32); flashmath's NumPy functions take float64")
    if len(devices) > 1:
        raise ValueError(f"{', '.join(n for n, _ in named)}: must be on one device; got "
                         f"{', '.join(str(t.device) for _, t in named)}")
    if t0.device.type != "cuda" and not kernels.INTERPRETED:
        raise ValueError(
            f"{first}: the Triton kernels need CUDA tensors, got a tensor on {t0.device} (for "
            f"tests, TRITON_INTERPRET=1 before importing flashmath.triton runs Triton's CPU "
            f"interpreter)")


def check_head_dims(d: int, dv: int, shapes: str) -> None:
    """D and Dv in 1 .. MAX_HEAD_DIM; ``shapes`` ends the message (the arguments' shapes)."""
    for name, size in (("head_dim (q, k)", d), ("head_dim (v)", dv)):
        if not 1 <= size <= MAX_HEAD_DIM:
            raise ValueError(f"{name}: flashmath.triton supports 1 .. {MAX_HEAD_DIM}, got "
                             f"{size}: {shapes}")


def make_spec(head_dim: int, causal: Any, window: Any, softcap: Any, scale: Any) -> _Spec:
    """The mask band, scale and softcap checked (the NumPy API's rules and messages)."""
    alignment = check_causal(causal)
    lo, hi = band(alignment, check_window(window))
    return _Spec(
        align_bottom=alignment != "top_left",
        win_left=kernels.UNBOUNDED if lo is None else -lo,
        win_right=kernels.UNBOUNDED if hi is None else hi,
        scale=1.0 / math.sqrt(head_dim) if scale is None else check_finite(scale, "scale"),
        softcap=None if softcap is None else check_positive(softcap, "softcap"),
    )


def host_ints(x: Any) -> Any:
    """A tensor of integers as a NumPy array (one host sync, to check values); anything
    else unchanged."""
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x


def _kv_lengths(kv_lengths: Any, B: int, Sk: int, device: torch.device) -> torch.Tensor | None:
    """kv_lengths checked (B integers in 0 .. Sk), as int32 on the device; None stays None."""
    if isinstance(kv_lengths, torch.Tensor):
        kv_lengths = kv_lengths.detach().cpu()  # one host sync, to check the range
    lengths = check_lengths(kv_lengths, "kv_lengths", B, Sk)
    return None if lengths is None else torch.as_tensor(lengths, dtype=torch.int32, device=device)


def check_alibi(alibi_slopes: Any, B: int, H: int, device: torch.device) -> torch.Tensor | None:
    """alibi_slopes checked ((H,) or (B, H) finite reals), as slope * log2(e) float32 (B * H,)
    on the device (the kernels' scores are in log2 units); None stays None."""
    if alibi_slopes is None:
        return None
    if isinstance(alibi_slopes, torch.Tensor):
        alibi_slopes = alibi_slopes.detach().cpu().double().numpy()
    slopes = check_alibi_slopes(alibi_slopes, B, H)
    assert slopes is not None
    full = np.broadcast_to(slopes, (B, H)) * kernels.LOG2E
    return torch.as_tensor(np.ascontiguousarray(full).ravel(), dtype=torch.float32,
                           device=device)


def check_sink_tensor(sinks: Any, H: int, device: torch.device) -> torch.Tensor | None:
    """sinks checked ((H,) reals, finite or -inf) on the device; a tensor keeps its autograd
    graph (the sinks are learnable), anything else becomes a float32 tensor."""
    if sinks is None:
        return None
    values = sinks.detach().cpu().double().numpy() if isinstance(sinks, torch.Tensor) else sinks
    checked = check_sinks(values, H)
    if isinstance(sinks, torch.Tensor):
        if sinks.device != device:
            raise ValueError(f"sinks: must be on q's device {device}, got {sinks.device}")
        return sinks
    assert checked is not None
    return torch.as_tensor(checked, dtype=torch.float32, device=device)
