"""`flashmath ring`: ring attention across processes, checked against one process.

    flashmath ring --world-size 4 --seq 4096 --causal          # spawns 4 ranks (gloo, loopback)
    torchrun --nproc-per-node 4 -m flashmath ring --seq 4096 --causal  # or -m flashmath.cli

What each rank runs and measures is :mod:`flashmath.distributed.demo`; this module parses
the arguments, refuses bad ones before any rank starts (one line on stderr, exit 2), and
launches the ranks: spawned on this machine (:func:`flashmath.distributed.launch.run_local`)
or, launched by torchrun (RANK, WORLD_SIZE, MASTER_ADDR, ... in the environment), joining
that rendezvous, so the same command runs across machines with torchrun's multi-node
options. Exit status: 0 every rank passed, 1 a rank failed, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from flashmath.cli import args as types
from flashmath.distributed.demo import DTYPES, DemoConfig, format_rows, run_demo_rank

__all__ = ["configure", "main"]

#: The torch.distributed backends the command accepts.
BACKENDS = ("gloo", "nccl", "mpi")






def configure(parser: argparse.ArgumentParser) -> None:
    """Add `flashmath ring`'s options."""
    parser.add_argument("--world-size", type=types.positive, default=2,
                        help="ranks to spawn on this machine (ignored under torchrun)")
    parser.add_argument("--seq", type=types.positive, default=2048, help="whole sequence length S")
    parser.add_argument("--batch", type=types.positive, default=1)
    parser.add_argument("--heads", type=types.positive, default=4, help="query heads H")
    parser.add_argument("--kv-heads", type=types.positive, default=None,
                        help="K/V heads (GQA); default H")
    parser.add_argument("--dim", type=types.positive, default=64, help="head dim D")
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--layout", choices=("contiguous", "zigzag"), default=None,
                        help="how the sequence is sharded (default: zigzag if --causal)")
    parser.add_argument("--dtype", choices=DTYPES, default="float64")
    parser.add_argument("--backend", default="gloo", choices=BACKENDS,
                        help="torch.distributed backend")
    parser.add_argument("--timeout", type=types.seconds, default=60.0,
                        help="seconds any transfer may wait before every rank raises")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="skip the single-process reference (for long sequences)")


def _check(cfg: DemoConfig, world_size: int) -> None:
    """What every rank would refuse, refused once here (ValueError naming the option)."""
    from flashmath.distributed.layouts import shard_ranges

    if cfg.kv_heads is not None and cfg.heads % cfg.kv_heads:
        raise ValueError(f"--kv-heads: {cfg.kv_heads} does not divide --heads {cfg.heads}")
    shard_ranges(cfg.seq, world_size, 0, cfg.layout)


def _under_torchrun() -> bool:
    return all(key in os.environ for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def main(args: argparse.Namespace) -> int:
    """Run the demo on every rank and print the per-rank table; the exit status."""
    layout = args.layout or ("zigzag" if args.causal else "contiguous")
    cfg = DemoConfig(seq=args.seq, batch=args.batch, heads=args.heads, kv_heads=args.kv_heads,
                     dim=args.dim, causal=args.causal, layout=layout, dtype=args.dtype,
                     seed=args.seed, check=args.check, timeout=args.timeout)
    torchrun = _under_torchrun()
    world = int(os.environ["WORLD_SIZE"]) if torchrun else args.world_size
    try:  # a clear error before any rank starts
        _check(cfg, world)
    except ValueError as exc:
        print(f"flashmath ring: error: {exc}", file=sys.stderr)
        return 2
    if torchrun:
        return _main_torchrun(cfg, args.backend)
    from flashmath.distributed.launch import run_local

    outcomes = run_local(run_demo_rank, args.world_size, cfg, backend=args.backend,
                         timeout=cfg.timeout, deadline=max(120.0, 10 * cfg.timeout))
    failed = [o for o in outcomes if not o.ok]
    if failed:
        for o in failed:
            print(o.describe(), file=sys.stderr)
        return 1
    print(format_rows([o.value for o in outcomes], cfg))
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
            print(format_rows(rows, cfg))
    finally:
        dist.destroy_process_group()
    return 0
