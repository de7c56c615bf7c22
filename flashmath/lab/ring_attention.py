"""Ring attention: exactness across ranks, memory per rank vs world size, and when the ring
hides its transfers.

Sections (records carry ``section``):

accuracy   the ring schedule of ``flashmath.distributed.ring`` for W ranks, run in one
           process (``simulate_ring_attention``: a thread per rank, queues for wires, the
           same forward/backward code as ``ring_attention``), against the float64 oracle:
           max |error| of out, dq, dk, dv, for W in 1..8, causal or not, both layouts,
           float64 and float32 (float32 also against the naive same-dtype formula).
memory     tracemalloc's peak of one rank's ring work (forward + backward) at fixed S as W
           grows: rank 0 runs the real passes while its peers are replayed in-process
           (``replay_rank_memory``), so the number is one rank's alone.
processes  (full run only) real process groups: W gloo ranks spawned on 127.0.0.1 run
           ``flashmath ring``'s demo; per-rank tracemalloc and resident peaks, compute and
           wait time, errors, and the loopback bandwidth between two ranks.
model      flashmath.distributed.model: compute vs transfer time of one step for the
           presets (H100 with NVLink, InfiniBand, Ethernet) and this CPU's measured kernel
           throughput; the crossover shard and sequence lengths above which transfers hide.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from flashmath.distributed import model
from flashmath.lab import plotting, readme
from flashmath.lab.experiment import Context, Result, Skipped
from flashmath.measure.flops import attention_flops
from flashmath.text import fmt_bytes, markdown_table
from flashmath.text import number as _g  # the one number formatter (3 significant digits)

NAME = "ring-attention"
TITLE = "Ring attention over torch.distributed: exact across ranks, memory per rank, comm/compute"
SEEDS: tuple[str, ...] = ()
TIMED = True  # it times kernels: the runner runs it alone
PRELOAD = ("torch",)  # imported ahead, while the untimed experiments run

#: The head layout the model's crossovers are quoted for (a Llama-style 8B layer, bf16).
MODEL_SHAPE = {"heads": 32, "dim": 128, "elem_bytes": 2, "gqa_kv_heads": 8}
#: Links for this CPU's measured throughput (a 10 GbE cluster; 1 GbE).
CPU_LINKS = {"10 GbE": 1.25e9, "1 GbE": 0.125e9}


def _torch() -> Any:
    import torch

    return torch


# --------------------------------------------------------------------------- accuracy


def _inputs(ctx: Context, stream: int, b: int, h: int, hk: int, s: int, d: int,
            dtype: str) -> list[Any]:
    torch = _torch()
    rng = ctx.rng(stream)
    shapes = [(b, h, s, d), (b, hk, s, d), (b, hk, s, d), (b, h, s, d)]
    return [torch.from_numpy(rng.standard_normal(sh)).to(getattr(torch, dtype)) for sh in shapes]


def _accuracy(ctx: Context) -> list[dict[str, Any]]:
    from flashmath import attention_reference, attention_reference_backward
    from flashmath.distributed.ring import simulate_ring_attention
    from flashmath.dtypes import from_torch

    s = 64 if ctx.quick else 512
    worlds = (1, 2, 4) if ctx.quick else (1, 2, 4, 8)
    b, h, hk, d = 1, 4, 2, 32
    rows = []
    for dtype in ("float64", "float32"):
        for causal, layout in ((False, "contiguous"), (True, "contiguous"), (True, "zigzag")):
            q, k, v, do = _inputs(ctx, 1, b, h, hk, s, d, dtype)
            arrs = [from_torch(t) for t in (q, k, v, do)]
            ref = [attention_reference(*arrs[:3], causal=causal),
                   *attention_reference_backward(arrs[3], *arrs[:3], causal=causal)]
            naive = None
            if dtype != "float64":
                naive = [attention_reference(*arrs[:3], causal=causal, upcast=False),
                         *attention_reference_backward(arrs[3], *arrs[:3], causal=causal,
                                                       upcast=False)]
            for w in worlds:
                ctx.progress(f"accuracy {dtype} causal={causal} {layout} W={w}")
                out, grads = simulate_ring_attention(q, k, v, w, causal=causal, layout=layout,
                                                     dout=do)
                assert grads is not None
                row: dict[str, Any] = {"section": "accuracy", "dtype": dtype, "causal": causal,
                                       "layout": layout, "W": w, "S": s, "B": b, "H": h,
                                       "H_kv": hk, "D": d}
                for i, (name, got) in enumerate(zip(("out", "dq", "dk", "dv"), (out, *grads),
                                                    strict=True)):
                    row[f"err_{name}"] = float(np.abs(got.double().numpy() - ref[i]).max())
                    row[f"scale_{name}"] = float(np.abs(ref[i]).max())
                    if naive is not None:
                        row[f"naive_err_{name}"] = float(
                            np.abs(np.asarray(naive[i], np.float64) - ref[i]).max())
                if naive is not None:
                    row["worst_over_naive"] = max(row[f"err_{n}"] / row[f"naive_err_{n}"]
                                                  for n in ("out", "dq", "dk", "dv"))
                row["worst_relative"] = max(row[f"err_{n}"] / max(1.0, row[f"scale_{n}"])
                                            for n in ("out", "dq", "dk", "dv"))
                rows.append(row)
    return rows


# --------------------------------------------------------------------------- memory


def _memory_seq(ctx: Context) -> int:
    """The fixed S of the memory section, and of the real process groups (full run)."""
    return 1024 if ctx.quick else 4096


def _memory(ctx: Context) -> tuple[list[dict[str, Any]], float]:
    """Rows per W, and this CPU's measured attention throughput (FLOP/s, W = 1 pass)."""
    from flashmath.distributed.ring import replay_rank_memory

    s = _memory_seq(ctx)
    worlds = (1, 2, 4, 8) if ctx.quick else (1, 2, 4, 8, 16)
    b, h, d = 1, 4, 64
    q, k, v, _ = _inputs(ctx, 2, b, h, h, s, d, "float32")
    rows: list[dict[str, Any]] = []
    flops_per_s = float("nan")
    for w in worlds:
        ctx.progress(f"memory S={s} W={w}")
        t0 = time.perf_counter()
        mem = replay_rank_memory(q, k, v, w, causal=True, layout="zigzag")
        seconds = time.perf_counter() - t0
        if w == 1:  # fwd + bwd of the whole causal sequence
            flops_per_s = attention_flops(b, h, s, s, d, causal=True, mode="fwd_bwd") / seconds
        rows.append({"section": "memory", "W": w, "S": s, "B": b, "H": h, "D": d,
                     "dtype": "float32", "causal": True, "layout": "zigzag",
                     "peak_bytes": mem["peak_bytes"],
                     "forward_peak_bytes": mem["forward_peak_bytes"],
                     "shard_bytes": mem["shard_bytes"],
                     "score_matrix_bytes": b * h * s * s * 4, "replay_s": seconds})
    base = rows[0]["peak_bytes"]
    for r in rows:
        r["fraction_of_w1_peak_bytes"] = r["peak_bytes"] / base
        r["ideal_over_w1"] = 1.0 / r["W"]
    return rows, flops_per_s


