"""``flash_attention`` on torch tensors: validation, kernel launches, the autograd Function.

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

__all__ = ["MAX_HEAD_DIM", "SUPPORTED_DTYPES", "Blocks", "fixed_blocks", "flash_attention"]

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


def _blocks(block_q: int | None = None, block_k: int | None = None) -> Blocks | None:
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


def _consts(q: torch.Tensor, v: torch.Tensor, spec: _Spec, kv_len: torch.Tensor | None,
            alibi: torch.Tensor | None = None) -> dict[str, Any]:
    d, dv = q.shape[-1], v.shape[-1]
    return {
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


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: torch.Tensor | None,
             alibi: torch.Tensor | None, sinks2: torch.Tensor | None, spec: _Spec,
             blocks: Blocks | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out (B, H, Sq, Dv) in q's dtype, m2 and l2 (B, H, Sq) float32): each row's max score
    and log2 of its softmax denominator, in log2 units (kernels.py: why they stay apart)."""
    B, H, Sq, _ = q.shape
    H_kv, Sk = k.shape[1], k.shape[2]
    out = q.new_empty((B, H, Sq, v.shape[-1]))
    m2 = torch.empty((B, H, Sq), device=q.device, dtype=torch.float32)
    l2 = torch.empty_like(m2)
    qk_scale, cap_scale = spec.scalars()
    _launch(kernels.attn_fwd, kernels.attn_fwd_tuned, blocks, Sq, "BLOCK_M", B * H,
            q, k, v, out, m2, l2, kv_len, alibi, sinks2,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            H, H // H_kv, Sq, Sk, qk_scale, cap_scale, spec.win_left, spec.win_right,
            HAS_SINKS=sinks2 is not None, **_consts(q, v, spec, kv_len, alibi))
    return out, m2, l2


def _backward(do: torch.Tensor, dlse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor, out: torch.Tensor, m2: torch.Tensor, l2: torch.Tensor,
              kv_len: torch.Tensor | None, alibi: torch.Tensor | None, spec: _Spec,
              blocks: Blocks | None,
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, Delta): the Delta preprocess (rowsum(dO * O) - dlse, (B, H, Sq)), then
    the dK/dV and dQ passes (no atomics)."""
    B, H, Sq, _ = q.shape
    H_kv, Sk = k.shape[1], k.shape[2]
    consts = _consts(q, v, spec, kv_len, alibi)
    delta = torch.empty_like(m2)
    if Sq and B * H:
        kernels.attn_bwd_preprocess[(triton.cdiv(Sq, 64), B * H)](
            out, do, dlse, delta, *out.stride(), *do.stride(), H, Sq,
            HEAD_DIM_V=consts["HEAD_DIM_V"], BLOCK_DV=consts["BLOCK_DV"],
            HAS_DLSE=dlse is not None, BLOCK_M=64)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    qk_scale, cap_scale = spec.scalars()
    scalars = (H, H // H_kv, Sq, Sk, qk_scale, cap_scale, spec.scale, spec.win_left,
               spec.win_right)
    _launch(kernels.attn_bwd_dkdv, kernels.attn_bwd_dkdv_tuned, blocks, Sk, "BLOCK_N", B * H_kv,
            q, k, v, do, dk, dv, m2, l2, delta, kv_len, alibi,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
            *scalars, **consts)
    _launch(kernels.attn_bwd_dq, kernels.attn_bwd_dq_tuned, blocks, Sq, "BLOCK_M", B * H,
            q, k, v, do, dq, m2, l2, delta, kv_len, alibi,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
            *scalars, **consts)
    return dq, dk, dv, delta


class _FlashAttention(torch.autograd.Function):
    """out, lse = f(q, k, v, sinks); the backward recomputes P from each row's max and
    log2-sum (m2, l2), tile by tile: the probability matrix is never stored."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                sinks: torch.Tensor | None, kv_len: torch.Tensor | None,
                alibi: torch.Tensor | None, spec: _Spec, blocks: Blocks | None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        # the backward tiles as the forward did
        sinks2 = None if sinks is None else (sinks.detach().float() * kernels.LOG2E).contiguous()
        out, m2, l2 = _forward(q, k, v, kv_len, alibi, sinks2, spec, blocks)
        ctx.save_for_backward(q, k, v, out, m2, l2, kv_len, alibi, sinks)
        ctx.spec, ctx.blocks = spec, blocks
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
        dq, dk, dv, delta = _backward(dout, dlse, q, k, v, out, m2, l2, kv_len, alibi,
                                      ctx.spec, ctx.blocks)
        dsinks = None
        if sinks is not None and ctx.needs_input_grad[3]:
            # d out / d sink = -p_sink out, d lse / d sink = p_sink: dsink = -sum p_sink Delta
            # (Delta = rowsum(dO * O) - dlse), p_sink = exp(sink - lse)
            p_sink = torch.exp(sinks.float()[None, :, None] - (m2 + l2) * _LN2)
            dsinks = -(p_sink * delta).sum(dim=(0, 2)).to(sinks.dtype)
        return dq, dk, dv, dsinks, None, None, None, None


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

    A query row with no key to attend gives output 0, lse -inf and zero gradients, never NaN.
    The backward is deterministic (no atomics): GQA's dK/dV are summed per K/V head in-kernel.

    Raises TypeError / ValueError naming the argument and the shapes it got.
    """
    spec, kv_len = _validate(q, k, v, causal, window, kv_lengths, softcap, scale)
    alibi = _alibi(alibi_slopes, q)
    sinks = _sinks(sinks, q)
    blocks = _blocks(block_q, block_k)
    out, lse = _FlashAttention.apply(q, k, v, sinks, kv_len, alibi, spec, blocks)
    return (out, lse) if return_lse else out


def _validate(q: Any, k: Any, v: Any, causal: Any, window: Any, kv_lengths: Any, softcap: Any,
              scale: Any) -> tuple[_Spec, torch.Tensor | None]:
    """Check every argument; return the kernel spec and kv_lengths as int32 on q's device."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    check_shapes(q, k, v)
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"q: dtype {q.dtype} is not supported by flashmath.triton (float16, bfloat16, "
            f"float32); flashmath.flash_attention (NumPy) takes float64")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v: must be on one device; got {q.device}, {k.device}, {v.device}")
    if q.device.type != "cuda" and not kernels.INTERPRETED:
        raise ValueError(
            f"q: the Triton kernels need CUDA tensors, got a tensor on {q.device} (for tests, "
            f"TRITON_INTERPRET=1 before importing flashmath.triton runs Triton's CPU interpreter)")
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    for name, d in (("head_dim (q, k)", q.shape[3]), ("head_dim (v)", v.shape[3])):
        if not 1 <= d <= MAX_HEAD_DIM:
            raise ValueError(f"{name}: flashmath.triton supports 1 .. {MAX_HEAD_DIM}, got {d}: "
                             f"{shapes}")
    alignment = check_causal(causal)
    lo, hi = band(alignment, check_window(window))
    spec = _Spec(
        align_bottom=alignment != "top_left",
        win_left=kernels.UNBOUNDED if lo is None else -lo,
        win_right=kernels.UNBOUNDED if hi is None else hi,
        scale=1.0 / math.sqrt(q.shape[3]) if scale is None else check_finite(scale, "scale"),
        softcap=None if softcap is None else check_positive(softcap, "softcap"),
    )
    return spec, _kv_lengths(kv_lengths, q.shape[0], k.shape[2], q.device)


