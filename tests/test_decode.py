"""fm.flash_decode: split-KV decoding equals the oracle for every split, empty splits included."""

from __future__ import annotations

import doctest
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import flashmath as fm
from flashmath.attention import decode
from flashmath.attention.decode import MIN_SPLIT_KEYS, choose_num_splits

EPS64 = np.finfo(np.float64).eps


def _case(b: int, h: int, hk: int, sq: int, sk: int, d: int, dv: int, seed: int = 0,
          dtype: Any = np.float64) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, h, sq, d)).astype(dtype)
    k = rng.standard_normal((b, hk, sk, d)).astype(dtype)
    v = rng.standard_normal((b, hk, sk, dv)).astype(dtype)
    return q, k, v


def _bound(ref: np.ndarray) -> float:
    return 64 * EPS64 * max(1.0, float(np.abs(ref).max()))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("b", "h", "hk", "sq", "sk", "lengths"), [
    (1, 1, 1, 1, 17, [17]),  # one head, full cache
    (2, 4, 2, 1, 23, [23, 5]),  # GQA (folded), a short cache: most splits hold no valid key
    (3, 4, 1, 3, 19, [19, 0, 2]),  # MQA, Sq > 1, an empty cache, a cache shorter than Sq
    (2, 2, 2, 2, 9, [9, 8]),  # plain multi-head, Sq = 2
])
def test_every_num_splits_matches_the_oracle(causal: bool, b: int, h: int, hk: int, sq: int,
                                             sk: int, lengths: list[int]) -> None:
    q, k, v = _case(b, h, hk, sq, sk, d=6, dv=5, seed=sk)
    ref = fm.attention_reference(q, k, v, kv_lengths=np.array(lengths), causal=causal)
    for n in range(1, sk + 1):
        out = fm.flash_decode(q, k, v, cache_lengths=np.array(lengths), num_splits=n,
                              causal=causal)
        assert out.shape == ref.shape and out.dtype == np.float64
        assert not np.isnan(out).any(), n
        assert np.abs(out - ref).max() <= _bound(ref), (n, np.abs(out - ref).max())


@given(
    b=st.integers(1, 3), group=st.sampled_from([1, 2, 4]), hk=st.integers(1, 2),
    sq=st.integers(1, 3), sk=st.integers(1, 40), d=st.integers(1, 9),
    causal=st.booleans(), softcap=st.sampled_from([None, 2.0]), data=st.data(),
)
def test_random_shapes_lengths_and_splits(b: int, group: int, hk: int, sq: int, sk: int,
                                          d: int, causal: bool, softcap: float | None,
                                          data: st.DataObject) -> None:
    lengths = np.array(data.draw(st.lists(st.integers(0, sk), min_size=b, max_size=b)))
    n = data.draw(st.one_of(st.none(), st.integers(1, sk)))
    q, k, v = _case(b, group * hk, hk, sq, sk, d, d + 1, seed=sk * 7 + d)
    q *= 3.0  # peaked scores: partial lse far apart
    ref = fm.attention_reference(q, k, v, kv_lengths=lengths, causal=causal, softcap=softcap,
                                 scale=0.7)
    out = fm.flash_decode(q, k, v, cache_lengths=lengths, num_splits=n, causal=causal,
                          softcap=softcap, scale=0.7)
    assert np.abs(out - ref).max() <= _bound(ref)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("sk", [64, 512])
