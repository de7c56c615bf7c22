#!/usr/bin/env python3
"""TFLOP/s of flashmath's Triton FlashAttention vs torch SDPA (flash, cuDNN) on one GPU.

    python benchmarks/bench_triton.py                      # the whole grid (autotunes first)
    python benchmarks/bench_triton.py --head-dim 128 --seq 4096 --dtype float16 --causal yes

Prints 'skipped: no CUDA device' and exits 0 where there is no GPU. The grid, the FLOP
formula and the table live in flashmath/triton/bench.py.
"""

from __future__ import annotations

import sys

try:
    from flashmath.triton.bench import main
except ImportError as exc:  # torch or triton missing: no GPU path to measure here
    print(f"skipped: no CUDA device ({exc})")
    sys.exit(0)

if __name__ == "__main__":
    sys.exit(main())
