"""Seed 004: where exp overflows in every dtype, where naive softmax breaks, how often it does.

Three measurements, each from flashmath's own functions:

1. Thresholds: ``fm.overflow_threshold`` / ``fm.underflow_threshold`` (bisection over the
   dtype's values with exp in the dtype) against the closed forms ``log(finfo.max)`` and
   ``log(smallest subnormal)``, for every dtype in ``flashmath.dtypes.DTYPES``; each found
   threshold is verified: exp of it is finite (positive), exp of the next value is not.
2. Breaking point: the smallest integer ``m`` for which ``fm.naive.softmax([0, m, 0, 0])``
   in the dtype holds NaN or inf, found by scanning the integers.
3. Stress test (seed 004's): Q, K ~ N(0, 1) of shape (seq_len, d_model); scores Q @ K.T,
   unscaled, scaled by 1/sqrt(d_model), and scaled after the seed's outlier
   K[5] = Q[10] * 3. A trial fails in float16 when its largest score
   is above float16's overflow threshold; ``fm.analyze_softmax_safety``'s prediction is
   compared with what ``fm.naive.softmax`` in float16 actually did (the report runs it:
   ``has_inf`` in its exp, ``has_nan`` in its output).
4. The quiz and the reflection questions: naive softmax of [1, 1000, 1, 1] and of all -1000
   in float16/32/64, a constructed q = k whose scaled score overflows float16, and the bytes
   and tensor-core figures behind "why not float64 everywhere".
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

import flashmath as fm
from flashmath import dtypes
from flashmath.attention.threads import one_blas_thread
from flashmath.lab import plotting, readme
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
#: Seed 004's outlier: K[OUTLIER_KEY] = Q[OUTLIER_QUERY] * OUTLIER_FACTOR.
OUTLIER_KEY, OUTLIER_QUERY, OUTLIER_FACTOR = 5, 10, 3.0
#: The stress test's kinds of scores.
SCORE_KINDS = ("unscaled", "scaled", "scaled, outlier")
#: Seed 004's quiz Q3 input and the reflection's very negative scores.
QUIZ_SCORES = (1.0, 1000.0, 1.0, 1.0)
NEGATIVE_SCORE = -1000.0
#: Reflection 2's constructed example: q = k = c * ones(d), scaled score c^2 sqrt(d).
CONSTRUCTED_C, CONSTRUCTED_D = 1.5, 64
#: Reflection 1: dense tensor-core peak TFLOPS of one NVIDIA H100 SXM by dtype (NVIDIA's
#: datasheet; reference figures, not measured here) and its HBM3 bandwidth in TB/s.
H100_DENSE_TFLOPS = {"float64": 67.0, "tf32": 494.7, "bfloat16/float16": 989.4,
                     "float8": 1978.9}
H100_HBM_TB_PER_S = 3.35


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
            stats: dict[str, list[Any]] = {f"{kind}_{what}": [] for kind in SCORE_KINDS
                                           for what in ("max", "fail", "pred", "naive", "frac")}
            for t in range(trials):
                q = rng.standard_normal((seq, d))  # (Sq, D)
                k = rng.standard_normal((seq, d))  # (Sk, D)
                with one_blas_thread():  # small product: BLAS threads only oversubscribe
                    unscaled = q @ k.T  # (Sq, Sk)
                    k[OUTLIER_KEY] = q[OUTLIER_QUERY] * OUTLIER_FACTOR
                    outlier = q @ k.T / math.sqrt(d)
                for kind, scores in (("unscaled", unscaled),
                                     ("scaled", unscaled / math.sqrt(d)),
                                     ("scaled, outlier", outlier)):
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
            for kind in SCORE_KINDS:
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


# --------------------------------------------------------------------------- quiz, reflections


def _softmax_records(name: str, x: tuple[float, ...]) -> list[dict[str, Any]]:
    """Naive and stable softmax of ``x`` in float16, float32 and float64."""
    rows = []
    for dname in ("float16", "float32", "float64"):
        xd = np.array(x).astype(dtypes.DTYPES[dname])
        with np.errstate(all="ignore"):
            naive = np.asarray(fm.naive.softmax(xd), dtype=np.float64)
            exps = np.exp(xd).astype(np.float64)
        rows.append({"section": name, "dtype": dname, "input": list(x), "exp": exps,
                     "naive": naive, "stable": np.asarray(fm.softmax(xd), dtype=np.float64),
                     "naive_nan_count": int(np.isnan(naive).sum())})
    return rows


def _constructed_record(threshold: float) -> dict[str, Any]:
    """Reflection 2: q = k = c * ones(d) against 7 random keys; naive float16 softmax."""
    c, d = CONSTRUCTED_C, CONSTRUCTED_D
    rng = np.random.default_rng(0)
    q = np.full(d, c)
    keys = np.vstack([q, rng.standard_normal((7, d))])  # (8, D)
    scores = keys @ q / math.sqrt(d)
    with np.errstate(all="ignore"):
        naive = np.asarray(fm.naive.softmax(scores.astype(np.float16)), dtype=np.float64)
    return {"section": "constructed", "c": c, "d_model": d, "scaled_score": float(scores[0]),
            "closed_form": c * c * math.sqrt(d), "threshold": threshold,
            "naive_float16": naive, "naive_nan": bool(np.isnan(naive).any()),
            "stable_float16": np.asarray(fm.softmax(scores.astype(np.float16)),
                                         dtype=np.float64)}


def _bandwidth_record() -> dict[str, Any]:
    """Reflection 1: bytes per element, and the K and V of one layer at a long context."""
    seq, heads, d = 8192, 32, 128
    itemsize = {n: int(dtypes.DTYPES[n].itemsize) for n in ("float64", "float32", "bfloat16",
                                                              "float8_e4m3fn")}
    kv = {n: 2 * seq * heads * d * b for n, b in itemsize.items()}
    return {"section": "bandwidth", "seq_len": seq, "heads": heads, "head_dim": d,
            "itemsize": itemsize, "kv_bytes": kv,
            "kv_read_us_at_hbm": {n: b / (H100_HBM_TB_PER_S * 1e12) * 1e6
                                  for n, b in kv.items()},
            "h100_dense_tflops": H100_DENSE_TFLOPS, "h100_hbm_tb_per_s": H100_HBM_TB_PER_S,
            "tflops_ratio_16_vs_64": H100_DENSE_TFLOPS["bfloat16/float16"]
            / H100_DENSE_TFLOPS["float64"]}


# --------------------------------------------------------------------------- figures


#: One marker and one dash pattern per dtype (in DTYPES order), so that dtypes whose points
#: or max lines coincide stay apart: big hollow markers under small filled ones.
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")
_DASHES = ("--", ":", "-.", (0, (5, 1)), (0, (1, 3)), (0, (3, 1, 1, 1)))


def _exp_figure(thresholds: list[dict[str, Any]]) -> Any:
    """exp(x) on a log scale against each dtype's largest value, in two x ranges.

    Drawn as log10(exp(x)) = x * log10(e) with 1eN tick labels: float64's max (1.8e308) is
    beyond what a log axis can pad around without overflowing. Every dtype has its own
    marker (sizes shrink in draw order, so coinciding points show as rings around dots) and
    dash pattern; the legends sit outside the axes, beside the README's table.
    """
    from matplotlib.ticker import FuncFormatter

    narrow = [r for r in thresholds if r["overflow_found"] < 20]
    wide = [r for r in thresholds if r["overflow_found"] >= 20]
    order = {r["dtype"]: i for i, r in enumerate(thresholds)}
    fig, axes = plotting.figure(1, 2, width=13, height=7.0)
    for ax, group, x_hi, y_hi in ((axes[0], narrow, 16.0, 7.0), (axes[1], wide, 760.0, 330.0)):
        x = np.linspace(0, x_hi, 400)
        ax.plot(x, x * math.log10(math.e), color="black", lw=1.5, label="exp(x)")
        shift_step = x_hi / 90
        taken: dict[float, int] = {}
        shared = _shared_lines(group, tol=y_hi / 60)
        for rank, r in enumerate(group):
            i = order[r["dtype"]]
            # a point at the same x as an earlier one is drawn shifted right, and says so
            dup = taken.get(r["overflow_found"], 0)
            taken[r["overflow_found"]] = dup + 1
            shift = dup * shift_step
            color = plotting.dtype_color(r["dtype"])
            j, others = shared[r["dtype"]]
            # max lines that (nearly) coincide are dashed in turn, one colour after another
            dash = (j * 6.0, (6.0, 6.0 * len(others))) if others else _DASHES[i % len(_DASHES)]
            ax.axhline(math.log10(r["finfo_max"]), color=color, ls=dash,
                       lw=1.8 if others else 1.1)
            size = 13 - 1.4 * rank
            filled = rank == len(group) - 1
            ax.plot([r["overflow_found"] + shift], [math.log10(r["exp_at_overflow"])],
                    _MARKERS[i % len(_MARKERS)], ms=size, mew=1.6, color=color,
                    mfc=color if filled else "none", ls=dash,
                    label=f"{r['dtype']}: max {r['finfo_max']:.4g}, "
                          f"exp overflows above {r['overflow_found']:.4g}"
                          + (f"; marker drawn {shift:.2g} right" if shift else "")
                          + (f"\n    max line {_near(r, group, others)}, dashes alternate"
                             if others else ""))
        ax.yaxis.set_major_formatter(FuncFormatter(_power_of_ten))
        ax.set_xlabel("x")
        ax.set_ylabel("exp(x)  (log scale)")
        ax.set_xlim(0, x_hi)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=1, frameon=False)
    axes[0].set_title("float8 and float16: lines = dtype max, markers = thresholds")
    axes[1].set_title("bfloat16, float32, float64")
    fig.suptitle("exp(x) against each dtype's largest value (markers: measured thresholds)")
    return fig


def _power_of_ten(y: float, _pos: int) -> str:
    """Tick label of a log10 axis: 1eN."""
    return f"1e{y:.0f}"


def _near(r: dict[str, Any], group: list[dict[str, Any]], others: list[str]) -> str:
    """"on / close to" the dtypes whose max lines print within a few pixels of r's."""
    maxes = {g["dtype"]: g["finfo_max"] for g in group}
    same = [o for o in others if maxes[o] == r["finfo_max"]]
    close = [o for o in others if o not in same]
    parts = ([f"the same as {', '.join(same)}'s"] if same else []) + (
        [f"close to {', '.join(close)}'s"] if close else [])
    return " and ".join(parts)


