"""Seed 004: where exp overflows in every dtype, where naive softmax breaks, how often it does.

Three measurements, each from flashmath's own functions:

1. Thresholds: ``fm.overflow_threshold`` / ``fm.underflow_threshold`` (bisection over the
   dtype's values with exp in the dtype) against the closed forms ``log(finfo.max)`` and
   ``log(smallest subnormal)``, for every dtype in ``flashmath.dtypes.DTYPES``; each found
   threshold is verified: exp of it is finite (positive), exp of the next value is not.
2. Breaking point: the smallest integer ``m`` for which ``fm.naive.softmax([0, m, 0, 0])``
   in the dtype holds NaN or inf, found by scanning the integers.
3. Stress test (seed 004's): Q, K ~ N(0, 1) of shape (seq_len, d_model); scores Q @ K.T,
   unscaled and scaled by 1/sqrt(d_model). A trial fails in float16 when its largest score
   is above float16's overflow threshold; ``fm.analyze_softmax_safety``'s prediction is
   compared with what ``fm.naive.softmax`` in float16 actually did (the report runs it:
   ``has_inf`` in its exp, ``has_nan`` in its output).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

import flashmath as fm
from flashmath import dtypes
from flashmath.attention.threads import one_blas_thread
from flashmath.lab import plotting
from flashmath.lab.experiment import Context, Result
from flashmath.lab.report import fmt_value as fmt
from flashmath.softmax import safety
from flashmath.text import markdown_table

NAME = "overflow"
TITLE = "Where exp overflows in every dtype, where naive softmax breaks, how often scores cross it"
SEEDS = ("004",)

SEQ_LENS = (32, 64, 128, 256)
D_MODELS = (32, 64, 128)
TRIALS, QUICK_TRIALS = 50, 5
#: The dtype of the stress test (seed 004's).
STRESS_DTYPE = "float16"
#: The configuration whose scores the histogram shows (seed 004's example).
HISTOGRAM_CONFIG = (128, 64)
#: Integers scanned for the naive breaking point (float64 breaks at 710).
BREAK_SCAN_LIMIT = 4096


def _step(value: Any, dt: np.dtype[Any]) -> Any:
    """The dtype value one step further from zero than ``value`` (same sign)."""
    uint = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[dt.itemsize]
    bits = np.array(value, dtype=dt).view(uint)
    return (bits + uint(1)).view(dt)[()]


def _exp(value: Any, dt: np.dtype[Any]) -> float:
    with np.errstate(all="ignore"):
        return float(np.exp(np.array(value, dtype=dt)))


# --------------------------------------------------------------------------- 1. thresholds


def _threshold_record(name: str, dt: np.dtype[Any]) -> dict[str, Any]:
    over, under = fm.overflow_threshold(dt), fm.underflow_threshold(dt)
    info = dtypes.finfo(dt)
    rec: dict[str, Any] = {
        "section": "thresholds", "dtype": name,
        "finfo_max": float(info.max), "smallest_subnormal": float(info.smallest_subnormal),
        "overflow_found": float(over), "overflow_closed_form": safety.overflow_closed_form(dt),
        "underflow_found": float(under),
        "underflow_closed_form": safety.underflow_closed_form(dt),
        "exp_at_overflow": _exp(over, dt), "exp_above_overflow": _exp(_step(over, dt), dt),
        "has_negatives": float(info.min) < 0,
    }
    rec["overflow_gap"] = rec["overflow_found"] - rec["overflow_closed_form"]
    rec["overflow_step"] = float(_step(over, dt)) - float(over)  # the dtype's spacing there
    rec["underflow_gap"] = rec["underflow_found"] - rec["underflow_closed_form"]
    rec["overflow_verified"] = (math.isfinite(rec["exp_at_overflow"])
                                and not math.isfinite(rec["exp_above_overflow"]))
    if rec["has_negatives"]:
        rec["exp_at_underflow"] = _exp(under, dt)
        rec["exp_below_underflow"] = _exp(_step(under, dt), dt)
        rec["underflow_verified"] = (rec["exp_at_underflow"] > 0
                                     and rec["exp_below_underflow"] == 0)
    else:  # float8_e8m0fnu: only positive values, exp(x) >= 1 for all of them
        rec |= {"exp_at_underflow": _exp(under, dt), "exp_below_underflow": None,
                "underflow_verified": None}
    return rec


# --------------------------------------------------------------------------- 2. breaking point


def _break_record(name: str, dt: np.dtype[Any], threshold: float) -> dict[str, Any]:
    """Scan m = 0, 1, 2, ... for the first naive softmax of [0, m, 0, 0] with NaN or inf."""
    rec: dict[str, Any] = {"section": "breaking_point", "dtype": name,
                           "overflow_threshold": threshold, "break_at": None}
    zero_ok = math.isfinite(float(np.array(0.0, dtype=dt)))
    for m in range(BREAK_SCAN_LIMIT + 1):
        x = np.array([0.0, m, 0.0, 0.0]).astype(dt)
        with np.errstate(all="ignore"):
            p = fm.naive.softmax(x).astype(np.float64)
        if not np.all(np.isfinite(p)):
            rec |= {"break_at": m, "m_in_dtype": float(x[1]), "output_there": p,
                    "exp_m_in_dtype": _exp(x[1], dt)}
            break
    # What the threshold predicts: the first integer whose dtype value lies above it.
    predicted = next((m for m in range(BREAK_SCAN_LIMIT + 1)
                      if float(np.array(m, dtype=np.float64).astype(dt)) > threshold), None)
    rec["zero_representable"] = zero_ok
    rec["predicted_from_threshold"] = predicted
    rec["agrees"] = rec["break_at"] == predicted
    return rec


# --------------------------------------------------------------------------- 3. stress test


def _stress(ctx: Context, threshold: float) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    trials = QUICK_TRIALS if ctx.quick else TRIALS
    rng = ctx.rng(1)
    dt = dtypes.DTYPES[STRESS_DTYPE]
    records, example = [], {}
    for seq in SEQ_LENS:
        for d in D_MODELS:
            ctx.progress(f"stress seq={seq} d={d}")
            stats: dict[str, list[Any]] = {k: [] for k in (
                "unscaled_max", "scaled_max", "unscaled_fail", "scaled_fail",
                "unscaled_pred", "scaled_pred", "unscaled_naive", "scaled_naive",
                "unscaled_frac", "scaled_frac")}
            for t in range(trials):
                q = rng.standard_normal((seq, d))  # (Sq, D)
                k = rng.standard_normal((seq, d))  # (Sk, D)
                with one_blas_thread():  # small product: BLAS threads only oversubscribe
                    unscaled = q @ k.T  # (Sq, Sk)
                for kind, scores in (("unscaled", unscaled),
                                     ("scaled", unscaled / math.sqrt(d))):
                    # the prediction, and what fm.naive.softmax did in the dtype (has_inf/has_nan)
                    report = fm.analyze_softmax_safety(scores, dt)
                    top = float(scores.max())
                    stats[f"{kind}_max"].append(top)
                    stats[f"{kind}_fail"].append(top > threshold)
                    stats[f"{kind}_pred"].append(report.will_overflow)
                    stats[f"{kind}_naive"].append(report.has_nan or report.has_inf)
                    stats[f"{kind}_frac"].append(report.overflow_count / report.total)
                    if (seq, d) == HISTOGRAM_CONFIG and t == 0:
                        example[kind] = scores
            for kind in ("unscaled", "scaled"):
                pred, naive = np.array(stats[f"{kind}_pred"]), np.array(stats[f"{kind}_naive"])
                records.append({
                    "section": "stress", "seq_len": seq, "d_model": d, "scores": kind,
                    "dtype": STRESS_DTYPE, "trials": trials,
                    "failure_rate": float(np.mean(stats[f"{kind}_fail"])),
                    "predicted_overflow_rate": float(np.mean(pred)),
                    "naive_failure_rate": float(np.mean(naive)),
                    "prediction_matches": int(np.sum(pred == naive)),
                    "mean_max_score": float(np.mean(stats[f"{kind}_max"])),
                    "largest_max_score": float(np.max(stats[f"{kind}_max"])),
                    "mean_overflow_fraction": float(np.mean(stats[f"{kind}_frac"])),
                    "mismatch_max_scores": np.array(stats[f"{kind}_max"])[pred != naive].tolist(),
                })
    return records, example


# --------------------------------------------------------------------------- figures


def _exp_figure(thresholds: list[dict[str, Any]]) -> Any:
    """exp(x) on a log scale against each dtype's largest value, in two x ranges.

    Drawn as log10(exp(x)) = x * log10(e) with 1eN tick labels: float64's max (1.8e308) is
    beyond what a log axis can pad around without overflowing.
    """
    from matplotlib.ticker import FuncFormatter

    narrow = [r for r in thresholds if r["overflow_found"] < 20]
    wide = [r for r in thresholds if r["overflow_found"] >= 20]
    fig, axes = plotting.figure(1, 2, width=12, height=4.8)
    for ax, group, x_hi in ((axes[0], narrow, 16.0), (axes[1], wide, 760.0)):
        x = np.linspace(0, x_hi, 400)
        ax.plot(x, x * math.log10(math.e), color="black", lw=1.5, label="exp(x)")
        for r in group:
            color = plotting.dtype_color(r["dtype"])
            ax.axhline(math.log10(r["finfo_max"]), color=color, ls="--", lw=0.9)
            ax.plot([r["overflow_found"]], [math.log10(r["exp_at_overflow"])], "o",
                    color=color, label=f"{r['dtype']}: max {r['finfo_max']:.3g}, "
                                       f"exp overflows above {r['overflow_found']:.4g}")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _pos: f"1e{y:.0f}"))
        ax.set_xlabel("x")
        ax.set_ylabel("exp(x)  (log scale)")
        ax.set_xlim(0, x_hi)
        ax.legend(loc="lower right")
    axes[0].set_title("float8 and float16: dashed = dtype max")
    axes[1].set_title("bfloat16, float32, float64: dashed = dtype max")
    fig.suptitle("exp(x) against each dtype's largest value (dots: measured thresholds)")
    return fig


def _histogram_figure(example: dict[str, np.ndarray], threshold: float) -> Any:
    seq, d = HISTOGRAM_CONFIG
    fig, axes = plotting.figure(1, 2, width=11, height=4)
    for ax, kind in zip(axes, ("unscaled", "scaled"), strict=True):
        scores = example[kind].ravel()
        above = float(np.mean(scores > threshold))
        ax.hist(scores, bins=60, color=plotting.dtype_color("float64"), alpha=0.85)
        ax.axvline(threshold, color=plotting.NAN_COLOR, ls="--",
                   label=f"{STRESS_DTYPE} exp overflow ({threshold:.4g}): "
                         f"{above:.1%} of scores above")
        title = "Q @ K.T" if kind == "unscaled" else "Q @ K.T / sqrt(d)"
        ax.set_title(f"{title}: seq_len={seq}, d_model={d}, max {scores.max():.3g}")
        ax.set_xlabel("score")
        ax.set_ylabel("count")
        ax.legend(loc="upper left")
    return fig


# --------------------------------------------------------------------------- readme


def _rate(rates: list[float]) -> str:
    lo, hi = min(rates), max(rates)
    return f"{lo:.0%}" if lo == hi else f"{lo:.0%}-{hi:.0%}"


def _readme(thr: list[dict[str, Any]], brk: list[dict[str, Any]], stress: list[dict[str, Any]],
            summary: dict[str, Any], stress_threshold: float) -> str:
    lines = ["# overflow (seed 004)", "", summary["headline"], "",
             "## exp thresholds per dtype: found vs closed form", "",
             "Found: `fm.overflow_threshold` / `fm.underflow_threshold` (exp evaluated in the "
             "dtype). Closed form: log(finfo.max) and log(smallest subnormal). *Verified*: exp "
             "of the found value is finite (positive) and exp of the next value out is not.",
             "",
             markdown_table(thr, [
                 ("dtype", "dtype"), ("max", "finfo_max"), ("overflow found", "overflow_found"),
                 ("log(max)", "overflow_closed_form"), ("gap", "overflow_gap"),
                 ("step there", "overflow_step"), ("verified", "overflow_verified"),
                 ("underflow found", "underflow_found"),
                 ("log(min subnormal)", "underflow_closed_form"), ("gap", "underflow_gap"),
                 ("verified", "underflow_verified")], fmt=fmt)]
    within = [r["dtype"] for r in thr if abs(r["overflow_gap"]) <= r["overflow_step"]]
    outside = [r["dtype"] for r in thr if r["dtype"] not in within]
    signed = [r for r in thr if r["has_negatives"]]
    half = [r["dtype"] for r in signed if abs(r["underflow_gap"] + math.log(2)) < 0.01]
    others = [r["underflow_gap"] for r in signed if r["dtype"] not in half]
    lines += [
        "",
        f"- The found overflow point lies within one step of the dtype (its spacing there) of "
        f"log(max) in {len(within)} of {len(thr)} dtypes"
        + (f" (not in {', '.join(outside)})" if outside else "")
        + ": exp(x) stays finite while it *rounds* to at most max, and the threshold is a "
        "value of the dtype, so it is the dtype value next to log(max).",
        f"- In {', '.join(half) or 'no dtype'} the underflow point sits log 2 = "
        f"{fmt(math.log(2))} below log(smallest subnormal): exp(x) rounds up to the smallest "
        "subnormal from anything above half of it."
        + (" In the others the dtype's own spacing near that point decides (gaps from "
           f"{fmt(min(others))} to {fmt(max(others))})." if others else ""),
    ]
    unsigned = [r["dtype"] for r in thr if not r["has_negatives"]]
    if unsigned:
        lines.append(f"- {', '.join(unsigned)}: no negative values, so exp of every value "
                     "is at least 1 and the underflow threshold is the smallest value.")
    failed = [r["dtype"] for r in thr
              if r["overflow_verified"] is False or r["underflow_verified"] is False]
    if failed:
        lines.append(f"- **Not verified**: {', '.join(failed)}.")

    lines += ["", "## Where naive softmax of [0, m, 0, 0] breaks", "",
              "The smallest integer m at which `fm.naive.softmax` in the dtype returns NaN or "
              "inf (integers scanned from 0), beside the first integer whose value in the "
              "dtype lies above the overflow threshold.", "",
              markdown_table(brk, [
                  ("dtype", "dtype"), ("breaks at m", "break_at"),
                  ("m as the dtype holds it", "m_in_dtype"), ("exp(m) in dtype", "exp_m_in_dtype"),
                  ("output", "output_there"), ("overflow threshold", "overflow_threshold"),
                  ("first integer above it", "predicted_from_threshold"),
                  ("agrees", "agrees")], fmt=fmt)]
    disagree = [r for r in brk if not r["agrees"]]
    lines.append("")
    if disagree:
        for r in disagree:
            why = ("0 is not a value of this dtype (it becomes NaN), so the input is broken "
                   "before exp runs" if not r["zero_representable"] else
                   f"m is held as {fmt(r.get('m_in_dtype'))}, exp of it is "
                   f"{fmt(r.get('exp_m_in_dtype'))} and the output is "
                   f"{fmt(r.get('output_there'))}")
            lines.append(f"- {r['dtype']}: breaks at {fmt(r['break_at'])}, the threshold "
                         f"predicts {fmt(r['predicted_from_threshold'])}: {why}.")
    else:
        lines.append("- In every dtype the breaking point is exactly the first integer above "
                     "the overflow threshold: exp(m) = inf (or NaN without inf), then "
                     "inf/inf = NaN.")

    lines += ["", f"## Stress test: {STRESS_DTYPE} failure rate of attention scores", "",
              f"Q, K ~ N(0, 1), {stress[0]['trials']} trials per configuration. A trial fails "
              f"when its largest score is above {STRESS_DTYPE}'s overflow threshold "
              f"({fmt(stress_threshold)}). *Naive* is the rate at which `fm.naive.softmax` in "
              f"{STRESS_DTYPE} actually hit inf or NaN; *matched* counts the trials where "
              "`fm.analyze_softmax_safety`'s prediction agreed with it.", ""]
    by = {(r["seq_len"], r["d_model"], r["scores"]): r for r in stress}
    pairs = [{"seq_len": seq, "d_model": d, "unscaled": by[(seq, d, "unscaled")],
              "scaled": by[(seq, d, "scaled")]} for seq in SEQ_LENS for d in D_MODELS]
    columns: list[Any] = [("seq_len", "seq_len"), ("d_model", "d_model")]
    for k in ("unscaled", "scaled"):
        columns += [
            (f"{k}: fail", lambda p, k=k: f"{p[k]['failure_rate']:.0%}"),
            ("mean max", lambda p, k=k: p[k]["mean_max_score"]),
            ("naive", lambda p, k=k: f"{p[k]['naive_failure_rate']:.0%}"),
            ("matched", lambda p, k=k: f"{p[k]['prediction_matches']}/{p[k]['trials']}")]
    lines += [markdown_table(pairs, columns, fmt=fmt), ""]
    for kind in ("unscaled", "scaled"):
        rows = [r for r in stress if r["scores"] == kind]
        top = max(rows, key=lambda r: r["largest_max_score"])
        lines.append(f"- {kind.capitalize()} scores: failure rate "
                     f"{_rate([r['failure_rate'] for r in rows])}; "
                     f"largest score seen {fmt(top['largest_max_score'])} (seq_len "
                     f"{top['seq_len']}, d_model {top['d_model']}).")
    total = sum(r["trials"] for r in stress)
    matched = sum(r["prediction_matches"] for r in stress)
    lines.append(f"- The prediction (max score > threshold) matched naive softmax in "
                 f"{matched} of {total} trials.")
    for r in stress:
        if r["mismatch_max_scores"]:
            lines.append(f"  - missed: seq_len {r['seq_len']}, d_model {r['d_model']}, "
                         f"{r['scores']}: largest scores {fmt(r['mismatch_max_scores'])} against "
                         f"the threshold {fmt(stress_threshold)}.")
    lines += ["", "## Figures", "",
              "![exp against each dtype's max](exp_vs_dtype_max.png)", "",
              "![scaled vs unscaled scores](score_histograms.png)"]
    return "\n".join(lines)


# --------------------------------------------------------------------------- run


def run(ctx: Context) -> Result:
    ctx.progress("thresholds")
    thresholds = [_threshold_record(name, dt) for name, dt in dtypes.DTYPES.items()]
    ctx.progress("breaking points")
    breaks = [_break_record(r["dtype"], dtypes.DTYPES[r["dtype"]], r["overflow_found"])
              for r in thresholds]
    stress_threshold = float(fm.overflow_threshold(STRESS_DTYPE))
    stress, example = _stress(ctx, stress_threshold)
    ctx.progress("figures")
    figures = {"exp_vs_dtype_max": _exp_figure(thresholds),
               "score_histograms": _histogram_figure(example, stress_threshold)}

    by_dtype = {r["dtype"]: r for r in thresholds}
    brk = {r["dtype"]: r["break_at"] for r in breaks}
    rates = {kind: [r["failure_rate"] for r in stress if r["scores"] == kind]
             for kind in ("unscaled", "scaled")}
    summary: dict[str, Any] = {
        "overflow_threshold": {r["dtype"]: r["overflow_found"] for r in thresholds},
        "underflow_threshold": {r["dtype"]: r["underflow_found"] for r in thresholds},
        "max_abs_overflow_gap": max(abs(r["overflow_gap"]) for r in thresholds),
        "all_thresholds_verified": all(r["overflow_verified"] and r["underflow_verified"]
                                       is not False for r in thresholds),
        "naive_breaks_at": brk,
        "breaking_points_agree": all(r["agrees"] for r in breaks),
        "stress_failure_rate": {k: [min(v), max(v)] for k, v in rates.items()},
        "prediction_matches": sum(r["prediction_matches"] for r in stress),
        "stress_trials": sum(r["trials"] for r in stress),
    }
    main = ("float16", "bfloat16", "float32", "float64")
    summary["headline"] = (
        "exp overflows above "
        + ", ".join(f"{fmt(by_dtype[d]['overflow_found'])} ({d})" for d in main)
        + "; naive softmax of [0, m, 0, 0] breaks at m = "
        + "/".join(f"{brk[d]}" for d in main)
        + f"; {STRESS_DTYPE} failure rate unscaled {_rate(rates['unscaled'])}, "
        f"scaled by 1/sqrt(d) {_rate(rates['scaled'])}")
    readme = _readme(thresholds, breaks, stress, summary, stress_threshold)
    return Result(records=thresholds + breaks + stress, summary=summary, figures=figures,
                  readme=readme, headline=summary["headline"])
