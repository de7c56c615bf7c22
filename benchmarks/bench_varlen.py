#!/usr/bin/env python3
"""Packed variable-length attention vs the padded API on the same tokens.

Sequence lengths drawn from 64..4096 summing to 16k tokens (H=8, D=64, float32, causal):
``varlen`` (flash_attention_varlen on the packed tokens), ``padded, no waste`` (the padded
API on each sequence alone, B=1: the same tokens, no padding), and ``padded batch``
(one call on the batch padded to the longest sequence, with q_lengths/kv_lengths, so the
padding's tiles are skipped but the arrays are padded), and ``padded, waste computed``
(the same padded batch without lengths: every padded pair is computed, what a padded
API without lengths costs). Times alternate in one process; ratios are to ``padded, no
waste``.

    python benchmarks/bench_varlen.py [--repeat 5] [--write docs/figures/varlen-cpu.md]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
from pathlib import Path

import numpy as np

import flashmath as fm
from flashmath.files import write_figure
from flashmath.measure.machine import describe
from flashmath.measure.timing import time_calls


def lengths(total: int, rng: np.random.Generator) -> list[int]:
    out: list[int] = []
    while sum(out) < total:
        out.append(int(min(rng.integers(64, 4097), total - sum(out))))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--write", type=Path, help="also write the table as Markdown here")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    lens = lengths(args.tokens, rng)
    h, d = 8, 64
    q, k, v = (rng.standard_normal((args.tokens, h, d), dtype=np.float32) for _ in range(3))
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    per_seq = [tuple(x[a:b].transpose(1, 0, 2)[None].copy() for x in (q, k, v))
               for a, b in itertools.pairwise(cu)]
    longest = max(lens)
    pad = np.zeros((len(lens), h, longest, d), np.float32)
    pq, pk, pv = pad.copy(), pad.copy(), pad.copy()
    for i, (a, b) in enumerate(itertools.pairwise(cu)):
        for dst, src in ((pq, q), (pk, k), (pv, v)):
            dst[i, :, : b - a] = src[a:b].transpose(1, 0, 2)
    ls = np.array(lens)
    fns = {
        "varlen": lambda: fm.flash_attention_varlen(q, k, v, cu, cu, causal=True),
        "padded, no waste": lambda: [fm.flash_attention(*s, causal=True) for s in per_seq],
        "padded batch": lambda: fm.flash_attention(pq, pk, pv, causal=True, q_lengths=ls,
                                                   kv_lengths=ls),
        "padded, waste computed": lambda: fm.flash_attention(pq, pk, pv, causal=True),
    }
    times = time_calls(fns, args.repeat)
    base = statistics.median(times["padded, no waste"])
    rows = [f"Sequence lengths {sorted(lens)} ({args.tokens} tokens), H={h}, D={d}, float32, "
            f"causal; median of {args.repeat} alternating rounds on {describe()}.", "",
            "| call | median ms | best ms | ratio to padded, no waste (median) |",
            "|---|---|---|---|"]
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append(f"| {name} | {med * 1e3:.1f} | {min(ts) * 1e3:.1f} | {med / base:.2f}x |")
    text = "\n".join(rows) + "\n"
    print(text)
    if args.write:
        write_figure(args.write, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