# --------------------------------------------------------------------------- processes


def _lab_rank(rank: int, world: int, cfg: Any) -> dict[str, Any]:
    """One spawned rank: the demo's measured ring pass, then a loopback bandwidth probe."""
    import torch
    import torch.distributed as dist

    from flashmath.distributed.demo import run_demo_rank

    row = run_demo_rank(rank, world, cfg)
    buf = torch.zeros(16 * 2**20 // 4)  # 16 MiB
    dist.barrier()
    t0 = time.perf_counter()
    reps = 4
    for _ in range(reps):
        if rank == 0:
            dist.send(buf, 1)
            dist.recv(buf, 1)
        elif rank == 1:
            dist.recv(buf, 0)
            dist.send(buf, 0)
    seconds = time.perf_counter() - t0
    row["loopback_bytes_per_s"] = 2 * reps * buf.numel() * 4 / seconds if rank < 2 else None
    return row


def _processes(ctx: Context) -> list[dict[str, Any]]:
    from flashmath.distributed.demo import DemoConfig
    from flashmath.distributed.launch import run_local

    rows = []
    cfg = DemoConfig(seq=_memory_seq(ctx), heads=4, dim=64, causal=True, layout="zigzag",
                     dtype="float32",
                     seed=ctx.seed)
    for w in (2, 4):
        ctx.progress(f"processes W={w}")
        outcomes = run_local(_lab_rank, w, cfg, timeout=60.0, deadline=300.0)
        for o in outcomes:
            if not o.ok:
                raise RuntimeError(f"ring-attention processes W={w}: {o.describe()}")
            rows.append({"section": "processes", "W": w, "S": cfg.seq, **o.value})
    return rows


# --------------------------------------------------------------------------- model


def _setups(cpu_flops: float, loopback: float | None) -> list[tuple[str, model.Setup]]:
    setups = list(model.PRESETS.items())
    for link, bw in CPU_LINKS.items():
        setups.append((f"cpu-{link.replace(' ', '').lower()}",
                       model.Setup(f"this CPU + {link}", cpu_flops, bw, 50e-6,
                                   f"{cpu_flops / 1e9:.3g} GFLOP/s measured; {link}")))
    if loopback:
        setups.append(("cpu-loopback", model.Setup(
            "this CPU, gloo loopback", cpu_flops, loopback, 50e-6,
            f"{cpu_flops / 1e9:.3g} GFLOP/s; {loopback / 1e9:.3g} GB/s measured")))
    return setups


def _records(mrows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The model rows as results.json keeps them: the crossovers of the setups built on this
    machine's measured throughput are timings in disguise, so only their README shows them
    (results.json stays the same for the same seed, timings aside)."""
    drop = ("crossover_shard_len", "crossover_seq_len_w8")
    return [{(f"{k}_from_timing" if r["measured"] and k in drop else k): v
             for k, v in r.items()} for r in mrows]


def _model(setups: list[tuple[str, model.Setup]]) -> list[dict[str, Any]]:
    rows = []
    for key, setup in setups:
        for hk in (MODEL_SHAPE["heads"], MODEL_SHAPE["gqa_kv_heads"]):
            for causal in (False, True):
                for backward in (False, True):
                    s_r = model.crossover_shard_len(
                        setup, heads=MODEL_SHAPE["heads"], kv_heads=hk, dim=MODEL_SHAPE["dim"],
                        elem_bytes=MODEL_SHAPE["elem_bytes"], causal=causal, backward=backward)
                    tc, _ = model.step_times(
                        setup, s_r, heads=MODEL_SHAPE["heads"], kv_heads=hk,
                        dim=MODEL_SHAPE["dim"], elem_bytes=MODEL_SHAPE["elem_bytes"],
                        causal=causal, backward=backward)
                    rows.append({
                        "section": "model", "setup": key, "name": setup.name,
                        "measured": key.startswith("cpu"), "crossover_step_s": tc,
                        "flops_per_s": setup.flops_per_s, "bandwidth_bytes_per_s":
                        setup.bandwidth, "latency_us": setup.latency_s * 1e6,
                        "H": MODEL_SHAPE["heads"], "H_kv": hk, "D": MODEL_SHAPE["dim"],
                        "causal": causal, "pass": "backward" if backward else "forward",
                        "crossover_shard_len": s_r,
                        "crossover_seq_len_w8": 8 * s_r,
                    })
    return rows


# --------------------------------------------------------------------------- figures


def _figures(memory: list[dict[str, Any]], procs: list[dict[str, Any]],
             setups: list[tuple[str, model.Setup]]) -> dict[str, Any]:
    fig, ax = plotting.figure(width=6.4, height=4.2)
    w = [r["W"] for r in memory]
    mib = 1e6  # MB, as the README's tables (flashmath.text.fmt_bytes) print them
    ax.plot(w, [r["peak_bytes"] / mib for r in memory], "o-", markersize=12, mfc="none",
            mew=1.6, label="one rank, peers replayed in-process (tracemalloc)")
    ax.plot(w, [memory[0]["peak_bytes"] / mib / x for x in w], "k:", label="ideal: W=1 peak / W")
    ax.plot(w, [r["shard_bytes"] / mib for r in memory], "s--", label="the rank's q, k, v shards")
    if procs:
        by_w: dict[int, list[float]] = {}
        for r in procs:
            by_w.setdefault(r["W"], []).append(r["ring_peak_bytes"] / mib)
        ax.plot(sorted(by_w), [max(by_w[x]) for x in sorted(by_w)], "^", markersize=6,
                label="real gloo ranks (max over ranks; inside the rings where equal)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("world size W (ranks)")
    ax.set_ylabel("peak MB per rank (forward + backward)")
    ax.set_title(f"per-rank memory at S = {memory[0]['S']} (causal, zigzag, float32)")
    ax.legend()

    fig2, axes = plotting.figure(1, 2, width=11.0, height=4.2)
    s_r = np.logspace(3, 18, 60, base=2)
    colors = {key: f"C{i}" for i, (key, _) in enumerate(setups)}
    shape = {"heads": MODEL_SHAPE["heads"], "dim": MODEL_SHAPE["dim"],
             "elem_bytes": MODEL_SHAPE["elem_bytes"]}
    ax = axes[0]
    drawn_compute: set[float] = set()
    for key, setup in setups:
        tc_tm = [model.step_times(setup, x, **shape) for x in s_r]  # type: ignore[arg-type]
        ax.plot(s_r, [t[1] for t in tc_tm], "--", color=colors[key],
                label=f"transfer: {setup.name}")
        if setup.flops_per_s not in drawn_compute:
            drawn_compute.add(setup.flops_per_s)
            ax.plot(s_r, [t[0] for t in tc_tm], "-", color="k" if key.startswith("h100") else
                    "tab:gray", label=f"compute at {setup.flops_per_s / 1e12:.3g} TFLOP/s")
        x = model.crossover_shard_len(setup, **shape)  # type: ignore[arg-type]
        ax.plot([x], [model.step_times(setup, x, **shape)[0]], "o",  # type: ignore[arg-type]
                color=colors[key])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("shard length S_r = S / W (tokens per rank)")
    ax.set_ylabel("seconds per ring step (forward)")
    ax.set_title("one step: compute ~ S_r^2, transfer ~ S_r (dots: crossover)")
    ax.legend(fontsize=6)
    ax = axes[1]
    seq = np.logspace(12, 22, 60, base=2)
    for key, setup in setups:
        if not key.startswith("h100"):
            continue
        for causal, style in ((False, "-"), (True, ":")):
            eff = [model.ring_time(setup, x, 8, causal=causal, **shape)["efficiency"]  # type: ignore[arg-type]
                   for x in seq]
            ax.plot(seq, eff, style, color=colors[key],
                    label=f"{setup.name}{' causal' if causal else ''}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length S (W = 8 ranks)")
    ax.set_ylabel("efficiency = W t_compute / ring time")
    ax.set_title("8 ranks, forward: transfers hidden at efficiency 1")
    ax.legend(fontsize=7)
    return {"memory_per_rank": fig, "comm_compute_model": fig2}


# --------------------------------------------------------------------------- readme


def _doubling(memory: list[dict[str, Any]]) -> float:
    """Geometric mean of peak(W) / peak(2W) from W = 2 on."""
    ratios = [a["peak_bytes"] / b["peak_bytes"] for a, b in itertools.pairwise(memory[1:])]
    return float(np.exp(np.mean(np.log(ratios)))) if ratios else float("nan")


def _summary(acc: list[dict[str, Any]], memory: list[dict[str, Any]],
             procs: list[dict[str, Any]], mrows: list[dict[str, Any]],
             cpu_flops: float) -> dict[str, Any]:
    f64 = [r for r in acc if r["dtype"] == "float64"]
    worst64 = max(max(r[f"err_{n}"] / max(1.0, r[f"scale_{n}"]) for n in ("out", "dq", "dk", "dv"))
                  for r in f64)
    f32 = [r for r in acc if r["dtype"] == "float32"]
    rule = max(max(r[f"err_{n}"] / r[f"naive_err_{n}"] for n in ("out", "dq", "dk", "dv"))
               for r in f32)
    cross = {r["setup"]: r["crossover_shard_len"] for r in mrows  # the presets: not timings
             if not r["measured"] and r["H_kv"] == r["H"] and not r["causal"]
             and r["pass"] == "forward"}
    m1, mlast = memory[0], memory[-1]
    headline = (
        f"ring attention equals the float64 oracle to {_g(worst64)} (relative, float64, W up "
        f"to {max(r['W'] for r in acc)}); one rank's peak memory at S = {m1['S']} falls from "
        f"{fmt_bytes(m1['peak_bytes'])} (W = 1) to {fmt_bytes(mlast['peak_bytes'])} (W = "
        f"{mlast['W']}); transfers hide above {_g(cross['h100-nvlink'])} tokens per rank on "
        f"NVLink, {_g(cross['h100-infiniband'])} on InfiniBand, "
        f"{_g(cross['h100-ethernet'])} on 100 GbE")
    fwd = [r for r in mrows if r["pass"] == "forward"]
    by = {(r["name"], r["H_kv"], r["causal"]): _cross(r) for r in fwd}
    names = list(dict.fromkeys(r["name"] for r in fwd if not r["measured"]))  # presets
    h, hk = MODEL_SHAPE["heads"], MODEL_SHAPE["gqa_kv_heads"]
    return {"headline": headline, "worst_float64_relative_error": worst64,
            "doubling_peak_bytes": _doubling(memory), "cpu_count": os.cpu_count(),
            "worst_float64_abs_error": max(max(r[f"err_{n}"] for n in ("out", "dq", "dk", "dv"))
                                           for r in f64),
            "gqa_crossover_ratio": {n: by[(n, h, False)] / by[(n, hk, False)] for n in names},
            "causal_crossover_ratio": {n: by[(n, h, True)] / by[(n, h, False)] for n in names},
            "backward_flops_factor": model.step_flops(1.0, heads=1, dim=1, backward=True)
            / model.step_flops(1.0, heads=1, dim=1),
            "worst_float32_error_over_naive": rule, "cpu_flops_per_s": cpu_flops,
            "crossover_shard_len": cross, "processes_run": bool(procs),
            "by_w_peak_bytes": {r["W"]: r["peak_bytes"] for r in memory}}


def _answer_accuracy(acc: list[dict[str, Any]], summary: dict[str, Any]) -> list[str]:
    errs = ("out", "dq", "dk", "dv")
    table = markdown_table(acc, [
        ("dtype", "dtype"), ("causal", "causal"), ("layout", "layout"), ("W", "W"),
        *[(f"max abs err {n}", f"err_{n}") for n in errs],
        ("worst relative err", "worst_relative"),
        ("worst abs err / naive same-dtype err", lambda r: r.get("worst_over_naive")),
    ])
    return [
        "Yes, to rounding. The ring schedule for W ranks, run in this process (one thread per "
        "rank, queues for wires: the same forward and backward code `ring_attention` runs "
        "over torch.distributed), against the float64 oracle `fm.attention_reference` over "
        f"the whole sequence (S = {acc[0]['S']}, H = {acc[0]['H']}, H_kv = {acc[0]['H_kv']}, "
        f"D = {acc[0]['D']}). The table's *max abs err* columns are absolute; the *relative* "
        "error divides each by max(1, max |value|) of the oracle's output or gradient. The "
        f"worst float64 relative error is {_g(summary['worst_float64_relative_error'])} "
        f"(the largest absolute one {_g(summary['worst_float64_abs_error'])}): partial results "
        "merged by their log-sum-exps are exact up to rounding, whatever W and layout. In "
        f"float32 the ring stays within {_g(summary['worst_float32_error_over_naive'])}x the "
        "error of the naive formula computed in float32 (the accuracy rule allows 2x forward, "
        "3x gradients).",
        "",
        table,
    ]


def _answer_memory(memory: list[dict[str, Any]], procs: list[dict[str, Any]],
                   summary: dict[str, Any], quick: bool) -> list[str]:
    m1 = memory[0]
    lines = [
        f"From {fmt_bytes(m1['peak_bytes'])} on one rank to "
        f"{fmt_bytes(memory[-1]['peak_bytes'])} on {memory[-1]['W']}: "
        f"{_g(memory[-1]['fraction_of_w1_peak_bytes'])} of the single-rank peak (ideal "
        f"{_g(memory[-1]['ideal_over_w1'])}). S = {m1['S']}, B = {m1['B']}, H = {m1['H']}, "
        f"D = {m1['D']}, float32, causal, zigzag layout. Rank 0 runs its real forward and "
        "backward passes; its peers are replayed in this process (the K/V shards it would "
        "receive are copied in from the whole tensors), so tracemalloc sees exactly one "
        "rank's allocations: the NumPy kernels' tiles, the K/V receive buffers, the dK/dV in "
        "flight and the outputs (its inputs are excluded). "
        + ("The quick run measures memory this way only; the full run also spawns real gloo "
           "process groups (below). " if quick else "")
        + "Everything a rank holds is O(S_r): its outputs and gradients, and what only a ring "
        "needs, a K/V receive buffer (two, from W = 3) and the dK/dV arriving and leaving; "
        f"those buffers are why W = 2 gives {_g(memory[1]['fraction_of_w1_peak_bytes'])} rather "
        f"than {_g(memory[1]['ideal_over_w1'])}. From W = 2 on, each doubling of W divides the "
        f"peak by {_g(summary['doubling_peak_bytes'])} on average (2 would be ideal; the kernels' "
        "fixed-size tiles are the part that does not shrink). The float32 score matrix the "
        f"tiled kernels never build would be {fmt_bytes(m1['score_matrix_bytes'])}. Bytes are "
        "decimal MB/kB here and on the plot.",
        "",
        markdown_table(memory, [
            ("W", "W"), ("peak (fwd + bwd)", lambda r: fmt_bytes(r["peak_bytes"])),
            ("forward peak", lambda r: fmt_bytes(r["forward_peak_bytes"])),
            ("shards q, k, v", lambda r: fmt_bytes(r["shard_bytes"])),
            ("peak / W=1 peak", "fraction_of_w1_peak_bytes"), ("ideal 1/W", "ideal_over_w1"),
        ]),
        "",
        "![memory_per_rank](memory_per_rank.png)",
    ]
    if procs:
        bw = [r["loopback_bytes_per_s"] for r in procs if r.get("loopback_bytes_per_s")]
        lines += [
            "",
            f"Real process groups: W gloo ranks spawned on 127.0.0.1 (S = {procs[0]['S']}, "
            "float32, causal, zigzag), each running `flashmath ring`'s demo: ring forward and "
            "backward with tracemalloc on, then absolute errors against the float64 oracle. "
            "The resident peak includes the interpreter, torch and NumPy themselves ("
            + _span(fmt_bytes(min(r['rss_peak_bytes'] for r in procs)),
                    fmt_bytes(max(r['rss_peak_bytes'] for r in procs)))
            + " per process here), which is "
            "why the tracemalloc figure is the one to compare with the replayed rank above. "
            + (f"Loopback bandwidth between two ranks: {_g(max(bw) / 1e9)} GB/s. " if bw else "")
            + f"On this {summary['cpu_count']}-core machine the ranks share the cores, so wait "
            "time includes waiting for a neighbour's compute, not only transfers.",
            "",
            markdown_table(procs, [
                ("W", "W"), ("rank", "rank"),
                ("ring peak (tracemalloc)", lambda r: fmt_bytes(r["ring_peak_bytes"])),
                ("resident peak", lambda r: fmt_bytes(r["rss_peak_bytes"])),
                ("compute s", "compute_s"), ("wait s", "wait_s"),
                ("max abs err out", "err_out"), ("max abs err dq", "err_dq"),
                ("max abs err dk", "err_dk"), ("max abs err dv", "err_dv"),
            ]),
        ]
    return lines


def _span(lo: str, hi: str) -> str:
    """"lo to hi", or one figure when both print the same."""
    return lo if lo == hi else f"{lo} to {hi}"


def _cross(r: Mapping[str, Any], key: str = "crossover_shard_len") -> float:
    return float(r.get(key, r.get(f"{key}_from_timing")))


def _answer_overlap(mrows: list[dict[str, Any]], summary: dict[str, Any]) -> list[str]:
    fp = [r for r in mrows if r["pass"] == "forward"]
    table = markdown_table(
        [r for r in fp if not r["causal"]] + [r for r in fp if r["causal"]], [
            ("setup", "name"), ("H / H_kv", lambda r: f"{r['H']} / {r['H_kv']}"),
            ("causal", "causal"), ("latency us", "latency_us"),
            ("crossover S_r (tokens/rank)", lambda r: f"{_cross(r):.0f}"),
            ("crossover S at W = 8", lambda r: f"{_cross(r, 'crossover_seq_len_w8'):.0f}"),
        ])
    bw_rows = [r for r in mrows if r["pass"] == "backward" and r["H_kv"] == r["H"]
               and not r["causal"]]
    gqa = summary["gqa_crossover_ratio"]
    causal = summary["causal_crossover_ratio"]
    return [
        "One step computes a (S_r x S_r) block, a S_r^2 seconds with a = 4 B H D / F "
        "(F the FLOP rate; half for causal), while the next K/V shard, 2 B H_kv S_r D e bytes, "
        "travels in b S_r + L seconds (b = 2 B H_kv D e / BW, L the link's latency); the step "
        "costs max(compute, transfer). Compute grows as S_r^2 and traffic as S_r, so above "
        "the crossover S_r* = (b + sqrt(b^2 + 4 a L)) / (2 a) every transfer is hidden "
        "(b / a without latency). Below, for "
        f"H = {MODEL_SHAPE['heads']}, D = {MODEL_SHAPE['dim']}, bf16 (e = 2), forward; the "
        "H100 setups assume an achieved "
        + ", ".join(sorted({f"{r['flops_per_s'] / 1e12:.0f} TFLOP/s" for r in fp
                            if r["setup"].startswith("h100")}))
        + " (what FlashAttention-2-class kernels reach, well below the dense bf16 peak) "
        "and round published link figures (see flashmath.distributed.model), the CPU "
        "rows this machine's measured kernel throughput "
        f"({_g(summary['cpu_flops_per_s'] / 1e9)} GFLOP/s, fwd + bwd at W = 1).",
        "",
        table,
        "",
        f"GQA (H_kv = {MODEL_SHAPE['gqa_kv_heads']}) moves 1/"
        f"{_g(MODEL_SHAPE['heads'] / MODEL_SHAPE['gqa_kv_heads'])} of the bytes for the same "
        "FLOPs, which would divide a bandwidth-only crossover b / a by that much; the latency "
        "term does not shrink with the bytes, so the crossover falls by less: "
        + ", ".join(f"{name} {_g(v)}x" for name, v in gqa.items())
        + " (the published setups). A causal mask halves the work per step, which would "
        "double b / a; with latency it multiplies the crossover by "
        + ", ".join(f"{name} {_g(v)}x" for name, v in causal.items())
        + ". The backward moves K, V and the float32 dK, dV (3x the forward's bytes in bf16) "
        f"for {_g(summary['backward_flops_factor'])}x the FLOPs: "
        + ", ".join(f"{r['name']} {_cross(r):.0f}" for r in bw_rows)
        + " tokens per rank. In short: NVLink hides the ring from about a thousand tokens "
        "per rank, InfiniBand from several thousand, commodity Ethernet only for shards of "
        "tens of thousands of tokens; a CPU is so slow per FLOP that even 1 GbE is hidden "
        "from modest shards.",
        "",
        "![comm_compute_model](comm_compute_model.png)",
        "",
        "Left: step compute and transfer time vs shard length per setup, crossovers marked; "
        "right: modelled ring efficiency vs S on 8 ranks.",
    ]


def _readme(acc: list[dict[str, Any]], memory: list[dict[str, Any]],
            procs: list[dict[str, Any]], mrows: list[dict[str, Any]],
            summary: dict[str, Any], quick: bool) -> str:
    answers = [_answer_accuracy(acc, summary), _answer_memory(memory, procs, summary, quick),
               _answer_overlap(mrows, summary)]
    return readme.render(NAME, SEEDS, summary["headline"], answers)


# --------------------------------------------------------------------------- run


def run(ctx: Context) -> Result:
    try:
        _torch()
    except ImportError as exc:
        raise Skipped("needs torch (pip install flashmath[torch])") from exc
    acc = _accuracy(ctx)
    memory, cpu_flops = _memory(ctx)
    procs = [] if ctx.quick else _processes(ctx)
    bw = [r["loopback_bytes_per_s"] for r in procs if r.get("loopback_bytes_per_s")]
    setups = _setups(cpu_flops, max(bw) if bw else None)
    mrows = _model(setups)
    summary = _summary(acc, memory, procs, mrows, cpu_flops)
    return Result(records=[*acc, *memory, *procs, *_records(mrows)], summary=summary,
                  figures=_figures(memory, procs, setups),
                  readme=_readme(acc, memory, procs, mrows, summary, ctx.quick),
                  headline=summary["headline"])
