"""Seeds 000 and 002: online softmax equals batched softmax, chunk by chunk, in every dtype.

Sections (each a ``section`` value in the records):

- grid: seed 000's Block C. For each (N, d, dtype, chunk size) a batch of random problems
  (s ~ N(0, 1), V ~ N(0, 1), cast to dtype) goes through ``SoftmaxState.update`` chunk by
  chunk (float32 state, the default); ``err`` is max |O_online - O_ref| where O_ref is
  softmax(s) @ V in float64 on the dtype-rounded inputs and O_online is returned in the
  input dtype. ``floor`` is the error of merely rounding O_ref to that dtype, ``err_state``
  the error before that rounding. Pass: err below seed 000's range for the dtype.
- chunk_sensitivity: Block D. float16 inputs, chunk sizes 1..256, float32 state vs float16
  state (``accum_dtype=float16``): max abs error vs chunk size (the figure).
- pathological: Block E. [60, 0, 0, 0], [-100, -100, -100, 0], all zeros, all -inf, an
  all -inf chunk before finite ones; in every dtype, float32 and float16 state.
- realistic: Block E'. s ~ N(0, 5), N = 64, d = 64, chunk 16.
- above_11: Block F's third question: scores above 11 (exp(11) ~ 59874, float16's largest
  finite value is 65504) with naive float16, online with float16 state, with float32 state;
  plus the two ways a float16 state does fail (exp(m_old - m_new) underflow, l > 65504).
- trace: seed 002's per-block (m, l) on its example scores, block size 2.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

import flashmath as fm
from flashmath import dtypes
from flashmath.lab import plotting, readme
from flashmath.lab.experiment import Context, Result
from flashmath.text import markdown_table

NAME = "online-softmax"
TITLE = "Online softmax equals batched softmax in every dtype, chunk size and merge order"
SEEDS = ("000", "002")

#: Seed 000's expected ranges (absolute error, for outputs of order one).
BOUNDS = {"float32": 1e-6, "float16": 1e-3, "bfloat16": 5e-3}
GRID_DTYPES = ("float32", "float16", "bfloat16")
CHUNKS = (1, 4, 16, 64, 256)
GRID_D = (16, 64)
GRID_N = {False: (64, 256, 1024), True: (64, 256)}  # quick -> sequence lengths
TRIALS = {False: 16, True: 4}  # random problems per grid cell (one batched state)
SENSITIVITY_N = {False: 2048, True: 512}
#: Seed 002's example scores and block size.
SEED_002_SCORES = (2.0, -1.5, 0.3, 4.2)
SEED_002_BLOCK = 2
#: A max/min error ratio across chunk sizes at or above this counts as "chunk size matters".
SENSITIVE = 2.0
#: Past float16's largest finite value: the length at which a float16 l overflows.
L_OVERFLOW_N = 2**17

#: Zeros before the jump of 20 in the "max jumps" case of the scores-above-11 section.
JUMP_AFTER = 255

F32, F16 = np.dtype(np.float32), np.dtype(np.float16)


# --------------------------------------------------------------------------- measuring


def _batched64(s: np.ndarray, V: np.ndarray) -> np.ndarray:
    """Seed 000's Block A, softmax(s) @ V, in float64 on the exact values of s and V."""
    p = fm.softmax(s.astype(np.float64))  # (..., N); all -inf rows give zeros
    return (p[..., None, :] @ V.astype(np.float64))[..., 0, :]


def _online(s: np.ndarray, V: np.ndarray, chunk: int, state_dtype: np.dtype[Any]
            ) -> fm.SoftmaxState:
    """Absorb s (..., N) and V (..., N, d) chunk by chunk (the last chunk may be short)."""
    cuts = list(range(chunk, s.shape[-1], chunk))
    state = fm.SoftmaxState.empty(s.shape[:-1], V.shape[-1], dtype=state_dtype)
    with np.errstate(all="ignore"):  # the float16 state overflows on purpose here
        for sc, vc in zip(np.split(s, cuts, axis=-1), np.split(V, cuts, axis=-2), strict=True):
            state = state.update(sc, vc)
    return state


