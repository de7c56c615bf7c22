"""Ring attention: exact attention over a sequence sharded across the ranks of a process group.

Legend: B batch, H query heads, H_kv key/value heads, S the whole sequence, S_r = S / W the
shard one rank holds, D head dim, Dv value head dim, W world size (ranks in the ring).

Each rank holds its queries and its keys/values for S_r positions. In W steps the K/V shards
travel once around the ring (rank r sends to r+1 and receives from r-1) while every rank
attends its queries to the shard it holds at that step; the partial outputs merge by their
log-sum-exps (``fm.merge_outputs``, the online-softmax rule), so the result is exact. Step s
starts the transfer of the next shard before computing the current block, so on a backend
with asynchronous point-to-point (gloo's and nccl's ``isend``/``irecv``) the transfer hides
behind the compute when the block is big enough (flashmath.distributed.model says when).

The backward follows the same ring: dQ accumulates on the query's own rank; dK/dV of a shard
travel with it, each rank adding its contribution, and after the last step one more hop
brings them home to the shard's owner. Blocks are computed on the host by the NumPy
tiled kernels' shard API (:func:`flashmath.attention.tiled.tiled_forward` /
``tiled_backward``); tensors and their transfers stay on the tensors' device, so the same
code runs with nccl on GPUs.

How the sequence is cut (``layout``: contiguous or zigzag) is
:mod:`flashmath.distributed.layouts`; how ranks exchange shards (torch.distributed, threads,
replay) and RingError are :mod:`flashmath.distributed.transport`. This module holds the
passes, the autograd op and the public entry points.

Causal masks use global positions (query at p sees keys at t <= p; Sq == Sk overall, so
bottom-right and top-left alignment agree). Blocks a causal mask leaves empty are skipped.

Failures: every transfer is waited on with a timeout (``timeout=``, or the process group's);
when a peer crashes or stops answering, each rank raises ``RingError`` naming itself, the
peers of the failed exchange and the step, instead of hanging.
"""

from __future__ import annotations

import threading
import time
import tracemalloc
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, overload

import numpy as np
import torch
import torch.distributed as dist

from flashmath.attention import tiled
from flashmath.attention.options import Causal, check_causal, check_finite, check_shapes
from flashmath.distributed.layouts import (
    LAYOUTS,
    block_pairs,
    check_layout,
    shard_ranges,
    shard_sequence,
    unshard_sequence,
)
from flashmath.distributed.transport import (
    Exchange,
    LocalExchange,
    Pending,
    ReplayExchange,
    RingError,
    ThreadExchange,
    TorchExchange,
)
from flashmath.dtypes import accumulate_dtype, from_torch, to_torch
from flashmath.softmax.online import merge_outputs

__all__ = [
    "LAYOUTS",
    "RingError",
    "RingStats",
    "replay_rank_memory",
    "ring_attention",
    "shard_ranges",
    "shard_sequence",
    "simulate_ring_attention",
    "unshard_sequence",
]


@dataclass
class RingStats:
    """Per-step timings of one ring pass, filled in when passed as ``stats=``.

    ``steps``: one dict per step and pass ("forward"/"backward"): compute_s (block compute),
    wait_s (time blocked on transfers after the compute: 0 when the transfer was hidden),
    sent_bytes (what this rank sent in that step).
    """

    steps: list[dict[str, Any]] = field(default_factory=list)

    def total(self, key: str, phase: str | None = None) -> float:
        """The sum of ``key`` over the steps (of one ``phase``, or all)."""
        return float(sum(s[key] for s in self.steps if phase in (None, s["phase"])))


# --------------------------------------------------------------------------- tensors


def _accum(dtype: torch.dtype) -> np.dtype[Any]:
    """flashmath.dtypes.accumulate_dtype of a torch dtype (float64 or float32)."""
    return accumulate_dtype(from_torch(torch.empty(0, dtype=dtype)).dtype)


def _host(t: torch.Tensor, acc: np.dtype[Any]) -> np.ndarray:
    """``t`` on the host in the accumulate dtype: narrow inputs are upcast (exactly) so that
    block results are not rounded to the narrow dtype before the ring merges them."""
    a = from_torch(t)
    return a if a.dtype == acc else a.astype(acc)


# Results go back to torch with dtypes.to_torch: on the host a tensor stays NumPy memory,
# so tracemalloc sees the ring's buffers as well as its NumPy temporaries.


