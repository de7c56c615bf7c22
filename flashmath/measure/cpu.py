"""`flashmath bench TARGET`: time flashmath against its peers, as ratios measured in one process.

Each target is one entry of :data:`TARGETS` (its arguments and its run function); add
``decode`` or ``triton`` the same way. Timings on a shared machine are noisy, so every
figure is the best (and the median) of ``--repeat`` rounds that alternate flashmath and
its peer, and what counts is the ratio of the two measured side by side.

``attention``
    fm.flash_attention (NumPy, CPU) against torch.nn.functional.scaled_dot_product_attention
    on CPU: forward and forward+backward times, their ratios (flashmath / torch, < 1 is
    faster), and GFLOP/s from DESIGN.md's count (forward 4 B H Sq Sk D, halved for square
    causal; backward 2.5x the forward). Also seed 003's loop (timed at a shorter length,
    where it finishes) and the forward's peak memory (tracemalloc) against the float32
    score matrix it never builds.

    flashmath bench attention                       # B=2 H=8 S=4096 D=64 float32, causal and not
    flashmath bench attention --seq 1024 2048 --causal --repeat 5
    flashmath bench attention --memory-seq 4096 8192 16384 32768

Functions the lab can call with small sizes: :func:`time_attention`, :func:`time_seed003`,
:func:`peak_memory`, :func:`attention_flops`.
"""

from __future__ import annotations

import argparse
import statistics
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from flashmath.dtypes import as_dtype

__all__ = [
    "TARGETS",
    "attention_flops",
    "configure",
    "main",
    "peak_memory",
    "seed003_forward",
    "time_attention",
    "time_calls",
    "time_seed003",
]


# --- Timing helpers ---


def time_calls(
    fns: dict[str, Callable[[], Any]], repeat: int = 3, *, budget: float | None = None,
    warmup: bool = True,
) -> dict[str, list[float]]:
    """Seconds per call of each fn, by name: one warm-up call each (unless ``warmup`` is
    False), then ``repeat`` rounds taking them in turn, so a burst of load on the machine
    hits all of them alike. With ``budget`` (seconds), rounds after the second stop once
    that long has passed since timing began: at least min(2, repeat) rounds, at most
    ``repeat``. Callers take min (best) or the median of each list."""
    if warmup:
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    for r in range(max(1, repeat)):
        if budget is not None and r >= 2 and time.perf_counter() - start >= budget:
            break
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


#: What attention_flops counts, as multiples of the forward's count.
FLOP_MODES = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}


def attention_flops(b: float, h: float, sq: float, sk: float, d: float, *, causal: bool,
                    mode: str = "fwd") -> float:
    """DESIGN.md's count, the one every benchmark uses: forward 4 B H Sq Sk D, halved for
    causal with Sq == Sk; the backward is 2.5x the forward. ``mode``: "fwd", "bwd" or
    "fwd_bwd" (forward + backward, 3.5x)."""
    if mode not in FLOP_MODES:
        raise ValueError(f"mode: expected one of {sorted(FLOP_MODES)}, got {mode!r}")
    fwd = 4.0 * b * h * sq * sk * d * (0.5 if causal and sq == sk else 1.0)
    return fwd * FLOP_MODES[mode]


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
    import flashmath as fm

    q, k, v, dout = _inputs(b, h, s, d, dtype, seed)
    tiles: dict[str, Any] = {"block_q": block_q, "block_k": block_k}
    fns: dict[str, Callable[[], Any]] = {
        "fm_fwd": lambda: fm.flash_attention(q, k, v, causal=causal, **tiles)}
    if backward:
        def fm_fwdbwd() -> None:
            out, lse = fm.flash_attention(q, k, v, causal=causal, return_lse=True, **tiles)
            fm.flash_attention_backward(dout, q, k, v, out, lse, causal=causal, **tiles)
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


# --- attention: seed 003's loop, the starting point ---


def seed003_forward(q: np.ndarray, k: np.ndarray, v: np.ndarray, tile: int,
                    causal: bool = True) -> np.ndarray:
    """Seed 003's tiled forward, loop for loop (a Python loop over rows for exp, a mask
    built per tile, no threads): kept only to be timed against. (B, H, N, D) in and out."""
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
                    for r in range(s.shape[0]):  # seed 003's per-row exp
                        if not np.isinf(m_new[r]):
                            p[r] = np.exp(s[r] - m_new[r])
                    l = l + p.sum(axis=1)
                    o = o + p @ v[b, h, j0:j0 + tile]
                    m = m_new
                out[b, h, i0:i0 + qt.shape[0]] = o / l[:, None]
    return out


