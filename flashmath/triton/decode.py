"""``flash_decode`` on torch tensors: a few new queries against a KV cache, contiguous or
paged, with new keys appended in place (flash-attention's ``flash_attn_with_kvcache``).

The cache layouts are :func:`flashmath.flash_decode`'s::

    contiguous   k_cache (B, H_kv, Sk, D)                v_cache (B, H_kv, Sk, Dv)
    paged        k_cache (num_pages, H_kv, page_size, D) v_cache (num_pages, H_kv, page_size, Dv)
                 block_table (B, max_pages): key t of sequence b is row t % page_size of
                 page block_table[b, t // page_size]; capacity Sk = max_pages * page_size

The forward kernel reads a paged cache through the block table itself (``PAGE`` in
``kernels.py``): no gather, no copy. Keys at or past a sequence's length are never read,
and neither are the table's entries past its last page (they may hold anything).

Not differentiable (decoding is inference; flash_attn_with_kvcache has no backward), and
the keys are not split across programs (flash-decoding's split-KV): one program per
(query block, batch, head) walks the whole cache, so few (batch, head) pairs leave a GPU
mostly idle. Unmeasured on a GPU so far.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from flashmath.attention.options import Causal, Window, check_lengths, check_shapes
from flashmath.attention.paged import (
    capacity_shapes,
    check_append,
    check_block_table,
    check_paged_shapes,
)
from flashmath.triton.op import (
    Layout,
    check_alibi,
    check_head_dims,
    check_sink_tensor,
    check_tensors,
    forward,
    host_ints,
    make_spec,
    sink_logits2,
    tile_sizes,
)

__all__ = ["flash_decode"]

_LN2 = float(np.log(2.0))


def flash_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    kv_lengths: Any = None,
    block_table: Any = None,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    causal: Causal = False,
    window: Window = None,
    alibi_slopes: Any = None,
    sinks: Any = None,
    block_k: int | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of Sq new queries per sequence to its KV cache, by the Triton forward kernel.

    Parameters
    ----------
    q : (B, H, Sq, D) float16, bfloat16 or float32; H % H_kv == 0 (GQA/MQA).
    k_cache, v_cache : the cache in q's dtype and on its device, contiguous or paged (see
        the module docstring).
    kv_lengths : (B,) ints: sequence b's valid keys before any append (None: the whole
        capacity). A tensor is read on the host once, to check it.
    block_table : (B, max_pages) ints: a paged cache (None: contiguous).
    k_new, v_new : (B, H_kv, S_new, D|Dv), both or neither: written into the cache in place
        at [kv_lengths[b], kv_lengths[b] + S_new) before attending, so the lengths grow by
        S_new (chunked prefill and speculative decoding with ``causal=True``).
    scale, softcap, causal, window, alibi_slopes, sinks : as
        :func:`flashmath.flash_decode` (causal=True: the Sq queries are each sequence's
        last Sq tokens, bottom-right aligned to its length after the append).
    block_k : keys per tile (a power of two >= 16); None autotunes on a GPU.
    return_lse : also return lse (B, H, Sq) float32, natural log.

    Returns
    -------
    out : (B, H, Sq, Dv) in q's dtype; rows with no valid key are 0 (lse -inf, or the sink's
    logit with sinks). Equal to :func:`flashmath.flash_decode` and to the oracle on the
    appended, contiguous cache within the accuracy rule, for any page size.

    Raises
    ------
    TypeError / ValueError naming the argument: tensors (type, dtype, device), shapes (with
    k_cache, v_cache named), kv_lengths, block_table (shape, integers, a page index out of
    range or a table too short for a length), k_new/v_new (shapes, one without the other,
    a cache too small for the append), scale, softcap, causal, window, alibi_slopes, sinks.
    """
    paged = block_table is not None
    block_table = host_ints(block_table)  # a tensor is read on the host once
    check_tensors(("q", q), ("k_cache", k_cache), ("v_cache", v_cache))
    names = ("q", "k_cache", "v_cache")
    if q.dim() != 4:
        raise ValueError(f"q: expected a 4-D tensor (B, H, Sq, D), got shape {tuple(q.shape)}")
    k_like: Any = k_cache
    v_like: Any = v_cache
    page = 0
    if paged:
        k_like, v_like, page = _paged_shapes(k_cache, v_cache, block_table)
    check_shapes(q, k_like, v_like, names)
    check_head_dims(q.shape[3], v_like.shape[3], f"q {tuple(q.shape)}, k_cache "
                                                 f"{tuple(k_cache.shape)}, v_cache "
                                                 f"{tuple(v_cache.shape)}")
    B, H, Sq, _ = q.shape
    H_kv, capacity = k_like.shape[1], k_like.shape[2]
    # a paged cache's capacity is its table's: a length past it is the table's fault
    lengths = check_lengths(host_ints(kv_lengths), "kv_lengths", B,
                            np.iinfo(np.int64).max if paged else capacity)
    lengths = np.full(B, capacity, np.int64) if lengths is None else lengths
    table = (check_block_table(block_table, B, k_cache.shape[0], page, lengths)
             if paged else None)
    spec = make_spec(q.shape[3], causal, window, softcap, scale)
    alibi = check_alibi(alibi_slopes, B, H, q.device)
    sinks_t = check_sink_tensor(sinks, H, q.device)
    blocks = tile_sizes(None, block_k)  # every check before the cache is written
    if k_new is not None or v_new is not None:
        lengths = _append(q, k_cache, v_cache, k_new, v_new, lengths, capacity, table,
                          block_table, page)
    table_t = None if table is None else torch.as_tensor(table, dtype=torch.int32,
                                                         device=q.device)
    layout = Layout(B, H, H_kv, Sq, capacity, Sq, capacity, table=table_t, page=page)
    kv_len = torch.as_tensor(lengths, dtype=torch.int32, device=q.device)
    with torch.no_grad():
        out, m2, l2 = forward(q, k_cache, v_cache, kv_len, alibi, sink_logits2(sinks_t), spec,
                              blocks, layout)
    return (out, (m2 + l2) * _LN2) if return_lse else out


