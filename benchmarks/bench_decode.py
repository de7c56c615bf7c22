"""Split-KV decoding on CPU: fm.flash_decode vs one fm.flash_attention call, Sq = 1.

    python benchmarks/bench_decode.py            # Sk up to 262144 (about a minute)
    python benchmarks/bench_decode.py --quick    # Sk up to 16384

For each shape (B, H, H_kv, D = 64; float32 unless --dtype) and cache length Sk (every entry's cache
full), prints the time of ``fm.flash_attention(q, k, v, kv_lengths=...)`` (the tiled
kernel, parallel over (batch, head) slices) and of ``fm.flash_decode`` with num_splits
1, 2, 4, 8 and the default (None: ``choose_num_splits``), as ratios to flash_attention's
time (< 1: faster). It shows where splitting pays on this machine's cores: when the
(batch, K/V head) slices are fewer than the cores and the cache is long. num_splits=1
isolates the other gain, folding the query heads of a GQA/MQA group into one K/V head
(float64 and the narrow dtypes; float32 does not fold, see flashmath.attention.decode).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import numpy as np

import flashmath as fm
from flashmath.attention.decode import choose_num_splits
from flashmath.attention.threads import cores
from flashmath.measure.timing import time_calls

SHAPES = [  # (B, H, H_kv): one head; MQA; GQA; many heads
    (1, 1, 1),
    (1, 8, 1),
    (1, 32, 8),
    (4, 8, 8),
]
SPLITS: list[int | None] = [1, 2, 4, 8, None]


def best_of(fn: Callable[[], Any], *, budget: float = 0.6, max_reps: int = 7) -> float:
    """The minimum of repeated timings (at least 2; more while within ``budget`` seconds)."""
    return min(time_calls({"fn": fn}, max_reps, budget=budget, warmup=False)["fn"])


def time_case(q: np.ndarray, k: np.ndarray, v: np.ndarray,
              lens: np.ndarray) -> tuple[float, list[float]]:
    """(flash_attention's time, flash_decode's time for each of SPLITS), in seconds."""
    base = best_of(lambda: fm.flash_attention(q, k, v, kv_lengths=lens))
    return base, [best_of(lambda n=n: fm.flash_decode(q, k, v, kv_lengths=lens, num_splits=n))
                  for n in SPLITS]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dtype", default="float32", help="float32 (default), float16, ...")
    args = parser.parse_args(argv)
    dt = fm.dtypes.as_dtype(args.dtype)
    lengths = [4096, 16384] if args.quick else [4096, 16384, 65536, 262144]
    rng = np.random.default_rng(0)
    d = 64
    print(f"cores: {cores()}; D={d}, {args.dtype}, Sq=1; entries: time / flash_attention's time")
    head = "  ".join(f"{'auto' if n is None else f'n={n}':>7}" for n in SPLITS)
    print(f"{'B':>2} {'H':>3} {'Hkv':>3} {'Sk':>7} {'flash ms':>9}  {head}  auto n")
    for b, h, hk in SHAPES:
        for sk in lengths:
            if b * hk * sk * d * dt.itemsize * 2 > 2**31:  # keep K + V under 2 GiB
                continue
            q = rng.standard_normal((b, h, 1, d), dtype=np.float32).astype(dt)
            k = rng.standard_normal((b, hk, sk, d), dtype=np.float32).astype(dt)
            v = rng.standard_normal((b, hk, sk, d), dtype=np.float32).astype(dt)
            base, times = time_case(q, k, v, np.full(b, sk))
            ratios = [t / base for t in times]
            auto = choose_num_splits(b * hk, sk)
            cells = "  ".join(f"{r:>7.2f}" for r in ratios)
            print(f"{b:>2} {h:>3} {hk:>3} {sk:>7} {base * 1e3:>9.2f}  {cells}  {auto:>6}",
                  flush=True)


if __name__ == "__main__":
    main()