@pytest.mark.parametrize("n", [1, 3, 16])
def test_narrow_dtypes_meet_the_accuracy_rule(dtype: str, sk: int, n: int) -> None:
    """Split results merge in float64 and round once: no worse than 2x the naive formula
    computed in the input dtype (the accuracy rule), over a few seeds, GQA included."""
    dt = fm.dtypes.as_dtype(dtype)
    for seed in range(4):
        q, k, v = _case(2, 8, 2, 1, sk, d=32, dv=32, seed=seed, dtype=dt)
        lengths = np.array([sk, sk * 5 // 8])
        ref = fm.attention_reference(q, k, v, kv_lengths=lengths)
        naive = fm.attention_reference(q, k, v, kv_lengths=lengths, upcast=False)
        out = fm.flash_decode(q, k, v, cache_lengths=lengths, num_splits=n)
        assert out.dtype == dt
        err = np.abs(out.astype(np.float64) - ref).max()
        naive_err = np.abs(naive.astype(np.float64) - ref).max()
        assert err <= 2 * naive_err, (seed, err, naive_err)


def test_all_caches_empty_gives_zeros() -> None:
    q, k, v = _case(2, 2, 1, 1, 8, 4, 3)
    out = fm.flash_decode(q, k, v, cache_lengths=np.array([0, 0]), num_splits=4)
    assert out.shape == (2, 2, 1, 3) and not out.any()


def test_splits_with_no_valid_key_do_not_poison_the_merge() -> None:
    """Huge scores in the valid keys, garbage (inf) in the padding: padding is never read
    into a result, and -inf partial lses weigh nothing."""
    q, k, v = _case(1, 2, 2, 1, 32, 4, 4)
    k[:, :, 5:] = np.inf
    v[:, :, 5:] = np.nan
    q *= 100.0
    ref = fm.attention_reference(q[..., :], k[:, :, :5], v[:, :, :5])
    for n in (1, 2, 7, 32):
        out = fm.flash_decode(q, k, v, cache_lengths=np.array([5]), num_splits=n)
        assert np.abs(out - ref).max() <= _bound(ref), n


@pytest.mark.parametrize(("rows", "keys", "cores", "expected"), [
    (2, 10**6, 2, 1),  # the slices already fill the cores
    (1, 2 * MIN_SPLIT_KEYS - 1, 2, 1),  # too short to pay for a split
    (1, 2 * MIN_SPLIT_KEYS, 2, 2),  # one slice, two cores
    (1, 8 * MIN_SPLIT_KEYS, 8, 8),
    (3, 8 * MIN_SPLIT_KEYS, 8, 3),  # ceil(8 / 3) ranges per slice
    (1, 3 * MIN_SPLIT_KEYS, 8, 3),  # each range keeps MIN_SPLIT_KEYS keys
    (1, 0, 2, 1),
])
def test_default_num_splits(rows: int, keys: int, cores: int, expected: int) -> None:
    assert choose_num_splits(rows, keys, cores=cores) == expected


def test_default_num_splits_is_used_and_exact() -> None:
    q, k, v = _case(1, 1, 1, 1, 2 * MIN_SPLIT_KEYS, 4, 4)
    lengths = np.array([2 * MIN_SPLIT_KEYS])
    ref = fm.flash_attention(q, k, v, kv_lengths=lengths)
    out = fm.flash_decode(q, k, v, cache_lengths=lengths)
    assert np.abs(out - ref).max() <= _bound(ref)


@pytest.mark.parametrize(("change", "error", "match"), [
    ({"q": np.zeros((1, 2, 4))}, ValueError, "q: expected a 4-D"),
    ({"k_cache": np.zeros((2, 1, 8, 4))}, ValueError, "k_cache, v_cache: batch"),
    ({"v_cache": np.zeros((1, 1, 7, 4))}, ValueError, "v_cache: shape"),
    ({"k_cache": np.zeros((1, 3, 8, 4)), "v_cache": np.zeros((1, 3, 8, 4))}, ValueError,
     "k_cache: H_kv=3"),
    ({"k_cache": np.zeros((1, 1, 8, 5))}, ValueError, "k_cache: head dim"),
    ({"cache_lengths": np.array([1.5])}, TypeError, "cache_lengths: expected integers"),
    ({"cache_lengths": np.array([1, 2])}, ValueError, "cache_lengths: expected shape"),
    ({"cache_lengths": np.array([9])}, ValueError,
     r"cache_lengths: values must lie in \[0, 8\], got \[9\]"),
    ({"cache_lengths": np.array([-1])}, ValueError, "cache_lengths: values"),
    ({"num_splits": 0}, ValueError, "num_splits"),
    ({"num_splits": 9}, ValueError, "num_splits"),
    ({"num_splits": 2.0}, ValueError, "num_splits"),
    ({"num_splits": True}, ValueError, "num_splits"),
    ({"q": np.zeros((1, 2, 1, 4), np.complex64)}, TypeError, "q: dtype complex64"),
])
def test_validation_names_the_argument(change: dict[str, Any], error: type, match: str) -> None:
    args: dict[str, Any] = {"q": np.zeros((1, 2, 1, 4)), "k_cache": np.zeros((1, 1, 8, 4)),
                            "v_cache": np.zeros((1, 1, 8, 4)), "cache_lengths": np.array([8])}
    args.update(change)
    with pytest.raises(error, match=match):
        fm.flash_decode(args.pop("q"), args.pop("k_cache"), args.pop("v_cache"), **args)


def test_docstring_example_runs() -> None:
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner()
    for test in finder.find(decode.flash_decode, "flash_decode", globs={}):
        runner.run(test)
    assert runner.failures == 0 and runner.tries > 0


def test_regression_mixed_dtypes_refused() -> None:
    q, k, v = (np.zeros((1, 1, n, 4)) for n in (1, 6, 6))
    with pytest.raises(TypeError, match="share one dtype"):
        fm.flash_decode(q.astype(np.float32), k, v, cache_lengths=[6])


@pytest.mark.parametrize("causal", ["bogus", 2, "TOP_LEFT", 0.5])
def test_regression_causal_is_validated(causal: Any) -> None:
    """Issue 17: "bogus" and 2 used to run bottom-right causal without a word."""
    q, k, v = _case(1, 2, 1, 2, 8, 4, 4)
    with pytest.raises(ValueError, match="causal:"):
        fm.flash_decode(q, k, v, kv_lengths=[8], causal=causal)


@pytest.mark.parametrize(("sq", "lengths"), [(1, [9, 4]), (3, [9, 2]), (4, [0, 7])])
def test_regression_top_left_causal_matches_the_oracle(sq: int, lengths: list[int]) -> None:
    """Issue 17: "top_left" ran bottom-right (1.27 away from the oracle); now it is torch's
    alignment (query i sees keys j <= i), one query included, for every split, GQA too."""
    q, k, v = _case(2, 4, 2, sq, 9, 6, 5, seed=sq)
    ref = fm.attention_reference(q, k, v, kv_lengths=np.array(lengths), causal="top_left")
    bottom = fm.attention_reference(q, k, v, kv_lengths=np.array(lengths), causal=True)
    assert np.abs(ref - bottom).max() > 0.1  # the two alignments really differ here
    for n in range(1, 10):
        out = fm.flash_decode(q, k, v, kv_lengths=lengths, num_splits=n, causal="top_left")
        assert np.abs(out - ref).max() <= _bound(ref), n


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_return_lse_is_the_merged_lse(dtype: Any, causal: bool) -> None:
    """lse (B, H, Sq) in float32 (float64 for float64) equals the oracle's for every split,
    GQA folding included; -inf for an empty cache; out is unchanged by return_lse."""
    q, k, v = _case(3, 4, 2, 2, 12, 6, 5, seed=4, dtype=dtype)
    lengths = [12, 0, 5]
    wide = [x.astype(np.float64) for x in (q, k, v)]
    _, ref = fm.attention_reference(*wide, kv_lengths=lengths, causal=causal, return_lse=True)
    want = np.float64 if dtype == np.float64 else np.float32
    tol = 1e-12 if dtype == np.float64 else 1e-5
    for n in (1, 2, 5, 12):
        out, lse = fm.flash_decode(q, k, v, kv_lengths=lengths, num_splits=n, causal=causal,
                                   return_lse=True)
        assert lse.shape == (3, 4, 2) and lse.dtype == want
        assert np.isneginf(lse[1]).all()
        np.testing.assert_allclose(lse[[0, 2]], ref[[0, 2]], rtol=tol, atol=tol)
        assert np.array_equal(out, fm.flash_decode(q, k, v, kv_lengths=lengths, num_splits=n,
                                                   causal=causal))
    out, lse = fm.flash_decode(q, k, v, kv_lengths=[0, 0, 0], return_lse=True)
    assert not out.any() and np.isneginf(lse).all() and lse.dtype == want


def test_kv_lengths_is_the_name_cache_lengths_its_alias() -> None:
    q, k, v = _case(2, 2, 1, 1, 10, 4, 4)
    a = fm.flash_decode(q, k, v, kv_lengths=[10, 3], num_splits=2)
    assert np.array_equal(a, fm.flash_decode(q, k, v, cache_lengths=[10, 3], num_splits=2))
    full = fm.flash_decode(q, k, v)  # no lengths: every cache is full
    assert np.abs(full - fm.attention_reference(q, k, v)).max() <= _bound(full)
    with pytest.raises(TypeError, match="give one"):
        fm.flash_decode(q, k, v, kv_lengths=[1, 1], cache_lengths=[1, 1])
    with pytest.raises(ValueError, match=r"kv_lengths: values must lie in \[0, 10\]"):
        fm.flash_decode(q, k, v, kv_lengths=[11, 1])


def test_scale_and_softcap_are_checked_even_with_empty_caches() -> None:
    q, k, v = _case(1, 1, 1, 1, 4, 4, 4)
    with pytest.raises(ValueError, match="scale:"):
        fm.flash_decode(q, k, v, kv_lengths=[0], scale=float("nan"))
    with pytest.raises(ValueError, match="softcap:"):
        fm.flash_decode(q, k, v, kv_lengths=[0], softcap=-1.0)
