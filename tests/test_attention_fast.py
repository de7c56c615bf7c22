"""The float32 fast path of the tiled kernels (flashmath.attention.fast): which calls take
it, its accuracy against both baselines on random problems of the sizes it takes, and its
edge cases (the stale row max's redo, rows empty in a first tile, NaN policy, empty rows,
dlse, the np.matmul fallback of its GEMMs)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import flashmath as fm
from flashmath import blas
from flashmath.attention import fast, modlib, schedule
from flashmath.attention.blockmask import create_block_mask
from flashmath.attention.schedule import Plan
from tests.attention_fuzz import FACTORS, judge, random_case, ulp


def _f32(rng: np.random.Generator, *shape: int, amp: float = 1.0) -> np.ndarray:
    return (amp * rng.standard_normal(shape)).astype(np.float32)


def _oracle(q: np.ndarray, k: np.ndarray, v: np.ndarray, do: np.ndarray,
            **opts: Any) -> tuple[np.ndarray, ...]:
    q64, k64, v64, do64 = (x.astype(np.float64) for x in (q, k, v, do))
    return (fm.attention_reference(q64, k64, v64, **opts),
            *fm.attention_reference_backward(do64, q64, k64, v64, **opts))


def _run(q: np.ndarray, k: np.ndarray, v: np.ndarray, do: np.ndarray,
         **opts: Any) -> tuple[np.ndarray, ...]:
    out, lse = fm.flash_attention(q, k, v, return_lse=True, **opts)
    return (out, *fm.flash_attention_backward(do, q, k, v, out, lse, **opts))


@pytest.fixture
def forced(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small problems on the fast path (to reach edge cases cheaply)."""
    monkeypatch.setattr(schedule, "FORCE_FAST", True)


def test_which_calls_take_the_fast_path() -> None:
    rng = np.random.default_rng(0)
    big = [_f32(rng, 1, 2, 512, 64) for _ in range(3)]
    assert Plan.build(*big).fast
    assert not Plan.build(*(x[:, :, :64] for x in big)).fast  # too few outputs and keys
    assert not Plan.build(*(x[:, :, :, :16] for x in big)).fast  # 1 * 2 * 512 * 16 < 2^16
    assert not Plan.build(*(x.astype(np.float16) for x in big)).fast
    assert not Plan.build(*(x.astype(np.float64) for x in big)).fast
    assert not Plan.build(*big, accum_dtype="float64").fast
    for opts in ({"softcap": 5.0}, {"bias": np.zeros((512, 512), np.float32)},
                 {"alibi_slopes": np.ones(2)}, {"sinks": np.zeros(2)},
                 {"score_mod": lambda s, b, h, qi, ki: s}):
        assert not Plan.build(*big, **opts).fast, opts
    four = [_f32(rng, 1, 4, 512, 64) for _ in range(3)]  # 4 heads: 300 live rows suffice
    assert Plan.build(*four, causal=True, window=(100, 0), kv_lengths=np.array([300])).fast
    assert not Plan.build(*big, causal=True, window=(100, 0), kv_lengths=np.array([300])).fast
    assert Plan.build(*big, mask_mod=lambda b, h, qi, ki: qi >= ki).fast
    # a long query over a few keys with a window: most rows see no key, and the outputs
    # counted are those of the rows that do (2 * 4096 * 64 rows are valid, 2 * 532 * 64 live)
    q_long = _f32(rng, 1, 2, 4096, 64)
    few = [x[:, :, :512] for x in big[1:]]
    assert Plan.build(q_long, *few).fast
    assert not Plan.build(q_long, *few, window=(19, 0)).fast


