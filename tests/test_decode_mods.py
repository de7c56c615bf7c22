"""flash_decode with score_mod / mask_mod / block_mask (issue 13): the mods see absolute
positions (kv_idx the cache position, q_idx the query's position in its own sequence),
so decoding equals the last rows of full-sequence attention with the same mods.

The oracle is independent of decode's offset logic: for each batch entry, the float64
reference over the whole valid sequence, the new queries placed at its last rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import flashmath as fm
from flashmath.attention import modlib
from flashmath.attention.blockmask import create_block_mask
from flashmath.attention.mods import ModError

CAP = 48  # cache capacity Sk


def _mods(name: str, heads: int) -> dict[str, Any]:
    ids = np.repeat(np.arange(4), CAP // 4)
    rng = np.random.default_rng(3)
    return {
        "causal": {"mask_mod": modlib.causal(CAP, CAP)},
        "window": {"mask_mod": modlib.sliding_window(CAP, CAP, 9, 0)},
        "document": {"mask_mod": modlib.document_mask(ids)},
        "prefix": {"mask_mod": modlib.prefix_lm(5)},
        "sink": {"mask_mod": modlib.attention_sink(CAP, CAP, 2, 8)},
        "alibi": {"score_mod": modlib.alibi(CAP, CAP, heads=heads)},
        "relative": {"score_mod": modlib.relative_bias(rng.standard_normal((heads, 9)), 4)},
        "softcap+window": {"score_mod": modlib.softcap(2.0),
                           "mask_mod": modlib.sliding_window(CAP, CAP, 12, 0)},
    }[name]


NAMES = ["causal", "window", "document", "prefix", "sink", "alibi", "relative",
         "softcap+window"]


def _for_entry(mods: dict[str, Any], b: int) -> dict[str, Any]:
    """The mods as a one-entry reference call must see them: entry b's index."""
    out: dict[str, Any] = {}
    if "mask_mod" in mods:
        m = mods["mask_mod"]
        out["mask_mod"] = lambda _b, h, qi, ki: m(b, h, qi, ki)
    if "score_mod" in mods:
        sm = mods["score_mod"]
        out["score_mod"] = lambda s, _b, h, qi, ki: sm(s, b, h, qi, ki)
    return out


def _oracle(q: np.ndarray, k: np.ndarray, v: np.ndarray, lengths: np.ndarray,
            mods: dict[str, Any], causal: bool) -> np.ndarray:
    b, h, sq, d = q.shape
    out = np.zeros((b, h, sq, v.shape[-1]))
    for i in range(b):
        n = int(lengths[i])
        qf = np.zeros((1, h, n, d))
        qf[0, :, n - sq:] = q[i]
        ref = fm.attention_reference(qf, k[i:i + 1, :, :n], v[i:i + 1, :, :n], causal=causal,
                                     **_for_entry(mods, i))
        out[i] = ref[0, :, n - sq:]
    return out


def _setup(b: int, h: int, hk: int, sq: int, lengths: tuple[int, ...], seed: int = 0
           ) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, h, sq, 8))
    k = rng.standard_normal((b, hk, CAP, 8))
    v = rng.standard_normal((b, hk, CAP, 6))
    return q, k, v, np.array(lengths)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq, num_splits", [(1, 1), (1, 3), (3, 1), (3, 4)])
def test_decode_with_mods_is_the_last_rows_of_full_attention(
        name: str, causal: bool, sq: int, num_splits: int) -> None:
    q, k, v, lengths = _setup(2, 4, 2, sq, (21, 44))  # GQA, entries of different lengths
    mods = _mods(name, 4)
    out = fm.flash_decode(q, k, v, kv_lengths=lengths, causal=causal,
                          num_splits=num_splits, **mods)
    np.testing.assert_allclose(out, _oracle(q, k, v, lengths, mods, causal), rtol=0,
                               atol=1e-12)


@pytest.mark.parametrize("name", ["causal", "window", "document", "sink"])
def test_a_block_mask_gives_the_mask_mods_result(name: str) -> None:
    q, k, v, lengths = _setup(2, 4, 2, 3, (30, 47), seed=1)
    mod = _mods(name, 4)["mask_mod"]
    bm = create_block_mask(mod, None, None, CAP, CAP, block_q=8, block_k=8)
    got = fm.flash_decode(q, k, v, kv_lengths=lengths, causal=True, block_mask=bm,
                          num_splits=2)
    want = fm.flash_decode(q, k, v, kv_lengths=lengths, causal=True, mask_mod=mod,
                           num_splits=2)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-13)
    np.testing.assert_allclose(got, _oracle(q, k, v, lengths, {"mask_mod": mod}, True),
                               rtol=0, atol=1e-12)


