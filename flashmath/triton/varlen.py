"""``flash_attention_varlen`` on torch tensors: packed sequences, no padding, differentiable.

The layout is flash-attention's ``flash_attn_varlen_func`` (and
:func:`flashmath.flash_attention_varlen`'s)::

    q: (total_q, H, D)     k: (total_k, H_kv, D)     v: (total_k, H_kv, Dv)
    cu_seqlens_q, cu_seqlens_k: (B + 1,) int32 prefix sums, cu[0] = 0, cu[B] = total
    sequence b holds rows cu[b]:cu[b + 1]; out (total_q, H, Dv); lse (H, total_q)

Tokens come first, then heads, where :func:`flashmath.triton.flash_attention` takes
(B, H, S, D). The kernels are the padded API's: each program reads its sequence's first
row and length from cu_seqlens (``VARLEN`` in ``kernels.py``), programs past a short
sequence's end do nothing, and no padded copy is made.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from flashmath.attention.options import Causal, Window, check_shapes
from flashmath.attention.varlen import check_cu_seqlens
from flashmath.triton.op import (
    Layout,
    attend,
    check_alibi,
    check_head_dims,
    check_sink_tensor,
    check_tensors,
    host_ints,
    make_spec,
    tile_sizes,
)

__all__ = ["flash_attention_varlen"]


def flash_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: Any,
    cu_seqlens_k: Any,
    *,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    causal: Causal = False,
    window: Window = None,
    softcap: float | None = None,
    scale: float | None = None,
    alibi_slopes: Any = None,
    sinks: torch.Tensor | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact attention over packed sequences of different lengths, by the Triton kernels.

    Shapes: q (total_q, H, D), k (total_k, H_kv, D), v (total_k, H_kv, Dv) -> out
    (total_q, H, Dv) in q's dtype; lse (H, total_q) float32, natural log. Each sequence
    attends to its own keys only; ``causal=True`` is bottom-right per sequence (query i of
    a sequence with Lq queries and Lk keys sees key j iff j <= i + Lk - Lq).

    cu_seqlens_q, cu_seqlens_k: (B + 1,) integer prefix sums (a tensor on any device, or
    anything NumPy reads); checked on the host (one sync), then passed as int32.
    max_seqlen_q, max_seqlen_k: optional, checked to be at least the longest sequence
    (they size the launch grid; the longest sequence is used when None).
    causal, window, softcap, scale, sinks, block_q, block_k: as
    :func:`flashmath.triton.flash_attention`, per sequence. alibi_slopes: (H,) or (B, H).

    Differentiable in q, k, v, sinks and through lse, as the padded op. A sequence with no
    keys gives zeros, lse -inf and zero gradients. Equal to the padded op with
    ``kv_lengths`` on the same data within the accuracy rule (tiles start at each
    sequence's first row, so results need not be bit-identical).

    Raises TypeError / ValueError naming the argument: tensors that are not 3-D, shapes,
    dtypes and devices as the padded op, cu_seqlens that do not start at 0, decrease, miss
    the packed length or disagree on B, max_seqlen below the longest sequence.
    """
    check_tensors(("q", q), ("k", k), ("v", v))
    legends = (("q", q, "(total_q, H, D)"), ("k", k, "(total_k, H_kv, D)"),
               ("v", v, "(total_k, H_kv, Dv)"))
    for name, t, legend in legends:
        if t.dim() != 3:
            raise ValueError(f"{name}: expected a 3-D packed tensor {legend}, got shape "
                             f"{tuple(t.shape)}")
    # the one (B, H, S, D) rule, on (1, H, total, D) views
    qv, kv, vv = (t.permute(1, 0, 2)[None] for t in (q, k, v))
    check_shapes(qv, kv, vv)
    check_head_dims(q.shape[2], v.shape[2], f"q {tuple(q.shape)}, k {tuple(k.shape)}, "
                                            f"v {tuple(v.shape)}")
    cq = check_cu_seqlens(host_ints(cu_seqlens_q), "cu_seqlens_q", q.shape[0], max_seqlen_q)
    ck = check_cu_seqlens(host_ints(cu_seqlens_k), "cu_seqlens_k", k.shape[0], max_seqlen_k)
    if cq.size != ck.size:
        raise ValueError(f"cu_seqlens_q has {cq.size - 1} sequences, cu_seqlens_k "
                         f"{ck.size - 1}: they must describe the same batch")
    B, H = cq.size - 1, q.shape[1]
    spec = make_spec(q.shape[2], causal, window, softcap, scale)
    layout = Layout(
        batch=B, heads=H, kv_heads=k.shape[1], sq=q.shape[0], sk=k.shape[0],
        max_q=int(np.diff(cq).max(initial=0)), max_k=int(np.diff(ck).max(initial=0)),
        cu_q=torch.as_tensor(cq, dtype=torch.int32, device=q.device),
        cu_k=torch.as_tensor(ck, dtype=torch.int32, device=q.device))
    out, lse = attend(q, k, v, check_sink_tensor(sinks, H, q.device), None,
                      check_alibi(alibi_slopes, B, H, q.device), spec,
                      tile_sizes(block_q, block_k), layout)
    return (out, lse) if return_lse else out
