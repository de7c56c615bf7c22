"""FP8 attention's accuracy, after FlashAttention-3's table, and the P cast under a sink.

Beyond the seed labs. Two measurements, on the CPU, with ``flashmath.attention.fp8``:

1. FlashAttention-3 (Shah et al., 2024, arXiv 2407.08608, section 4.3): Q, K, V drawn from
   N(0, 1) plus, on 0.1% of entries, an independent N(0, 10^2) term ("outliers"), and a
   control without outliers. e4m3 attention with per-tensor or per-block scales, with or
   without the random Hadamard transform of Q and K, and FP16 attention: RMSE against the
   float64 oracle ``fm.attention_reference`` on the unrounded inputs.
2. The P cast (arXiv 2606.06521): Q, K, V kept in float32 so that only the cast of the
   probabilities P to e4m3 rounds; an attention sink (a bias of strength delta on the first
   4 keys, all in the first key tile); forward vs reverse key-tile order, P scale 1 vs 256.
   MSE against the oracle.

The paper's figures (PAPER_RMSE) are quoted as we read its Table 3; results.json holds them
beside the measured ones, and the README compares each ratio and says why they differ.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

import flashmath as fm
from flashmath.attention import fp8
from flashmath.lab import plotting, readme
from flashmath.lab.experiment import Context, Result
from flashmath.text import markdown_table
from flashmath.text import number as _g  # the one number formatter (3 significant digits)

NAME = "fp8-attention"
TITLE = "FP8 attention: per-tensor vs block scales, the Hadamard transform, the P cast at a sink"
SEEDS: tuple[str, ...] = ()

#: FlashAttention-3's Table 3 (RMSE against a float64 reference), as we read it.
PAPER_RMSE = {"fp16": 1.9e-4, "fp16_baseline": 3.2e-4, "fp8_per_tensor": 2.4e-2,
              "fp8_block_hadamard": 9.1e-3, "fp8_tensor_hadamard": 9.3e-3,
              "fp8_block": 2.4e-2}
#: The sink paper's claim: reverse order + P scale 256 lowers the MSE 3-10x at moderate sinks.
PAPER_SINK_GAIN = (3.0, 10.0)
#: The FP8 configurations: name -> (scaling, Hadamard), plus FP16.
CONFIGS = {"fp8_per_tensor": ("tensor", False), "fp8_tensor_hadamard": ("tensor", True),
           "fp8_block": ("block", False), "fp8_block_hadamard": ("block", True)}
LABELS = {"fp16": "FP16", "fp8_per_tensor": "FP8 per-tensor",
          "fp8_tensor_hadamard": "FP8 per-tensor + Hadamard", "fp8_block": "FP8 per-block",
          "fp8_block_hadamard": "FP8 per-block + Hadamard (FA3)"}
OUTLIER_FRACTION, OUTLIER_STD = 0.001, 10.0
SINK_KEYS = 4
#: Shapes (B, H, S, D) of the two sections and the sink strengths, full and --quick.
SHAPES: dict[bool, dict[str, Any]] = {
    False: {"table": (1, 2, 1024, 128), "sink": (1, 1, 2048, 64), "deltas": (0, 4, 6, 8)},
    True: {"table": (1, 1, 512, 128), "sink": (1, 1, 1024, 64), "deltas": (0, 6)}}
BLOCK = 128
#: A measured RMSE "matches" the paper's within this relative margin.
MATCH = 0.25
SINK_VARIANTS = (("forward", 1.0), ("forward", 256.0), ("reverse", 1.0), ("reverse", 256.0))


def _inputs(rng: np.random.Generator, shape: tuple[int, ...], outliers: bool
            ) -> list[np.ndarray]:
    out = []
    for _ in range(3):
        t = rng.standard_normal(shape)
        if outliers:
            t += rng.normal(0.0, OUTLIER_STD, shape) * (rng.random(shape) < OUTLIER_FRACTION)
        out.append(t)
    return out


def _rmse(a: Any, b: Any) -> float:
    return float(np.sqrt(np.mean((np.asarray(a, np.float64) - b) ** 2)))


def _subnormal_share(q: np.ndarray, k: np.ndarray, signs: Any) -> float:
    """The share of Q and K entries that per-tensor e4m3 scaling puts below e4m3's smallest
    normal value (where its relative precision falls off), with or without the transform."""
    if signs is not None:
        q, k = fp8.random_hadamard(q, signs), fp8.random_hadamard(k, signs)
    normal = float(fm.dtypes.finfo("float8_e4m3fn").tiny)
    shares = [np.mean(np.abs(fp8.quantize(t)[0].astype(np.float64)) < normal) for t in (q, k)]
    return float(np.mean(shares))


def _table(ctx: Context) -> list[dict[str, Any]]:
    shape = SHAPES[ctx.quick]["table"]
    rows: list[dict[str, Any]] = []
    for si, setup in enumerate(("outliers", "control")):
        ctx.progress(f"table: {setup}")
        rng = ctx.rng(si)
        q, k, v = _inputs(rng, shape, setup == "outliers")
        signs = fp8.random_signs(shape[-1], rng)
        ref = np.asarray(fm.attention_reference(q, k, v))
        base = {"section": "table", "setup": setup, "B": shape[0], "H": shape[1],
                "S": shape[2], "D": shape[3], "block": BLOCK,
                "amax_qk": float(max(np.abs(q).max(), np.abs(k).max())),
                "amax_qk_hadamard": float(max(np.abs(fp8.random_hadamard(q, signs)).max(),
                                              np.abs(fp8.random_hadamard(k, signs)).max()))}
        base |= {"subnormal_share": _subnormal_share(q, k, None),
                 "subnormal_share_hadamard": _subnormal_share(q, k, signs),
                 "outliers_per_block": BLOCK * shape[-1] * OUTLIER_FRACTION
                 if setup == "outliers" else 0.0}
        out = fp8.fp8_attention(q, k, v, dtype="float16", scaling="none", block_q=BLOCK,
                                block_k=BLOCK)
        rows.append(base | {"config": "fp16", "rmse": _rmse(out, ref)})
        for name, (scaling, hadamard) in CONFIGS.items():
            out = fp8.fp8_attention(q, k, v, scaling=scaling, block_q=BLOCK, block_k=BLOCK,
                                    hadamard_signs=signs if hadamard else None)
            rows.append(base | {"config": name, "rmse": _rmse(out, ref)})
    for r in rows:
        tensor = next(x for x in rows if x["setup"] == r["setup"]
                      and x["config"] == "fp8_per_tensor")
        r["ratio_per_tensor_over_this"] = tensor["rmse"] / r["rmse"]
        r["paper_rmse"] = PAPER_RMSE.get(str(r["config"])) if r["setup"] == "outliers" else None
        r["paper_ratio"] = (PAPER_RMSE["fp8_per_tensor"] / r["paper_rmse"]
                            if r["paper_rmse"] else None)
        r["rmse_over_paper"] = r["rmse"] / r["paper_rmse"] if r["paper_rmse"] else None
    return rows


def _sink(ctx: Context) -> list[dict[str, Any]]:
    shape, deltas = SHAPES[ctx.quick]["sink"], SHAPES[ctx.quick]["deltas"]
    q, k, v = _inputs(ctx.rng(7), shape, outliers=False)
    s = shape[2]
    rows = []
    for delta in deltas:
        ctx.progress(f"sink delta={delta}")
        bias = np.zeros((s, s))
        bias[:, :SINK_KEYS] = delta
        ref = np.asarray(fm.attention_reference(q, k, v, bias=bias))
        scores = (q @ np.swapaxes(k, -1, -2)) / math.sqrt(shape[-1]) + bias
        p = np.exp(scores - scores.max(axis=-1, keepdims=True))[..., SINK_KEYS:]
        for order, p_scale in SINK_VARIANTS:
            out = fp8.fp8_attention(q, k, v, quantize_qkv=False, key_order=order,
                                    p_scale=p_scale, bias=bias, block_q=BLOCK, block_k=BLOCK)
            rows.append({"section": "sink", "delta": delta, "order": order,
                         "non_sink_mass": float(np.mean(p.sum(-1) / (p.sum(-1) + np.exp(
                             scores - scores.max(-1, keepdims=True))[..., :SINK_KEYS].sum(-1)))),
                         "p_scale": p_scale, "S": s, "D": shape[-1], "sink_keys": SINK_KEYS,
                         "non_sink_keys": s - SINK_KEYS,
                         "mse": _rmse(out, ref) ** 2,
                         "flushed_share": _flushed_share(scores, order, p_scale)})
    for r in rows:
        worst = next(x for x in rows if x["delta"] == r["delta"] and x["order"] == "forward"
                     and x["p_scale"] == 1.0)
        r["mse_gain_vs_forward_1"] = worst["mse"] / r["mse"]
    return rows


def _flushed_share(scores: np.ndarray, order: str, p_scale: float) -> float:
    """The share of non-sink probabilities that the kernel's P cast flushes to zero, in its
    own key order: tile by tile, p = exp(s - m) with m the running max so far (this tile
    included), as ``fp8.fp8_attention`` forms it; flushed = p > 0 but e4m3(p * p_scale) = 0."""
    m = np.full((*scores.shape[:-1], 1), -np.inf)
    flushed = 0
    for start in fp8.tile_starts(scores.shape[-1], BLOCK, order):
        s = scores[..., start : start + BLOCK]
        m = np.maximum(m, s.max(axis=-1, keepdims=True))
        pt = np.exp(s - m).astype(np.float32)
        cast = (pt * np.float32(p_scale)).astype(fm.dtypes.DTYPES["float8_e4m3fn"])
        lost = (pt > 0) & (cast.astype(np.float32) == 0)
        flushed += int(np.count_nonzero(lost[..., max(0, SINK_KEYS - start):]))
    return flushed / (scores[..., SINK_KEYS:].size)


def _figure(table: list[dict[str, Any]], sink: list[dict[str, Any]]) -> Any:
    fig, axes = plotting.figure(1, 2, width=12.5, height=4.6)
    ax = axes[0]
    configs = list(dict.fromkeys(r["config"] for r in table))
    x = np.arange(len(configs))
    for j, (setup, color) in enumerate((("outliers", "#d62728"), ("control", "#1f77b4"))):
        vals = [next(r["rmse"] for r in table if r["setup"] == setup and r["config"] == c)
                for c in configs]
        ax.bar(x + (j - 0.5) * 0.36, vals, width=0.34, color=color, label=f"measured, {setup}")
    paper = [PAPER_RMSE.get(c) for c in configs]
    ax.plot(x - 0.18, [p if p else np.nan for p in paper], "k*", ms=11,
            label="FlashAttention-3's table (outliers)")
    if "fp16" in configs:  # the paper's FP16 row has two entries: FA3's and its baseline's
        ax.plot([configs.index("fp16") + 0.18], [PAPER_RMSE["fp16_baseline"]], "k*", ms=11,
                mfc="white", label="the table's FP16 baseline (outliers)")
    ax.set_yscale("log")
    ax.set_xticks(x, [LABELS[c].replace(" + ", "\n+ ") for c in configs], fontsize=7)
    ax.set_ylabel("RMSE vs float64 oracle")
    ax.set_title("FP16 and e4m3 attention")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3)
    ax = axes[1]
    # the variants that fix the underflow coincide: big hollow markers under small filled
    # ones and four dash patterns keep each visible
    styles = (("o", 11, "-"), ("s", 9, "--"), ("^", 7, "-."), ("D", 4, ":"))
    for (order, ps), (marker, size, ls) in zip(SINK_VARIANTS, styles, strict=True):
        rows = [r for r in sink if r["order"] == order and r["p_scale"] == ps]
        ax.plot([r["delta"] for r in rows], [r["mse"] for r in rows], marker=marker, ms=size,
                ls=ls, lw=1.4, mfc="none" if size > 5 else None, mew=1.5,
                label=f"{order} order, P scale {ps:g}")
    ax.set_yscale("log")
    ax.set_xlabel(f"sink strength delta (bias on the first {SINK_KEYS} keys)")
    ax.set_ylabel("MSE vs float64 oracle (Q, K, V float32; P cast to e4m3)")
    ax.set_title("the P cast under an attention sink")
    ax.legend(fontsize=7)
    return fig


def _answer_outliers(table: list[dict[str, Any]], summary: dict[str, Any]) -> list[str]:
    out = {r["config"]: r for r in table if r["setup"] == "outliers"}
    t, bh = out["fp8_per_tensor"], out["fp8_block_hadamard"]
    ratio = summary["fp8_error_ratio"]
    paper_ratio = summary["paper_fp8_error_ratio"]
    gain_h = out["fp8_tensor_hadamard"]["ratio_per_tensor_over_this"]
    gain_b = out["fp8_block"]["ratio_per_tensor_over_this"]
    return [
        f"{_g(ratio)}x lower here (per-tensor {_g(t['rmse'])}, per-block + Hadamard "
        f"{_g(bh['rmse'])}), against the paper's {_g(paper_ratio)}x ({_g(t['paper_rmse'])} and "
        f"{_g(bh['paper_rmse'])}). The Hadamard transform does the work, as in the paper: "
        f"alone it gives {_g(gain_h)}x (paper "
        f"{_g(out['fp8_tensor_hadamard']['paper_ratio'])}x), block scales alone {_g(gain_b)}x "
        f"(paper {_g(out['fp8_block']['paper_ratio'])}x). Why: the largest |entry| of Q and K "
        f"is {_g(t['amax_qk'])}, an outlier, and sets the per-tensor scale; after the "
        f"transform each outlier is spread over all {t['D']} features and the largest |entry| "
        f"falls to {_g(t['amax_qk_hadamard'])}, so ordinary entries sit higher in e4m3's "
        f"range: {_g(t['subnormal_share'])} of the Q and K entries land below e4m3's smallest "
        f"normal value with per-tensor scales, {_g(t['subnormal_share_hadamard'])} after the "
        "transform. That share is too small to be the whole gain; the transform also changes "
        "how each outlier's own rounding error (up to 2^-4 of it) enters the scores, spread "
        "over every feature instead of one, which this experiment does not separate. Per-block "
        f"scales do not help much: a {BLOCK}-row block of {t['D']} features holds "
        f"{_g(t['outliers_per_block'])} outliers on average, so nearly every block's scale is "
        "an outlier's anyway.",
        "",
        "Where and why the figures differ. Measured RMSE over the paper's, row by row: "
        + ", ".join(f"{LABELS[c]} {_g(out[c]['rmse_over_paper'])}"
                    for c in CONFIGS)
        + ". " + _where_they_differ(out) + " Two reasons we can name, neither measured "
        "apart here. For the per-tensor row: the paper's baseline FP8 is a standard (unfused) "
        "attention that keeps its softmax intermediate in FP16, as we read it, while ours is "
        "the same tiled kernel as every other row, with the softmax in float32 and only P "
        "cast to e4m3. That does not explain the per-block row, which in the paper is FA3's "
        "own kernel with block scales and without the transform: there the difference may "
        "lie in the problem, since the paper does not print the sequence length or head dim "
        "of the table and its outlier draw is its own (the quick run's smaller shape gives "
        "another ratio). Both agree on the order: per-tensor and per-block alone are close, "
        "the transform is what lowers the error.",
    ]


def _where_they_differ(out: dict[str, dict[str, Any]]) -> str:
    """Which rows match the paper (within MATCH of its RMSE) and which do not, in a sentence."""
    near = [c for c in CONFIGS if 1 / (1 + MATCH) <= out[c]["rmse_over_paper"] <= 1 + MATCH]
    pct = f"{MATCH:.0%}"
    far = [c for c in CONFIGS if c not in near]
    if not far:
        return f"Every FP8 row is within {pct} of the paper's, so the ratios agree too."
    if not near:
        return (f"No FP8 row is within {pct} of the paper's: the whole scale differs, and "
                "the ratios differ with it.")
    return (f"The rows with {', '.join(LABELS[c] for c in near)} are within {pct} of the "
            f"paper's; {', '.join(LABELS[c] for c in far)} differ more, so the gap between "
            "the ratios comes from those rows.")


def _answer_control(table: list[dict[str, Any]]) -> str:
    ctl = {r["config"]: r for r in table if r["setup"] == "control"}
    out = {r["config"]: r for r in table if r["setup"] == "outliers"}
    return (
        "Without outliers the scale is set by ordinary entries and the transform has nothing "
        "to spread: per-tensor "
        f"{_g(ctl['fp8_per_tensor']['rmse'])}, per-block + Hadamard "
        f"{_g(ctl['fp8_block_hadamard']['rmse'])} (ratio "
        f"{_g(ctl['fp8_block_hadamard']['ratio_per_tensor_over_this'])}x): the e4m3 error is "
        "the format's own, about 2^-4 relative per cast. FP16 is far below every FP8 row: "
        f"{_g(out['fp16']['rmse'])} with outliers, {_g(ctl['fp16']['rmse'])} without (the "
        f"paper: FA3 {_g(PAPER_RMSE['fp16'])}, its FP16 baseline "
        f"{_g(PAPER_RMSE['fp16_baseline'])}); ours accumulates in float32 as FA3 does.")


def _answer_sink(sink: list[dict[str, Any]], summary: dict[str, Any]) -> list[str]:
    gains = summary["sink_gain_reverse_256"]
    best = max(gains, key=lambda d: gains[d])
    lo, hi = PAPER_SINK_GAIN
    return [
        "Yes. In forward order the first tile holds the sink, so the running max is the "
        "sink's from the start and every later tile's P = exp(s - m) is tiny: e4m3 flushes "
        "values below half its smallest subnormal to zero. The share of non-sink "
        "probabilities the cast flushes (counted in the kernel's own tile order), forward "
        "order at P scale 1: "
        + ", ".join(f"delta {_g(r['delta'])}: {_g(r['flushed_share'])}"
                    for r in sink if r["order"] == "forward" and r["p_scale"] == 1.0)
        + "; reverse order at P scale 1: "
        + ", ".join(f"delta {_g(r['delta'])}: {_g(r['flushed_share'])}"
                    for r in sink if r["order"] == "reverse" and r["p_scale"] == 1.0)
        + ". Reverse order meets the sink last, so the other tiles are cast relative to the "
        "running max of the keys before it and rescaled in float32 afterwards; a P scale of "
        "256 moves the cast's range up by 2^8. MSE gain of reverse + 256 over forward + 1: "
        + ", ".join(f"delta {d}: {_g(g)}x" for d, g in gains.items())
        + f"; the largest, {_g(gains[best])}x at delta {best}, "
        + ("is within" if lo <= gains[best] <= hi else "is outside")
        + f" the paper's {_g(lo)}-{_g(hi)}x. The P scale does most of it: forward order with "
        "P scale 256 alone gains "
        + ", ".join(f"delta {_g(r['delta'])}: {_g(r['mse_gain_vs_forward_1'])}x"
                    for r in sink if r["order"] == "forward" and r["p_scale"] == 256.0)
        + (", so here reverse order adds little once P is scaled"
           if summary["sink_reverse_over_forward_at_256"] <= 1.1 else
           f", and reverse order adds up to {_g(summary['sink_reverse_over_forward_at_256'])}x "
           "on top") + ". What underflow loses is the "
        "non-sink keys' share of the probability mass ("
        + ", ".join(f"delta {_g(r['delta'])}: {_g(r['non_sink_mass'])}"
                    for r in sink if r["order"] == "forward" and r["p_scale"] == 1.0)
        + f" here, at S = {sink[0]['S']}, over {sink[0]['non_sink_keys']} non-sink keys; only "
        "this length was run). Without a sink (delta 0) almost nothing is flushed and the "
        "variants agree. Where the gain falls at strong sinks, it is because the error left "
        "after the fix grows (reverse + 256: "
        + ", ".join(f"delta {_g(r['delta'])}: MSE {_g(r['mse'])}"
                    for r in sink if r["order"] == "reverse" and r["p_scale"] == 256.0)
        + "), not because the cast loses less.",
        "",
        markdown_table(sink, [
            ("delta", "delta"), ("order", "order"), ("P scale", "p_scale"),
            ("MSE", lambda r: _g(r["mse"])),
            ("flushed share (this order)", lambda r: _g(r["flushed_share"])),
            ("gain vs forward, 1", lambda r: f"{r['mse_gain_vs_forward_1']:.3g}x")]),
    ]


def _reverse_adds(sink: list[dict[str, Any]]) -> float:
    """The largest MSE gain of reverse over forward order, both at P scale 256."""
    at = {(r["delta"], r["order"]): r["mse"] for r in sink if r["p_scale"] == 256.0}
    return max(at[(d, "forward")] / at[(d, "reverse")] for d, o in at if o == "forward")


def _readme(table: list[dict[str, Any]], sink: list[dict[str, Any]],
            summary: dict[str, Any]) -> str:
    r0 = table[0]
    method = (
        f"Q, K, V of shape (B, H, S, D) = ({r0['B']}, {r0['H']}, {r0['S']}, {r0['D']}); "
        f"outliers: N(0, 1) plus N(0, {_g(OUTLIER_STD)}^2) on {_g(OUTLIER_FRACTION * 100)}% of "
        f"entries. Tiles of {BLOCK} x {BLOCK}; per-block scales are one per tile of rows of Q, "
        "K and V; the Hadamard transform uses one set of random signs for Q and K "
        "(`flashmath.attention.fp8`). Scores and P V accumulate in float32, the online "
        "softmax state is float32, P is cast to e4m3 per tile. RMSE over every output entry "
        "against `fm.attention_reference` in float64 on the unrounded inputs. The sink "
        f"section: (1, 1, {sink[0]['S']}, {sink[0]['D']}), Q, K, V in float32, a bias delta "
        f"on the first {SINK_KEYS} keys of every row.")
    table_text = markdown_table(table, [
        ("setup", "setup"), ("configuration", lambda r: LABELS[r["config"]]),
        ("RMSE", lambda r: _g(r["rmse"])), ("paper RMSE", lambda r: _g(r["paper_rmse"])),
        ("per-tensor / this", lambda r: f"{r['ratio_per_tensor_over_this']:.3g}x"),
        ("paper: per-tensor / this",
         lambda r: "–" if r["paper_ratio"] is None else f"{r['paper_ratio']:.3g}x")])
    answers = [_answer_outliers(table, summary), _answer_control(table),
               _answer_sink(sink, summary)]
    return readme.render(NAME, SEEDS, summary["headline"], answers, [
        ("Method", method), ("The accuracy table", table_text),
        ("Figure", ["![fp8_rmse](fp8_rmse.png)", "",
                    "Left: RMSE per configuration, outliers and control, with the paper's "
                    "figures as stars. Right: the sink section's MSE against delta."])])


def run(ctx: Context) -> Result:
    table = _table(ctx)
    sink = _sink(ctx)
    out = {r["config"]: r for r in table if r["setup"] == "outliers"}
    deltas = SHAPES[ctx.quick]["deltas"]
    gains = {str(d): next(r["mse_gain_vs_forward_1"] for r in sink if r["delta"] == d
                          and r["order"] == "reverse" and r["p_scale"] == 256.0)
             for d in deltas}
    summary: dict[str, Any] = {
        "rmse_fp8_per_tensor": out["fp8_per_tensor"]["rmse"],
        "rmse_fp8_block_hadamard": out["fp8_block_hadamard"]["rmse"],
        "fp8_error_ratio": out["fp8_per_tensor"]["rmse"] / out["fp8_block_hadamard"]["rmse"],
        "paper_rmse": PAPER_RMSE,
        "paper_fp8_error_ratio": PAPER_RMSE["fp8_per_tensor"] / PAPER_RMSE["fp8_block_hadamard"],
        "paper_sink_gain": list(PAPER_SINK_GAIN),
        "sink_gain_reverse_256": gains,
        "sink_reverse_over_forward_at_256": _reverse_adds(sink),
        "rmse_fp16": out["fp16"]["rmse"],
        "table": [{k: r[k] for k in ("setup", "config", "rmse", "paper_rmse",
                                     "ratio_per_tensor_over_this", "paper_ratio")}
                  for r in table],
        "plot": "fp8_rmse.png",
        "outlier_fraction": OUTLIER_FRACTION, "outlier_std": OUTLIER_STD,
        "paper_match_margin": MATCH,
    }
    summary["headline"] = (
        f"FP8 per-block + Hadamard attention has {_g(summary['fp8_error_ratio'])}x lower RMSE "
        f"than per-tensor FP8 on outlier inputs ({_g(summary['rmse_fp8_block_hadamard'])} vs "
        f"{_g(summary['rmse_fp8_per_tensor'])}; FlashAttention-3: "
        f"{_g(summary['paper_fp8_error_ratio'])}x); under a sink, reverse order with P scale "
        f"256 lowers the MSE up to {_g(max(gains.values()))}x")
    return Result(records=table + sink, summary=summary, figures={"fp8_rmse": _figure(table, sink)},
                  readme=_readme(table, sink, summary), headline=summary["headline"])
