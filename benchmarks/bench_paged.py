#!/usr/bin/env python3
"""Paged vs contiguous KV cache for decoding: flash_decode's time with a block_table
(pages shuffled in memory) over the same cache laid out contiguously, in one process.

    python benchmarks/bench_paged.py [--keys 32768] [--repeat 7] [--write FILE.md]

B=1, H=8 query heads over H_kv=8 (and 2) K/V heads, D=128, one query, float32 and float16,
page sizes 16 and 256. The ratio is paged / contiguous (median of alternating rounds).
"""

from __future__ import annotations

import argparse
import statistics
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keys", type=int, default=32768)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--write", type=Path)
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    rows = ["| dtype | H_kv | page size | contiguous ms | paged ms | paged / contiguous |",
            "|---|---|---|---|---|---|"]
    for dtype in (np.float32, np.float16):
        for hk in (8, 2):
            q = rng.standard_normal((1, 8, 1, 128)).astype(dtype)
            k = rng.standard_normal((1, hk, args.keys, 128)).astype(dtype)
            v = rng.standard_normal((1, hk, args.keys, 128)).astype(dtype)
            lengths = np.array([args.keys])
            for page in (16, 256):
                kp, table = _paged(k, page, np.random.default_rng(page))
                vp, _ = _paged(v, page, np.random.default_rng(page))  # the same table
                times = time_calls({
                    "contiguous": lambda q=q, k=k, v=v, n=lengths: fm.flash_decode(
                        q, k, v, kv_lengths=n),
                    "paged": lambda q=q, kp=kp, vp=vp, t=table, n=lengths: fm.flash_decode(
                        q, kp, vp, kv_lengths=n, block_table=t),
                }, args.repeat)
                c, pg_ = statistics.median(times["contiguous"]), statistics.median(times["paged"])
                rows.append(f"| {np.dtype(dtype).name} | {hk} | {page} | {c * 1e3:.1f} | "
                            f"{pg_ * 1e3:.1f} | {pg_ / c:.2f}x |")
    text = (f"Cache length {args.keys}, B=1, H=8, D=128, one query; median of {args.repeat} "
            f"alternating rounds on {describe()}.\n\n" + "\n".join(rows) + "\n")
    print(text)
    if args.write:
        write_figure(args.write, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
