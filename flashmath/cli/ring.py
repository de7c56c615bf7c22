"""`flashmath ring`: ring attention across processes, checked against one process.

    flashmath ring --world-size 4 --seq 4096 --causal          # spawns 4 ranks (gloo, loopback)
    torchrun --nproc-per-node 4 -m flashmath.cli ring --seq 4096 --causal

Every rank builds the same seeded (B, H, S, D) inputs, keeps its shard (``--layout``), runs
``ring_attention`` forward and backward, and compares its rows of the output and its shards
of dq, dk, dv with single-process attention over the whole sequence. Printed per rank: the
peak memory of its ring work (tracemalloc: NumPy block temporaries and the ring's buffers,
inputs excluded), its peak resident memory, the time spent computing and waiting on
transfers, and the max errors. Launched by torchrun (RANK, WORLD_SIZE, MASTER_ADDR, ... in
the environment) it joins that rendezvous instead of spawning, so the same command runs
across machines with torchrun's multi-node options.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
import tracemalloc
from dataclasses import dataclass
from typing import Any

__all__ = ["DemoConfig", "configure", "main", "run_demo_rank"]

_DTYPES = ("float64", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class DemoConfig:
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


def _positive(text: str) -> int:
    """argparse type: an integer >= 1 (argparse turns the ValueError into exit 2)."""
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


_positive.__name__ = "positive integer"  # what argparse's "invalid ... value" names


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--world-size", type=_positive, default=2,
                        help="ranks to spawn on this machine (ignored under torchrun)")
    parser.add_argument("--seq", type=_positive, default=2048, help="whole sequence length S")
    parser.add_argument("--batch", type=_positive, default=1)
    parser.add_argument("--heads", type=_positive, default=4, help="query heads H")
    parser.add_argument("--kv-heads", type=_positive, default=None,
                        help="K/V heads (GQA); default H")
    parser.add_argument("--dim", type=_positive, default=64, help="head dim D")
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--layout", choices=("contiguous", "zigzag"), default=None,
                        help="how the sequence is sharded (default: zigzag if --causal)")
    parser.add_argument("--dtype", choices=_DTYPES, default="float64")
    parser.add_argument("--backend", default="gloo", help="torch.distributed backend")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds any transfer may wait before every rank raises")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="skip the single-process reference (for long sequences)")


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


def _print_table(rows: list[dict[str, Any]], cfg: DemoConfig) -> None:
    mib = 1 / 2**20
    print(f"ring attention: W={rows[0]['world_size']} S={cfg.seq} B={cfg.batch} H={cfg.heads} "
          f"H_kv={cfg.kv_heads or cfg.heads} D={cfg.dim} {cfg.dtype} causal={cfg.causal} "
          f"layout={cfg.layout}")
    cols = "rank  ring peak MiB  shard MiB  RSS peak MiB  compute s  wait s  sent MiB"
    errs = "  max|err| out / dq / dk / dv" if cfg.check else ""
    print(cols + errs)
    for r in rows:
        line = (f"{r['rank']:>4}  {r['ring_peak_bytes'] * mib:>13.2f}"
                f"  {r['shard_bytes'] * mib:>9.2f}  {r['rss_peak_bytes'] * mib:>12.1f}"
                f"  {r['compute_s']:>9.3f}  {r['wait_s']:>6.3f}"
                f"  {r['sent_bytes'] * mib:>8.2f}")
        if cfg.check:
            line += "  " + " / ".join(f"{r[f'err_{n}']:.2e}" for n in ("out", "dq", "dk", "dv"))
        print(line)


def _under_torchrun() -> bool:
    return all(key in os.environ for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def main(args: argparse.Namespace) -> int:
    layout = args.layout or ("zigzag" if args.causal else "contiguous")
    cfg = DemoConfig(seq=args.seq, batch=args.batch, heads=args.heads, kv_heads=args.kv_heads,
                     dim=args.dim, causal=args.causal, layout=layout, dtype=args.dtype,
                     seed=args.seed, check=args.check, timeout=args.timeout)
    if _under_torchrun():
        return _main_torchrun(cfg, args.backend)
    from flashmath.distributed.launch import run_local
    from flashmath.distributed.ring import shard_ranges

    try:  # a clear error before spawning
        shard_ranges(cfg.seq, args.world_size, 0, layout)
    except ValueError as exc:
        print(f"flashmath ring: error: {exc}", file=sys.stderr)
        return 2
    outcomes = run_local(run_demo_rank, args.world_size, cfg, backend=args.backend,
                         timeout=cfg.timeout, deadline=max(120.0, 10 * cfg.timeout))
    failed = [o for o in outcomes if not o.ok]
    if failed:
        for o in failed:
            print(o.describe(), file=sys.stderr)
        return 1
    _print_table([o.value for o in outcomes], cfg)
    return 0


def _main_torchrun(cfg: DemoConfig, backend: str) -> int:
    import datetime

    import torch.distributed as dist

    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=cfg.timeout))
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        row = run_demo_rank(rank, world, cfg)
        rows: list[Any] = [None] * world
        dist.all_gather_object(rows, row)
        if rank == 0:
            _print_table(rows, cfg)
    finally:
        dist.destroy_process_group()
    return 0
