"""`flashmath bench TARGET`: time flashmath against its peers, as ratios measured in one process.

Each target is one entry of :data:`TARGETS` (its arguments and its run function). Timings
on a shared machine are noisy, so every figure is the best (and the median) of
``--repeat`` rounds that alternate flashmath and its peer, and what counts is the ratio
of the two measured side by side.

``attention``
    fm.flash_attention (NumPy, CPU) against torch.nn.functional.scaled_dot_product_attention
    on CPU: forward and forward+backward times, their ratios (flashmath / torch, < 1 is
    faster), and GFLOP/s (:func:`flashmath.measure.flops.attention_flops`: forward
    4 B H Sq Sk D, halved for square causal; backward 2.5x the forward). Also the original
    per-row-exp loop (timed at a shorter length, where it finishes) and the forward's peak
    memory (tracemalloc) against the float32 score matrix it never builds.

    flashmath bench attention                       # B=2 H=8 S=4096 D=64 float32, causal and not
    flashmath bench attention --seq 1024 2048 --causal --repeat 5
    flashmath bench attention --memory-seq 4096 8192 16384 32768

What is measured lives in :mod:`flashmath.measure.cpu`; this module is the command only.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

from flashmath.cli import args as types
from flashmath.measure.cpu import peak_memory, time_attention, time_seed003
from flashmath.text import number

__all__ = ["TARGETS", "Target", "configure", "main"]





_DTYPES = ("float64", "float32", "float16", "bfloat16")


def _configure_attention(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seq", type=types.positive, nargs="+", default=[4096],
                   help="sequence lengths S")
    p.add_argument("--batch", type=types.positive, default=2)
    p.add_argument("--heads", type=types.positive, default=8)
    p.add_argument("--dim", type=types.positive, default=64, help="head dim D")
    p.add_argument("--dtype", default="float32", choices=_DTYPES)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--causal", action="store_true", help="causal only (default: both)")
    mode.add_argument("--non-causal", action="store_true", help="non-causal only")
    p.add_argument("--repeat", type=types.positive, default=3,
                   help="timed rounds (best and median kept)")
    p.add_argument("--block-q", type=types.positive, default=None)
    p.add_argument("--block-k", type=types.positive, default=None)
    p.add_argument("--no-backward", action="store_true", help="time the forward only")
    p.add_argument("--seed003-seq", type=types.non_negative, default=1024,
                   help="length at which the original per-row-exp loop is timed (0: skip)")
    p.add_argument("--memory-seq", type=types.positive, nargs="*",
                   default=[4096, 8192, 16384, 32768],
                   help="lengths for the peak-memory table (B = H = 1)")


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1e3 * seconds


def _run_attention(args: argparse.Namespace) -> int:
    modes = [True] if args.causal else [False] if args.non_causal else [False, True]
    bwd = not args.no_backward
    print(f"fm.flash_attention vs torch SDPA (CPU), B={args.batch} H={args.heads} "
          f"D={args.dim} {args.dtype}; {args.repeat} alternating rounds; ratio = flashmath "
          f"time / torch time, best / best and median / median")
    cols = f"{'torch ms':>9} {'ratio':>6} {'median':>6} {'fm GF/s':>7} {'th GF/s':>7}"
    head = f"{'S':>6} {'causal':>6} | {'fm fwd ms':>9} {cols}"
    if bwd:
        head += f" | {'fm f+b ms':>9} {cols}"
    print(head, flush=True)
    for s in args.seq:
        for causal in modes:
            r = time_attention(args.batch, args.heads, s, args.dim, causal=causal,
                               dtype=args.dtype, repeat=args.repeat, backward=bwd,
                               block_q=args.block_q, block_k=args.block_k)
            line = f"{s:>6} {causal!s:>6}"
            for what in ("fwd", "fwdbwd") if bwd else ("fwd",):
                line += (f" | {number(_ms(r[f'fm_{what}_s']), '9.1f')} "
                         f"{number(_ms(r[f'torch_{what}_s']), '9.1f')} "
                         f"{number(r[f'{what}_ratio_time'], '6.2f')} "
                         f"{number(r[f'{what}_median_ratio_time'], '6.2f')} "
                         f"{number(r[f'fm_{what}_gflops'], '7.1f')} "
                         f"{number(r[f'torch_{what}_gflops'], '7.1f')}")
            print(line, flush=True)
    if args.seed003_seq:
        for causal in modes:
            r = time_seed003(args.batch, args.heads, args.seed003_seq, args.dim, causal=causal)
            print(f"the original per-row-exp loop, measured at S={args.seed003_seq} "
                  f"causal={causal}: {number(_ms(r['seed003_fwd_s']), '.0f')} ms = "
                  f"{number(r['seed003_vs_torch_ratio_time'], '.1f')}x torch's time, "
                  f"{number(r['seed003_vs_fm_ratio_time'], '.1f')}x fm.flash_attention's",
                  flush=True)
    if args.memory_seq:
        _print_memory(args)
    return 0


def _print_memory(args: argparse.Namespace) -> None:
    mib = 2.0**20
    print(f"forward peak memory (tracemalloc), B=H=1, D={args.dim} float32, vs the S x S "
          "float32 scores:")
    print(f"{'S':>6} {'peak MiB':>9} {'output MiB':>10} {'scratch MiB':>11} "
          f"{'scores MiB':>10} {'peak/scores':>11}")
    for s in args.memory_seq:
        m = peak_memory(s, d=args.dim)
        print(f"{s:>6} {number(m['peak_bytes'] / mib, '9.2f')} "
              f"{number(m['output_bytes'] / mib, '10.2f')} "
              f"{number(m['scratch_bytes'] / mib, '11.2f')} "
              f"{number(m['scores_bytes'] / mib, '10.0f')} "
              f"{number(100 * m['peak_fraction'], '10.3f')}%", flush=True)
    m = peak_memory(args.seq[0], b=args.batch, h=args.heads, d=args.dim)
    print(f"B={args.batch} H={args.heads} S={args.seq[0]}: peak "
          f"{number(m['peak_bytes'] / mib, '.1f')} MiB = "
          f"{number(100 * m['peak_fraction'], '.2f')}% of the "
          f"{number(m['scores_bytes'] / mib, '.0f')} MiB score matrix", flush=True)


@dataclass(frozen=True)
class Target:
    """One `flashmath bench` target: its help line, arguments and run function."""

    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


TARGETS: dict[str, Target] = {
    "attention": Target(
        "NumPy FlashAttention (forward, forward+backward) vs torch SDPA on CPU; memory",
        _configure_attention, _run_attention),
}


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the targets as sub-commands of `flashmath bench`."""
    sub = parser.add_subparsers(dest="target", required=True, metavar="TARGET")
    for name, target in TARGETS.items():
        target.configure(sub.add_parser(name, help=target.help, description=target.help))


def main(args: argparse.Namespace) -> int:
    """Run the chosen target; its exit code."""
    return TARGETS[args.target].run(args)
