#!/usr/bin/env python3
"""Programmable attention: block sparsity, mods vs built-in options, torch flex_attention,
and the cost of create_block_mask.

At S=4096 (B=1, H=2, D=64, float32), in one process with alternating rounds:

- ``dense``: fm.flash_attention with no mask, the baseline of the ratios;
- document masking, 8 equal documents (target: <= 1/8 of dense + 10%), given as a block
  mask over ``modlib.document_mask`` and, for reference, as the equivalent bool ``mask=``;
- sliding window 512 as ``window=(511, 0)`` and as a mask_mod (target: <= 512/4096 + 10%);
- causal as ``causal=True`` and as a mask_mod (target: the same within 10%);
- torch's flex_attention on CPU for causal / document / window, compiled (torch.compile,
  in a child process given ``--compile-timeout`` seconds for its first compile) or, if that
  fails or times out, eager (it then materialises the scores): the table says which.

Rows that need ``fm.flash_attention(..., mask_mod=, score_mod=, block_mask=)`` are skipped
with a message while the kernel does not take those keywords. Last, create_block_mask at
S=32768 with 128x128 tiles (interval rules and an evaluated mod) against the time of one
causal attention call at that length (H=1).

    python benchmarks/bench_mods.py [--repeat 3] [--long 32768] [--write docs/figures/mods-cpu.md]
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import flashmath as fm
from flashmath.attention import modlib
from flashmath.attention.blockmask import create_block_mask
from flashmath.files import write_figure
from flashmath.measure.machine import describe
from flashmath.measure.timing import time_calls
from flashmath.text import number

S, H, D, DOCS, WINDOW = 4096, 2, 64, 8, 512


def _inputs(s: int, h: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal((1, h, s, D), dtype=np.float32) for _ in range(3)]


def _kernel_takes_mods() -> bool:
    return {"mask_mod", "block_mask"} <= set(inspect.signature(fm.flash_attention).parameters)


def _flashmath_rows(repeat: int) -> tuple[dict[str, list[float]], list[str]]:
    q, k, v = _inputs(S, H)
    ids = np.repeat(np.arange(DOCS), S // DOCS)
    doc_bool = (ids[:, None] == ids[None, :])[None, None]
    fns: dict[str, Any] = {
        "dense": lambda: fm.flash_attention(q, k, v),
        "document, mask= (bool array)": lambda: fm.flash_attention(q, k, v, mask=doc_bool),
        "window 512, window=": lambda: fm.flash_attention(q, k, v, window=(WINDOW - 1, 0)),
        "causal, causal=True": lambda: fm.flash_attention(q, k, v, causal=True),
    }
    notes = []
    if _kernel_takes_mods():
        doc = create_block_mask(modlib.document_mask(ids), None, None, S, S)
        win = create_block_mask(modlib.sliding_window(S, S, WINDOW - 1, 0), None, None, S, S)
        cau = create_block_mask(modlib.causal(S, S), None, None, S, S)
        kw: Any = fm.flash_attention
        fns["document, block_mask"] = lambda: kw(q, k, v, block_mask=doc)
        fns["window 512, block_mask"] = lambda: kw(q, k, v, block_mask=win)
        fns["causal, block_mask"] = lambda: kw(q, k, v, block_mask=cau)
        fns["causal, mask_mod (no block mask)"] = lambda: kw(q, k, v,
                                                             mask_mod=modlib.causal(S, S))
    else:
        notes.append("Skipped: the mask_mod/block_mask rows (fm.flash_attention does not take "
                     "mask_mod=, score_mod=, block_mask= yet).")
    return time_calls(fns, repeat), notes


def _torch_child(mode: str, repeat: int, timeout: float) -> dict[str, Any]:
    """flex_attention timings (seconds per call) for causal, document, window; in this
    process. mode: "compiled" or "eager"; a first (compiling) call longer than ``timeout``
    seconds raises TimeoutError."""
    import signal

    import torch
    import torch.nn.attention.flex_attention as fa

    fa._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG = True
    q, k, v = (torch.from_numpy(x) for x in _inputs(S, H))
    ids = torch.repeat_interleave(torch.arange(DOCS), S // DOCS)
    mods = {
        "causal": lambda b, h, qi, ki: qi >= ki,
        "document": lambda b, h, qi, ki: ids[qi] == ids[ki],
        "window 512": lambda b, h, qi, ki: (qi >= ki) & (qi - ki < WINDOW),
    }
    flex = torch.compile(fa.flex_attention) if mode == "compiled" else fa.flex_attention
    fns, first = {}, {}
    for name, mod in mods.items():
        bm = fa.create_block_mask(mod, None, None, S, S, device="cpu")
        t0 = time.perf_counter()
        signal.signal(signal.SIGALRM, _too_slow)
        signal.alarm(max(1, int(timeout)))
        with torch.no_grad():
            flex(q, k, v, block_mask=bm)
        signal.alarm(0)
        first[name] = time.perf_counter() - t0

        def call(bm: Any = bm) -> None:
            with torch.no_grad():
                flex(q, k, v, block_mask=bm)

        fns[f"torch flex_attention ({mode}), {name}"] = call
    return {"times": time_calls(fns, repeat, warmup=False), "first": first,
            "threads": torch.get_num_threads()}


def _too_slow(signum: int, frame: Any) -> None:
    raise TimeoutError("the first flex_attention call (the compile) ran out of time")


def _torch_rows(repeat: int, timeout: float) -> tuple[dict[str, list[float]], list[str]]:
    for mode in ("compiled", "eager"):
        cmd = [sys.executable, __file__, "--torch-child", mode, "--repeat", str(repeat),
               "--compile-timeout", str(timeout)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 and "TimeoutError" in done.stderr:
            note = (f"torch.compile(flex_attention): a first call (compile) took over "
                    f"{timeout:.0f} s here")
            continue
        if done.returncode != 0:
            note = (f"torch flex_attention ({mode}) failed: "
                    f"{(done.stderr.strip().splitlines() or ['?'])[-1]}")
            continue
        got = json.loads(done.stdout.strip().splitlines()[-1])
        firsts = ", ".join(f"{n} {t:.1f} s" for n, t in got["first"].items())
        what = "first call (compile)" if mode == "compiled" else "first call"
        notes = [f"torch: {mode}, {got['threads']} threads; {what}: {firsts}."]
        if mode == "eager":
            notes.insert(0, note + "; eager flex_attention materialises the scores")
        return got["times"], notes
    return {}, [note]


def _block_mask_rows(long: int) -> list[str]:
    ids = np.repeat(np.arange(DOCS), long // DOCS)
    doc = modlib.document_mask(ids)

    def evaluated(b: int, h: int, q_idx: np.ndarray, kv_idx: np.ndarray) -> np.ndarray:
        return doc(b, h, q_idx, kv_idx)  # the same mask without its tile_kind rule

    q, k, v = _inputs(long, 1)
    t0 = time.perf_counter()
    fm.flash_attention(q, k, v, causal=True)
    attention = time.perf_counter() - t0
    rows = [f"create_block_mask at S={long}, 128x128 tiles ({(long // 128) ** 2} tiles), "
            f"against one causal fm.flash_attention call (B=1, H=1, D={D}): "
            f"{attention * 1e3:.0f} ms.", "",
            "| mask_mod | classified by | ms | ratio to the attention |", "|---|---|---|---|"]
    for name, mod, how in (("causal", modlib.causal(long, long), "tile_kind (intervals)"),
                           ("document, 8 docs", doc, "tile_kind (sorted ids)"),
                           ("sliding window 512", modlib.sliding_window(long, long, 511, 0),
                            "tile_kind (intervals)"),
                           ("document, 8 docs", evaluated, "evaluating the mod")):
        times = time_calls({name: lambda mod=mod: create_block_mask(mod, None, None, long, long)},
                           3 if how.startswith("tile") else 1)
        best = min(times[name])
        rows.append(f"| {name} | {how} | {number(best * 1e3)} | {number(best / attention)} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--long", type=int, default=32768, help="S for the create_block_mask rows")
    p.add_argument("--compile-timeout", type=float, default=60.0,
                   help="seconds allowed for each first (compiling) flex_attention call")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--torch-child", choices=("compiled", "eager"), help=argparse.SUPPRESS)
    p.add_argument("--write", type=Path, help="also write the tables as Markdown here")
    args = p.parse_args(argv)
    if args.torch_child:
        print(json.dumps(_torch_child(args.torch_child, args.repeat, args.compile_timeout)))
        return 0
    times, notes = _flashmath_rows(args.repeat)
    if not args.no_torch:
        more, torch_notes = _torch_rows(args.repeat, args.compile_timeout)
        times.update(more)
        notes += torch_notes
    base = statistics.median(times["dense"])
    rows = [f"S={S}, B=1, H={H}, D={D}, float32; median of {args.repeat} alternating rounds "
            f"on {describe()}. Targets: document <= {1 / DOCS + 0.1:.3f}x dense, window <= "
            f"{WINDOW / S + 0.1:.3f}x dense, mask_mod = built-in within 10%.", "",
            "| call | median ms | ratio to dense |", "|---|---|---|"]
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append(f"| {name} | {med * 1e3:.1f} | {med / base:.3f}x |")
    rows += [""] + [f"- {n}" for n in notes] + [""] + _block_mask_rows(args.long)
    text = "\n".join(rows) + "\n"
    print(text)
    if args.write:
        write_figure(args.write, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
