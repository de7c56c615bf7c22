"""flash_attention forward: out and lse against the float64 oracle, tiles, dtypes, edge cases."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from hypothesis import given

import flashmath as fm
from flashmath.dtypes import DTYPES
from flashmath.measure import iomodel
from tests.attention_cases import (
    OPTIONS,
    assert_close,
    check_against_reference,
    options,
    problems,
    qkv,
)

SHAPES = [  # (B, H, H_kv, Sq, Sk, D, Dv)
    (2, 2, 2, 13, 13, 8, 8),  # square
    (1, 4, 2, 9, 21, 5, 3),  # Sq < Sk, GQA, Dv != D
    (2, 3, 1, 22, 7, 4, 6),  # Sq > Sk, MQA
    (1, 2, 2, 1, 17, 4, 4),  # one query (decoding)
    (1, 2, 1, 11, 1, 3, 2),  # one key
]
TILES = [(None, None), (4, 4), (5, 3)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", OPTIONS)
@pytest.mark.parametrize(("bq", "bk"), TILES)
def test_forward_matches_reference(shape, name, bq, bk):
    b, h, h_kv, sq, sk, d, dv = shape
    rng = np.random.default_rng([sq, sk, d, len(name)])
    q, k, v = qkv(rng, b, h, sq, sk, d, h_kv=h_kv, dv=dv)
    check_against_reference(q, k, v, block_q=bq, block_k=bk, grads=False,
                            **options(name, rng, b, h, sq, sk))


@pytest.mark.parametrize("d", [1, 33, 59, 64, 111, 128])
@pytest.mark.parametrize("name", ["plain", "everything"])
def test_head_dims(d, name):
    rng = np.random.default_rng(d)
    q, k, v = qkv(rng, 1, 2, 19, 23, d)
    check_against_reference(q, k, v, block_q=8, block_k=16, **options(name, rng, 1, 2, 19, 23))


@given(problems())
def test_forward_hypothesis(problem):
    check_against_reference(grads=False, **problem)


# --- seed 003's checks ---


@pytest.mark.parametrize(("seed", "n", "d"), [(42, 256, 64), (123, 512, 32)])
def test_seed003_checks(seed, n, d):
    """Seed 003's checks: (1, 1, 256, 64) and the N = 512 case, tile 64, causal, relative
    error < 1e-4 (here it is ~1e-15: float64 throughout)."""
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((1, 1, n, d)) for _ in range(3))
    out = fm.flash_attention(q, k, v, causal=True, block_q=64, block_k=64)
    ref = fm.attention_reference(q, k, v, causal=True)
    assert np.max(np.abs(out - ref) / np.abs(ref)) < 1e-4
    assert np.max(np.abs(out - ref)) < 1e-13


# --- dtypes ---


@pytest.mark.parametrize(("dtype", "rel"), [
    ("float64", 1e-13), ("float32", 1e-5), ("float16", 2e-3), ("bfloat16", 1.6e-2),
    ("float8_e4m3fn", 0.13), ("float8_e5m2", 0.25),
])
def test_dtypes_return_the_input_dtype(dtype, rel):
    """Narrow inputs compute in float32: the error is the output's rounding, about eps/2."""
    rng = np.random.default_rng(1)
    q, k, v = qkv(rng, 1, 2, 33, 40, 16, dtype=DTYPES[dtype])
    out, lse = fm.flash_attention(q, k, v, causal=True, block_q=8, block_k=16, return_lse=True)
    ref, ref_lse = fm.attention_reference(q, k, v, causal=True, return_lse=True)
    assert out.dtype == DTYPES[dtype]
    assert lse.dtype == (np.float64 if dtype == "float64" else np.float32)
    assert_close(out, ref, rel=rel)
    assert_close(lse, ref_lse, rel=1e-13 if dtype == "float64" else 1e-6)


def test_accum_dtype_overrides_the_tile_arithmetic():
    rng = np.random.default_rng(2)
    q, k, v = qkv(rng, 1, 1, 64, 64, 16, dtype=np.float16)
    ref = fm.attention_reference(q, k, v)
    narrow = fm.flash_attention(q, k, v, block_k=8, accum_dtype="float16")
    wide = fm.flash_attention(q, k, v, block_k=8)
    assert narrow.dtype == wide.dtype == np.float16
    assert np.abs(narrow - ref).max() > np.abs(wide - ref).max()
    q, k, v = qkv(rng, 1, 1, 64, 64, 16, dtype=np.float32)
    out = fm.flash_attention(q, k, v, accum_dtype=np.float64)
    assert out.dtype == np.float32
    assert_close(out, fm.attention_reference(q, k, v), rel=1e-7)


def test_integer_input_promotes_to_float64():
    q = np.arange(24).reshape(1, 2, 3, 4) % 3
    out = fm.flash_attention(q, q, q, causal=True)
    assert out.dtype == np.float64
    assert_close(out, fm.attention_reference(q * 1.0, q * 1.0, q * 1.0, causal=True), rel=1e-14)


# --- rows with nothing to attend to, NaN and inf, empty shapes ---