def time_seed003(b: int = 2, h: int = 8, s: int = 1024, d: int = 64, *, causal: bool = False,
                 tile: int = 128, repeat: int = 1, seed: int = 0) -> dict[str, Any]:
    """Forward time of seed 003's loop, fm.flash_attention and torch SDPA at one length.

    float32 inputs (the seed's loop keeps them; its accumulators are float64). Returns
    ``seed003_fwd_s``, ``fm_fwd_s``, ``torch_fwd_s`` (None without torch) and the ratios
    ``seed003_vs_torch_ratio_time``, ``seed003_vs_fm_ratio_time``.
    """
    import flashmath as fm

    q, k, v, dout = _inputs(b, h, s, d, "float32", seed)
    fns: dict[str, Callable[[], Any]] = {
        "seed003_fwd": lambda: seed003_forward(q, k, v, tile, causal),
        "fm_fwd": lambda: fm.flash_attention(q, k, v, causal=causal),
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
    import flashmath as fm

    q, k, v, _ = _inputs(b, h, s, d, dtype, 0)
    out_bytes = b * h * s * d * q.itemsize + b * h * s * (8 if dtype == "float64" else 4)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        fm.flash_attention(q, k, v, causal=causal, block_q=block_q, block_k=block_k,
                           return_lse=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    scores = b * h * s * s * 4
    return {"B": b, "H": h, "S": s, "D": d, "dtype": dtype, "peak_bytes": peak,
            "output_bytes": out_bytes, "scratch_bytes": peak - out_bytes,
            "scores_bytes": scores, "peak_fraction": peak / scores}


# --- attention: the command ---


def _configure_attention(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seq", type=int, nargs="+", default=[4096], help="sequence lengths S")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64, help="head dim D")
    p.add_argument("--dtype", default="float32")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--causal", action="store_true", help="causal only (default: both)")
    mode.add_argument("--non-causal", action="store_true", help="non-causal only")
    p.add_argument("--repeat", type=int, default=3, help="timed rounds (best and median kept)")
    p.add_argument("--block-q", type=int, default=None)
    p.add_argument("--block-k", type=int, default=None)
    p.add_argument("--no-backward", action="store_true", help="time the forward only")
    p.add_argument("--seed003-seq", type=int, default=1024,
                   help="length at which seed 003's loop is timed (0: skip)")
    p.add_argument("--memory-seq", type=int, nargs="*", default=[4096, 8192, 16384, 32768],
                   help="lengths for the peak-memory table (B = H = 1)")


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


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
                ms = [None if r[f"{w}_{what}_s"] is None else 1e3 * r[f"{w}_{what}_s"]
                      for w in ("fm", "torch")]
                line += (f" | {_fmt(ms[0], '9.1f')} {_fmt(ms[1], '9.1f')} "
                         f"{_fmt(r[f'{what}_ratio_time'], '6.2f')} "
                         f"{_fmt(r[f'{what}_median_ratio_time'], '6.2f')} "
                         f"{_fmt(r[f'fm_{what}_gflops'], '7.1f')} "
                         f"{_fmt(r[f'torch_{what}_gflops'], '7.1f')}")
            print(line, flush=True)
    if args.seed003_seq:
        for causal in modes:
            r = time_seed003(args.batch, args.heads, args.seed003_seq, args.dim, causal=causal)
            print(f"seed 003's loop, measured at S={args.seed003_seq} causal={causal}: "
                  f"{1e3 * r['seed003_fwd_s']:.0f} ms = "
                  f"{_fmt(r['seed003_vs_torch_ratio_time'], '.1f')}x torch's time, "
                  f"{r['seed003_vs_fm_ratio_time']:.1f}x fm.flash_attention's", flush=True)
    if args.memory_seq:
        print("forward peak memory (tracemalloc), B=H=1, D=64 float32, vs the S x S float32 "
              "scores:")
        print(f"{'S':>6} {'peak MiB':>9} {'output MiB':>10} {'scratch MiB':>11} "
              f"{'scores MiB':>10} {'peak/scores':>11}")
        for s in args.memory_seq:
            m = peak_memory(s, d=args.dim)
            mib = 2.0**20
            print(f"{s:>6} {m['peak_bytes'] / mib:>9.2f} {m['output_bytes'] / mib:>10.2f} "
                  f"{m['scratch_bytes'] / mib:>11.2f} {m['scores_bytes'] / mib:>10.0f} "
                  f"{100 * m['peak_fraction']:>10.3f}%", flush=True)
        m = peak_memory(args.seq[0], b=args.batch, h=args.heads, d=args.dim)
        print(f"B={args.batch} H={args.heads} S={args.seq[0]}: peak "
              f"{m['peak_bytes'] / 2**20:.1f} MiB = {100 * m['peak_fraction']:.2f}% of the "
              f"{m['scores_bytes'] / 2**20:.0f} MiB score matrix", flush=True)
    return 0


# --- Targets and the command ---


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
    return TARGETS[args.target].run(args)