def test_small_float32_calls_run_float64_tiles_and_round_once() -> None:
    """At most SMALL_PAIRS (batch, head, query, key) pairs, off the fast path: float64
    tiles, and every output and gradient within half an ulp of the oracle (correctly
    rounded; or within float64 rounding where dq, dk cancel to ~0), where float32 tiles
    were a coin toss against the baselines."""
    rng = np.random.default_rng(7)
    q, k, v, do = (rng.standard_normal((2, 4, 64, 8)).astype(np.float32) * 3 for _ in range(4))
    assert Plan.build(q, k, v).acc == np.float64
    assert Plan.build(q, k, v, accum_dtype="float32").acc == np.float32  # asked for: kept
    big = np.zeros((1, 1, 1024, 8), np.float32)
    assert 1024 * 1024 > schedule.SMALL_PAIRS and Plan.build(big, big, big).acc == np.float32
    h16 = [x.astype(np.float16) for x in (q, k, v)]
    assert Plan.build(*h16).acc == np.float32  # float16 input: not this rule
    for opts in ({}, {"causal": True}, {"window": (3, 0)}):
        out, lse = fm.flash_attention(q, k, v, return_lse=True, **opts)
        mine = (out, *fm.flash_attention_backward(do, q, k, v, out, lse, **opts))
        refs = (fm.attention_reference(q, k, v, **opts),
                *fm.attention_reference_backward(do, q, k, v, **opts))
        for x, ref in zip(mine, refs, strict=True):
            assert x.dtype == np.float32
            ref = np.asarray(ref, np.float64)
            err = np.abs(x - ref)
            # within half an ulp, or (dq, dk of rows that cancel to ~0) float64 rounding
            assert ((err <= 0.5 * ulp(ref, np.dtype(np.float32)))
                    | (err <= 1e-13 * np.abs(ref).max())).all()