def test_appended_keys_and_a_paged_cache_take_mods_too() -> None:
    """k_new / v_new grow each length by S_new: the queries sit at the new last positions."""
    q, k, v, lengths = _setup(2, 2, 2, 2, (10, 30), seed=2)
    rng = np.random.default_rng(5)
    k_new, v_new = rng.standard_normal((2, 2, 2, 8)), rng.standard_normal((2, 2, 2, 6))
    mods = _mods("window", 2)
    kc, vc = k.copy(), v.copy()
    out = fm.flash_decode(q, kc, vc, kv_lengths=lengths, k_new=k_new, v_new=v_new,
                          causal=True, **mods)
    np.testing.assert_allclose(out, _oracle(q, kc, vc, lengths + 2, mods, True), rtol=0,
                               atol=1e-12)
    page = 8
    table = np.arange(2 * (CAP // page), dtype=np.int32).reshape(2, CAP // page)
    kp = kc.reshape(2, 2, CAP // page, page, 8).transpose(0, 2, 1, 3, 4).reshape(-1, 2, page, 8)
    vp = vc.reshape(2, 2, CAP // page, page, 6).transpose(0, 2, 1, 3, 4).reshape(-1, 2, page, 6)
    paged = fm.flash_decode(q, kp, vp, kv_lengths=lengths + 2, block_table=table,
                            causal=True, **mods)
    np.testing.assert_allclose(paged, out, rtol=0, atol=1e-13)


@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(NAMES), causal=st.booleans(), sq=st.integers(1, 4),
       l0=st.integers(4, CAP), l1=st.integers(4, CAP), splits=st.integers(1, 5),
       group=st.sampled_from([1, 2]), seed=st.integers(0, 1000))
def test_random_decodes_with_mods(name: str, causal: bool, sq: int, l0: int, l1: int,
                                  splits: int, group: int, seed: int) -> None:
    q, k, v, lengths = _setup(2, 2 * group, 2, sq, (max(l0, sq), max(l1, sq)), seed=seed)
    mods = _mods(name, 2 * group)
    out = fm.flash_decode(q, k, v, kv_lengths=lengths, causal=causal, num_splits=splits,
                          **mods)
    np.testing.assert_allclose(out, _oracle(q, k, v, lengths, mods, causal), rtol=0,
                               atol=1e-12)


def test_narrow_dtypes_with_mods_round_once() -> None:
    """float32 / float16 / bfloat16: computed in float32, ranges merged in float64, rounded
    once: within one ulp of the output's magnitude of the float64 oracle on the rounded
    inputs."""
    q, k, v, lengths = _setup(2, 4, 2, 2, (25, 40), seed=4)
    mods = _mods("document", 4)
    for name in ("float32", "float16", "bfloat16"):
        dt = fm.dtypes.DTYPES[name]
        qs, ks, vs = (x.astype(dt) for x in (q, k, v))
        out = fm.flash_decode(qs, ks, vs, kv_lengths=lengths, causal=True, num_splits=3,
                              **mods)
        ref = _oracle(*(x.astype(np.float64) for x in (qs, ks, vs)), lengths, mods, True)
        ulp = float(fm.dtypes.finfo(dt).eps) * max(1.0, float(np.abs(ref).max()))
        assert out.dtype == dt
        assert np.abs(out.astype(np.float64) - ref).max() <= ulp, name


def test_bad_mods_are_named() -> None:
    q, k, v, lengths = _setup(1, 2, 2, 1, (20,))
    with pytest.raises(TypeError, match="mask_mod: expected a callable"):
        fm.flash_decode(q, k, v, kv_lengths=lengths, mask_mod=3)
    with pytest.raises(ValueError, match="block_mask: built for"):
        fm.flash_decode(q, k, v, kv_lengths=lengths,
                        block_mask=create_block_mask(modlib.causal(8, 8), None, None, 8, 8))
    with pytest.raises(ModError, match="not_vectorised"):
        def not_vectorised(b: int, h: int, q_idx: Any, kv_idx: Any) -> bool:
            return bool(q_idx >= kv_idx)
        fm.flash_decode(q, k, v, kv_lengths=lengths, mask_mod=not_vectorised)


def test_top_left_queries_sit_at_their_own_index() -> None:
    """causal="top_left": query i is token i (torch's alignment), so q_idx = i, as in the
    reference called on the same cache."""
    q, k, v, lengths = _setup(2, 2, 2, 3, (20, 35), seed=6)
    mods = _mods("sink", 2)
    out = fm.flash_decode(q, k, v, kv_lengths=lengths, causal="top_left", num_splits=2, **mods)
    ref = fm.attention_reference(q, k, v, kv_lengths=lengths, causal="top_left", **mods)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-12)
