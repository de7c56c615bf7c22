"""flashmath against torch SDPA on CPU: forward and backward times, ratios, peak memory.

Functions the lab and ``flashmath bench attention`` (:mod:`flashmath.cli.bench`) call:
:func:`time_attention` (fm.flash_attention and its backward against
torch.nn.functional.scaled_dot_product_attention, side by side), :func:`time_seed003`
(the original per-row-exp tiled loop, kept only to be timed against) and
:func:`peak_memory` (the forward's tracemalloc peak against the score matrix it never
builds). Every figure is the best (and the median) of ``repeat`` rounds that alternate
flashmath and its peer (:func:`flashmath.measure.timing.time_calls`); what counts is the
ratio of the two measured side by side. GFLOP/s use :func:`flashmath.measure.flops.attention_flops`.
torch is imported lazily and is optional (its entries are then None).
"""

from __future__ import annotations

import statistics
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np

from flashmath.attention.tiled import flash_attention, flash_attention_backward
from flashmath.dtypes import as_dtype
from flashmath.measure.flops import attention_flops
from flashmath.measure.timing import time_calls

__all__ = [
    "peak_memory",
    "seed003_forward",
    "time_attention",
    "time_seed003",
]


def _inputs(b: int, h: int, s: int, d: int, dtype: Any, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((b, h, s, d), dtype=np.float32).astype(as_dtype(dtype))
            for _ in range(4)]


# --- attention: flashmath vs torch SDPA ---


def time_attention(
    b: int = 2, h: int = 8, s: int = 4096, d: int = 64, *, causal: bool = False,
    dtype: str = "float32", repeat: int = 3, backward: bool = True, torch: bool = True,
    block_q: int | None = None, block_k: int | None = None, seed: int = 0,
) -> dict[str, Any]:
    """Time fm.flash_attention (and its backward) against torch SDPA on CPU, side by side.

    Returns a JSON-ready dict: the shape and options; ``fm_fwd_s`` / ``torch_fwd_s`` (best
    of ``repeat``), ``*_median_s``; ``fwd_ratio_time`` = fm / torch (best / best) and
    ``fwd_median_ratio_time``; ``*_fwd_gflops``; the same with ``fwdbwd`` when
    ``backward``. torch entries are None when torch is not importable or ``torch=False``.
    """
    q, k, v, dout = _inputs(b, h, s, d, dtype, seed)
    tiles: dict[str, Any] = {"block_q": block_q, "block_k": block_k}
    fns: dict[str, Callable[[], Any]] = {
        "fm_fwd": lambda: flash_attention(q, k, v, causal=causal, **tiles)}
    if backward:
        def fm_fwdbwd() -> None:
            out, lse = flash_attention(q, k, v, causal=causal, return_lse=True, **tiles)
            flash_attention_backward(dout, q, k, v, out, lse, causal=causal, **tiles)
        fns["fm_fwdbwd"] = fm_fwdbwd
    tt = _torch() if torch else None
    if tt is not None:
        fns |= _torch_fns(tt, q, k, v, dout, causal=causal, backward=backward)
    times = time_calls(fns, repeat)
    rec: dict[str, Any] = {"B": b, "H": h, "S": s, "D": d, "causal": causal, "dtype": dtype,
                           "repeat": repeat, "block_q": block_q, "block_k": block_k}
    for what in ("fwd", "fwdbwd") if backward else ("fwd",):
        flops = attention_flops(b, h, s, s, d, causal=causal,
                                mode="fwd_bwd" if what == "fwdbwd" else "fwd")
        for who in ("fm", "torch"):
            ts = times.get(f"{who}_{what}")
            rec[f"{who}_{what}_s"] = min(ts) if ts else None
            rec[f"{who}_{what}_median_s"] = statistics.median(ts) if ts else None
            rec[f"{who}_{what}_gflops"] = flops / min(ts) / 1e9 if ts else None
        fm_t, torch_t = times[f"fm_{what}"], times.get(f"torch_{what}")
        rec[f"{what}_ratio_time"] = min(fm_t) / min(torch_t) if torch_t else None
        rec[f"{what}_median_ratio_time"] = (
            statistics.median(fm_t) / statistics.median(torch_t) if torch_t else None)
    return rec


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        return None
    return torch


def _torch_fns(torch: Any, q: np.ndarray, k: np.ndarray, v: np.ndarray, dout: np.ndarray, *,
               causal: bool, backward: bool) -> dict[str, Callable[[], Any]]:
    sdpa = torch.nn.functional.scaled_dot_product_attention
    tq, tk, tv, tdo = (torch.from_numpy(np.asarray(x, np.float32)) for x in (q, k, v, dout))
    fns: dict[str, Callable[[], Any]] = {
        "torch_fwd": lambda: sdpa(tq, tk, tv, is_causal=causal)}
    if backward:
        def torch_fwdbwd() -> None:
            xs = [x.detach().requires_grad_() for x in (tq, tk, tv)]
            sdpa(*xs, is_causal=causal).backward(tdo)
        fns["torch_fwdbwd"] = torch_fwdbwd
    return fns