def _kv_lengths(kv_lengths: Any, B: int, Sk: int, device: torch.device) -> torch.Tensor | None:
    """kv_lengths checked (B integers in 0 .. Sk), as int32 on the device; None stays None."""
    if isinstance(kv_lengths, torch.Tensor):
        kv_lengths = kv_lengths.detach().cpu()  # one host sync, to check the range
    lengths = check_lengths(kv_lengths, "kv_lengths", B, Sk)
    return None if lengths is None else torch.as_tensor(lengths, dtype=torch.int32, device=device)


def _alibi(alibi_slopes: Any, q: torch.Tensor) -> torch.Tensor | None:
    """alibi_slopes checked ((H,) or (B, H) finite reals), as slope * log2(e) float32 (B * H,)
    on q's device (the kernels' scores are in log2 units); None stays None."""
    if alibi_slopes is None:
        return None
    if isinstance(alibi_slopes, torch.Tensor):
        alibi_slopes = alibi_slopes.detach().cpu().double().numpy()
    slopes = check_alibi_slopes(alibi_slopes, q.shape[0], q.shape[1])
    assert slopes is not None
    full = np.broadcast_to(slopes, (q.shape[0], q.shape[1])) * kernels.LOG2E
    return torch.as_tensor(np.ascontiguousarray(full).ravel(), dtype=torch.float32,
                           device=q.device)


def _sinks(sinks: Any, q: torch.Tensor) -> torch.Tensor | None:
    """sinks checked ((H,) reals, finite or -inf) on q's device; a tensor keeps its autograd
    graph (the sinks are learnable), anything else becomes a float32 tensor."""
    if sinks is None:
        return None
    values = sinks.detach().cpu().double().numpy() if isinstance(sinks, torch.Tensor) else sinks
    checked = check_sinks(values, q.shape[1])
    if isinstance(sinks, torch.Tensor):
        if sinks.device != q.device:
            raise ValueError(f"sinks: must be on q's device {q.device}, got {sinks.device}")
        return sinks
    assert checked is not None
    return torch.as_tensor(checked, dtype=torch.float32, device=q.device)