def _max_err(out: np.ndarray, ref: np.ndarray) -> float:
    """max |out - ref| (inf when out has NaN or inf)."""
    out64 = np.asarray(out, dtype=np.float64)
    if not np.all(np.isfinite(out64)):
        return math.inf
    return float(np.max(np.abs(out64 - ref), initial=0.0))


def _judged(err: float, ref: np.ndarray, dname: str) -> dict[str, Any]:
    """err against seed 000's bound for dname: absolute for outputs of order one, scaled by
    max |O| where that exceeds 1 (docs/conventions.md: rounding a result to a narrow dtype
    costs in proportion to its size). ``bound_applied`` is the bound the pass uses."""
    max_abs_out = float(np.max(np.abs(ref), initial=0.0))
    bound = BOUNDS[dname]
    applied = bound * max(1.0, max_abs_out)
    return {"err": err, "max_abs_out": max_abs_out, "bound": bound, "bound_applied": applied,
            "pass": err < applied}


def _errors(s: np.ndarray, V: np.ndarray, chunk: int, state_dtype: np.dtype[Any]
            ) -> dict[str, Any]:
    """err (output in the input dtype, judged), err_state (before rounding), floor."""
    ref = _batched64(s, V)
    state = _online(s, V, chunk, state_dtype)
    with np.errstate(all="ignore"):
        out, out_state = state.finalize(dtype=s.dtype), state.finalize()
    return {**_judged(_max_err(out, ref), ref, dtypes.dtype_name(s.dtype)),
            "err_state": _max_err(out_state, ref), "floor": _max_err(ref.astype(s.dtype), ref)}