def _paged_shapes(k: torch.Tensor, v: torch.Tensor, block_table: Any) -> tuple[Any, Any, int]:
    """The paged cache checked, as (B, H_kv, Sk, D|Dv) stand-ins of capacity Sk =
    max_pages * page_size, and its page size (flashmath.attention.paged's rules)."""
    check_paged_shapes(k, v)
    return (*capacity_shapes(k, v, np.shape(block_table)), k.shape[2])


def _append(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: Any,
            v_new: Any, lengths: np.ndarray, capacity: int, table: np.ndarray | None,
            block_table: Any, page: int) -> np.ndarray:
    """Write k_new, v_new at each sequence's length, in place; the new lengths."""
    if k_new is not None and v_new is not None:
        check_tensors(("k_new", k_new), ("v_new", v_new), ("q", q))
        if k_new.dtype != k_cache.dtype or v_new.dtype != v_cache.dtype:
            raise TypeError(f"k_new, v_new: expected the cache's dtype {k_cache.dtype}, got "
                            f"{k_new.dtype}, {v_new.dtype}")
    new_lengths = check_append(q, k_new, v_new, k_cache, v_cache, lengths, capacity)
    s_new = k_new.shape[2]
    if table is not None:
        table = check_block_table(block_table, q.shape[0], k_cache.shape[0], page,
                                  new_lengths)
    with torch.no_grad():
        for b, start in enumerate(lengths.tolist()):
            if table is None:
                k_cache[b, :, start:start + s_new] = k_new[b]
                v_cache[b, :, start:start + s_new] = v_new[b]
                continue
            t = torch.arange(start, start + s_new)
            pages = torch.as_tensor(table[b], device=k_cache.device)[t // page]
            rows = (t % page).to(k_cache.device)
            k_cache[pages, :, rows] = k_new[b].transpose(0, 1)  # (S_new, H_kv, D)
            v_cache[pages, :, rows] = v_new[b].transpose(0, 1)
    return new_lengths
