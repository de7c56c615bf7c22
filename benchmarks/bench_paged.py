#!/usr/bin/env python3
"""Paged vs contiguous KV cache for decoding: flash_decode's time with a block_table
(pages shuffled in memory) over the same cache laid out contiguously, in one process.

    python benchmarks/bench_paged.py [--keys 32768] [--repeat 7] [--write FILE.md]

B=1, H=8 query heads over H_kv=8 (and 2) K/V heads, D=128, one query, float32 and float16,
page sizes 16 and 256. The ratio is paged / contiguous (median of alternating rounds).
Each dtype and H_kv runs in a fresh process: glibc's allocator raises its trim and mmap
thresholds as a process frees large blocks, so a case measured after others inherits
their state (a paged decode once read 2x faster after other cases than alone).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

import flashmath as fm
from flashmath.files import write_figure
from flashmath.measure.machine import describe
from flashmath.measure.timing import time_calls


def _paged(cache: np.ndarray, page: int,
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    b, hk, s, d = cache.shape
    per = -(-s // page)
    table = rng.permutation(b * per).reshape(b, per).astype(np.int32)
    pages = np.empty((b * per, hk, page, d), cache.dtype)
    for i in range(b):
        for p in range(per):
            pages[table[i, p]] = cache[i, :, p * page : (p + 1) * page]
    return pages, table


def _case(dtype: str, hk: int, keys: int, repeat: int) -> list[tuple[int, float, float]]:
    """(page, contiguous s, paged s) medians for one dtype and H_kv, in this process."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 8, 1, 128)).astype(dtype)
    k = rng.standard_normal((1, hk, keys, 128)).astype(dtype)
    v = rng.standard_normal((1, hk, keys, 128)).astype(dtype)
    lengths = np.array([keys])
    rows = []
    for page in (16, 256):
        kp, table = _paged(k, page, np.random.default_rng(page))
        vp, _ = _paged(v, page, np.random.default_rng(page))  # the same table
        times = time_calls({
            "contiguous": lambda: fm.flash_decode(q, k, v, kv_lengths=lengths),
            "paged": lambda kp=kp, vp=vp, t=table: fm.flash_decode(
                q, kp, vp, kv_lengths=lengths, block_table=t),
        }, repeat)
        rows.append((page, statistics.median(times["contiguous"]),
                     statistics.median(times["paged"])))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keys", type=int, default=32768)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--write", type=Path)
    p.add_argument("--case", nargs=2, metavar=("DTYPE", "H_KV"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.case:  # one dtype and H_kv, in a fresh process: print its rows as JSON
        print(json.dumps(_case(args.case[0], int(args.case[1]), args.keys, args.repeat)))
        return 0
    rows = ["| dtype | H_kv | page size | contiguous ms | paged ms | paged / contiguous |",
            "|---|---|---|---|---|---|"]
    for dtype in ("float32", "float16"):
        for hk in (8, 2):
            run = subprocess.run([sys.executable, __file__, "--case", dtype, str(hk),
                                  "--keys", str(args.keys), "--repeat", str(args.repeat)],
                                 check=True, capture_output=True, text=True)
            for page, c, pg_ in json.loads(run.stdout.splitlines()[-1]):
                rows.append(f"| {dtype} | {hk} | {page} | {c * 1e3:.1f} | {pg_ * 1e3:.1f} | "
                            f"{pg_ / c:.2f}x |")
    text = (f"Cache length {args.keys}, B=1, H=8, D=128, one query; median of {args.repeat} "
            f"alternating rounds, each dtype and H_kv in a fresh process, on "
            f"{describe()}.\n\n" + "\n".join(rows) + "\n")
    print(text)
    if args.write:
        write_figure(args.write, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
