"""One forward+backward of a small transformers model on CPU: flashmath against torch SDPA.

    python benchmarks/bench_model.py                       # seq 2048, float32, 5 rounds
    python benchmarks/bench_model.py --seq 1024 --repeat 9 --write docs/figures/model-cpu.md

The model is flashmath.integrations.model_errors.small_model (a randomly initialised
2-layer Llama, hidden 64, 4 query / 2 key-value heads of 16, vocab 128; no download),
batch 1, causal, with the same weights under both attention implementations. One call is
the forward, a next-token loss and its backward through every parameter. Both run in one
process in alternating rounds (flashmath.measure.cpu.time_calls), so load on the machine
hits them alike; the ratio flashmath / sdpa is reported for the median and the best
round (> 1: flashmath slower). ``--write`` writes the Markdown table, machine named, to a
file (docs/figures/model-cpu.md for the README).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

from flashmath.files import write_figure
from flashmath.integrations.model_errors import SMALL_CONFIG, small_model
from flashmath.integrations.transformers import register
from flashmath.measure.machine import describe
from flashmath.measure.timing import time_calls
from flashmath.text import markdown_table


def step(model: torch.nn.Module, ids: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=2048, help="sequence length (2048)")
    parser.add_argument("--repeat", type=int, default=5, help="alternating rounds (5)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--write", type=Path, help="write the Markdown table to this file")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    name = register()
    models = {impl: small_model(impl, dtype).train() for impl in (name, "sdpa")}
    ids = torch.randint(0, SMALL_CONFIG["vocab_size"], (1, args.seq),
                        generator=torch.Generator().manual_seed(0))
    times = time_calls({impl: (lambda m=m: step(m, ids)) for impl, m in models.items()},
                       repeat=args.repeat)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    rows = [{"what": f"flashmath / sdpa, seq {args.seq}, {args.dtype}, fwd+bwd",
             "median": med[name] / med["sdpa"], "best": best[name] / best["sdpa"],
             "flashmath_s": med[name], "sdpa_s": med["sdpa"], "rounds": len(times[name])}]
    table = markdown_table(rows, [("small Llama on CPU", "what"), ("ratio (median)", "median"),
                                  ("ratio (best)", "best"), ("flashmath s", "flashmath_s"),
                                  ("sdpa s", "sdpa_s"), ("rounds", "rounds")])
    machine = (f"Machine: {describe()}. "
               f"Regenerate: `python benchmarks/bench_model.py --seq {args.seq} "
               f"--repeat {args.repeat} --write docs/figures/model-cpu.md`.")
    text = f"{table}\n\n{machine}\n"
    print(text)
    if args.write:
        write_figure(args.write, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
