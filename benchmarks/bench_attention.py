"""NumPy FlashAttention on CPU against torch SDPA: forward and forward+backward time ratios
for the benchmark shapes, and the forward's peak memory; a Markdown table naming the machine.

    python benchmarks/bench_attention.py                    # every shape, 5 alternating rounds
    python benchmarks/bench_attention.py --write docs/figures/attention-cpu.md
    python benchmarks/bench_attention.py --shapes main --repeat 7
    python benchmarks/bench_attention.py --path accurate    # time the accurate loops instead

ratio = flashmath time / torch ``scaled_dot_product_attention`` time, measured in this one
process with the two taken in turn in every round (``flashmath.measure.cpu.time_attention``,
one warm-up call each), so a burst of load hits both alike; "median" is median / median and
"best" best / best over the rounds. torch runs with ``torch.set_num_threads(cores)`` and
flashmath on the same cores (a thread per core). The shapes (float32):

    main   B=2 H=8 S=4096 D=64          the issue's target shape
    s1024  B=2 H=8 S=1024 D=64
    s16k   B=1 H=2 S=16384 D=64         (B H = 2 keeps a round near the main shape's time)
    d128   B=2 H=8 S=4096 D=128
    b1h3   B=1 H=3 S=4096 D=64          few slices: cut by query blocks into parts

Memory: tracemalloc's peak of the forward at S=4096, B=H=1 and B=2 H=8, against the float32
score matrix it never builds. For flashmath's speed command see ``flashmath bench attention``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np

from flashmath.attention import schedule
from flashmath.attention.threads import cores
from flashmath.files import write_figure
from flashmath.measure import cpu
from flashmath.measure.machine import blas_name, cpu_model, simd

SHAPES: dict[str, tuple[int, int, int, int]] = {  # name: (B, H, S, D)
    "main": (2, 8, 4096, 64),
    "s1024": (2, 8, 1024, 64),
    "s16k": (1, 2, 16384, 64),
    "d128": (2, 8, 4096, 128),
    "b1h3": (1, 3, 4096, 64),
}


def machine() -> dict[str, str]:
    """The CPU model and core count, NumPy's BLAS and the torch version."""
    try:
        import torch

        tv = f"torch {torch.__version__}" + (" (MKL)" if torch.backends.mkl.is_available() else "")
    except ImportError:
        tv = "torch not installed"
    return {"cpu": f"{cpu_model()} ({simd()})", "cores": str(cores()),
            "numpy": f"NumPy {np.__version__} ({blas_name()})", "torch": tv}


def run(shapes: list[str], repeat: int, done: Any = None) -> list[dict[str, Any]]:
    """Time every shape, causal and not; ``done(rows)`` after each row (to write as it
    goes, so that a run stopped early still leaves its finished rows)."""
    rows: list[dict[str, Any]] = []
    for name in shapes:
        b, h, s, d = SHAPES[name]
        for causal in (False, True):
            r = cpu.time_attention(b, h, s, d, causal=causal, repeat=repeat)
            r["shape"] = name
            rows.append(r)
            print(_line(r), flush=True)
            if done is not None:
                done(rows)
    return rows


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{1e3 * x:.0f}"


def _line(r: dict[str, Any]) -> str:
    return (f"| B={r['B']} H={r['H']} S={r['S']} D={r['D']} | {'yes' if r['causal'] else 'no'} | "
            f"{_ratio(r['fwd_median_ratio_time'])} | {_ratio(r['fwd_ratio_time'])} | "
            f"{_ms(r['fm_fwd_median_s'])} / {_ms(r['torch_fwd_median_s'])} | "
            f"{_ratio(r['fwdbwd_median_ratio_time'])} | {_ratio(r['fwdbwd_ratio_time'])} | "
            f"{_ms(r['fm_fwdbwd_median_s'])} / {_ms(r['torch_fwdbwd_median_s'])} |")


HEADER = ("| shape (float32) | causal | fwd ratio median | fwd ratio best | fwd ms fm / torch "
          "(median) | fwd+bwd ratio median | fwd+bwd ratio best | fwd+bwd ms fm / torch "
          "(median) |\n|---|---|---|---|---|---|---|---|")


def memory_lines() -> list[str]:
    out = []
    for b, h in ((1, 1), (2, 8)):
        for causal in (False, True):
            m = cpu.peak_memory(4096, b=b, h=h, causal=causal)
            out.append(f"| B={b} H={h} S=4096 D=64 | {'yes' if causal else 'no'} | "
                       f"{m['peak_bytes'] / 2**20:.2f} | {m['scores_bytes'] / 2**20:.0f} | "
                       f"{100 * m['peak_fraction']:.2f}% |")
    return out


def markdown(info: dict[str, str], rows: list[dict[str, Any]], mem: list[str], repeat: int,
             command: str) -> str:
    exact = {None: "the fast float32 loops these sizes take (flashmath.attention.fast)",
             False: "the accurate loops (--path accurate: float32 scores formed in float64)",
             True: "the fast float32 loops (--path fast)"}[schedule.FORCE_FAST]
    lines = [
        "# flashmath's NumPy attention against torch SDPA on CPU",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores available; {info['numpy']}; "
        f"{info['torch']} with torch.set_num_threads({info['cores']}). flashmath: "
        f"{exact}.",
        "",
        f"ratio = flashmath time / torch time, {repeat} alternating rounds in one process "
        f"after a warm-up call each; median = median / median, best = best / best. The "
        f"machine may be shared: compare ratios, not milliseconds.",
        "",
        HEADER,
        *(_line(r) for r in rows),
        "",
        "Forward peak memory (tracemalloc, out and lse included) against the float32 "
        "score matrix:",
        "",
        "| shape | causal | peak MiB | scores MiB | peak / scores |",
        "|---|---|---|---|---|",
        *mem,
        "",
        f"Regenerate: `{command}`",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    p.add_argument("--repeat", type=int, default=5, help="alternating rounds (>= 1)")
    p.add_argument("--write", metavar="PATH", help="also write the Markdown table there")
    p.add_argument("--path", choices=["auto", "fast", "accurate"], default="auto",
                   help="which tile loops to time (auto: what the call takes, the fast ones "
                        "at these sizes)")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error(f"--repeat: expected a positive count, got {args.repeat}")
    try:
        import torch

        torch.set_num_threads(cores())
    except ImportError:
        pass
    schedule.FORCE_FAST = {"auto": None, "fast": True, "accurate": False}[args.path]
    info = machine()
    print(f"{info['cpu']} ({info['cores']} cores), {info['numpy']}, {info['torch']}")
    command = "python benchmarks/bench_attention.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    total = 2 * len(args.shapes)

    def write(rows: list[dict[str, Any]], mem: list[str]) -> None:
        if args.write:
            text = markdown(info, rows, mem, args.repeat, command.strip())
            if len(rows) < total:
                text += f"\n(incomplete: {len(rows)} of {total} rows so far)\n"
            write_figure(args.write, text)

    print(HEADER, flush=True)
    rows = run(args.shapes, args.repeat, done=lambda rs: write(rs, []))
    mem = memory_lines()
    print("\n".join(mem))
    write(rows, mem)
    if args.write:
        print(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
