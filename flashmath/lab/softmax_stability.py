"""Seed 001: break naive softmax on an adversarial battery; the stable one survives it.

The battery is seed 001's eight logit vectors (five tenses; y = 1 is "present simple"),
each run in float32 (the seed's dtype), float16 and bfloat16 through ``fm.naive`` (the
textbook formulas in the input dtype) and the stable ``fm`` functions, and compared with
an exact oracle (mpmath at 50 digits on the same, dtype-rounded, input). A float64 pass
checks flashmath against scipy.special.

Error measure: ``err`` is max_i |p_i - p*_i| / max_i p*_i against the oracle's p* (absolute
error relative to the largest probability, the rule of docs/conventions.md for outputs
rounded back to a narrow dtype; element-wise relative error is meaningless for probabilities
that underflow).
A result "diverges" from the oracle when it has NaN/inf or ``err`` > DIVERGE_EPS x eps(dtype).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

import flashmath as fm
from flashmath import dtypes
from flashmath.lab import plotting, readme
from flashmath.lab.experiment import Context, Result
from flashmath.lab.report import fmt_value as fmt
from flashmath.softmax.naive import exp_and_softmax
from flashmath.text import markdown_table

NAME = "softmax-stability"
TITLE = "Break naive softmax on the adversarial battery; the stable one survives"
SEEDS = ("001",)

#: Seed 001's battery, in its order: (case, logits).
CASES: tuple[tuple[str, np.ndarray], ...] = (
    ("small magnitudes", np.array([0.1, 0.2, 0.3, 0.4, 0.5])),
    ("mixed magnitudes", np.array([-3.0, 0.0, 1.0, 2.0, 5.0])),
    ("large positive", np.array([1.0, 92.0, 3.0, 0.0, 2.0])),
    ("large negative", np.array([-100.0, -200.0, -300.0, -400.0, -500.0])),
    ("all identical", np.array([5.0, 5.0, 5.0, 5.0, 5.0])),
    ("masked entry", np.array([1.0, -np.inf, 3.0, 0.0, 2.0])),
    ("single element", np.array([42.0])),
    ("verb vocabulary", np.zeros(600)),
)
#: The true label of the cross-entropy battery (index 1, "present simple").
LABEL = 1
#: float32 is the seed's dtype; float16 and bfloat16 are the narrow versions of each case.
BATTERY_DTYPES = ("float32", "float16", "bfloat16")
#: A result diverges when its error exceeds this many epsilons of its dtype.
DIVERGE_EPS = 16
#: Seed 001's Block D predictions (its own hand-written table), checked against measurement.
SEED_PREDICTIONS: dict[str, dict[str, Any]] = {
    "small magnitudes": {"naive_nan": False, "stable_nan": False, "ce": 1.50},
    "mixed magnitudes": {"naive_nan": False, "stable_nan": False, "ce": None},
    "large positive": {"naive_nan": True, "stable_nan": False, "ce": 91.0},
    "large negative": {"naive_nan": True, "stable_nan": False, "ce": 0.0},
}
#: The seed's stop condition 2: naive NaN on at least this many cases.
STOP_NAIVE_NAN = 2
#: The scipy.special functions of the float64 cross-check (flashmath has each by that name).
SCIPY_FUNCTIONS = ("softmax", "log_softmax", "logsumexp")
#: Vectors up to this length keep their full probabilities in results.json.
KEEP_VECTOR = 8


# --------------------------------------------------------------------------- oracle


def _oracle(x: np.ndarray) -> tuple[np.ndarray, float, float | None, str]:
    """(probabilities, logsumexp, cross-entropy at LABEL or None, source) of float64 ``x``,
    each exact to float64 rounding.

    flashmath.softmax.mp_oracle (mpmath, 50 digits) when mpmath is installed (a test extra, which
    torch's sympy also brings); otherwise flashmath in float64.
    """
    has_label = LABEL < x.size
    try:
        import mpmath  # noqa: F401  (mp_oracle needs it; asked first, as mp_oracle may be cached)

        from flashmath.softmax import mp_oracle
    except ImportError:
        lse = float(fm.logsumexp(x))
        return (np.asarray(fm.softmax(x), dtype=np.float64), lse,
                lse - float(x[LABEL]) if has_label else None,
                "flashmath float64 (mpmath not installed)")
    ce = float(mp_oracle.cross_entropy(x, np.array(LABEL), reduction="sum")) if has_label else None
    return (mp_oracle.softmax(x), float(mp_oracle.logsumexp(x)), ce,
            f"mpmath, {mp_oracle.DPS} digits")


# --------------------------------------------------------------------------- measuring


def _err(p: np.ndarray, oracle: np.ndarray) -> float:
    """max |p - oracle| / max oracle (inf when p has NaN or inf)."""
    p64 = p.astype(np.float64)
    if not np.all(np.isfinite(p64)):
        return math.inf
    return float(np.max(np.abs(p64 - oracle)) / np.max(np.abs(oracle)))


def _rel_diff_where_valid(naive: np.ndarray, stable: np.ndarray) -> float | None:
    """max |naive - stable| / |stable| over the entries where naive is finite (0/0 counts 0);
    None when no entry is valid."""
    n, s = naive.astype(np.float64), stable.astype(np.float64)
    valid = np.isfinite(n)
    if not valid.any():
        return None
    n, s = n[valid], s[valid]
    with np.errstate(all="ignore"):
        rel = np.where(n == s, 0.0, np.abs(n - s) / np.abs(s))
    return float(np.max(rel))


def _mechanism(x: np.ndarray, dt: np.dtype[Any], naive: np.ndarray, err: float) -> str | None:
    """Why the textbook formula went wrong in ``dt``, read off its intermediates (exp, sum)."""
    eps = float(dtypes.finfo(dt).eps)
    if np.all(np.isfinite(naive.astype(np.float64))) and err <= DIVERGE_EPS * eps:
        return None
    # x is already in dt: exp runs in dt, as in the textbook formula (naive.softmax's own)
    e, _ = exp_and_softmax(x, -1)
    with np.errstate(all="ignore"):
        total = np.sum(e)
    e64, total64 = e.astype(np.float64), float(total)
    name = dtypes.dtype_name(dt)
    if np.isinf(e64).any():
        bad = x.astype(np.float64)[np.isinf(e64)]
        return (f"overflow: exp({fmt(bad.min())}) = inf in {name} (exp overflows above "
                f"{fmt(fm.overflow_threshold(dt))}), so the sum is inf and inf/inf = NaN")
    if np.isnan(e64).any():
        bad = x.astype(np.float64)[np.isnan(e64)]
        return f"exp({fmt(bad.min())}) is NaN in {name} (no inf to overflow to)"
    if total64 == 0.0:
        return (f"underflow: every exp(x) rounds to 0 in {name} (largest is exp("
                f"{fmt(x.astype(np.float64).max())}); exp underflows below "
                f"{fmt(fm.underflow_threshold(dt))}), so 0/0 = NaN")
    if math.isinf(total64):
        return f"the sum of exp(x) overflows to inf in {name}, so every p = x/inf = 0"
    exact = float(np.sum(e64))
    if total64 != exact:
        bits = int(dtypes.finfo(dt).nmant) + 1
        return (f"accumulation: the {name} sum of exp(x) is {fmt(total64)}, not "
                f"{fmt(exact)} ({name} carries {bits} significant bits and every addition to "
                "the running sum rounds to them)")
    return f"rounding: error {fmt(err)} = {fmt(err / eps)} eps of {name}"


def _cross_entropy(fn: Any, x: np.ndarray, n: int) -> tuple[float | None, str | None]:
    """(loss, None) or (None, why it is undefined) for label LABEL."""
    if LABEL >= n:
        try:
            with np.errstate(all="ignore"):
                fn(x, LABEL)
        except (ValueError, IndexError) as exc:
            return None, f"{type(exc).__name__}: {exc}"
        return None, f"label {LABEL} is out of range for {n} class(es), yet no error was raised"
    with np.errstate(all="ignore"):
        return float(np.asarray(fn(x, LABEL), dtype=np.float64)), None


def _battery_record(case: str, x64: np.ndarray, dt: np.dtype[Any]) -> tuple[dict[str, Any],
                                                                            dict[str, Any]]:
    """One (case, dtype) measurement: a JSON record and the arrays the heatmap needs."""
    x = x64.astype(dt)
    xin = x.astype(np.float64)  # the exact values the dtype holds
    oracle, oracle_lse, oracle_ce, source = _oracle(xin)
    with np.errstate(all="ignore"):
        naive = np.asarray(fm.naive.softmax(x))
    stable = np.asarray(fm.softmax(x))
    n = x.size
    name = dtypes.dtype_name(dt)
    rec: dict[str, Any] = {"section": "battery", "case": case, "dtype": name, "n": n,
                           "label": LABEL, "oracle_source": source}
    for kind, p in (("naive", naive), ("stable", stable)):
        p64 = p.astype(np.float64)
        err = _err(p, oracle)
        rec |= {
            f"{kind}_nan": bool(np.isnan(p64).any()),
            f"{kind}_inf": bool(np.isinf(p64).any()),
            f"{kind}_sum": float(np.sum(p64)),
            f"{kind}_max": float(np.max(p64)),
            f"{kind}_err": err,
            f"{kind}_diverged": bool(not math.isfinite(err)
                                     or err > DIVERGE_EPS * float(dtypes.finfo(dt).eps)),
        }
    info = dtypes.finfo(dt)
    with np.errstate(all="ignore"):
        e = np.exp(x)
        rec |= {"overflow_threshold": float(fm.overflow_threshold(dt)),
                "underflow_threshold": float(fm.underflow_threshold(dt)),
                "dtype_tiny": float(info.tiny), "dtype_eps": float(info.eps),
                "naive_exp_of_max": float(np.exp(np.max(x))),
                "naive_sum_exp": float(np.sum(e)), "exact_sum_exp": float(np.sum(
                    e.astype(np.float64)))}
    rec["naive_mechanism"] = _mechanism(x, dt, naive, rec["naive_err"])
    rec["rel_diff_where_naive_valid"] = _rel_diff_where_valid(naive, stable)
    rec["oracle_ce"] = oracle_ce
    rec["oracle_lse"] = oracle_lse
    if n <= KEEP_VECTOR:  # the loss for every label, to read the seed's guesses against
        rec["oracle_ce_by_label"] = [rec["oracle_lse"] - float(v) for v in xin]
        # a by-hand logsumexp for nearly equal logits: mean + ln(n) (the seed's "by hand")
        rec["lse_by_hand"] = float(np.mean(np.asarray(xin, np.float64)) + np.log(n))
        rec["ce_by_hand"] = rec["lse_by_hand"] - float(xin[LABEL]) if n > LABEL else None
    rec["naive_ce"], rec["naive_ce_undefined"] = _cross_entropy(fm.naive.cross_entropy, x, n)
    rec["stable_ce"], rec["stable_ce_undefined"] = _cross_entropy(fm.cross_entropy, x, n)
    if n <= KEEP_VECTOR:
        rec |= {"input": xin, "oracle_p": oracle, "naive_p": naive.astype(np.float64),
                "stable_p": stable.astype(np.float64)}
    return rec, {"naive": naive.astype(np.float64), "stable": stable.astype(np.float64)}


def _oracle_digits() -> int | None:
    """The mpmath oracle's working digits (None without mpmath)."""
    try:
        import mpmath  # noqa: F401

        from flashmath.softmax import mp_oracle
    except ImportError:
        return None
    return int(mp_oracle.DPS)


def _max_abs_diff(a: Any, b: Any) -> float:
    """max |a - b|, with equal infinities counting as 0."""
    a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    with np.errstate(all="ignore"):
        d = np.where(a64 == b64, 0.0, np.abs(a64 - b64))
    return float(np.max(d))


def _float64_records() -> tuple[list[dict[str, Any]], str | None]:
    """float64, per case: flashmath against the oracle and against scipy.special (when
    installed; it is a test extra, so its columns are None without it, with a note why)."""
    note: str | None = None
    try:
        from scipy import special
    except ImportError:
        special, note = None, "scipy is not installed (a test extra): cross-check skipped"
    records = []
    for case, x in CASES:
        oracle, lse, _, _ = _oracle(x)
        p, lp, l = fm.softmax(x), fm.log_softmax(x), fm.logsumexp(x)
        records.append({
            "section": "float64", "case": case, "dtype": "float64",
            "stable_err": _err(np.asarray(p), oracle),
            "logsumexp_rel_err": abs(float(l) - lse) / max(1.0, abs(lse)),
            **({f"scipy_{fn}_max_abs_diff": None for fn in SCIPY_FUNCTIONS} if special is None
               else {f"scipy_{fn}_max_abs_diff": _max_abs_diff(ours, getattr(special, fn)(x))
                     for fn, ours in zip(SCIPY_FUNCTIONS, (p, lp, l), strict=True)}),
        })
    return records, note


# --------------------------------------------------------------------------- figure


def _heatmap(vectors: dict[tuple[str, str], dict[str, np.ndarray]]) -> Any:
    """softmax_break.png: rows = cases, one (naive | stable) pair of panels per dtype."""
    import matplotlib as mpl

    width = 5
    cmap, norm = mpl.colormaps["viridis"], mpl.colors.Normalize(0.0, 1.0)
    fig, axes = plotting.figure(len(BATTERY_DTYPES), 2, width=9.5,
                                height=3.4 * len(BATTERY_DTYPES), sharey=True)
    labels = [f"{c} (first {width} of {x.size})" if x.size > width else c for c, x in CASES]
    for row, dname in enumerate(BATTERY_DTYPES):
        for col, kind in enumerate(("naive", "stable")):
            ax = axes[row, col]
            rgba = np.ones((len(CASES), width, 4)) * 0.92  # grey: no such entry
            for i, (case, _) in enumerate(CASES):
                p = vectors[(case, dname)][kind][:width]
                for j, v in enumerate(p):
                    rgba[i, j] = mpl.colors.to_rgba(plotting.NAN_COLOR) if np.isnan(v) \
                        else cmap(norm(v))
                    light = np.isnan(v) or v > 0.6
                    ax.text(j, i, "NaN" if np.isnan(v) else f"{v:.2g}", ha="center",
                            va="center", fontsize=7, color="black" if light else "white")
            ax.imshow(rgba, aspect="auto", interpolation="nearest")
            ax.set_xticks(range(width), [f"p[{j}]" for j in range(width)])
            ax.set_yticks(range(len(CASES)), labels)
            ax.grid(False)
            ax.set_title(f"{kind} softmax, {dname}")
    fig.colorbar(mpl.cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes, shrink=0.5,
                 label="probability (red: NaN, grey: no entry)")
    fig.suptitle("Seed 001 battery: naive (textbook) vs stable softmax")
    return fig


# --------------------------------------------------------------------------- readme


def _empty_row_records() -> list[dict[str, Any]]:
    """The all -inf row: naive, and each of the stable softmax's ``empty=`` choices, beside a
    normal row of the same batch (which must stay untouched)."""
    x = np.array([[-np.inf] * 5, [1.0, 2.0, 3.0, 4.0, 5.0]])
    with np.errstate(all="ignore"):
        naive = np.asarray(fm.naive.softmax(x))
    rows = [{"section": "empty_row", "method": "naive", "output": naive[0],
             "other_row_ok": bool(np.allclose(naive[1], fm.softmax(x[1])))}]
    for choice in ("zeros", "uniform", "nan"):
        p = np.asarray(fm.softmax(x, empty=choice))
        rows.append({"section": "empty_row", "method": f"stable, empty={choice!r}",
                     "output": p[0], "other_row_ok": bool(np.allclose(p[1], fm.softmax(x[1])))})
    rows[1]["logsumexp"] = float(fm.logsumexp(x[0]))
    return rows


def _nan_in(v: Any) -> str:
    return "NaN" if v else "no NaN"


def _answer_predictions(by: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    table = markdown_table(
        [by[(case, "float32")] | {f"seed_{k}": v for k, v in SEED_PREDICTIONS.get(
            case, {}).items()} for case, _ in CASES],
        [("case", "case"), ("seed: naive NaN?", "seed_naive_nan"), ("naive NaN", "naive_nan"),
         ("seed: stable NaN?", "seed_stable_nan"), ("stable NaN", "stable_nan"),
         ("seed: CE", lambda r: "" if r.get("seed_ce") is None else f"~{fmt(r['seed_ce'])}"),
         ("exact CE (oracle)", "oracle_ce"),
         ("naive CE", lambda r: _ce(r["naive_ce"], r["naive_ce_undefined"])),
         ("stable CE", lambda r: _ce(r["stable_ce"], r["stable_ce_undefined"]))], fmt=fmt)
    return ["The seed's own predictions beside float32 (the seed's dtype) and the exact "
            "(oracle) loss; where they diverge, why:", "", table, "", *_prediction_notes(by)]


def _prediction_notes(by: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    """A sentence for each seed prediction the float32 measurement or the oracle contradicts."""
    notes = []
    for case, pred in SEED_PREDICTIONS.items():
        r = by[(case, "float32")]
        if pred["naive_nan"] != r["naive_nan"]:
            notes.append(f"- {case}, naive: the seed predicted {_nan_in(pred['naive_nan'])}, "
                         f"float32 gives {_nan_in(r['naive_nan'])}: "
                         + (r["naive_mechanism"] or _why_no_nan(r)) + ". It does give NaN in "
                         "the narrower dtypes (float16: "
                         f"{_nan_in(by[(case, 'float16')]['naive_nan'])}, bfloat16: "
                         f"{_nan_in(by[(case, 'bfloat16')]['naive_nan'])}).")
        guess = pred.get("ce")
        if guess is None or r["oracle_ce"] is None:
            continue
        if abs(guess - r["oracle_ce"]) <= 0.05 * max(1.0, abs(r["oracle_ce"])):
            continue
        losses = r["oracle_ce_by_label"]
        near = int(np.argmin([abs(v - guess) for v in losses]))
        x = np.asarray(r["input"], dtype=np.float64)
        lse, ce = r["oracle_lse"], r["oracle_ce"]
        if ce < 1e-6:  # logsumexp exceeds x[LABEL] by less than it can show
            loss = (f"logsumexp(x) = x[{LABEL}] + {fmt(ce)} (printed as {fmt(lse)}: every "
                    f"other logit is so far below x[{LABEL}] = {fmt(x[LABEL])} that the excess "
                    f"is below float64's resolution there), so the loss is {fmt(ce)}")
        else:
            loss = (f"logsumexp(x) - x[{LABEL}] = {fmt(lse)} - ({fmt(x[LABEL])}) = {fmt(ce)}, "
                    f"{'above' if ce > guess else 'below'} the guess")
        if near == int(np.argmax(x)):
            why = (f"~{fmt(guess)} is the loss of label {near} ({fmt(losses[near])}), whose "
                   f"logit x[{near}] = {fmt(x[near])} is the largest: the seed's reasoning "
                   "picked the max's index "
                   f"instead of y = {LABEL}.")
        elif float(np.ptp(x)) < 1.0:  # nearly equal logits: the by-hand estimate
            why = (f"By hand, logsumexp(x) ~ mean(x) + ln({x.size}) = {fmt(r['lse_by_hand'])} "
                   f"for logits this close, which gives {fmt(r['ce_by_hand'])} for y = {LABEL}: "
                   f"the guess is a rough estimate (the nearest loss, {fmt(losses[near])}, is "
                   f"label {near}'s).")
        elif abs(losses[near] - guess) <= 0.05 * max(1.0, abs(guess)):
            why = (f"~{fmt(guess)} is the loss of label {near}: logsumexp(x) - x[{near}] = "
                   f"{fmt(lse)} - ({fmt(x[near])}) = {fmt(losses[near])}; the guess fits "
                   f"y = {near}, not y = {LABEL}.")
        else:
            why = f"The nearest loss to the guess is label {near}'s, {fmt(losses[near])}."
        notes.append(f"- {case}, CE: the seed guessed ~{fmt(guess)}; with y = {LABEL}, "
                     f"{loss}. {why}")
    return notes or ["- Every seed prediction held."]


def _why_no_nan(r: dict[str, Any]) -> str:
    """Why the textbook formula stayed NaN-free: exp of the largest logit is non-zero."""
    e, tiny = r["naive_exp_of_max"], r["dtype_tiny"]
    kind = f"a subnormal (below {fmt(tiny)})" if 0 < e < tiny else "finite"
    return (f"exp({fmt(float(np.max(r['input'])))}) = {fmt(e)} in {r['dtype']} is {kind} and "
            "non-zero, so the sum is neither 0 nor inf and no 0/0 or inf/inf occurs")


def _answer_stop_condition(battery: list[dict[str, Any]], summary: dict[str, Any]) -> list[str]:
    nan_cases = summary["naive_nan_cases"]
    lines = [", ".join(f"{d}: naive NaN in {len(v)} case(s) ({', '.join(v) or 'none'})"
                       for d, v in nan_cases.items())
             + f"; stable NaN in {summary['stable_nan_count']} of {summary['battery_size']}."]
    short = [d for d, v in nan_cases.items() if len(v) < STOP_NAIVE_NAN]
    if short:
        lines.append(f"float32 falls short of the seed's {STOP_NAIVE_NAN} cases"
                     if short == ["float32"] else f"{', '.join(short)} fall(s) short")
        f32 = [r for r in battery if r["dtype"] == "float32"]
        over = sorted({float(v) for r in f32 for v in r.get("input", ())
                       if v > r["overflow_threshold"]})
        tops = [float(np.max(r["input"])) for r in f32 if "input" in r]
        lines[-1] += (": float32's exp overflows above "
                      f"{fmt(f32[0]['overflow_threshold'])} (the battery's logits above it: "
                      f"{fmt(over)}) and underflows only below "
                      f"{fmt(f32[0]['underflow_threshold'])}, below every row's largest logit "
                      f"(the lowest is {fmt(min(tops))}), so no row's exps all vanish. The "
                      "narrower dtypes overflow and underflow sooner:")
    lines.append("")
    for r in battery:
        if r["naive_diverged"]:
            lines.append(f"- **{r['case']}, {r['dtype']}**: "
                         f"{'NaN' if r['naive_nan'] else 'err ' + fmt(r['naive_err'])}; "
                         f"{r['naive_mechanism']}.")
    return lines


def _answer_max_trick(by: dict[tuple[str, str], dict[str, Any]]) -> str:
    r = by[("large positive", "float32")]
    return ("softmax(x - c) = softmax(x) for any constant c, because the factor exp(-c) "
            "multiplies numerator and denominator alike and cancels; choosing c = max(x) makes "
            "every exponent <= 0, so no exp exceeds 1 (nothing overflows), and the largest term "
            "is exp(0) = 1, so the sum is at least 1 (no 0/0). Measured on the large positive "
            f"case in float32: the stable sum is {fmt(r['stable_sum'])} with error "
            f"{fmt(r['stable_err'])}, where the naive one is {fmt(r['naive_sum'])}.")


def _answer_empty_row(rows: list[dict[str, Any]]) -> list[str]:
    by = {r["method"]: r for r in rows}
    zeros = by["stable, empty='zeros'"]
    return [
        f"flashmath returns zeros (and logsumexp {fmt(zeros['logsumexp'])}): "
        + "; ".join(f"{r['method']} gives {fmt(r['output'])}" for r in rows)
        + ". The other row of the same batch is untouched in every case ("
        + ", ".join(fmt(r["other_row_ok"]) for r in rows) + ").",
        "",
        "Zeros is the default because a row with nothing to attend to contributes nothing: "
        "attention then outputs zeros and its gradients are zero, never NaN (PyTorch's safe "
        "softmax and FlashAttention agree), and a batch with a fully padded row trains on. "
        "Uniform (`empty=\"uniform\"`, the seed's hint) is defensible, since the input has no "
        "signal, but it hides the pathology and puts probability on masked entries; NaN "
        "(`empty=\"nan\"`) makes the pathology loud and poisons everything downstream. Both "
        "are a keyword away for a caller who wants them.",
    ]


def _answer_masked_label(battery: list[dict[str, Any]]) -> str:
    r = next(r for r in battery if r["case"] == "masked entry" and r["dtype"] == "float32")
    return (f"The masked entry case has x[{LABEL}] = -inf: the exact loss is "
            f"{fmt(r['oracle_ce'])}, naive {fmt(r['naive_ce'])}, stable {fmt(r['stable_ce'])}. "
            "Correct (probability 0 for the truth is infinite loss), and a poison pill for "
            "training: a mask must never cover the true label.")


def _answer_scipy(f64: list[dict[str, Any]], scipy_note: str | None,
                  summary: dict[str, Any]) -> list[str]:
    if scipy_note:
        return [scipy_note + "; install the lab extra (`pip install flashmath[lab]`) for it."]
    diff = summary["scipy_max_abs_diff"]
    return [
        "Yes, on every case, adversarial ones included (scipy is stable too): the largest "
        "absolute differences are "
        + ", ".join(f"{fn} {fmt(v)}" for fn, v in diff.items())
        + f"; against the exact oracle flashmath's softmax is off by at most "
        f"{fmt(summary['float64_max_err_stable'])}.",
        "",
        markdown_table(f64, [
            ("case", "case"), ("softmax", "scipy_softmax_max_abs_diff"),
            ("log_softmax", "scipy_log_softmax_max_abs_diff"),
            ("logsumexp", "scipy_logsumexp_max_abs_diff"), ("err vs oracle", "stable_err"),
            ("logsumexp rel err", "logsumexp_rel_err")], fmt=fmt),
    ]


def _method(summary: dict[str, Any]) -> str:
    return (f"Seed 001's eight logit vectors, label y = {LABEL} for cross-entropy, in "
            f"{', '.join(BATTERY_DTYPES)}. Naive: `fm.naive` (the textbook formulas, computed "
            "in the input dtype). Stable: `fm.softmax` / `fm.cross_entropy` (max-shift, "
            "float32 accumulators for narrow input, result in the input dtype). Oracle: "
            f"{summary['oracle']} on the dtype-rounded input. `err` is the largest absolute "
            "error relative to the largest probability; a result *diverges* when it has "
            f"NaN/inf or err > {summary['diverge_eps']} eps of its dtype. Stable softmax "
            f"diverged in {summary['stable_diverged_count']} of {summary['battery_size']} "
            "(case, dtype) pairs; its largest error per dtype: "
            + ", ".join(f"{d} {fmt(v)} ({fmt(summary['max_err_stable_eps'][d])} eps)"
                        for d, v in summary["max_err_stable"].items()) + ".")


def _ce_section(battery: list[dict[str, Any]]) -> list[str]:
    lines = []
    for r in battery:
        if r["dtype"] == "float32" and r["stable_ce_undefined"]:
            lines.append(f"- {r['case']}: undefined; stable says {r['stable_ce_undefined']}; "
                         f"naive says {r['naive_ce_undefined']}.")
    bad = [r for r in battery if r["naive_ce"] is not None and r["oracle_ce"] is not None
           and not math.isclose(r["naive_ce"], r["oracle_ce"], rel_tol=1e-2, abs_tol=1e-6)]
    if bad:
        lines.append("- naive CE = -log(softmax(x)[y]) is off by more than 1% from the exact "
                     "value in:")
        lines += [f"  - {r['case']}, {r['dtype']}: {fmt(r['naive_ce'])} instead of "
                  f"{fmt(r['oracle_ce'])}: {_ce_mechanism(r)}" for r in bad]
    return lines


def _readme(battery: list[dict[str, Any]], f64: list[dict[str, Any]],
            scipy_note: str | None, empty_rows: list[dict[str, Any]],
            summary: dict[str, Any]) -> str:
    by = {(r["case"], r["dtype"]): r for r in battery}
    columns = [("case", "case"), *((f"{kind} {what}", f"{kind}_{what}")
                                   for kind in ("naive", "stable")
                                   for what in ("nan", "sum", "max", "err")),
               ("max rel diff (naive valid)", "rel_diff_where_naive_valid")]
    answers = [_answer_predictions(by), _answer_scipy(f64, scipy_note, summary),
               _answer_stop_condition(battery, summary), _answer_max_trick(by),
               _answer_empty_row(empty_rows), _answer_masked_label(battery)]
    sections: list[readme.Section] = [
        ("Method", _method(summary)),
        ("Cross-entropy (y = 1) in every dtype", _ce_section(battery)),
        *((f"Results, {d}", markdown_table([by[(case, d)] for case, _ in CASES], columns,
                                           fmt=fmt)) for d in BATTERY_DTYPES),
        ("Figure", ["![softmax_break](softmax_break.png)", "",
                    "Rows are the cases (the verb vocabulary shows its first entries), each "
                    "dtype a pair of panels: naive left, stable right. Red cells are NaN."]),
    ]
    return readme.render(NAME, SEEDS, summary["headline"], answers, sections)


def _ce(value: float | None, undefined: str | None) -> str:
    return f"undefined ({undefined})" if undefined else fmt(value)


def _ce_mechanism(r: dict[str, Any]) -> str:
    """Why -log(softmax(x)[y]) missed, from the measured softmax of the same record."""
    if r["naive_nan"]:
        return "its softmax was already NaN (see above)."
    if r["naive_ce"] == math.inf:
        return (f"softmax(x)[{LABEL}] underflowed to 0 in {r['dtype']} (exact "
                f"probability exp(-{fmt(r['oracle_ce'])})), and -log(0) = inf; the stable "
                f"logsumexp(x) - x[{LABEL}] never forms that probability.")
    return (f"its softmax was off (err {fmt(r['naive_err'])}"
            + (f"; {r['naive_mechanism']}" if r["naive_mechanism"] else "") + ").")


# --------------------------------------------------------------------------- run


def run(ctx: Context) -> Result:
    battery, vectors = [], {}
    for dname in BATTERY_DTYPES:
        ctx.progress(f"battery {dname}")
        for case, x in CASES:
            rec, vec = _battery_record(case, x, dtypes.DTYPES[dname])
            battery.append(rec)
            vectors[(case, dname)] = vec
    ctx.progress("scipy cross-check")
    f64, scipy_note = _float64_records()
    empty_rows = _empty_row_records()
    ctx.progress("heatmap")
    fig = _heatmap(vectors)

    nan_cases = {d: [r["case"] for r in battery if r["dtype"] == d and r["naive_nan"]]
                 for d in BATTERY_DTYPES}
    stable_nan = sum(r["stable_nan"] for r in battery)
    summary: dict[str, Any] = {
        "oracle": battery[0]["oracle_source"],
        "naive_nan_cases": nan_cases,
        "naive_diverged_cases": {d: [r["case"] for r in battery
                                     if r["dtype"] == d and r["naive_diverged"]]
                                 for d in BATTERY_DTYPES},
        "stable_nan_count": stable_nan,
        "stable_diverged_count": sum(r["stable_diverged"] for r in battery),
        "max_err_stable": {d: max(r["stable_err"] for r in battery if r["dtype"] == d)
                           for d in BATTERY_DTYPES},
        "float64_max_err_stable": max((r["stable_err"] for r in f64), default=None),
        "scipy_max_abs_diff": None if scipy_note else {
            fn: max(r[f"scipy_{fn}_max_abs_diff"] for r in f64) for fn in SCIPY_FUNCTIONS},
        "scipy_note": scipy_note,
        "battery_size": len(battery),
        "oracle_digits": _oracle_digits(),
        "diverge_eps": DIVERGE_EPS,
        "seed_predictions": SEED_PREDICTIONS,
    }
    summary["max_err_stable_eps"] = {d: v / float(dtypes.finfo(d).eps)
                                     for d, v in summary["max_err_stable"].items()}
    n = len(CASES)
    summary["headline"] = (
        "naive softmax gives NaN in "
        + ", ".join(f"{len(v)}/{n} {d}" for d, v in nan_cases.items())
        + f" cases; stable in {stable_nan}/{len(battery)}; "
        + "stable max error " + ", ".join(f"{d} {fmt(v)}"
                                          for d, v in summary["max_err_stable"].items())
        + (f"; float64 agrees with scipy to {fmt(max(summary['scipy_max_abs_diff'].values()))}"
           if not scipy_note else ""))
    text = _readme(battery, f64, scipy_note, empty_rows, summary)
    return Result(records=battery + f64 + empty_rows, summary=summary,
                  figures={"softmax_break": fig}, readme=text, headline=summary["headline"])