def _shared_lines(group: list[dict[str, Any]], tol: float) -> dict[str, tuple[int, list[str]]]:
    """dtype -> (its place, the other dtypes) among max lines within ``tol`` (log10 units)
    of each other, which would print as one line: those are dashed in turn."""
    rows = sorted(group, key=lambda r: math.log10(r["finfo_max"]))
    clusters: list[list[str]] = []
    last = -math.inf
    for r in rows:
        y = math.log10(r["finfo_max"])
        if clusters and y - last <= tol:
            clusters[-1].append(r["dtype"])
        else:
            clusters.append([r["dtype"]])
        last = y
    return {name: (c.index(name), [o for o in c if o != name]) for c in clusters for name in c}


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


def _thresholds_section(thr: list[dict[str, Any]]) -> list[str]:
    lines = ["Found: `fm.overflow_threshold` / `fm.underflow_threshold` (exp evaluated in the "
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
        f"{fmt(math.log(2))} below log(smallest "
        "subnormal): exp(x) rounds up to the smallest subnormal from anything above half of it."
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
    return lines


def _answer_q2(thr: list[dict[str, Any]]) -> str:
    by = {r["dtype"]: r for r in thr}
    return ("b) 11: measured, exp overflows in float16 above "
            f"{fmt(by['float16']['overflow_found'])} (log of float16's max "
            f"{fmt(by['float16']['finfo_max'])} is "
            f"{fmt(by['float16']['overflow_closed_form'])}). The other choices are float32's "
            f"{fmt(by['float32']['overflow_found'])} and float64's "
            f"{fmt(by['float64']['overflow_found'])}; every dtype's threshold is in the table "
            "below and in the figure.")


def _answer_breaking_point(brk: list[dict[str, Any]]) -> list[str]:
    lines = ["The smallest integer m at which `fm.naive.softmax` of [0, m, 0, 0] in the dtype "
             "returns NaN or inf (integers scanned from 0), beside the first integer whose value "
             "in the dtype lies above the overflow threshold:", "",
             markdown_table(brk, [
                 ("dtype", "dtype"), ("breaks at m", "break_at"),
                 ("m as the dtype holds it", "m_in_dtype"), ("exp(m) in dtype", "exp_m_in_dtype"),
                 ("output", "output_there"), ("overflow threshold", "overflow_threshold"),
                 ("first integer above it", "predicted_from_threshold"),
                 ("agrees", "agrees")], fmt=fmt), ""]
    disagree = [r for r in brk if not r["agrees"]]
    for r in disagree:
        why = ("0 is not a value of this dtype (it becomes NaN), so the input is broken "
               "before exp runs" if not r["zero_representable"] else
               f"m is held as {fmt(r.get('m_in_dtype'))}, exp of it is "
               f"{fmt(r.get('exp_m_in_dtype'))} and the output is "
               f"{fmt(r.get('output_there'))}")
        lines.append(f"- {r['dtype']}: breaks at {fmt(r['break_at'])}, the threshold "
                     f"predicts {fmt(r['predicted_from_threshold'])}: {why}.")
    if not disagree:
        lines.append("- In every dtype the breaking point is exactly the first integer above "
                     "the overflow threshold: exp(m) = inf (or NaN without inf), then "
                     "inf/inf = NaN.")
    return lines


def _answer_q3(quiz: list[dict[str, Any]]) -> str:
    outs = "; ".join(f"{r['dtype']} {fmt(r['naive'])}" for r in quiz)
    nan_counts = {r["naive_nan_count"] for r in quiz}
    n = len(quiz[0]["input"])
    wrong = nan_counts != {n}
    return (f"Measured naive softmax: {outs}. "
            + ("The key's answer c) is wrong: " if wrong else "The key's answer c) holds: ")
            + "exp(1000) is inf in every dtype, so the sum is inf; the entry at 1000 is "
            "inf/inf = NaN, but each other entry is exp(1)/inf = "
            f"{fmt(quiz[0]['naive'][0])}, a finite number divided by inf, which is 0, not NaN. "
            f"Only {fmt(max(nan_counts))} of the {n} entries is NaN. (a) is the right *limit*, "
            "and what the stable softmax returns: "
            + "; ".join(f"{r['dtype']} {fmt(r['stable'])}" for r in quiz) + ".")


def _answer_q4(stress: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    rates = summary["stress_failure_rate"]
    by = {k: [r for r in stress if r["scores"] == k] for k in SCORE_KINDS}
    mean_max = {k: max(r["mean_max_score"] for r in rows) for k, rows in by.items()}
    return (
        "d) both: for q, k ~ N(0, 1) a score q.k is a sum of d products of unit variance, so its "
        "variance is d; dividing by sqrt(d) brings it back to 1 (normalised variance) and so "
        "makes the scores smaller. Measured in float16 (table below): unscaled scores fail "
        f"in {_rate(rates['unscaled'])} of trials (largest mean max score "
        f"{fmt(mean_max['unscaled'])}), scaled ones in {_rate(rates['scaled'])} (largest mean "
        f"max {fmt(mean_max['scaled'])}). But scaling helps, it does not solve: with the seed's "
        f"outlier K[{OUTLIER_KEY}] = Q[{OUTLIER_QUERY}] * {fmt(OUTLIER_FACTOR)} the scaled score "
        f"of that pair is {fmt(OUTLIER_FACTOR)} |q|^2 / sqrt(d), about "
        f"{fmt(OUTLIER_FACTOR)} sqrt(d), and the scaled failure rate becomes "
        f"{_rate(rates['scaled, outlier'])} (largest mean max {fmt(mean_max['scaled, outlier'])})."
        " Only the max-subtraction of the stable softmax removes the overflow.")


def _answer_fp64(bw: dict[str, Any]) -> str:
    kv, t = bw["kv_bytes"], bw["kv_read_us_at_hbm"]
    tf = bw["h100_dense_tflops"]
    return (
        f"Bytes: float64 holds {bw['itemsize']['float64']} bytes per value, bfloat16 "
        f"{bw['itemsize']['bfloat16']} and float8 {bw['itemsize']['float8_e4m3fn']}, and "
        "attention is bandwidth-bound: the K and V of one layer at "
        f"{bw['seq_len']} tokens, {bw['heads']} heads of {bw['head_dim']} are "
        + ", ".join(f"{fmt(kv[n] / 1e6)} MB in {n}" for n in ("float64", "bfloat16",
                                                             "float8_e4m3fn"))
        + f", each read once per step at {fmt(bw['h100_hbm_tb_per_s'])} TB/s (an H100's HBM3) in "
        + ", ".join(f"{fmt(t[n])} us" for n in ("float64", "bfloat16", "float8_e4m3fn"))
        + ". Tensor cores: an H100 SXM's dense peak (NVIDIA's datasheet, not measured here) is "
        + ", ".join(f"{fmt(v)} TFLOPS in {n}" for n, v in tf.items())
        + f", so float64 gives up {fmt(bw['tflops_ratio_16_vs_64'])}x of bfloat16's compute. "
        "Stable arithmetic in 16 bits, with float32 accumulators, costs neither.")


def _answer_constructed(c: dict[str, Any]) -> str:
    return (
        f"q = k = {fmt(c['c'])} * ones(d) with d = {c['d_model']}: the scaled score is "
        f"q.k / sqrt(d) = c^2 sqrt(d) = {fmt(c['closed_form'])} (computed "
        f"{fmt(c['scaled_score'])}), above float16's {fmt(c['threshold'])}, so naive softmax in "
        f"float16 of that query against it and 7 random keys gives {fmt(c['naive_float16'])}; "
        f"the stable one gives {fmt(c['stable_float16'])}. Any c with c^2 sqrt(d) above the "
        "threshold does it; the outlier case above is the realistic version.")


def _answer_negative(neg: list[dict[str, Any]]) -> str:
    return ("Underflow instead of overflow: exp(-1000) rounds to 0 in every dtype ("
            + ", ".join(f"{r['dtype']} {fmt(r['exp'][0])}" for r in neg)
            + "), so the naive sum is 0 and every entry is 0/0 = NaN ("
            + "; ".join(f"{r['dtype']} {fmt(r['naive'])}" for r in neg)
            + "). The stable softmax subtracts the max first, so it sees exp(0) = 1 in every "
            "entry and returns the right, uniform, answer ("
            + "; ".join(f"{r['dtype']} {fmt(r['stable'])}" for r in neg) + ").")


def _stress_section(stress: list[dict[str, Any]], stress_threshold: float) -> list[str]:
    lines = [f"Q, K ~ N(0, 1), {stress[0]['trials']} trials per configuration; *outlier*: the "
             f"same Q, K with K[{OUTLIER_KEY}] = Q[{OUTLIER_QUERY}] * {fmt(OUTLIER_FACTOR)}, "
             "scaled. A trial fails when its largest score is above "
             f"{STRESS_DTYPE}'s overflow threshold ({fmt(stress_threshold)}). *Naive* is the "
             f"rate at which `fm.naive.softmax` in {STRESS_DTYPE} actually hit inf or NaN; "
             "*matched* counts the trials where `fm.analyze_softmax_safety`'s prediction agreed "
             "with it.", ""]
    by = {(r["seq_len"], r["d_model"], r["scores"]): r for r in stress}
    pairs = [{"seq_len": seq, "d_model": d, **{k: by[(seq, d, k)] for k in SCORE_KINDS}}
             for seq in SEQ_LENS for d in D_MODELS]
    columns: list[Any] = [("seq_len", "seq_len"), ("d_model", "d_model")]
    for k in SCORE_KINDS:
        columns += [
            (f"{k}: fail", lambda p, k=k: f"{p[k]['failure_rate']:.0%}"),
            ("mean max", lambda p, k=k: p[k]["mean_max_score"]),
            ("naive", lambda p, k=k: f"{p[k]['naive_failure_rate']:.0%}"),
            ("matched", lambda p, k=k: f"{p[k]['prediction_matches']}/{p[k]['trials']}")]
    lines += [markdown_table(pairs, columns, fmt=fmt), ""]
    for kind in SCORE_KINDS:
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
    return lines


def _readme(thr: list[dict[str, Any]], brk: list[dict[str, Any]], stress: list[dict[str, Any]],
            extra: dict[str, Any], summary: dict[str, Any], stress_threshold: float) -> str:
    answers = [_answer_q2(thr), _answer_breaking_point(brk), _answer_q3(extra["quiz"]),
               _answer_q4(stress, summary), _answer_fp64(extra["bandwidth"]),
               _answer_constructed(extra["constructed"]), _answer_negative(extra["negative"])]
    sections: list[readme.Section] = [
        ("exp thresholds per dtype: found vs closed form", _thresholds_section(thr)),
        (f"Stress test: {STRESS_DTYPE} failure rate of attention scores",
         _stress_section(stress, stress_threshold)),
        ("Figures", ["![exp against each dtype's max](exp_vs_dtype_max.png)", "",
                     "Each dtype has its own marker, size and dash pattern, and the legends "
                     "sit below the axes; a threshold equal to an earlier dtype's is drawn "
                     "shifted right, as its legend entry says. The exact values are the "
                     "thresholds table above.", "",
                     "![scaled vs unscaled scores](score_histograms.png)"]),
    ]
    return readme.render(NAME, SEEDS, summary["headline"], answers, sections)


# --------------------------------------------------------------------------- run


def run(ctx: Context) -> Result:
    ctx.progress("thresholds")
    thresholds = [_threshold_record(name, dt) for name, dt in dtypes.DTYPES.items()]
    ctx.progress("breaking points")
    breaks = [_break_record(r["dtype"], dtypes.DTYPES[r["dtype"]], r["overflow_found"])
              for r in thresholds]
    stress_threshold = float(fm.overflow_threshold(STRESS_DTYPE))
    stress, example = _stress(ctx, stress_threshold)
    extra: dict[str, Any] = {"quiz": _softmax_records("quiz_q3", QUIZ_SCORES),
             "negative": _softmax_records("very_negative", (NEGATIVE_SCORE,) * 4),
             "constructed": _constructed_record(stress_threshold),
             "bandwidth": _bandwidth_record()}
    ctx.progress("figures")
    figures = {"exp_vs_dtype_max": _exp_figure(thresholds),
               "score_histograms": _histogram_figure(example, stress_threshold)}

    by_dtype = {r["dtype"]: r for r in thresholds}
    brk = {r["dtype"]: r["break_at"] for r in breaks}
    rates = {kind: [r["failure_rate"] for r in stress if r["scores"] == kind]
             for kind in SCORE_KINDS}
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
        f"scaled by 1/sqrt(d) {_rate(rates['scaled'])}, scaled with the seed's outlier "
        f"{_rate(rates['scaled, outlier'])}")
    text = _readme(thresholds, breaks, stress, extra, summary, stress_threshold)
    records: list[dict[str, Any]] = [*thresholds, *breaks, *stress, *extra["quiz"],
                                     *extra["negative"], extra["constructed"],
                                     extra["bandwidth"]]
    return Result(records=records, summary=summary, figures=figures, readme=text,
                  headline=summary["headline"])
