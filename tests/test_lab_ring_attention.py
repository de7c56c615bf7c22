"""ring-attention: the comm/compute model's algebra, and the quick lab run's numbers and report."""

from __future__ import annotations

import math

import pytest

from flashmath.distributed import model
from flashmath.lab import ring_attention
from flashmath.lab.experiment import Context, Result
from flashmath.lab.runner import to_jsonable

NVLINK = model.PRESETS["h100-nvlink"]


def test_crossover_is_where_compute_equals_transfer() -> None:
    for setup in model.PRESETS.values():
        for kw in ({}, {"kv_heads": 8}, {"causal": True}, {"backward": True}):
            s_r = model.crossover_shard_len(setup, heads=32, dim=128, **kw)  # type: ignore[arg-type]
            tc, tm = model.step_times(setup, s_r, heads=32, dim=128, **kw)  # type: ignore[arg-type]
            assert math.isclose(tc, tm, rel_tol=1e-9), (setup.name, kw)


def test_crossover_closed_form_without_latency() -> None:
    """S_r* = (2 H_kv e / BW) F / (4 H c): e F / (2 BW) for multi-head, non-causal."""
    setup = model.Setup("x", 400e12, 450e9)
    assert math.isclose(model.crossover_shard_len(setup, heads=8), 2 * 400e12 / (2 * 450e9))
    assert math.isclose(model.crossover_shard_len(setup, heads=8, kv_heads=2),
                        model.crossover_shard_len(setup, heads=8) / 4)
    assert math.isclose(model.crossover_shard_len(setup, heads=8, causal=True),
                        2 * model.crossover_shard_len(setup, heads=8))
    assert math.isclose(model.crossover_seq_len(setup, 8, heads=8),
                        8 * model.crossover_shard_len(setup, heads=8))


def test_ring_time_overlaps_above_the_crossover() -> None:
    s_star = model.crossover_seq_len(NVLINK, 8, heads=32)
    below = model.ring_time(NVLINK, s_star / 4, 8, heads=32)
    above = model.ring_time(NVLINK, s_star * 4, 8, heads=32)
    assert below["efficiency"] < 1 and not below["hidden"]
    assert above["efficiency"] == 1 and above["hidden"]
    for t in (below, above):
        assert t["overlapped_s"] <= t["serial_s"]
        assert math.isclose(t["serial_s"], 8 * t["compute_s"] + 7 * t["transfer_s"])


def test_step_counts_follow_the_formulas() -> None:
    assert model.step_flops(1024, batch=2, heads=4, dim=64) == 4 * 2 * 4 * 1024**2 * 64
    assert model.step_flops(1024, causal=True, backward=True) == (
        model.step_flops(1024) * 0.5 * 2.5)
    assert model.step_bytes(1024, batch=2, kv_heads=4, dim=64, elem_bytes=2) == (
        2 * 2 * 4 * 1024 * 64 * 2)
    assert model.step_bytes(1024, elem_bytes=2, backward=True) == 3 * model.step_bytes(1024)


@pytest.fixture(scope="module")
def quick() -> Result:
    pytest.importorskip("torch")
    return ring_attention.run(Context(name=ring_attention.NAME, quick=True))


def _section(result: Result, name: str) -> list[dict]:
    return [r for r in result.records if r["section"] == name]


def test_quick_run_is_exact_across_world_sizes(quick: Result) -> None:
    acc = _section(quick, "accuracy")
    assert {r["W"] for r in acc} == {1, 2, 4}
    assert {(r["causal"], r["layout"]) for r in acc} == {
        (False, "contiguous"), (True, "contiguous"), (True, "zigzag")}
    for r in acc:
        for n in ("out", "dq", "dk", "dv"):
            if r["dtype"] == "float64":
                assert r[f"err_{n}"] <= 64 * 2.0**-52 * max(1.0, r[f"scale_{n}"]), (r, n)
            else:  # the accuracy rule: 2x the naive same-dtype error forward, 3x gradients
                assert r[f"err_{n}"] <= (2 if n == "out" else 3) * r[f"naive_err_{n}"], (r, n)


def test_quick_run_memory_per_rank_falls_with_world_size(quick: Result) -> None:
    mem = _section(quick, "memory")
    peaks = [r["peak_bytes"] for r in mem]
    assert [r["W"] for r in mem] == [1, 2, 4, 8]
    assert peaks == sorted(peaks, reverse=True)
    assert mem[-1]["fraction_of_w1_peak_bytes"] < 0.35  # 8 ranks: well under half of W = 1
    # Below the dense score matrix once the sequence is split; at W = 1 and the quick
    # S = 1024 the O(S D) float64 gradient sums and inputs alone come to ~99% of it (16.6
    # of 16.8 MB, with thread timing moving it over), so W = 1 gets 10% of room.
    assert all(r["peak_bytes"] < r["score_matrix_bytes"] for r in mem if r["W"] > 1)
    assert mem[0]["peak_bytes"] < 1.1 * mem[0]["score_matrix_bytes"]
    assert not _section(quick, "processes")  # the quick run stays in-process


def test_quick_run_model_and_report(quick: Result) -> None:
    rows = _section(quick, "model")
    nv = [r for r in rows if r["setup"] == "h100-nvlink" and r["H_kv"] == 32
          and not r["causal"] and r["pass"] == "forward"]
    assert len(nv) == 1 and 800 < nv[0]["crossover_shard_len"] < 1200
    assert all("crossover_shard_len" not in r for r in rows if r["measured"])
    assert set(quick.figures) == {"memory_per_rank", "comm_compute_model"}
    assert quick.headline in quick.readme
    assert "nan" not in quick.readme.lower()
    to_jsonable(quick.records)
    to_jsonable(quick.summary)


def test_readme_prose_agrees_with_its_table(quick: Result) -> None:
    """GQA's crossover ratio is quoted as the table's own ratio (latency included), errors are
    labelled absolute or relative, bytes are decimal on the plot too, and a CPU is slow per
    FLOP."""
    result = quick
    text, summary = result.readme, result.summary
    assert "cuts the crossover by 4" not in text and "slow per FLOP" in text
    assert "max abs err out" in text and "worst relative err" in text
    model = [r for r in result.records if r["section"] == "model" and not r["measured"]
             and r["pass"] == "forward" and not r["causal"]]
    by = {(r["name"], r["H_kv"]): r["crossover_shard_len"] for r in model}
    for name, ratio in summary["gqa_crossover_ratio"].items():
        assert ratio == pytest.approx(by[(name, 32)] / by[(name, 8)])
        assert f"{name} {ratio:.3g}x" in text
    ylabel = result.figures["memory_per_rank"].get_axes()[0].get_ylabel()
    assert "MB" in ylabel and "MiB" not in ylabel