def _empty_like(t: torch.Tensor) -> torch.Tensor:
    """An uninitialised contiguous tensor like ``t`` (NumPy memory on the host)."""
    if t.device.type != "cpu":
        return torch.empty_like(t, memory_format=torch.contiguous_format)
    return to_torch(np.empty(tuple(t.shape), dtype=from_torch(t[:0]).dtype), t.dtype, t.device)


# --------------------------------------------------------------------------- block kernels


# The NumPy tiled kernels' shard API (flashmath.attention.tiled, module docs): offsets
# place the local rows at global positions, the totals place the causal diagonal (S == S).


def _block_forward(q: np.ndarray, k: np.ndarray, v: np.ndarray, *, scale: float, causal: bool,
                   q_offset: int, k_offset: int, seq: int) -> tuple[np.ndarray, np.ndarray]:
    return tiled.tiled_forward(q, k, v, causal=causal, scale=scale, q_offset=q_offset,
                               k_offset=k_offset, q_total=seq, k_total=seq)


def _block_backward(dout: np.ndarray, q: np.ndarray, k: np.ndarray, v: np.ndarray,
                    out: np.ndarray, lse: np.ndarray, *, scale: float, causal: bool,
                    q_offset: int, k_offset: int, seq: int,
                    dlse: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    return tiled.tiled_backward(dout, q, k, v, out, lse, causal=causal, scale=scale,
                                q_offset=q_offset, k_offset=k_offset, q_total=seq,
                                k_total=seq, dlse=dlse)


# --------------------------------------------------------------------------- the ring passes


class _KVRing:
    """The K/V shard a rank holds, and the next one arriving: double-buffered.

    ``start(step)`` sends the shard held to rank+1 and receives the next from rank-1 into
    a spare pair (none at the last step); ``finish()`` waits and makes the new shard
    current. The rank's own k, v (step 0) are sent but never written into; two spare
    pairs are allocated at most.
    """

    def __init__(self, ex: Exchange, k: torch.Tensor, v: torch.Tensor):
        self.ex = ex
        self.kv = (k.contiguous(), v.contiguous())
        self.spare: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.pending: Pending | None = None
        self.next: tuple[torch.Tensor, torch.Tensor] | None = None
        self.own = True

    def start(self, step: int) -> None:
        if step == self.ex.world_size - 1:
            self.pending = None
            return
        if not self.spare:
            self.spare.append((_empty_like(self.kv[0]), _empty_like(self.kv[1])))
        self.next = self.spare.pop(0)
        self.pending = self.ex.start(self.kv, self.next, "K/V", step)

    def finish(self) -> tuple[torch.Tensor, ...]:
        """Wait for the transfer started last; returns what was sent (for the stats)."""
        if self.pending is None or self.next is None:
            return ()
        self.pending.wait()
        if not self.own:
            self.spare.append(self.kv)
        self.kv, self.next, self.own = self.next, None, False
        return self.kv


def _record(stats: RingStats | None, phase: str, step: int, compute: float, wait: float,
            sent: Sequence[torch.Tensor]) -> None:
    if stats is not None:
        stats.steps.append({
            "phase": phase, "step": step, "compute_s": compute, "wait_s": wait,
            "sent_bytes": int(sum(t.numel() * t.element_size() for t in sent)),
        })


def _ring_forward(ex: Exchange, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                  causal: bool, scale: float, layout: str,
                  stats: RingStats | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's (out (B, H, S_r, Dv) in q's dtype, lse (B, H, S_r) float32/float64, and
    out in that accumulate dtype: what the backward is given, so that its check of out
    against its own recomputation is not thrown by out's rounding to a narrow dtype)."""
    w, r = ex.world_size, ex.rank
    seq = q.shape[-2] * w
    q_ranges = shard_ranges(seq, w, r, layout)
    acc = _accum(q.dtype)
    qn = _host(q, acc)
    out = np.zeros((*q.shape[:-1], v.shape[-1]), acc)  # (B, H, S_r, Dv)
    lse = np.full(q.shape[:-1], -np.inf, acc)  # (B, H, S_r)
    ring = _KVRing(ex, k, v)
    for step in range(w):
        ring.start(step)  # the next transfer runs while this shard is computed on
        t0 = time.perf_counter()
        kn, vn = _host(ring.kv[0], acc), _host(ring.kv[1], acc)
        k_ranges = shard_ranges(seq, w, (r - step) % w, layout)
        for qs, ks, qo, ko, masked in block_pairs(q_ranges, k_ranges, causal):
            o_b, lse_b = _block_forward(qn[..., qs, :], kn[..., ks, :], vn[..., ks, :],
                                        scale=scale, causal=masked, q_offset=qo,
                                        k_offset=ko, seq=seq)
            o_m, lse_m = merge_outputs([out[..., qs, :], o_b], [lse[..., qs], lse_b])
            out[..., qs, :], lse[..., qs] = o_m, lse_m
        t1 = time.perf_counter()
        sent = ring.finish()
        _record(stats, "forward", step, t1 - t0, time.perf_counter() - t1, sent)
    return (to_torch(out, q.dtype, q.device), to_torch(lse, _torch_dtype(acc), q.device),
            to_torch(out, _torch_dtype(acc), q.device))


def _torch_dtype(dt: np.dtype[Any]) -> torch.dtype:
    """The torch dtype of an accumulate dtype from :func:`_accum` (float64 or float32)."""
    return torch.from_numpy(np.empty(0, dt)).dtype


def _ring_backward(ex: Exchange, dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                   v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, *, causal: bool,
                   scale: float, layout: str, stats: RingStats | None = None,
                   dlse: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """This rank's (dq, dk, dv), in the dtypes of q, k, v. ``dlse``: the cotangent of this
    rank's merged lse (d lse / d s = p, so every block's dp - delta gains it)."""
    w, r = ex.world_size, ex.rank
    seq = q.shape[-2] * w
    q_ranges = shard_ranges(seq, w, r, layout)
    acc = _accum(q.dtype)
    qn, don, on, lsen = (_host(t, acc) for t in (q, dout, out, lse))
    dlsen = None if dlse is None else _host(dlse, acc)
    dq = np.zeros(q.shape, acc)
    ring = _KVRing(ex, k, v)
    dkv_in: tuple[torch.Tensor, torch.Tensor] | None = None  # grads arriving from rank-1
    dkv_pending: Pending | None = None
    dkv_sent: tuple[torch.Tensor, ...] = ()
    for step in range(w):
        ring.start(step)
        t0 = time.perf_counter()
        kn, vn = _host(ring.kv[0], acc), _host(ring.kv[1], acc)
        dk = np.zeros(k.shape, acc)
        dv = np.zeros(v.shape, acc)
        k_ranges = shard_ranges(seq, w, (r - step) % w, layout)
        for qs, ks, qo, ko, masked in block_pairs(q_ranges, k_ranges, causal):
            dq_b, dk_b, dv_b = _block_backward(
                don[..., qs, :], qn[..., qs, :], kn[..., ks, :], vn[..., ks, :],
                on[..., qs, :], lsen[..., qs], scale=scale, causal=masked, q_offset=qo,
                k_offset=ko, seq=seq, dlse=None if dlsen is None else dlsen[..., qs])
            dq[..., qs, :] += dq_b
            dk[..., ks, :] += dk_b
            dv[..., ks, :] += dv_b
        t1 = time.perf_counter()
        if dkv_pending is not None:  # what rank-1 accumulated for the shard we now hold
            dkv_pending.wait()
            assert dkv_in is not None
            dk += from_torch(dkv_in[0])
            dv += from_torch(dkv_in[1])
        if w > 1:  # pass this shard's grads on; after the last step they reach the owner
            dkv_sent = (to_torch(dk, _torch_dtype(acc), k.device),
                        to_torch(dv, _torch_dtype(acc), v.device))
            if dkv_in is None:
                dkv_in = (_empty_like(dkv_sent[0]), _empty_like(dkv_sent[1]))
            dkv_pending = ex.start(dkv_sent, dkv_in, "dK/dV", step)
        sent = ring.finish()
        _record(stats, "backward", step, t1 - t0, time.perf_counter() - t1,
                (*sent, *dkv_sent))
    if w > 1:
        t1 = time.perf_counter()
        assert dkv_pending is not None and dkv_in is not None
        dkv_pending.wait()
        dk, dv = from_torch(dkv_in[0]), from_torch(dkv_in[1])
        _record(stats, "backward", w, 0.0, time.perf_counter() - t1, ())
    return (to_torch(dq, q.dtype, q.device), to_torch(dk, k.dtype, k.device),
            to_torch(dv, v.dtype, v.device))


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ex: Exchange,
                causal: bool, scale: float, layout: str, stats: RingStats | None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse, out_acc = _ring_forward(ex, q, k, v, causal=causal, scale=scale,
                                          layout=layout, stats=stats)
        ctx.save_for_backward(q, k, v, out_acc, lse)
        ctx.cfg = (ex, causal, scale, layout, stats)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor | None,
                 dlse: torch.Tensor | None) -> tuple[Any, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        ex, causal, scale, layout, stats = ctx.cfg
        dout = torch.zeros_like(out) if dout is None else dout.contiguous()
        dq, dk, dv = _ring_backward(ex, dout, q, k, v, out, lse, causal=causal,
                                    scale=scale, layout=layout, stats=stats,
                                    dlse=None if dlse is None else dlse.contiguous())
        return dq, dk, dv, None, None, None, None, None


# --------------------------------------------------------------------------- public API


def _validate(q: Any, k: Any, v: Any, layout: str) -> None:
    """The shared shape rule (:func:`flashmath.attention.options.check_shapes`) plus what
    the ring adds: torch tensors of a floating dtype on one device, q, k, v holding the same
    positions, and a known layout."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating dtype, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: on {t.device}, but q is on {q.device}")
    check_shapes(q, k, v)
    s, sk = q.shape[2], k.shape[2]
    if s != sk:
        raise ValueError(f"k, v: each rank holds the same positions for q, k and v; got shard "
                         f"lengths q {s}, k {sk}, v {v.shape[2]}")
    check_layout(layout)


@overload
def ring_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group: Any = ...,
    causal: Causal = ..., scale: float | None = ..., layout: str = ...,
    timeout: float | None = ..., stats: RingStats | None = ...,
    return_lse: Literal[False] = ...,
) -> torch.Tensor: ...


@overload
def ring_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group: Any = ...,
    causal: Causal = ..., scale: float | None = ..., layout: str = ...,
    timeout: float | None = ..., stats: RingStats | None = ...,
    return_lse: Literal[True],
) -> tuple[torch.Tensor, torch.Tensor]: ...


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: Any = None,
    causal: Causal = False,
    scale: float | None = None,
    layout: str = "contiguous",
    timeout: float | None = None,
    stats: RingStats | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact attention over a sequence sharded across the ranks of ``group``, differentiable.

    Parameters
    ----------
    q : (B, H, S_r, D) tensor, this rank's queries (S_r = S / W positions, see ``layout``).
    k, v : (B, H_kv, S_r, D) and (B, H_kv, S_r, Dv) tensors, this rank's keys and values for
        the same positions as ``q``; H % H_kv == 0 (GQA/MQA). float64/32/16 or bfloat16,
        on any device the backend can send (CPU with gloo, CUDA with nccl).
    group : the process group (default: the default group). When torch.distributed is not
        initialised and ``group`` is None, the "ring" has one rank (plain attention).
    causal : True (or "top_left": with Sq == Sk over the whole sequence the two alignments
        agree): each query sees the keys at global positions <= its own. Other values
        raise ValueError, as in every backend.
    scale : score scale, default 1/sqrt(D).
    layout : "contiguous" or "zigzag" (load-balanced for causal); how the sequence was cut,
        see ``shard_sequence``. Every rank must use the same layout and shard length.
    timeout : seconds to wait for any one transfer (default: the process group's timeout).
    stats : a RingStats to receive per-step compute/wait timings.
    return_lse : also return lse, this rank's rows of the merged natural-log log-sum-exp
        over the whole sequence.

    Returns
    -------
    out : (B, H, S_r, Dv) tensor in q's dtype: this rank's rows of softmax(q k^T * scale) v
        over the whole sequence. ``backward`` runs the reverse ring and returns dq, dk, dv
        for this rank's shards. A query row with no visible key gives zeros (never NaN).
    lse : (B, H, S_r), float32 (float64 for float64 input), -inf for rows with no visible
        key; only with ``return_lse``. Differentiable: gradients flow through it as well
        as through out (to train through merges of partial results).

    Raises
    ------
    RingError (a RuntimeError) when a peer fails or does not answer within ``timeout``;
    ValueError/TypeError naming the argument for bad input or shards that differ by rank.
    """
    _validate(q, k, v, layout)
    causal = check_causal(causal) is not None
    scale = float(q.shape[-1] ** -0.5 if scale is None else check_finite(scale, "scale"))
    ex: Exchange
    if group is None and not (dist.is_available() and dist.is_initialized()):
        ex = LocalExchange()
    else:
        tex = TorchExchange(group, timeout)
        if tex.world_size > 1:
            tex.check_same_shapes(q, k, v)
        ex = tex
    out, lse = _RingAttention.apply(q, k, v, ex, causal, scale, layout, stats)
    return (out, lse) if return_lse else out


def simulate_ring_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, world_size: int, *,
    causal: Causal = False, scale: float | None = None, layout: str = "contiguous",
    dout: torch.Tensor | None = None, dlse: torch.Tensor | None = None, timeout: float = 60.0,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """Run the ring in one process: ``world_size`` threads, each a rank running exactly the
    schedule of ``ring_attention`` with queues for wires. Takes the whole (B, H, S, D)
    tensors, shards them by ``layout``, and returns the whole output (and, given ``dout``,
    the whole (dq, dk, dv)), unsharded; ``dlse`` (B, H, S), with dout, is the cotangent of
    the merged lse. For tests and the lab; a real run uses processes."""
    _validate(q, k, v, layout)
    causal = check_causal(causal) is not None
    scale = float(q.shape[-1] ** -0.5 if scale is None else check_finite(scale, "scale"))
    w = world_size

    def shard(x: torch.Tensor, r: int) -> torch.Tensor:
        return shard_sequence(x, w, r, layout=layout)

    boxes = ThreadExchange.boxes_for(w)
    results: list[Any] = [None] * w
    errors: list[BaseException] = []

    def rank_main(r: int) -> None:
        try:
            ex = ThreadExchange(r, w, boxes, timeout) if w > 1 else LocalExchange()
            qs, ks, vs = shard(q, r), shard(k, r), shard(v, r)
            out, lse, out_acc = _ring_forward(ex, qs, ks, vs, causal=causal, scale=scale,
                                              layout=layout)
            grads = None
            if dout is not None:
                grads = _ring_backward(
                    ex, shard(dout, r), qs, ks, vs, out_acc, lse, causal=causal, scale=scale,
                    layout=layout,
                    dlse=None if dlse is None else shard_sequence(dlse, w, r, layout=layout,
                                                                  dim=-1))
            results[r] = (out, grads)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=rank_main, args=(r,), daemon=True) for r in range(w)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    if errors:
        raise errors[0]
    if any(t.is_alive() for t in threads):
        raise RingError(f"simulate_ring_attention: ranks still running after {timeout} s")
    out = unshard_sequence([res[0] for res in results], layout=layout)
    if dout is None:
        return out, None
    grads = tuple(unshard_sequence([res[1][i] for res in results], layout=layout)
                  for i in range(3))
    return out, grads


def replay_rank_memory(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, world_size: int, *, rank: int = 0,
    causal: Causal = False, layout: str = "contiguous", backward: bool = True,
) -> dict[str, int]:
    """Peak memory of one rank's ring work, measured in this process with tracemalloc.

    Rank ``rank`` runs the same forward (and backward) passes as ``ring_attention`` on its
    shards of the whole (B, H, S, D) tensors; its peers are replayed (the K/V it would
    receive are copied from the whole tensors; incoming dK/dV are zeros, so only the memory
    is meaningful, not the gradients). Its inputs are allocated before measuring. Returns
    {"peak_bytes": forward+backward peak, "forward_peak_bytes": ..., "shard_bytes": the
    q, k, v shards themselves}.
    """
    _validate(q, k, v, layout)
    causal = check_causal(causal) is not None
    w = world_size
    ks = [shard_sequence(k, w, r, layout=layout) for r in range(w)]
    vs = [shard_sequence(v, w, r, layout=layout) for r in range(w)]
    qs = shard_sequence(q, w, rank, layout=layout)
    dout = torch.ones((*qs.shape[:-1], v.shape[-1]), dtype=q.dtype)
    ex: Exchange = ReplayExchange(rank, w, ks, vs) if w > 1 else LocalExchange()
    scale = float(q.shape[-1] ** -0.5)
    was = tracemalloc.is_tracing()
    if not was:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        _, lse, out_acc = _ring_forward(ex, qs, ks[rank], vs[rank], causal=causal,
                                        scale=scale, layout=layout)
        fwd = tracemalloc.get_traced_memory()[1] - base
        if backward:
            _ring_backward(ex, dout, qs, ks[rank], vs[rank], out_acc, lse, causal=causal,
                           scale=scale, layout=layout)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        if not was:
            tracemalloc.stop()
    shard = sum(t.numel() * t.element_size() for t in (qs, ks[rank], vs[rank]))
    return {"peak_bytes": int(peak), "forward_peak_bytes": int(fwd), "shard_bytes": int(shard)}
