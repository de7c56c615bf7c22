"""The ring attention demo: one rank's measured ring pass, checked against one process.

Every rank builds the same seeded (B, H, S, D) inputs (:class:`DemoConfig`), keeps its
shard (``layout``), runs ``ring_attention`` forward and backward, and compares its rows of
the output and its shards of dq, dk, dv with single-process attention over the whole
sequence (:func:`run_demo_rank`). Measured per rank: the peak memory of its ring work
(tracemalloc: NumPy block temporaries and the ring's buffers, inputs excluded), its peak
resident memory, the time spent computing and waiting on transfers, and the max errors.
``flashmath ring`` (:mod:`flashmath.cli.ring`) launches it; the lab's ring experiment
runs it too. torch is imported inside the functions.
"""

from __future__ import annotations

import resource
import time
import tracemalloc
from dataclasses import dataclass
from typing import Any

__all__ = ["DTYPES", "DemoConfig", "format_rows", "run_demo_rank"]

#: The dtypes the demo takes.
DTYPES = ("float64", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class DemoConfig:
    """One demo run: the whole sequence's shape, dtype and options; every rank builds the
    same seeded inputs from it. ``check``: compare with single-process attention."""

    seq: int
    batch: int = 1
    heads: int = 4
    kv_heads: int | None = None
    dim: int = 64
    causal: bool = False
    layout: str = "contiguous"
    dtype: str = "float64"
    seed: int = 0
    check: bool = True
    timeout: float = 60.0


def _inputs(cfg: DemoConfig) -> tuple[Any, ...]:
    import torch

    g = torch.Generator().manual_seed(cfg.seed)
    dt = getattr(torch, cfg.dtype)
    hk = cfg.kv_heads or cfg.heads
    shapes = [(cfg.batch, cfg.heads, cfg.seq, cfg.dim), (cfg.batch, hk, cfg.seq, cfg.dim),
              (cfg.batch, hk, cfg.seq, cfg.dim), (cfg.batch, cfg.heads, cfg.seq, cfg.dim)]
    return tuple(torch.randn(s, generator=g, dtype=torch.float64).to(dt) for s in shapes)


def _reference(q: Any, k: Any, v: Any, dout: Any, causal: bool) -> list[Any]:
    """out, dq, dk, dv of single-process attention over the whole sequence, in float64: the
    oracle (``fm.attention_reference``) while its (B, H, S, S) matrices fit in 256 MiB, the
    tiled kernels beyond."""
    import numpy as np
    import torch

    from flashmath.attention import tiled
    from flashmath.attention.reference import attention_reference, attention_reference_backward
    from flashmath.dtypes import from_torch

    q64, k64, v64, do64 = (from_torch(t).astype(np.float64) for t in (q, k, v, dout))
    b, h, s, _ = q64.shape
    if b * h * s * s * 8 <= 256 * 2**20:
        out = attention_reference(q64, k64, v64, causal=causal)
        grads = attention_reference_backward(do64, q64, k64, v64, causal=causal)
    else:
        out, lse = tiled.tiled_forward(q64, k64, v64, causal=causal)
        grads = tiled.tiled_backward(do64, q64, k64, v64, out, lse, causal=causal)
    return [torch.from_numpy(x) for x in (out, *grads)]


def run_demo_rank(rank: int, world_size: int, cfg: DemoConfig) -> dict[str, Any]:
    """One rank of the demo (process group already initialised): ring forward+backward on
    its shard, measured; errors against the single-process result when ``cfg.check``."""
    import torch

    from flashmath.distributed.ring import RingStats, ring_attention, shard_sequence

    full = _inputs(cfg)
    q, k, v, dout = (shard_sequence(t, world_size, rank, layout=cfg.layout) for t in full)
    q.requires_grad_(True)
    k.requires_grad_(True)
    v.requires_grad_(True)
    n = 2 if cfg.layout == "zigzag" else 1  # warm up (lazy imports, first-call caches) on
    warm = [t[..., :n, :].detach().clone().requires_grad_(True) for t in (q, k, v)]  # n rows
    w_out = ring_attention(*warm, causal=cfg.causal, layout=cfg.layout)
    w_out.backward(torch.ones_like(w_out))  # (a non-scalar backward imports more than .sum())
    stats = RingStats()
    tracemalloc.start()
    t0 = time.perf_counter()
    out = ring_attention(q, k, v, causal=cfg.causal, layout=cfg.layout, timeout=cfg.timeout,
                         stats=stats)
    out.backward(dout)
    wall = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    row: dict[str, Any] = {
        "rank": rank, "world_size": world_size,
        "ring_peak_bytes": int(peak),
        "shard_bytes": int(sum(t.numel() * t.element_size() for t in (q, k, v))),
        "rss_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "wall_s": wall,
        "compute_s": stats.total("compute_s"), "wait_s": stats.total("wait_s"),
        "sent_bytes": int(stats.total("sent_bytes")),
    }
    if cfg.check:
        ref = _reference(full[0], full[1], full[2], full[3], cfg.causal)
        got = (out, q.grad, k.grad, v.grad)
        for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref, strict=True):
            r_shard = shard_sequence(r, world_size, rank, layout=cfg.layout)
            err = (g.detach().double() - r_shard.double()).abs().max()
            row[f"err_{name}"] = float(err)
            row[f"max_abs_{name}"] = float(r_shard.double().abs().max())
    return row


def format_rows(rows: list[dict[str, Any]], cfg: DemoConfig) -> str:
    """The demo's per-rank table (the rows of :func:`run_demo_rank`, in rank order)."""
    mib = 1 / 2**20
    lines = [f"ring attention: W={rows[0]['world_size']} S={cfg.seq} B={cfg.batch} H={cfg.heads} "
          f"H_kv={cfg.kv_heads or cfg.heads} D={cfg.dim} {cfg.dtype} causal={cfg.causal} "
          f"layout={cfg.layout}"]
    cols = "rank  ring peak MiB  shard MiB  RSS peak MiB  compute s  wait s  sent MiB"
    errs = "  max|err| out / dq / dk / dv" if cfg.check else ""
    lines.append(cols + errs)
    for r in rows:
        line = (f"{r['rank']:>4}  {r['ring_peak_bytes'] * mib:>13.2f}"
                f"  {r['shard_bytes'] * mib:>9.2f}  {r['rss_peak_bytes'] * mib:>12.1f}"
                f"  {r['compute_s']:>9.3f}  {r['wait_s']:>6.3f}"
                f"  {r['sent_bytes'] * mib:>8.2f}")
        if cfg.check:
            line += "  " + " / ".join(f"{r[f'err_{n}']:.2e}" for n in ("out", "dq", "dk", "dv"))
        lines.append(line)
    return "\n".join(lines)
