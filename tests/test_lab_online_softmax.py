"""The online-softmax experiment (seeds 000 and 002): it runs, says what it measured, and
its measurements meet seed 000's expectations."""

from __future__ import annotations

import time

import numpy as np
import pytest

from flashmath.lab import online_softmax, registry
from flashmath.lab.experiment import Context, Result, strip_volatile
from flashmath.lab.runner import dumps_json

SECTIONS = ("grid", "chunk_sensitivity", "pathological", "realistic", "above_11", "trace")


@pytest.fixture(scope="module")
def quick() -> tuple[Result, float]:
    start = time.perf_counter()
    result = online_softmax.run(Context(name=online_softmax.NAME, quick=True))
    return result, time.perf_counter() - start


def section(result: Result, name: str) -> list[dict]:
    return [r for r in result.records if r["section"] == name]


def test_registered_under_its_name():
    assert registry.experiments()[online_softmax.NAME] is online_softmax
    assert online_softmax.NAME == "online-softmax" and online_softmax.SEEDS == ("000", "002")


def test_quick_run_is_smaller_and_has_every_section(quick):
    result, _seconds = quick  # speed goals live in benchmarks/, not in timed tests
    grid = section(result, "grid")
    assert {r["N"] for r in grid} == set(online_softmax.GRID_N[True])
    for name in SECTIONS:
        assert section(result, name), name
    assert set(result.figures) == {"chunk_sensitivity"}
    dumps_json({"records": result.records, "summary": result.summary})  # JSON-ready


def test_grid_covers_seed_000_and_every_cell_passes(quick):
    grid = section(quick[0], "grid")
    assert {r["dtype"] for r in grid} == {"float32", "float16", "bfloat16"}
    assert {r["chunk"] for r in grid} == {1, 4, 16, 64, 256}
    assert {r["d"] for r in grid} == {16, 64}
    assert all(r["pass"] and r["err"] < r["bound"] for r in grid)
    assert quick[0].summary["grid_pass"] == len(grid)


def test_chunk_size_does_not_matter_with_float32_state_but_does_with_float16(quick):
    spread = quick[0].summary["sensitivity_spread"]
    assert spread["float32"] < online_softmax.SENSITIVE <= spread["float16"]
    errs = quick[0].summary["sensitivity_err"]
    assert errs["float16"]["1"] > errs["float32"]["1"]


def test_pathological_and_realistic_cases_pass_with_float32_state(quick):
    for name in ("pathological", "realistic"):
        rows = [r for r in section(quick[0], name) if r["state"] == "float32"]
        assert rows and all(r["pass"] for r in rows), name
    huge16 = [r for r in section(quick[0], "pathological")
              if r["case"].startswith("one huge") and r["dtype"] == "float16"]
    assert all(r["finite"] and not r["naive_finite"] for r in huge16)  # exp(60) = inf in fp16


def test_above_11_shows_naive_nan_and_float16_state_overflow(quick):
    rows = {(r["case"], r["method"]): r for r in section(quick[0], "above_11")}
    spikes, _, long = dict.fromkeys(r["case"] for r in section(quick[0], "above_11"))
    assert not rows[(spikes, "naive float16")]["finite"]
    assert rows[(spikes, "online, float16 state")]["pass"]
    assert rows[(long, "online, float16 state")]["l_final"] == np.inf
    assert rows[(long, "online, float32 state")]["pass"]


def test_seed_002_trace(quick):
    trace = section(quick[0], "trace")
    assert [(r["m"], r["l"]) for r in trace] == [
        (2.0, 1.0 + np.exp(-3.5)),
        (4.2, (1.0 + np.exp(-3.5)) * np.exp(2.0 - 4.2) + np.exp(0.3 - 4.2) + 1.0)]


def test_readme_answers_block_f_from_the_numbers(quick):
    result = quick[0]
    readme = result.readme
    for needle in ("Block F, question 1 of seed 000", "Block F, question 2", "value > 11",
                   "![chunk_sensitivity](chunk_sensitivity.png)", "section 2 of seed 002"):
        assert needle in readme
    assert f"{result.summary['grid_worst_err']['float16']:.3g}" in readme
    # one worst float16 figure: the largest error of any float16 record (default state),
    # quoted by the headline and by question 1's answer
    worst = result.summary["float16_worst"]
    errs = [r["err"] for r in result.records
            if (r.get("dtype") == "float16" and r.get("state") == "float32")
            or r.get("method") == "online, float32 state"]
    assert worst["err"] == max(errs)
    assert (f"worst float16 error anywhere with the default float32 state {worst['err']:.3g}"
            in result.headline)
    assert (f"with a float16 state up to {result.summary['float16_state_worst_err']:.3g}"
            in result.headline)
    answer = readme.split("Block F, question 1 of seed 000")[1].split("**3.")[0]
    assert answer.split("\n\n", 2)[2].startswith(f"{worst['err']:.3g}, in ")
    # the bound column shows the bound applied, bound x max(1, |O|)
    for r in result.records:
        if "bound_applied" in r:
            assert r["bound_applied"] == r["bound"] * max(1.0, r["max_abs_out"])
    assert result.headline and result.headline in readme


def test_same_seed_same_results(quick):
    again = online_softmax.run(Context(name=online_softmax.NAME, quick=True))
    first = quick[0]
    assert dumps_json(strip_volatile(again.records)) == dumps_json(strip_volatile(first.records))
    assert again.readme == first.readme
    other = online_softmax.run(Context(name=online_softmax.NAME, seed=1, quick=True))
    assert dumps_json(other.records) != dumps_json(first.records)