# --- attention: the original loop, the starting point ---


def seed003_forward(q: np.ndarray, k: np.ndarray, v: np.ndarray, tile: int,
                    causal: bool = True) -> np.ndarray:
    """The original tiled forward, loop for loop (a Python loop over rows for exp, a mask
    built per tile, no threads): kept only to be timed against. (B, H, N, D) in and out;
    ``tile`` rows and keys per tile, causal bottom-right (N == N)."""
    b_, h_, n, d = q.shape
    scale = 1.0 / np.sqrt(d)
    out = np.zeros_like(q)
    for b in range(b_):
        for h in range(h_):
            for i0 in range(0, n, tile):
                qt = q[b, h, i0:i0 + tile]
                m = np.full(qt.shape[0], -np.inf)
                l = np.zeros(qt.shape[0])
                o = np.zeros((qt.shape[0], d))
                for j0 in range(0, n, tile):
                    if causal and j0 >= i0 + qt.shape[0]:
                        continue
                    s = qt @ k[b, h, j0:j0 + tile].T * scale
                    if causal:
                        rows = np.arange(i0, i0 + qt.shape[0])[:, None]
                        s = np.where(np.arange(j0, j0 + s.shape[1])[None, :] > rows, -np.inf, s)
                    m_new = np.maximum(m, s.max(axis=1))
                    corr = np.ones_like(m)
                    live = ~(np.isneginf(m) & np.isneginf(m_new))
                    corr[live] = np.exp(m[live] - m_new[live])
                    o, l = o * corr[:, None], l * corr
                    p = np.zeros_like(s)
                    for r in range(s.shape[0]):  # the original per-row exp
                        if not np.isinf(m_new[r]):
                            p[r] = np.exp(s[r] - m_new[r])
                    l = l + p.sum(axis=1)
                    o = o + p @ v[b, h, j0:j0 + tile]
                    m = m_new
                out[b, h, i0:i0 + qt.shape[0]] = o / l[:, None]
    return out


def time_seed003(b: int = 2, h: int = 8, s: int = 1024, d: int = 64, *, causal: bool = False,
                 tile: int = 128, repeat: int = 1, seed: int = 0) -> dict[str, Any]:
    """Forward time of the original loop (:func:`seed003_forward`), fm.flash_attention and
    torch SDPA at one length.

    float32 inputs (the original loop keeps them; its accumulators are float64). Returns
    ``seed003_fwd_s``, ``fm_fwd_s``, ``torch_fwd_s`` (None without torch) and the ratios
    ``seed003_vs_torch_ratio_time``, ``seed003_vs_fm_ratio_time``.
    """
    q, k, v, dout = _inputs(b, h, s, d, "float32", seed)
    fns: dict[str, Callable[[], Any]] = {
        "seed003_fwd": lambda: seed003_forward(q, k, v, tile, causal),
        "fm_fwd": lambda: flash_attention(q, k, v, causal=causal),
    }
    tt = _torch()
    if tt is not None:
        fns["torch_fwd"] = _torch_fns(tt, q, k, v, dout, causal=causal, backward=False)["torch_fwd"]
    times = {name: min(ts) for name, ts in time_calls(fns, repeat).items()}
    torch_t = times.get("torch_fwd")
    return {
        "B": b, "H": h, "S": s, "D": d, "causal": causal, "tile": tile,
        "seed003_fwd_s": times["seed003_fwd"], "fm_fwd_s": times["fm_fwd"],
        "torch_fwd_s": torch_t,
        "seed003_vs_torch_ratio_time": times["seed003_fwd"] / torch_t if torch_t else None,
        "seed003_vs_fm_ratio_time": times["seed003_fwd"] / times["fm_fwd"],
    }


# --- attention: memory ---


def peak_memory(s: int, *, b: int = 1, h: int = 1, d: int = 64, causal: bool = False,
                dtype: str = "float32", block_q: int | None = None,
                block_k: int | None = None) -> dict[str, Any]:
    """tracemalloc's peak while fm.flash_attention runs (inputs allocated before, excluded).

    Returns ``peak_bytes`` (everything the forward allocated, its output included),
    ``output_bytes`` (out and lse), ``scratch_bytes`` (peak - output), ``scores_bytes``
    (B H S S * 4, the float32 score matrix a standard forward would build) and
    ``peak_fraction`` = peak / scores.
    """
    q, k, v, _ = _inputs(b, h, s, d, dtype, 0)
    out_bytes = b * h * s * d * q.itemsize + b * h * s * (8 if dtype == "float64" else 4)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        flash_attention(q, k, v, causal=causal, block_q=block_q, block_k=block_k,
                           return_lse=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    scores = b * h * s * s * 4
    return {"B": b, "H": h, "S": s, "D": d, "dtype": dtype, "peak_bytes": peak,
            "output_bytes": out_bytes, "scratch_bytes": peak - out_bytes,
            "scores_bytes": scores, "peak_fraction": peak / scores}
