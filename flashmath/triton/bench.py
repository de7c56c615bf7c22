"""TFLOP/s of flashmath.triton against torch SDPA (flash and cuDNN backends), one CUDA device.

The grid (issue 6): B * S = 16k tokens, H * D = 2048, D in {64, 128}, S in 512 .. 16384,
causal and not, float16 and bfloat16; forward, backward and both. FLOPs from
:func:`flashmath.measure.flops.attention_flops`: forward 4 * B * H * Sq * Sk * D (halved
for square causal), backward 2.5x the forward.

Every implementation runs in the same process on the same tensors; a row's
``<peer>_ratio_time`` is flashmath's time over the peer's (below 1: flashmath is faster),
the direction of :func:`flashmath.measure.cpu.time_attention`'s ``*_ratio_time``. A backend torch
cannot run for a shape is recorded as unavailable, not as zero.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from flashmath.measure.flops import attention_flops
from flashmath.measure.gpu import SKIPPED, cuda_available
from flashmath.text import Column, markdown_table, number

__all__ = [
    "DTYPES",
    "HEAD_DIMS",
    "HIDDEN",
    "IMPLS",
    "MODES",
    "SEQ_LENS",
    "SKIPPED",
    "TOKENS",
    "Shape",
    "attention_flops",
    "cuda_available",
    "format_table",
    "main",
    "run",
    "shapes",
]

TOKENS = 16 * 1024  # B * S
HIDDEN = 2048  # H * D
HEAD_DIMS = (64, 128)
SEQ_LENS = (512, 1024, 2048, 4096, 8192, 16384)
DTYPES = ("float16", "bfloat16")
MODES = ("fwd", "bwd", "fwd_bwd")
#: flashmath first; the peers are torch SDPA pinned to one backend each.
IMPLS = ("flashmath", "sdpa_flash", "sdpa_cudnn")


@dataclass(frozen=True)
class Shape:
    """One benchmark problem: q, k, v of shape (batch, heads, seq, head_dim)."""

    batch: int
    heads: int
    seq: int
    head_dim: int
    causal: bool
    dtype: str


def shapes(*, head_dims: Sequence[int] = HEAD_DIMS, seq_lens: Sequence[int] = SEQ_LENS,
           dtypes: Sequence[str] = DTYPES, causal: Sequence[bool] = (False, True)) -> list[Shape]:
    """The grid at B * S = TOKENS and H * D = HIDDEN."""
    return [Shape(TOKENS // s, HIDDEN // d, s, d, c, dt)
            for dt in dtypes for d in head_dims for c in causal for s in seq_lens]


def _impl(name: str) -> Callable[[Any, Any, Any, bool], Any]:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if name == "flashmath":
        from flashmath.triton import flash_attention

        return lambda q, k, v, causal: flash_attention(q, k, v, causal=causal)
    backend = {"sdpa_flash": SDPBackend.FLASH_ATTENTION,
               "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION}[name]

    def sdpa(q: Any, k: Any, v: Any, causal: bool) -> Any:
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return sdpa


def _time_ms(impl: Callable[..., Any], shape: Shape, mode: str, tensors: tuple[Any, ...]) -> float:
    """Median milliseconds of one call (triton.testing.do_bench with return_mode="median",
    its default is the mean: warm-up, L2 flushed)."""
    import torch
    from triton.testing import do_bench

    q, k, v, dout = tensors
    if mode == "fwd":
        with torch.no_grad():
            return float(do_bench(lambda: impl(q, k, v, shape.causal), return_mode="median"))
    if mode == "bwd":
        out = impl(q, k, v, shape.causal)
        return float(do_bench(
            lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True),
            return_mode="median"))
    return float(do_bench(
        lambda: torch.autograd.grad(impl(q, k, v, shape.causal), (q, k, v), dout),
        return_mode="median"))


def run(grid: Sequence[Shape], *, modes: Sequence[str] = MODES, impls: Sequence[str] = IMPLS,
        progress: Callable[[str], None] = lambda _msg: None, device: str = "cuda",
        ) -> list[dict[str, Any]]:
    """One record per (shape, mode): time and TFLOP/s of each implementation, and ratios.

    Keys: the Shape's fields, ``mode``, ``flops``, ``<impl>_ms``, ``<impl>_tflops`` (None where
    the backend cannot run the shape, with ``<impl>_error``) and ``<peer>_ratio_time``,
    flashmath's time over the peer's (below 1 flashmath is faster; as in flashmath.measure.cpu).
    """
    import torch

    fns = {name: _impl(name) for name in impls}
    records = []
    for shape in grid:
        dtype = getattr(torch, shape.dtype)
        gen = torch.Generator(device=device).manual_seed(0)
        dims = (shape.batch, shape.heads, shape.seq, shape.head_dim)
        q, k, v, dout = (torch.randn(dims, device=device, dtype=dtype, generator=gen)
                         for _ in range(4))
        tensors = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), dout)
        for mode in modes:
            progress(f"{shape.dtype} D={shape.head_dim} S={shape.seq} "
                     f"{'causal' if shape.causal else 'full'} {mode}")
            rec: dict[str, Any] = {**asdict(shape), "mode": mode}
            rec["flops"] = attention_flops(shape.batch, shape.heads, shape.seq, shape.seq,
                                           shape.head_dim, causal=shape.causal, mode=mode)
            for name, fn in fns.items():
                try:
                    ms = _time_ms(fn, shape, mode, tensors)
                except RuntimeError as exc:  # e.g. a backend that does not take this shape
                    rec[f"{name}_ms"] = rec[f"{name}_tflops"] = None
                    rec[f"{name}_error"] = str(exc).splitlines()[0][:200]
                    continue
                rec[f"{name}_ms"] = ms
                rec[f"{name}_tflops"] = rec["flops"] / (ms * 1e-3) / 1e12
            for name in impls[1:]:
                ours, theirs = rec.get("flashmath_ms"), rec.get(f"{name}_ms")
                peer = name.removeprefix("sdpa_")
                rec[f"{peer}_ratio_time"] = ours / theirs if ours and theirs else None
            records.append(rec)
    return records


def format_table(records: Sequence[dict[str, Any]], impls: Sequence[str] = IMPLS) -> str:
    """A Markdown table: TFLOP/s per implementation and, per peer, flashmath's time over
    the peer's (column "time / <peer>"; below 1.00x flashmath is faster). A backend that
    could not run a shape reads as :data:`flashmath.text.MISSING`."""
    peers = [name.removeprefix("sdpa_") for name in impls[1:]]

    def num(key: str, fmt: str, suffix: str = "") -> Callable[[Mapping[str, Any]], str]:
        return lambda r: number(r.get(key), fmt) + ("" if r.get(key) is None else suffix)

    columns: list[Column] = [("dtype", "dtype"), ("D", "head_dim"), ("S", "seq"),
                             ("B", "batch"), ("H", "heads"), ("causal", "causal"),
                             ("mode", "mode")]
    columns += [(f"{name} TFLOP/s", num(f"{name}_tflops", ".1f")) for name in impls]
    columns += [(f"time / {p}", num(f"{p}_ratio_time", ".2f", "x")) for p in peers]
    return markdown_table(records, columns)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table (``benchmarks/bench_triton.py``); 'skipped: no CUDA device' without one."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dim", type=int, nargs="+", default=list(HEAD_DIMS))
    parser.add_argument("--seq", type=int, nargs="+", default=list(SEQ_LENS))
    parser.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--mode", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--causal", choices=("both", "yes", "no"), default="both")
    args = parser.parse_args(argv)
    if not cuda_available():
        print(SKIPPED)
        return 0
    causal = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    grid = shapes(head_dims=args.head_dim, seq_lens=args.seq, dtypes=args.dtype, causal=causal)
    import torch

    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    records = run(grid, modes=args.mode, progress=lambda msg: print("  ..", msg, flush=True))
    print(format_table(records))
    return 0
