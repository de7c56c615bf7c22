"""sdpa-benchmark: flashmath's Triton FlashAttention against torch SDPA, in TFLOP/s (seed 002, §5).

Seed 002's optional section times torch's scaled_dot_product_attention on a GPU. Here the
same run times flashmath.triton.flash_attention beside SDPA's flash and cuDNN backends,
forward, backward and both, over flashmath.triton.bench's grid (``quick``: fewer lengths).
Without a CUDA device it raises ``Skipped`` at once with the reason ("no CUDA device ..."),
so the run marks it *skipped* and report.md says why.
"""

from __future__ import annotations

from typing import Any

from flashmath.lab import experiment, plotting, readme
from flashmath.lab.experiment import Context, Result
from flashmath.measure.gpu import SKIPPED  # what the GPU benchmarks say without a GPU

NAME = "sdpa-benchmark"
TITLE = "flashmath.triton vs torch SDPA (flash, cuDNN): TFLOP/s forward and backward on a GPU"
SEEDS = ("002",)
TIMED = True  # it times kernels: the runner runs it alone
PRELOAD = ("torch",)  # imported ahead, while the untimed experiments run


def _skip_reason() -> str | None:
    """Why the benchmark cannot run here, or None."""
    try:
        import torch
    except ImportError:
        return f"{SKIPPED} (torch is not installed: pip install 'flashmath[gpu]')"
    if not torch.cuda.is_available():
        return SKIPPED
    try:
        import triton  # noqa: F401
    except ImportError:
        return "skipped: triton is not installed (pip install 'flashmath[gpu]')"
    return None


def run(ctx: Context) -> Result:
    reason = _skip_reason()
    if reason is not None:
        raise experiment.Skipped(f"{reason}; nothing was measured. Run `flashmath lab --only "
                      "sdpa-benchmark` (or `python benchmarks/bench_triton.py`) on a machine "
                      "with a CUDA GPU and `pip install 'flashmath[gpu]'`")
    import torch

    from flashmath.triton import bench

    grid = bench.shapes(seq_lens=(1024, 4096) if ctx.quick else bench.SEQ_LENS,
                        dtypes=("float16",) if ctx.quick else bench.DTYPES)
    records = bench.run(grid, progress=ctx.progress)
    summary = _summary(records)
    summary["device"] = torch.cuda.get_device_name()
    return Result(records=records, summary=summary, figures={"tflops": _figure(records)},
                  readme=_readme(records, summary), headline=_headline(summary))


def _summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per mode: the worst (largest) time ratio flashmath / peer for each peer (the target
    is <= 1 on every row) and the best flashmath TFLOP/s."""
    out: dict[str, Any] = {"status": "measured", "rows": len(records)}
    for mode in _modes(records):
        rows = [r for r in records if r["mode"] == mode]
        for peer in ("flash", "cudnn"):
            ratios = [r[f"{peer}_ratio_time"] for r in rows if r.get(f"{peer}_ratio_time")]
            out[f"{mode}_worst_vs_{peer}_ratio_time"] = max(ratios) if ratios else None
        best = [r["flashmath_tflops"] for r in rows if r.get("flashmath_tflops")]
        out[f"{mode}_best_flashmath_tflops"] = max(best) if best else None
    return out


def _headline(summary: dict[str, Any]) -> str:
    worst = [summary.get(f"{m}_worst_vs_flash_ratio_time") for m in ("fwd", "bwd")]
    if None in worst:
        return f"flashmath.triton vs SDPA on {summary['device']}"
    return (f"flashmath.triton vs SDPA-flash on {summary['device']}: worst ratio forward "
            f"{worst[0]:.2f}x, backward {worst[1]:.2f}x (target <= 1.00x)")


def _modes(records: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r["mode"] for r in records))


def _figure(records: list[dict[str, Any]]) -> Any:
    """TFLOP/s against S, one panel per mode: flashmath solid, SDPA-flash dotted."""
    modes = _modes(records)
    fig, axes = plotting.figure(1, len(modes), width=5 * len(modes), height=4, squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        rows = [r for r in records if r["mode"] == mode]
        for key in sorted({(r["dtype"], r["head_dim"], r["causal"]) for r in rows}):
            sel = [r for r in rows if (r["dtype"], r["head_dim"], r["causal"]) == key]
            label = f"{key[0]} D={key[1]}{' causal' if key[2] else ''}"
            for impl, style in (("flashmath", "-o"), ("sdpa_flash", ":x")):
                pts = [(r["seq"], r[f"{impl}_tflops"]) for r in sel if r.get(f"{impl}_tflops")]
                if pts:
                    ax.plot(*zip(*pts, strict=True), style, label=f"{impl} {label}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length S (B * S = 16k tokens)")
        ax.set_ylabel("TFLOP/s")
        ax.set_title(mode)
    axes[0][0].legend(fontsize=6)
    return fig


def _readme(records: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    from flashmath.triton import bench

    lines = []
    for mode in _modes(records):
        for peer in ("flash", "cudnn"):
            worst = summary.get(f"{mode}_worst_vs_{peer}_ratio_time")
            if worst is not None:
                verdict = "meets" if worst <= 1.0 else "misses"
                lines.append(f"- {mode}: worst ratio to SDPA-{peer} {worst:.2f}x "
                             f"({verdict} the 1.0x target)")
        best = summary.get(f"{mode}_best_flashmath_tflops")
        if best is not None:
            lines.append(f"- {mode}: best flashmath {best:.0f} TFLOP/s")
    answer = [f"Measured on {summary['device']}, beside flashmath.triton's own kernel, "
              "forward, backward and both, over a grid of lengths (the seed's single float16 "
              "causal shape is one row of it):", "", *lines]
    method = (f"B * S = {bench.TOKENS} tokens, H * D = {bench.HIDDEN}; FLOPs: forward "
              "4*B*H*S^2*D (halved when causal), backward 2.5x. A ratio is flashmath's time over "
              "SDPA's: below 1.00x flashmath is faster. The target is at most 1.00x on every row.")
    return readme.render(NAME, SEEDS, _headline(summary), [answer],
                         [("Method", method), ("All rows", bench.format_table(records)),
                          ("Figure", "![tflops](tflops.png)")])
