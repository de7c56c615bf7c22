"""model-attention: a small transformers model's end-to-end logit error in bfloat16 and
float16 with each attention implementation (eager, sdpa, flashmath), against the same
model in float64 with eager attention.

The model is a small randomly initialised Llama (flashmath.integrations.model_errors: 2
layers, 4 query / 2 key-value heads); the same weights run in each dtype with each
implementation, on one batch of random token ids per sequence length. What the error
measures is the whole model's rounding (norms, MLPs, matmuls) with attention as one part
of it, so the table says how much the choice of attention matters end to end.
Needs torch and transformers (``pip install 'flashmath[lab]'``); ``--quick`` skips it,
since building the models alone takes longer than the quick run's budget.
"""

from __future__ import annotations

from typing import Any

from flashmath.lab import experiment, plotting, readme
from flashmath.lab.experiment import Context, Result
from flashmath.text import markdown_table, number

NAME = "model-attention"
TITLE = "A small Llama's logit error per attention implementation, bfloat16 and float16"
SEEDS: tuple[str, ...] = ()

SEQ_LENS = (128, 256, 512, 1024, 2048)
DTYPES = ("bfloat16", "float16")


def run(ctx: Context) -> Result:
    if ctx.quick:
        raise experiment.Skipped("skipped in --quick: building and running the models takes "
                                 "longer than the quick run's budget; run `flashmath lab "
                                 "--only model-attention`")
    try:
        from flashmath.integrations import model_errors
    except ImportError as exc:
        raise experiment.Skipped(f"needs torch and transformers ({exc}); "
                                 "pip install 'flashmath[lab]'") from None
    ctx.progress("building models")
    records = model_errors.logit_errors(DTYPES, SEQ_LENS, seed=ctx.seed)
    for r in records:
        r["impl"] = "flashmath" if r["impl"] not in ("eager", "sdpa") else r["impl"]
    summary = _summary(records)
    return Result(records=records, summary=summary, figures={"logit_error": _figure(records)},
                  readme=_readme(records, summary), headline=_headline(summary))


def _summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per dtype: the most accurate implementation at the longest length, and flashmath's
    error relative to eager's there (and the median over lengths)."""
    out: dict[str, Any] = {}
    longest = max(r["seq_len"] for r in records)
    for dt in DTYPES:
        at = {r["impl"]: r["max_error"] for r in records
              if r["dtype"] == dt and r["seq_len"] == longest}
        out[f"{dt}_best_impl"] = min(at, key=lambda k: at[k])
        ratios = sorted(r["ratio_to_eager"] for r in records
                        if r["dtype"] == dt and r["impl"] == "flashmath" and r["ratio_to_eager"])
        out[f"{dt}_flashmath_over_eager_at_longest"] = at["flashmath"] / at["eager"]
        out[f"{dt}_flashmath_over_eager_median"] = ratios[len(ratios) // 2]
        out[f"{dt}_max_error_at_longest"] = at
        out[f"{dt}_spread_percent"] = 100 * (max(at.values()) / min(at.values()) - 1)
    out["longest"] = longest
    return out


def _headline(s: dict[str, Any]) -> str:
    return (f"at S={s['longest']} the most accurate attention is "
            f"{s['bfloat16_best_impl']} in bfloat16 and {s['float16_best_impl']} in float16; "
            f"flashmath's logit error is {number(s['bfloat16_flashmath_over_eager_at_longest'])}x "
            f"eager's in bfloat16 and {number(s['float16_flashmath_over_eager_at_longest'])}x "
            f"in float16")


def _figure(records: list[dict[str, Any]]) -> Any:
    fig, axes = plotting.figure(1, 2, width=10, height=4, squeeze=False)
    for ax, dt in zip(axes[0], DTYPES, strict=True):
        for impl, style in (("eager", "-o"), ("sdpa", "--s"), ("flashmath", ":^")):
            pts = [(r["seq_len"], r["max_error"]) for r in records
                   if r["dtype"] == dt and r["impl"] == impl]
            if pts:
                ax.plot(*zip(*pts, strict=True), style, label=impl)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_ylabel("max |logit - float64 eager logit|")
        ax.set_title(dt)
        ax.legend()
    return fig


def _readme(records: list[dict[str, Any]], s: dict[str, Any]) -> str:
    answers = []
    for dt in DTYPES:
        at = s[f"{dt}_max_error_at_longest"]
        answers.append(
            f"In {dt}, at S={s['longest']}: eager {number(at['eager'])}, sdpa "
            f"{number(at['sdpa'])}, flashmath {number(at['flashmath'])}; the most accurate is "
            f"{s[f'{dt}_best_impl']}. Over all lengths the median of flashmath's error over "
            f"eager's is {number(s[f'{dt}_flashmath_over_eager_median'])}x. At S="
            f"{s['longest']} the three differ by {number(s[f'{dt}_spread_percent'], '.2g')}%: "
            "so the attention's own exactness moves the logits little; the likely cause (not "
            "measured apart here) is the rounding of the narrow matmuls, norms and MLPs "
            "outside attention, which all three share.")
    method = ("Max and mean |logit error| over the batch's logits against the float64 model "
              "with eager attention (the same weights, cast). flashmath runs through "
              "flashmath.integrations.transformers (its tiled NumPy kernels on CPU).")
    return readme.render(NAME, SEEDS, _headline(s), answers,
                         [("Method", method),
                          ("All rows", markdown_table(records, [
                              ("dtype", "dtype"), ("seq_len", "seq_len"),
                              ("attention", "impl"), ("max abs logit error", "max_error"),
                              ("mean abs error", "mean_error"),
                              ("max error / eager's", "ratio_to_eager")])),
                          ("Figure", "![logit error](logit_error.png)")])