@pytest.mark.parametrize("case", [
    {"q_lengths": np.array([2, 0])},
    {"kv_lengths": np.array([0, 3])},
    {"causal": True},  # Sq > Sk bottom-right: the first Sq - Sk rows see no key
    {"window": (0, 0), "kv_lengths": np.array([4, 7])},
    {"mask": np.array([True, False, True, False, True, True, True, True, True, False])[:, None]},
    {"bias": np.where(np.arange(10)[:, None] % 3 == 0, -np.inf, 0.0)},
])
def test_fully_masked_rows_give_zero_and_minus_inf(case):
    rng = np.random.default_rng(3)
    q, k, v = qkv(rng, 2, 2, 10, 7, 5)
    out, lse = fm.flash_attention(q, k, v, block_q=4, block_k=3, return_lse=True, **case)
    ref, ref_lse = fm.attention_reference(q, k, v, return_lse=True, **case)
    empty = np.isneginf(ref_lse)
    assert empty.any(), "the case should leave some row empty"
    assert not np.isnan(out).any() and not np.isnan(lse).any()
    np.testing.assert_array_equal(np.isneginf(lse), empty)
    assert (out[empty] == 0).all()
    assert_close(out, ref, rel=1e-13)


def test_nan_and_inf_make_their_rows_nan_only():
    """NaN in q row 1, a +inf score in row 2 (through the bias), NaN in key 4 (seen by
    rows 4 and 5 under top-left causal): exactly those rows are NaN, as in the oracle."""
    rng = np.random.default_rng(4)
    q, k, v = qkv(rng, 1, 1, 6, 6, 3)
    q[0, 0, 1, 0] = np.nan
    k[0, 0, 4, 1] = np.nan
    bias = np.zeros((6, 6))
    bias[2, 1] = np.inf
    out, lse = fm.flash_attention(q, k, v, causal="top_left", bias=bias, block_q=2, block_k=2,
                                  return_lse=True)
    ref = fm.attention_reference(q, k, v, causal="top_left", bias=bias)
    nan_rows = np.isnan(out[0, 0]).any(axis=1)
    np.testing.assert_array_equal(nan_rows, [False, True, True, False, True, True])
    np.testing.assert_array_equal(nan_rows, np.isnan(ref[0, 0]).any(axis=1))
    np.testing.assert_array_equal(np.isnan(lse[0, 0]), nan_rows)
    assert_close(out[0, 0, [0, 3]], ref[0, 0, [0, 3]], rel=1e-14)


@pytest.mark.parametrize(("sq", "sk"), [(0, 5), (5, 0), (0, 0)])
def test_empty_lengths(sq, sk):
    q, k, v = qkv(np.random.default_rng(5), 1, 2, sq, sk, 3)
    out, lse = fm.flash_attention(q, k, v, causal=True, return_lse=True)
    assert out.shape == (1, 2, sq, 3) and lse.shape == (1, 2, sq)
    assert (out == 0).all() and np.isneginf(lse).all()


# --- tiles: skipping, IO counting, memory ---


def stats_of(sq, sk, bq, bk, **opts):
    q, k, v = qkv(np.random.default_rng(6), 1, 1, sq, sk, 4, dtype=np.float32)
    return iomodel.counted_bytes(q, k, v, block_q=bq, block_k=bk, **opts)


def test_causal_skips_the_tiles_above_the_diagonal():
    s = stats_of(64, 64, 8, 8, causal=True)
    assert (s["tiles"], s["tiles_partial"], s["tiles_total"]) == (36, 8, 64)


def test_sliding_window_visits_a_band_of_tiles():
    s = stats_of(64, 64, 8, 8, causal=True, window=(8, 0))
    assert (s["tiles"], s["tiles_total"]) == (15, 64)  # the diagonal and the one before it
    assert s["read_k_bytes"] < 64 * 4 * 4 * 2  # a window's worth of keys per query block


def test_kv_lengths_skip_padding_keys():
    s = stats_of(16, 64, 8, 8, kv_lengths=np.array([20]))
    assert s["tiles"] == 2 * 3
    assert s["read_k_bytes"] == 2 * 20 * 4 * 4  # keys 0..19, read once per query block


@pytest.mark.parametrize("opts", [{}, {"causal": True}, {"window": (5, 3)},
                                  {"causal": "top_left", "q_lengths": np.array([27])}])
def test_io_counts_match_the_iomodel(opts):
    """Visited tiles and bytes match flashmath.measure.iomodel's FA2 order exactly (both clip the
    key rows of a tile to the block's key span and the query rows to the valid length)."""
    sq, sk, bq, bk = 40, 56, 8, 16
    s = stats_of(sq, sk, bq, bk, **opts)
    model = iomodel.flash_attention_bytes(sq, sk, 4, block_q=bq, block_k=bk, elem_bytes=4,
                                          **opts)
    assert (s["tiles"], s["tiles_total"]) == (model.tiles, model.tiles_total)
    rec = model.as_record()
    for key in ("read_q_bytes", "read_k_bytes", "read_v_bytes", "write_o_bytes",
                "write_lse_bytes"):
        assert s[key] == rec[key], key


def test_counted_bytes_cover_every_slice():
    q, k, v = qkv(np.random.default_rng(7), 2, 2, 10, 10, 4, dtype=np.float32)
    stats = iomodel.counted_bytes(q, k, v, block_q=4, block_k=4)
    assert stats["tiles"] == stats["tiles_total"] == 2 * 2 * 9
    assert stats["total_bytes"] == stats["read_bytes"] + stats["write_bytes"]


@pytest.mark.slow
def test_forward_memory_is_a_small_fraction_of_the_score_matrix():
    """S = 4096, B = H = 1, float32: peak extra memory (beyond the inputs and the returned
    out and lse) < 5% of the 64 MiB score matrix."""
    q, k, v = qkv(np.random.default_rng(8), 1, 1, 4096, 4096, 64, dtype=np.float32)
    tracemalloc.start()
    try:
        fm.flash_attention(q, k, v, causal=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    output = 4096 * 64 * 4 + 4096 * 4  # out and lse, which the call returns
    assert 0 < peak - output < 0.05 * 4096 * 4096 * 4