@pytest.fixture(params=[False, True], ids=["exp", "exp2"])
def simd_exp2(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Both ways FULL tiles may run, whichever this machine's NumPy picks (fast.SIMD_EXP2)."""
    monkeypatch.setattr(fast, "SIMD_EXP2", request.param)
    return bool(request.param)


def test_full_tiles_run_exp2_only_where_numpy_vectorises_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy.lib.introspect as introspect

    for current, want in (("baseline(X86_V2)", False), ("X86_V4", True), ("AVX512_SKX", True)):
        monkeypatch.setattr(introspect, "opt_func_info", lambda current=current, **_: {
            "exp2": {"ff": {"current": current, "available": "X86_V4 baseline(X86_V2)"}}})
        assert fast._simd_exp2() is want
    monkeypatch.setattr(introspect, "opt_func_info", lambda **_: {})  # NumPy says nothing
    assert fast._simd_exp2() is False
    for flag, want in ((True, np.exp2), (False, np.exp)):
        monkeypatch.setattr(fast, "SIMD_EXP2", flag)
        assert fast._exp(fast.TileKind.FULL, 0.5)[1] is want
        assert fast._exp(fast.TileKind.PARTIAL, 0.5) == (0.5, np.exp)
    monkeypatch.setattr(fast, "SIMD_EXP2", True)
    assert fast._exp(fast.TileKind.FULL, 0.5)[0] == pytest.approx(0.5 / np.log(2))


@pytest.mark.parametrize(("seed", "exp2"), [(s, False) for s in range(6)]
                         + [(s, True) for s in range(3)])
def test_medium_random_cases_hold_the_rule_against_both_baselines(
        seed: int, exp2: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Random problems just above the fast path's threshold (benchmarks/fuzz_attention.py
    --medium runs hundreds): within 2x (out) and 3x (gradients) of the naive float32
    formula and of the PyTorch-style baseline, with FULL tiles on exp and on exp2."""
    pytest.importorskip("torch")
    monkeypatch.setattr(fast, "SIMD_EXP2", exp2)
    rng = np.random.default_rng(1000 + seed)
    case = random_case(rng, "float32", medium=True)
    q, k, v = (np.asarray(case[x], np.float32) for x in ("q", "k", "v"))
    assert Plan.build(q, k, v, block_q=case["blocks"][0], block_k=case["blocks"][1],
                      **case["options"]).fast
    rec = judge(case)
    assert rec["nan_ok"]
    for base, ratios in rec["ratios"].items():
        for x, (ratio, _) in ratios.items():
            assert ratio <= FACTORS[x], (base, x, ratio, case["options"], q.shape, k.shape)


def test_benchmark_like_shape_matches_the_oracle_as_closely_as_the_naive_formula() -> None:
    rng = np.random.default_rng(5)
    q, k, v, do = (_f32(rng, 1, 4, 700, 64) for _ in range(4))
    k, v = k[:, :2], v[:, :2]  # GQA
    for opts in ({}, {"causal": True}, {"window": (64, 16)}):
        ref = _oracle(q, k, v, do, **opts)
        naive = (fm.attention_reference(q, k, v, upcast=False, **opts),
                 *fm.attention_reference_backward(do, q, k, v, upcast=False, **opts))
        for mine, base, want, factor in zip(_run(q, k, v, do, **opts), naive, ref,
                                            (2, 3, 3, 3), strict=True):
            assert np.abs(mine - want).max() <= factor * np.abs(base - want).max(), opts


def test_a_later_tile_far_above_the_first_is_redone_not_overflowed(forced: None,
                                                                   simd_exp2: bool) -> None:
    """The first tile's row max is kept for later tiles; keys 600.. score ~200 above it
    (exp would overflow float32): that tile is redone on the exact online step."""
    rng = np.random.default_rng(2)
    q, k, v, do = (_f32(rng, 1, 1, 64, 16) for _ in range(4))
    k = np.concatenate([_f32(rng, 1, 1, 600, 16), 40 * np.repeat(q[:, :, :1], 300, axis=2)
                        + _f32(rng, 1, 1, 300, 16)], axis=2)
    v = _f32(rng, 1, 1, 900, 16)
    ref = _oracle(q, k, v, do)
    got = _run(q, k, v, do, block_k=128)
    for mine, want in zip(got, ref, strict=True):
        assert np.isfinite(mine).all()
        np.testing.assert_allclose(mine, want, rtol=0, atol=2e-3 * max(1, np.abs(want).max()))


def test_a_first_tile_key_the_sample_misses_is_redone_not_overflowed(forced: None,
                                                                     simd_exp2: bool) -> None:
    """The shift comes from 32 of the first tile's 128 keys (every 4th); key 5, which the
    sample misses, scores ~200 above them (exp would overflow float32): the first tile is
    redone on the exact online step."""
    rng = np.random.default_rng(4)
    q, k, v, do = (_f32(rng, 1, 1, 64, 16) for _ in range(4))
    k = _f32(rng, 1, 1, 256, 16)
    k[:, :, 5] = 40 * q[:, :, 0]
    v = _f32(rng, 1, 1, 256, 16)
    ref = _oracle(q, k, v, do)
    for mine, want in zip(_run(q, k, v, do, block_k=128), ref, strict=True):
        assert np.isfinite(mine).all()
        np.testing.assert_allclose(mine, want, rtol=0, atol=2e-3 * max(1, np.abs(want).max()))


_BAND_MOD = modlib.sliding_window(256, 256, 150, 0)


@pytest.mark.parametrize("opts", [
    {"window": (150, 0)}, {"causal": True},
    {"window": (150, 30), "kv_lengths": np.array([250])},
    {"mask_mod": _BAND_MOD},  # the shift's keys from Mods.shared_keys
    {"block_mask": create_block_mask(_BAND_MOD, None, None, 256, 256, block_q=64,
                                     block_k=64)},
    {"mask_mod": modlib.sliding_window(256, 256, 150, 30), "causal": True}],
    ids=["window", "causal", "window-lengths", "band-mod", "band-block-mask",
         "band-mod-and-causal"])
def test_a_key_outside_the_shared_keys_far_above_them_is_redone(
        forced: None, simd_exp2: bool, opts: dict[str, Any]) -> None:
    """A banded block samples its shift from the keys all its rows see; a key only some
    rows see (the band's left edge, the diagonal) scoring ~200 above them is redone on
    the exact step, not overflowed."""
    rng = np.random.default_rng(7)
    q, k, v, do = (_f32(rng, 1, 1, 256, 16) for _ in range(4))
    # keys near the edges of blocks of 64 rows, each far above the scores of one row that
    # sees it (keys 46, 48: rows 192-196 / 192-198 see them; rows 199.. of their block do
    # not, and a shift from them would underflow their every p)
    for j, i, amp in ((46, 195, 400), (48, 195, 400), (70, 80, 40), (100, 110, 40),
                      (129, 139, 40), (200, 210, 40)):
        k[0, 0, j] = amp * q[0, 0, i]
    ref = _oracle(q, k, v, do, **opts)
    got = _run(q, k, v, do, block_q=64, block_k=128, **opts)
    for mine, want in zip(got, ref, strict=True):
        assert np.isfinite(mine).all()
        np.testing.assert_allclose(mine, want, rtol=0, atol=2e-3 * max(1, np.abs(want).max()))


def test_rows_empty_in_their_first_tile_and_empty_rows(forced: None) -> None:
    """A sliding window hides the first tile from some rows of a block (their max comes
    from a later tile); kv_lengths 0 empties a whole batch entry (out 0, lse -inf, zero
    gradients)."""
    rng = np.random.default_rng(3)
    q, k, v, do = (_f32(rng, 2, 2, 300, 8) for _ in range(4))
    opts: dict[str, Any] = {"window": (20, 5), "kv_lengths": np.array([300, 0]),
                            "block_q": 64, "block_k": 32}
    out, lse = fm.flash_attention(q, k, v, return_lse=True, **opts)
    grads = fm.flash_attention_backward(do, q, k, v, out, lse, **opts)
    ref = _oracle(q, k, v, do, window=(20, 5), kv_lengths=np.array([300, 0]))
    for mine, want in zip((out, *grads), ref, strict=True):
        np.testing.assert_allclose(mine, want, rtol=0, atol=1e-5 * max(1, np.abs(want).max()))
    assert (out[1] == 0).all() and np.isneginf(lse[1]).all()
    assert all((g[1] == 0).all() for g in grads)


def test_nan_policy(forced: None) -> None:
    """NaN in one query row makes that row NaN; +inf in a visible key makes every row
    that sees it NaN; the other rows stay finite."""
    rng = np.random.default_rng(4)
    q, k, v = (_f32(rng, 1, 1, 96, 8) for _ in range(3))
    q[0, 0, 5, 2] = np.nan
    k[0, 0, 70, 1] = np.inf  # hidden from rows 64-69 inside a PARTIAL tile: zeroed after exp
    out = fm.flash_attention(q, k, v, causal=True, block_q=32, block_k=32)
    s = np.einsum("id,jd->ij", q[0, 0].astype(np.float64), k[0, 0].astype(np.float64))
    seen = np.tril(np.ones((96, 96), bool))
    bad = np.isnan(q[0, 0]).any(axis=1) | (seen & ~np.isfinite(s) & ~np.isneginf(s)).any(axis=1)
    assert np.isnan(out[0, 0][bad]).all()
    assert np.isfinite(out[0, 0][~bad]).all()


def test_a_huge_hidden_score_is_zeroed_after_exp(forced: None) -> None:
    """A key whose scores overflow exp (inf after exp2) is hidden from rows 64-69 inside a
    PARTIAL tile: those rows are as if it were absent, forward and backward."""
    rng = np.random.default_rng(5)
    q, k, v, do = (_f32(rng, 1, 1, 96, 8) for _ in range(4))
    k[0, 0, 70] = 1e6 * np.sign(q[0, 0, 75])  # row 75 puts all its weight on key 70
    opts: dict[str, Any] = {"causal": True, "block_q": 32, "block_k": 32}
    got = _run(q, k, v, do, **opts)
    want = _oracle(q, k, v, do, causal=True)
    assert all(np.isfinite(x).all() for x in got)
    for mine, ref in zip(got[:2], want[:2], strict=True):  # out, dq: rows up to 69
        np.testing.assert_allclose(mine[0, 0, :70], ref[0, 0, :70], rtol=0, atol=1e-5)
    np.testing.assert_allclose(got[0][0, 0, 75], v[0, 0, 70], rtol=0, atol=1e-6)


def test_dlse_matches_the_accurate_path(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(6)
    q, k, v, do = (_f32(rng, 1, 2, 400, 64) for _ in range(4))
    dlse = _f32(rng, 1, 2, 400)
    out, lse = fm.flash_attention(q, k, v, causal=True, return_lse=True)
    fast = fm.flash_attention_backward(do, q, k, v, out, lse, causal=True, dlse=dlse)
    monkeypatch.setattr(schedule, "FORCE_FAST", False)
    slow = fm.flash_attention_backward(do, q, k, v, out, lse, causal=True, dlse=dlse)
    for a, b in zip(fast, slow, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-5 * np.abs(b).max())


def test_the_matmul_fallback_gives_the_same_results(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without cblas_sgemm (other NumPy builds) the fast path runs on np.matmul."""
    rng = np.random.default_rng(7)
    q, k, v, do = (_f32(rng, 1, 2, 512, 64) for _ in range(4))
    with_blas = _run(q, k, v, do, causal=True)
    monkeypatch.setattr(blas, "_kernel", lambda: None)
    without = _run(q, k, v, do, causal=True)
    for a, b in zip(with_blas, without, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())


def test_rows_that_see_few_keys_take_the_accurate_path() -> None:
    """window (0, 0) (one key per row), short kv_lengths, few valid query rows, tiny head
    dims: a baseline can be exact there (dq = dk = 0 for a row with one key), or is a coin
    toss away; the accurate loops take them."""
    rng = np.random.default_rng(8)
    q, k, v = (_f32(rng, 2, 2, 512, 64) for _ in range(3))
    assert not Plan.build(q, k, v, causal=True, window=(0, 0)).fast
    assert not Plan.build(q, k, v, window=(15, 15)).fast
    assert Plan.build(q, k, v, window=(16, 15)).fast
    assert not Plan.build(q, k, v, kv_lengths=np.array([3, 500])).fast
    assert Plan.build(q, k, v, kv_lengths=np.array([0, 32])).fast  # an empty entry is fine
    assert not Plan.build(q, k, v, q_lengths=np.array([4, 4])).fast  # 2 * 2 * 8 * 64 outputs
    assert not Plan.build(q[..., :8], k[..., :8], v, causal=True).fast  # D = 8


@pytest.mark.parametrize("nj", [1, 31, 32, 33, 1000, 1024])
def test_row_sums_are_accurate(nj: int) -> None:
    """Runs of 32 in float32, summed in float64: one run is off by at most 31 eps / 2; over
    1000 keys the runs' errors average out to within 1.5 eps (a float32 matrix-vector
    product over 1024 keys, summed in order, was off by 3.3 eps here)."""
    rng = np.random.default_rng(nj)
    pt = rng.random((nj, 40), dtype=np.float32)
    exact = pt.astype(np.float64).sum(axis=0)
    got = fast.row_sums(pt[:, 3:40])  # a strided view, as the tiles are
    assert got.dtype == np.float64
    eps = float(np.finfo(np.float32).eps)
    bound = 1.5 if nj >= 1000 else 15.5
    assert np.all(np.abs(got - exact[3:]) <= bound * eps * exact[3:])


def test_key_shards_take_the_accurate_path_and_their_gradients_sum_to_the_whole() -> None:
    """A shard of the keys (ring attention, split-KV) sees rows whose p do not sum to 1:
    the accurate loops take it, and the shards' dq add up to the whole problem's."""
    rng = np.random.default_rng(9)
    q, k, v, do = (_f32(rng, 1, 2, 600, 64) for _ in range(4))
    out, lse = fm.flash_attention(q, k, v, causal=True, return_lse=True)
    assert Plan.build(q, k, v, causal=True).fast
    assert not Plan.build(q, k[:, :, :300], v[:, :, :300], causal=True, k_total=600).fast
    whole = fm.flash_attention_backward(do, q, k, v, out, lse, causal=True)
    from flashmath.attention.tiled import tiled_backward
    parts = [tiled_backward(do, q, k[:, :, j:j + 300], v[:, :, j:j + 300], out, lse,
                            causal=True, k_offset=j, k_total=600) for j in (0, 300)]
    dq = parts[0][0].astype(np.float64) + parts[1][0]
    np.testing.assert_allclose(dq, whole[0], rtol=0, atol=1e-5 * np.abs(whole[0]).max())


def test_a_mask_mod_alone_takes_square_tiles_on_the_fast_path_only(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A mask_mod without a block mask: the fast loops take FAST_BLOCK_Q squares (EMPTY
    tiles are skipped at that grain); the accurate loops keep the default tiles (a decode
    with a mask_mod measured 1.6x slower on 256-key tiles)."""
    monkeypatch.setattr(schedule, "cores", lambda: 1)  # slices not cut: tiles not halved
    rng = np.random.default_rng(3)
    causal = lambda b, h, qi, ki: ki <= qi  # noqa: E731
    big = [_f32(rng, 1, 2, 1024, 64) for _ in range(3)]
    plan = Plan.build(*big, mask_mod=causal)
    assert plan.fast and (plan.bq, plan.bk) == (schedule.FAST_BLOCK_Q, schedule.FAST_BLOCK_Q)
    half = [x.astype(np.float16) for x in big]
    plan = Plan.build(*half, mask_mod=causal)
    assert not plan.fast
    plain = Plan.build(*half)
    assert (plan.bq, plan.bk) == (plain.bq, plain.bk) == (schedule.DEFAULT_BLOCK_Q,
                                                          schedule.DEFAULT_BLOCK_K)
