"""NumPy FlashAttention on CPU against torch SDPA: forward and forward+backward ratios, GFLOP/s,
seed 003's loop, and the forward's peak memory.

    python benchmarks/bench_attention.py                  # B=2 H=8 S=4096 D=64 float32, both modes
    python benchmarks/bench_attention.py --seq 1024 --repeat 5 --memory-seq

A thin script over ``flashmath bench attention`` (flashmath/bench.py), which takes the same
arguments; see there for what is measured and how.
"""

from __future__ import annotations

import argparse
import sys

from flashmath.cli import bench


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench.TARGETS["attention"].configure(parser)
    args = parser.parse_args(argv)
    args.target = "attention"
    return bench.main(args)


if __name__ == "__main__":
    sys.exit(main())