def _problem(rng: np.random.Generator, shape: tuple[int, ...], n: int, d: int,
             dt: np.dtype[Any], scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    s = (scale * rng.standard_normal((*shape, n))).astype(dt)
    V = rng.standard_normal((*shape, n, d)).astype(dt)
    return s, V


def _grid(ctx: Context) -> list[dict[str, Any]]:
    rng, trials, records = ctx.rng(1), TRIALS[ctx.quick], []
    for n in GRID_N[ctx.quick]:
        ctx.progress(f"grid N={n}")
        for d in GRID_D:
            for dname in GRID_DTYPES:
                s, V = _problem(rng, (trials,), n, d, dtypes.DTYPES[dname])
                for chunk in CHUNKS:
                    records.append({"section": "grid", "N": n, "d": d, "dtype": dname,
                                    "chunk": chunk, "trials": trials, "state": "float32",
                                    **_errors(s, V, chunk, F32)})
    return records


def _sensitivity(ctx: Context) -> list[dict[str, Any]]:
    n, d, trials = SENSITIVITY_N[ctx.quick], 64, TRIALS[ctx.quick]
    ctx.progress(f"chunk sensitivity N={n}")
    s, V = _problem(ctx.rng(2), (trials,), n, d, F16)
    return [{"section": "chunk_sensitivity", "N": n, "d": d, "dtype": "float16",
             "chunk": chunk, "trials": trials, "state": dtypes.dtype_name(state),
             **_errors(s, V, chunk, state)}
            for state in (F32, F16) for chunk in CHUNKS]


PATHOLOGICAL: tuple[tuple[str, tuple[float, ...]], ...] = (
    ("one huge value [60, 0, 0, 0]", (60.0, 0.0, 0.0, 0.0)),
    ("one near zero [-100, -100, -100, 0]", (-100.0, -100.0, -100.0, 0.0)),
    ("all zeros", (0.0, 0.0, 0.0, 0.0)),
    ("all -inf", (-math.inf,) * 4),
    ("all -inf chunk, then finite", (-math.inf, -math.inf, 1.0, 2.0)),
)


def _pathological(ctx: Context) -> list[dict[str, Any]]:
    ctx.progress("pathological inputs")
    V64 = ctx.rng(3).standard_normal((4, 16))
    records = []
    for case, scores in PATHOLOGICAL:
        for dname in GRID_DTYPES:
            dt = dtypes.DTYPES[dname]
            s, V = np.array(scores, dt), V64.astype(dt)
            ref = _batched64(s, V)
            with np.errstate(all="ignore"):  # seed 000's naive formula, in the input dtype
                naive = fm.naive.softmax(s) @ V
            for state in (F32, F16):
                with np.errstate(all="ignore"):
                    out = _online(s, V, 2, state).finalize(dtype=dt)
                records.append({
                    "section": "pathological", "case": case, "scores": list(scores),
                    "dtype": dname, "state": dtypes.dtype_name(state), "chunk": 2,
                    **_judged(_max_err(out, ref), ref, dname),
                    "finite": bool(np.all(np.isfinite(out.astype(np.float64)))),
                    "naive_finite": bool(np.all(np.isfinite(naive.astype(np.float64)))),
                    "expected": _expected(case, V64), "out_first": float(out[0]),
                })
    return records


def _expected(case: str, V: np.ndarray) -> str:
    """The closed form seed 000 names for each case."""
    return {"one near zero [-100, -100, -100, 0]": "V[3]", "all zeros": "mean(V)",
            "all -inf": "zeros", "all -inf chunk, then finite": "softmax([1, 2]) @ V[2:]",
            }.get(case, "V[0] (exp(-60) vanishes)")


def _realistic(ctx: Context) -> list[dict[str, Any]]:
    ctx.progress("realistic N(0, 5)")
    n, d, chunk, trials = 64, 64, 16, TRIALS[ctx.quick]
    rng, records = ctx.rng(4), []
    s64 = 5.0 * rng.standard_normal((trials, n))
    V64 = rng.standard_normal((trials, n, d))
    p = fm.softmax(s64)
    _, trace = fm.softmax_online(s64, chunk)
    ms = np.stack([m for m, _ in trace])  # (blocks, trials)
    alphas = np.exp(ms[:-1] - ms[1:])
    peaks = {"mean_max_p": float(p.max(-1).mean()),
             "mean_max_updates": float((ms[1:] > ms[:-1]).sum(0).mean()),
             "min_alpha": float(alphas.min())}
    for dname in GRID_DTYPES:
        dt = dtypes.DTYPES[dname]
        for state in (F32, F16):
            records.append({"section": "realistic", "N": n, "d": d, "chunk": chunk,
                            "trials": trials, "dtype": dname, "state": dtypes.dtype_name(state),
                            **_errors(s64.astype(dt), V64.astype(dt), chunk, state), **peaks})
    return records


def _above_11(ctx: Context) -> list[dict[str, Any]]:
    """Scores above 11 in float16: naive vs online with float16 and float32 state."""
    ctx.progress("scores above 11")
    rng, d, records = ctx.rng(5), 16, []
    spikes = rng.standard_normal(256)
    spikes[[10, 100, 200]] = [12.0, 15.0, 20.0]
    jump = np.concatenate([np.zeros(JUMP_AFTER), [20.0]])  # m jumps by 20: exp(-20) underflows
    cases = (
        ("spikes 12, 15, 20 among N(0, 1)", spikes, 16,
         "exp(s) overflows only in the naive formula; online subtracts the running max"),
        (f"max jumps by 20 after {JUMP_AFTER} zeros", jump, 16,
         "alpha = exp(0 - 20) = 2.1e-9 underflows to 0 in float16"),
        (f"{L_OVERFLOW_N} equal scores of 12", np.full(L_OVERFLOW_N, 12.0), 1024,
         f"l = {L_OVERFLOW_N} exceeds float16's 65504"),
    )
    for case, s64, chunk, note in cases:
        s = s64.astype(F16)
        V = (1.0 + rng.standard_normal((s.size, d))).astype(F16)  # outputs near 1, not 0
        ref = _batched64(s, V)
        with np.errstate(all="ignore"):
            naive = fm.naive.softmax(s) @ V
        rows: list[tuple[str, np.ndarray, float | None]] = [("naive float16", naive, None)]
        for state in (F16, F32):
            st = _online(s, V, chunk, state)
            with np.errstate(all="ignore"):
                rows.append((f"online, {dtypes.dtype_name(state)} state",
                             st.finalize(dtype=F16), float(st.l)))
        for method, out, l_final in rows:
            records.append({
                "section": "above_11", "case": case, "N": int(s.size), "d": d, "chunk": chunk,
                "max_score": float(s.max()), "method": method, "l_final": l_final,
                **_judged(_max_err(out, ref), ref, "float16"),
                "finite": bool(np.all(np.isfinite(out.astype(np.float64)))), "note": note})
    return records


def _trace() -> list[dict[str, Any]]:
    scores = np.array(SEED_002_SCORES)
    probs, trace = fm.softmax_online(scores, SEED_002_BLOCK)
    exact = fm.softmax(scores)  # the stable two-pass softmax
    return [{"section": "trace", "block": i,
             "entries": list(scores[i * SEED_002_BLOCK:(i + 1) * SEED_002_BLOCK]),
             "m": m, "l": l, "probs": list(probs),
             "max_abs_diff_vs_stable": float(np.max(np.abs(probs - exact)))}
            for i, (m, l) in enumerate(trace)]


# --------------------------------------------------------------------------- summary


def _summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    by = _by_section(records)
    grid, sens = by["grid"], by["chunk_sensitivity"]
    worst = {d: max((r for r in grid if r["dtype"] == d), key=lambda r: r["err"])
             for d in GRID_DTYPES}
    sens_err = {st: {str(r["chunk"]): r["err"] for r in sens if r["state"] == st}
                for st in ("float32", "float16")}
    patho = by["pathological"]
    above = by["above_11"]
    summary: dict[str, Any] = {
        "grid_cells": len(grid),
        "grid_pass": sum(r["pass"] for r in grid),
        "grid_worst_err": {d: r["err"] for d, r in worst.items()},
        "grid_worst_at": {d: {k: r[k] for k in ("N", "d", "chunk")} for d, r in worst.items()},
        "grid_worst_floor": {d: max(r["floor"] for r in grid if r["dtype"] == d)
                             for d in GRID_DTYPES},
        "grid_worst_err_state": {d: max(r["err_state"] for r in grid if r["dtype"] == d)
                                 for d in GRID_DTYPES},
        "sensitivity_err": sens_err,
        "sensitivity_spread": {st: max(v.values()) / min(v.values())
                               for st, v in sens_err.items()},
        "pathological_pass": sum(r["pass"] for r in patho if r["state"] == "float32"),
        "pathological_cases": sum(r["state"] == "float32" for r in patho),
        "realistic": {f"{r['dtype']}, {r['state']} state": r["err"] for r in by["realistic"]},
        "above_11": {f"{r['case']}: {r['method']}": r["err"] for r in above},
    }
    w16 = _worst_float16(records)
    state16 = [r["err"] for r in records if "err" in r and (
        (r.get("dtype") == "float16" and r.get("state") == "float16")
        or r.get("method") == "online, float16 state")]  # (scores above 11: float16 inputs)
    summary["float16_state_worst_err"] = max(e for e in state16 if math.isfinite(e))
    summary["float16_state_nonfinite_cases"] = sum(not math.isfinite(e) for e in state16)
    real16 = next(r for r in records if r["section"] == "realistic"
                  and r["dtype"] == "float16" and r["state"] == "float32")
    # the recurrence's own error per unit of output (rounding errors scale with |O|)
    summary["realistic_err_state_per_out"] = real16["err_state"] / real16["max_abs_out"]
    summary["grid_worst_err_state_per_out"] = max(
        r["err_state"] / r["max_abs_out"] for r in grid if r["dtype"] == "float16")
    summary["float16_worst"] = {k: w16.get(k) for k in (
        "section", "case", "N", "d", "chunk", "err", "max_abs_out", "bound_applied", "pass")}
    summary["constants"] = {"float16_max": float(dtypes.finfo(F16).max),
                            "exp_11": math.exp(11.0), "jump_after": JUMP_AFTER,
                            "l_overflow_n": L_OVERFLOW_N, "bounds": BOUNDS}
    summary["headline"] = (
        f"online softmax within seed 000's bounds in {summary['grid_pass']}/{len(grid)} grid "
        "cells; worst max abs error in the grid "
        + ", ".join(f"{d} {_g(summary['grid_worst_err'][d])}" for d in GRID_DTYPES)
        + f"; worst float16 error anywhere with the default float32 state {_g(w16['err'])} "
        f"({_where(w16)}), " + ("within" if w16["pass"] else "NOT within")
        + f" its bound {_g(w16['bound_applied'])}; with a float16 state up to "
        + _g(summary["float16_state_worst_err"])
        + (f" where finite ({summary['float16_state_nonfinite_cases']} not finite: see "
           "scores above 11)" if summary["float16_state_nonfinite_cases"] else ""))
    return summary


def _float16_default_state(r: dict[str, Any]) -> bool:
    """A float16-input record computed the default way (online, float32 state)."""
    if r["section"] == "above_11":
        return r["method"] == "online, float32 state"
    return r.get("dtype") == "float16" and r.get("state") == "float32" and "err" in r


def _worst_float16(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The largest float16 error of the default online softmax, over every section."""
    rows = [r for r in records if _float16_default_state(r) and math.isfinite(r["err"])]
    return max(rows, key=lambda r: r["err"])


def _where(r: dict[str, Any]) -> str:
    names = {"grid": "the grid", "chunk_sensitivity": "the chunk-size sweep",
             "pathological": "the pathological inputs", "realistic": "the N(0, 5) logits",
             "above_11": "the scores above 11"}
    detail = r.get("case") or f"N = {r['N']}, d = {r['d']}, chunk {r['chunk']}"
    return f"{names[r['section']]}, {detail}"


def _by_section(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        out.setdefault(r["section"], []).append(r)
    return out


def _g(v: Any) -> str:
    """A number for prose: 3 significant digits, inf/NaN spelled out."""
    if v is None:
        return "—"
    v = float(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.3g}"


# --------------------------------------------------------------------------- figure


def _figure(sens: list[dict[str, Any]]) -> Any:
    fig, ax = plotting.figure(width=6.0, height=4.0)
    for state, marker in (("float32", "o"), ("float16", "s")):
        rows = [r for r in sens if r["state"] == state]
        ax.plot([r["chunk"] for r in rows], [r["err"] for r in rows], marker=marker,
                color=plotting.dtype_color(state), label=f"{state} state (m, l, o)")
    floor = max(r["floor"] for r in sens)
    ax.axhline(BOUNDS["float16"], color=plotting.NAN_COLOR, ls="--", lw=1,
               label="seed 000 bound 1e-3")
    on_floor = all(r["err"] == floor for r in sens if r["state"] == "float32")
    # a wide pale band under the lines: visible also where a state's error lies on it
    ax.axhline(floor, color="grey", lw=6, alpha=0.35, zorder=1,
               label="rounding the exact O to float16"
                     + (" (the float32 state's error equals it)" if on_floor else ""))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(CHUNKS, [str(c) for c in CHUNKS])
    ax.set_xlabel("chunk size")
    ax.set_ylabel("max |O_online - O_float64|")
    n, trials = sens[0]["N"], sens[0]["trials"]
    ax.set_title(f"float16 inputs, N = {n}, d = {sens[0]['d']}, {trials} problems")
    ax.legend()
    return fig


# --------------------------------------------------------------------------- readme


def _method(grid: list[dict[str, Any]]) -> str:
    return (
        "Online softmax keeps a running max m, normaliser l and weighted sum o per row "
        "(`fm.SoftmaxState`) and absorbs the scores chunk by chunk. Errors are max |O_online - "
        "O_ref| with O_ref = softmax(s) @ V in float64 on the dtype-rounded inputs; O_online is "
        "returned in the input dtype. Seed 000's bounds ("
        + ", ".join(f"{d} {_g(b)}" for d, b in BOUNDS.items())
        + ") are absolute, for outputs of order one. Rounding a result to a narrow dtype costs "
        "in proportion to its size (half an ulp of |O|), so a result passes when its error is "
        "below the *bound applied*, bound x max(1, max |O|); the tables show that bound. In "
        f"the grid max |O| stays below {_g(max(r['max_abs_out'] for r in grid))}, so there "
        "the two are equal.")


def _answer_grid(grid: list[dict[str, Any]], summary: dict[str, Any]) -> list[str]:
    worst = summary["grid_worst_err"]
    return [
        f"{summary['grid_pass']} of {summary['grid_cells']} cells pass; the worst per dtype: "
        + ", ".join(f"{d} {_g(worst[d])} (bound {_g(BOUNDS[d])})" for d in GRID_DTYPES)
        + f". Each cell is the worst of {grid[0]['trials']} random problems (s, V ~ N(0, 1)), "
        "float32 state.",
        "",
        markdown_table(grid, [
            ("N", "N"), ("d", "d"), ("dtype", "dtype"), ("chunk", "chunk"),
            ("max abs error", lambda r: _g(r["err"])),
            ("before rounding", lambda r: _g(r["err_state"])),
            ("rounding floor", lambda r: _g(r["floor"])),
            ("bound applied", lambda r: _g(r["bound_applied"])), ("pass", "pass")]),
    ]


def _answer_worst(summary: dict[str, Any]) -> str:
    w = summary["float16_worst"]
    worst, floor = summary["grid_worst_err"], summary["grid_worst_floor"]
    return (
        f"{_g(w['err'])}, in {_where(w)} (every section, float16 inputs, the default float32 "
        f"state). Against the plain {_g(BOUNDS['float16'])} it is "
        f"{'under' if w['err'] < BOUNDS['float16'] else 'over'}; its outputs reach max |O| = "
        f"{_g(w['max_abs_out'])}, so the bound applied is "
        f"{_g(w['bound_applied'])} and it {'passes' if w['pass'] else 'fails'}. The extra error "
        "is the final rounding to float16, which grows with |O|: the grid's outputs stay near "
        f"1 and its worst float16 error is {_g(worst['float16'])}, with the rounding of the "
        f"exact O to float16 alone costing up to {_g(floor['float16'])}; the float32 state's "
        f"own output, before that rounding, is off by at most "
        f"{_g(summary['grid_worst_err_state']['float16'])}.")


def _answer_chunks(sens: list[dict[str, Any]], summary: dict[str, Any]) -> list[str]:
    s32, s16 = summary["sensitivity_err"]["float32"], summary["sensitivity_err"]["float16"]
    spread = summary["sensitivity_spread"]
    n = sens[0]["N"]
    return [
        f"With a float32 state {'no' if spread['float32'] < SENSITIVE else 'yes'}: at float16, "
        f"N = {n}, errors across chunk sizes {', '.join(map(str, CHUNKS))} are "
        f"{', '.join(_g(s32[str(c)]) for c in CHUNKS)} (max/min {_g(spread['float32'])}); the "
        "recurrence is exact algebra, alpha rescales both l and o, and what is left is the "
        "final rounding to float16. With a float16 state "
        f"{'yes' if spread['float16'] >= SENSITIVE else 'hardly'}: "
        f"{', '.join(_g(s16[str(c)]) for c in CHUNKS)} (max/min {_g(spread['float16'])}). Each "
        f"update rounds l and o to float16, so chunk size 1 rounds them {n} times and chunk "
        f"size {CHUNKS[-1]} only {-(-n // CHUNKS[-1])} times (NumPy's float16 sum and matmul "
        "accumulate in float32 inside a chunk and round once).",
        "",
        "![chunk_sensitivity](chunk_sensitivity.png)",
        "",
        markdown_table(sens, [("state", "state"), ("chunk", "chunk"),
                              ("max abs error", lambda r: _g(r["err"])),
                              ("bound applied", lambda r: _g(r["bound_applied"])),
                              ("pass", "pass")]),
    ]


def _answer_above_11(by: dict[str, list[dict[str, Any]]], summary: dict[str, Any]) -> list[str]:
    above = {(r["case"], r["method"]): r for r in by["above_11"]}
    cases = list(dict.fromkeys(r["case"] for r in by["above_11"]))
    c = summary["constants"]
    return [
        f"exp(11) = {_g(c['exp_11'])} is near float16's largest finite value "
        f"{_g(c['float16_max'])}.",
        "",
        markdown_table(by["above_11"], [
            ("case", "case"), ("method", "method"), ("max score", "max_score"),
            ("final l", "l_final"), ("max abs error", lambda r: _g(r["err"])),
            ("max abs O", "max_abs_out"), ("bound applied", lambda r: _g(r["bound_applied"])),
            ("finite", "finite"), ("pass", "pass")]),
        "",
        _above_11_prose(above, cases, c),
    ]


def _answer_pathological(rows: list[dict[str, Any]]) -> list[str]:
    ok = [r for r in rows if r["state"] == "float32"]
    return [
        f"All {sum(r['pass'] for r in ok)} of {len(ok)} (case, dtype) pairs pass with the "
        "float32 state, each equal to the closed form in `expected`; the naive formula is not "
        f"finite in {sum(not r['naive_finite'] for r in ok)} of them. Chunk size 2; `naive "
        "finite` is seed 000's textbook exp(s) / sum(exp(s)) @ V in the input dtype.",
        "",
        markdown_table(rows, [
            ("case", "case"), ("dtype", "dtype"), ("state", "state"), ("expected", "expected"),
            ("max abs error", lambda r: _g(r["err"])),
            ("bound applied", lambda r: _g(r["bound_applied"])),
            ("finite", "finite"), ("naive finite", "naive_finite"), ("pass", "pass")]),
    ]


def _answer_realistic(rows: list[dict[str, Any]], summary: dict[str, Any]) -> list[str]:
    return [_realistic_prose(rows, summary), "",
            markdown_table(rows, [
                ("dtype", "dtype"), ("state", "state"),
                ("max abs error", lambda r: _g(r["err"])),
                ("before rounding", lambda r: _g(r["err_state"])),
                ("rounding floor", lambda r: _g(r["floor"])), ("max abs O", "max_abs_out"),
                ("bound applied", lambda r: _g(r["bound_applied"])), ("pass", "pass")])]


def _answer_trace(trace: list[dict[str, Any]]) -> list[str]:
    return [
        f"Scores {list(SEED_002_SCORES)}, block size {SEED_002_BLOCK} (`fm.softmax_online`, "
        "float64); the seed's d is l here:",
        "",
        markdown_table(trace, [
            ("block", "block"), ("entries", lambda r: ", ".join(_g(v) for v in r["entries"])),
            ("m", lambda r: repr(r["m"])), ("l", lambda r: repr(r["l"]))]),
        "",
        f"Probabilities {', '.join(f'{p:.6f}' for p in trace[-1]['probs'])}; max difference "
        f"from the stable two-pass softmax {_g(trace[-1]['max_abs_diff_vs_stable'])}, within "
        "the seed's atol.",
    ]


def _readme(records: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    by = _by_section(records)
    answers = [_answer_grid(by["grid"], summary),
               _answer_chunks(by["chunk_sensitivity"], summary),
               _answer_pathological(by["pathological"]),
               _answer_realistic(by["realistic"], summary), _answer_worst(summary),
               _answer_above_11(by, summary), _answer_trace(by["trace"])]
    return readme.render(NAME, SEEDS, summary["headline"], answers,
                         [("Method", _method(by["grid"]))])


def _source_of_error(r: dict[str, Any]) -> str:
    """Where a grid cell's error comes from: the final rounding, or the recurrence too."""
    if r["err"] <= r["floor"] + r["err_state"]:
        return ("It comes from rounding the output to float16, not from the recurrence: the "
                f"same cell's rounding floor is {_g(r['floor'])}.")
    return (f"It exceeds that cell's rounding floor {_g(r['floor'])} by "
            f"{_g(r['err'] - r['floor'])}: error carried by the recurrence itself.")


def _above_11_prose(above: dict[tuple[str, str], dict[str, Any]], cases: list[str],
                    c: dict[str, Any]) -> str:
    spikes, jump, big = cases
    n16, o16, o32 = "naive float16", "online, float16 state", "online, float32 state"

    def outcome(r: dict[str, Any]) -> str:
        return f"error {_g(r['err'])}" if r["finite"] else "NaN/inf output"

    sp16, sp32 = above[(spikes, o16)], above[(spikes, o32)]
    j16, j32 = above[(jump, o16)], above[(jump, o32)]
    b16, b32 = above[(big, o16)], above[(big, o32)]
    both = sp16["pass"] and sp32["pass"]
    harmless = j16["err"] <= 2 * j32["err"]
    return (
        f"The naive formula gives {'finite output' if above[(spikes, n16)]['finite'] else 'NaN'}"
        " once a score exceeds 11 (exp(12) is inf in float16, inf / inf = NaN). The online "
        "recurrence only ever takes exp(s - m) <= 1, and "
        + ("handles the spikes with either state" if both else "still misses the bound")
        + f": {outcome(sp16)} with a float16 state, {outcome(sp32)} with float32, against a "
        f"bound of {_g(sp32['bound_applied'])} (these outputs reach |O| = "
        f"{_g(sp32['max_abs_out'])}). The max jumping by 20 makes alpha = exp(-20) underflow to "
        "0 in a float16 state, which is "
        + ("harmless (the old terms weigh exp(-20) of the new one)" if harmless else "costly")
        + f": {outcome(j16)} vs {outcome(j32)}. With {b16['N']} equal scores a float16 "
        f"state's l reaches {_g(b16['l_final'])} (largest finite float16 {_g(c['float16_max'])}): "
        f"{outcome(b16)}, against {outcome(b32)} with the float32 state (l = "
        f"{_g(b32['l_final'])}). "
        + ("So scores above 11 do not by themselves need float32 accumulators for m, l, o; "
           f"long sequences (l > {_g(c['float16_max'])}) and accuracy (question 3) do, hence "
           "float32 state by default." if sp16["pass"] and not b16["pass"] else
           "float32 accumulators for m, l, o are the default for these reasons."))


def _realistic_prose(rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    """Block E': peakedness, then what it does to the recurrence, read from the recurrence's
    own error (before the final rounding) against the grid's, and the float16 state's."""
    r0 = rows[0]
    by = {(r["dtype"], r["state"]): r for r in rows}
    r16, g16 = by[("float16", "float32")], summary["grid_worst_err_state"]["float16"]
    s16 = by[("float16", "float16")]
    rel, g_rel = summary["realistic_err_state_per_out"], summary["grid_worst_err_state_per_out"]
    verdict = ("has no measurable effect on the recurrence with the default float32 state "
               "beyond the size of its outputs" if rel <= 2 * g_rel else
               "hurts the recurrence, also per unit of output")
    return (
        f"s ~ N(0, 5), N = {r0['N']}, d = {r0['d']}, chunk {r0['chunk']}, {r0['trials']} "
        f"problems. The distribution is peaked: the largest probability averages "
        f"{_g(r0['mean_max_p'])}, and the running max rises in {_g(r0['mean_max_updates'])} of "
        f"the {r0['N'] // r0['chunk'] - 1} later chunks on average, the smallest rescale factor "
        f"alpha being {_g(r0['min_alpha'])}. Errors with the float32 state: "
        + ", ".join(f"{r['dtype']} {_g(r['err'])} ({'pass' if r['pass'] else 'FAIL'})"
                    for r in rows if r["state"] == "float32")
        + f". Peakedness {verdict}: before the final rounding the float16 inputs' output is "
        f"off by {_g(r16['err_state'])}, against {_g(g16)} at worst on the grid; per unit of "
        f"max |O| that is {_g(rel)} against up to {_g(g_rel)} on the grid. The float16 "
        f"error after rounding, {_g(r16['err'])}, is larger than the grid's because the "
        f"outputs are: max |O| = {_g(r16['max_abs_out'])}, and rounding the exact O to float16 "
        f"alone costs {_g(r16['floor'])}. With a float16 state the float16 error is "
        f"{_g(s16['err'])} ({'pass' if s16['pass'] else 'FAIL'}): every rescale and every sum "
        "of the running l and O then rounds to float16.")


# --------------------------------------------------------------------------- run


def run(ctx: Context) -> Result:
    records = [*_grid(ctx), *_sensitivity(ctx), *_pathological(ctx), *_realistic(ctx),
               *_above_11(ctx), *_trace()]
    summary = _summarise(records)
    figure = _figure(_by_section(records)["chunk_sensitivity"])
    return Result(records=records, summary=summary, figures={"chunk_sensitivity": figure},
                  readme=_readme(records, summary), headline=summary["headline"])
