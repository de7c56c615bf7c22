"""hbm-traffic: the IO model equals the bytes the NumPy forward counted; the quick run's report."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from flashmath.lab import hbm_traffic
from flashmath.lab.experiment import Context
from flashmath.lab.runner import to_jsonable
from flashmath.measure import iomodel


def _model_and_count(B, H, Hkv, sq, sk, d, dv, bq, bk, dtype=np.float32, **options):
    rng = np.random.default_rng([B, H, sq, sk, d, bq, bk])
    q = rng.standard_normal((B, H, sq, d)).astype(dtype)
    k = rng.standard_normal((B, Hkv, sk, d)).astype(dtype)
    v = rng.standard_normal((B, Hkv, sk, dv)).astype(dtype)
    counted = iomodel.counted_bytes(q, k, v, block_q=bq, block_k=bk, **options)
    lengths = {n: None if options.get(n) is None else [int(x) for x in options[n]]
               for n in ("q_lengths", "kv_lengths")}
    model = iomodel.flash_attention_bytes(
        sq, sk, d, dv=dv, block_q=bq, block_k=bk, elem_bytes=q.itemsize,
        stat_bytes=8 if dtype == np.float64 else 4, batch=B, heads=H,
        causal=options.get("causal", False), window=options.get("window"), **lengths)
    return model.as_record(), counted


@pytest.mark.parametrize(
    ("shape", "tiles", "options"),
    [
        ((1, 1, 1, 256, 256, 64, 64), (64, 64), {}),
        ((1, 1, 1, 256, 256, 64, 64), (64, 64), {"causal": True}),
        ((1, 2, 2, 130, 130, 32, 32), (48, 40), {"causal": True}),  # ragged tiles
        ((1, 2, 2, 37, 150, 16, 16), (16, 32), {"causal": True}),  # Sq < Sk, bottom-right
        ((1, 2, 2, 37, 150, 16, 16), (16, 32), {"causal": "top_left"}),
        ((1, 2, 2, 150, 37, 16, 16), (32, 16), {"causal": True}),  # Sq > Sk: empty rows
        ((1, 2, 2, 200, 200, 16, 16), (32, 32), {"causal": True, "window": (40, 0)}),
        ((1, 2, 2, 160, 200, 16, 16), (32, 48), {"window": (16, 16)}),
        ((2, 4, 2, 96, 128, 16, 8), (32, 64), {}),  # GQA, Dv != D
        ((2, 2, 2, 128, 128, 16, 16), (32, 32),
         {"causal": True, "kv_lengths": np.array([100, 37]), "q_lengths": np.array([128, 60])}),
        ((1, 1, 1, 1, 300, 64, 64), (1, 64), {}),  # decode
    ],
)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_model_equals_count(shape, tiles, options, dtype):
    model, counted = _model_and_count(*shape, *tiles, dtype=dtype, **options)
    assert {k: counted[k] for k in model} == model
    assert counted["read_mask_bytes"] == counted["read_bias_bytes"] == 0


@given(
    B=st.integers(1, 2), Hkv=st.integers(1, 2), group=st.integers(1, 2),
    sq=st.integers(1, 48), sk=st.integers(1, 48), d=st.integers(1, 4), dv=st.integers(1, 4),
    bq=st.integers(1, 16), bk=st.integers(1, 16),
    causal=st.sampled_from([False, True, "top_left"]),
    window=st.none() | st.tuples(st.none() | st.integers(0, 12), st.none() | st.integers(0, 12)),
    lengths=st.booleans(), data=st.data(),
)
def test_model_equals_count_drawn(B, Hkv, group, sq, sk, d, dv, bq, bk, causal, window,
                                  lengths, data):
    options = {"causal": causal, "window": window}
    if lengths:
        options["q_lengths"] = np.array(data.draw(st.lists(st.integers(0, sq), min_size=B,
                                                           max_size=B)))
        options["kv_lengths"] = np.array(data.draw(st.lists(st.integers(0, sk), min_size=B,
                                                            max_size=B)))
    model, counted = _model_and_count(B, Hkv * group, Hkv, sq, sk, d, dv, bq, bk, **options)
    assert {k: counted[k] for k in model} == model


@pytest.fixture(scope="module")
def quick():
    return hbm_traffic.run(Context(name=hbm_traffic.NAME, quick=True))


def test_quick_run_counts_agree_with_the_model(quick):
    traffic = [r for r in quick.records if r["section"] == "traffic"]
    assert {r["T"] for r in traffic} == set(hbm_traffic.LENGTHS)
    counted = [r for r in traffic if r["counted"]]
    assert counted and all(r["count_matches_model"] for r in counted)
    assert all(r["count_matches_model"] is None for r in traffic if not r["counted"])
    assert quick.summary["count_agrees"] == quick.summary["counted_cases"] == len(counted)


def test_quick_run_numbers_tell_the_story(quick):
    traffic = [r for r in quick.records if r["section"] == "traffic"]
    for r in traffic:
        # the seed's flash estimate is the floor (Q, K, V, O once); the model is above it
        assert r["fa2_total_bytes"] > r["seed_flash_bytes"]
        assert r["standard_bytes"] > r["fa2_total_bytes"]
        assert r["standard_bytes"] > r["seed_standard_bytes"]  # S and P are read back too
    for d in hbm_traffic.HEAD_DIMS:
        dense = [r for r in traffic if r["d"] == d and not r["causal"]]
        assert [r["standard_over_fa2"] for r in dense] == sorted(r["standard_over_fa2"]
                                                                 for r in dense)
        causal = [r for r in traffic if r["d"] == d and r["causal"]]
        assert all(c["fa2_total_bytes"] < r["fa2_total_bytes"] for c, r in zip(causal, dense,
                                                                                 strict=True))
    sram = [r for r in quick.records if r["section"] == "sram"]
    assert len(sram) == len(hbm_traffic.SRAM_SWEEP) * len(hbm_traffic.HEAD_DIMS)
    assert "At T = 4096 and the seed's d = 128, seed 002's estimate says" in quick.readme


def test_quick_run_report(quick):
    assert set(quick.figures) == {"traffic"}
    assert quick.headline in quick.readme
    assert "model only" in quick.readme and "nan" not in quick.readme.lower()
    to_jsonable(quick.records)
    to_jsonable(quick.summary)
