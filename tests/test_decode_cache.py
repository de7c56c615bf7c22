"""flash_decode's serving interfaces (flash_attn_with_kvcache, FlashInfer's paged decode):
a paged cache, appending new keys in place, several new queries (chunked prefill), window,
softcap, ALiBi slopes, sinks and return_lse, all against the float64 oracle on the same
data and against the contiguous cache."""

import numpy as np
import pytest

import flashmath as fm


def _setup(b=2, h=4, hk=2, cap=40, d=8, dv=6, sq=1, lengths=(17, 33), seed=0,
           dtype=np.float64):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, h, sq, d)).astype(dtype)
    k = rng.standard_normal((b, hk, cap, d)).astype(dtype)
    v = rng.standard_normal((b, hk, cap, dv)).astype(dtype)
    return q, k, v, np.array(lengths)


def _page(k, page, rng):
    """The contiguous (B, H_kv, cap, D) cache in shuffled pages, and its block table."""
    b, hk, cap, d = k.shape
    per = -(-cap // page)
    table = rng.permutation(b * per + 2)[: b * per].reshape(b, per).astype(np.int32)
    pages = rng.standard_normal((b * per + 2, hk, page, d)).astype(k.dtype)
    for i in range(b):
        for p in range(per):
            rows = k[i, :, p * page : (p + 1) * page]
            pages[table[i, p], :, : rows.shape[1]] = rows
    return pages, table


@pytest.mark.parametrize("page", [1, 5, 8, 16, 64])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_paged_equals_contiguous_and_the_oracle(page, num_splits):
    q, k, v, lengths = _setup(cap=48)
    kp, table = _page(k, page, np.random.default_rng(page))
    vp, _ = _page(v, page, np.random.default_rng(page))
    out, lse = fm.flash_decode(q, kp, vp, kv_lengths=lengths, block_table=table,
                               num_splits=num_splits, return_lse=True)
    want, want_lse = fm.flash_decode(q, k, v, kv_lengths=lengths, num_splits=num_splits,
                                     return_lse=True)
    ref = fm.attention_reference(q, k, v, kv_lengths=lengths)
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-14)
    np.testing.assert_allclose(lse, want_lse, rtol=0, atol=1e-13)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-14)


def test_paged_chunks_cross_many_pages(monkeypatch):
    from flashmath.attention import decode

    monkeypatch.setattr(decode, "PAGED_CHUNK_KEYS", 8)
    monkeypatch.setattr(decode, "PAGED_CHUNK_BYTES", 1)
    q, k, v, lengths = _setup(cap=64, lengths=(63, 20))
    kp, table = _page(k, 4, np.random.default_rng(1))
    vp, _ = _page(v, 4, np.random.default_rng(1))
    out = fm.flash_decode(q, kp, vp, kv_lengths=lengths, block_table=table)
    np.testing.assert_allclose(out, fm.attention_reference(q, k, v, kv_lengths=lengths),
                               rtol=0, atol=1e-14)


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_append_then_attend_equals_the_oracle_on_the_appended_cache(paged, causal):
    """k_new/v_new are written at each length, then Sq = S_new queries attend (causal:
    each new query sees the cache and the new keys up to its own position)."""
    s_new = 3
    q, k, v, lengths = _setup(cap=40, sq=s_new)
    rng = np.random.default_rng(2)
    k_new = rng.standard_normal((2, 2, s_new, 8))
    v_new = rng.standard_normal((2, 2, s_new, 6))
    want_k, want_v = k.copy(), v.copy()
    for i, n in enumerate(lengths):
        want_k[i, :, n : n + s_new], want_v[i, :, n : n + s_new] = k_new[i], v_new[i]
    ref = fm.attention_reference(q, want_k, want_v, kv_lengths=lengths + s_new, causal=causal)
    if paged:
        kc, table = _page(k, 8, np.random.default_rng(3))
        vc, _ = _page(v, 8, np.random.default_rng(3))
        out = fm.flash_decode(q, kc, vc, kv_lengths=lengths, block_table=table, k_new=k_new,
                              v_new=v_new, causal=causal)
        from flashmath.attention.paged import gather_keys

        np.testing.assert_array_equal(gather_keys(kc, table.astype(np.int64), 0, 40)[:, :, :36],
                                      want_k[:, :, :36])
    else:
        out = fm.flash_decode(q, k, v, kv_lengths=lengths, k_new=k_new, v_new=v_new,
                              causal=causal)
        np.testing.assert_array_equal(k, want_k)  # written in place
        np.testing.assert_array_equal(v, want_v)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-14)


@pytest.mark.parametrize("opts", [
    {"window": (5, 0), "causal": True},
    {"softcap": 3.0},
    {"alibi_slopes": np.array([0.5, 0.25, 0.125, 0.0625])},
    {"sinks": np.array([0.5, -1.0, 2.0, -np.inf])},
    {"sinks": np.array([0.5, -1.0, 2.0, 0.0]), "alibi_slopes": np.array([0.1, 0.2, 0.3, 0.4])},
])
@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("dtype", [np.float64, np.float16])
def test_options_equal_the_oracle(opts, num_splits, dtype):
    q, k, v, lengths = _setup(sq=2, dtype=dtype)
    out, lse = fm.flash_decode(q, k, v, kv_lengths=lengths, num_splits=num_splits,
                               return_lse=True, **opts)
    ref, ref_lse = fm.attention_reference(q, k, v, kv_lengths=lengths, return_lse=True,
                                          **opts)
    base = fm.attention_reference(q, k, v, kv_lengths=lengths, upcast=False, **opts)
    if dtype == np.float64:
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-14)
        np.testing.assert_allclose(lse, ref_lse, rtol=0, atol=1e-13)
    else:
        err = np.abs(out.astype(np.float64) - ref).max()
        assert err <= 2 * max(np.abs(base.astype(np.float64) - ref).max(),
                              float(np.finfo(dtype).eps) * np.abs(ref).max())
        np.testing.assert_allclose(lse, ref_lse, rtol=0, atol=1e-5)


def test_sinks_with_folded_gqa_heads():
    q, k, v, lengths = _setup(h=8, hk=2, sq=1, dtype=np.float16)
    sinks = np.linspace(-2, 2, 8)
    out = fm.flash_decode(q, k, v, kv_lengths=lengths, sinks=sinks)
    ref = fm.attention_reference(q, k, v, kv_lengths=lengths, sinks=sinks)
    assert np.abs(out.astype(np.float64) - ref).max() < 2e-3


def test_an_empty_cache_with_a_sink_gives_zeros_and_the_sinks_lse():
    q, k, v, _ = _setup()
    out, lse = fm.flash_decode(q, k, v, kv_lengths=np.array([0, 0]),
                               sinks=np.array([1.0, 2.0, 3.0, 4.0]), return_lse=True)
    assert (out == 0).all()
    np.testing.assert_array_equal(lse[0, :, 0], [1.0, 2.0, 3.0, 4.0])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"block_table": np.array([[0, 1], [2, 99]])}, r"block_table\[1, 1\] = 99 is not a page"),
    ({"block_table": np.array([[0], [1]])},
     r"block_table: sequence 1 needs 2 pages for 33 keys \(page_size 32\), the table has 1"),
    ({"block_table": np.array([0, 1])}, r"block_table: expected shape \(B, max_pages\)"),
    ({"k_new": np.zeros((2, 2, 30, 8)), "v_new": np.zeros((2, 2, 30, 6))},
     r"k_new: sequence 0 has 17 keys and 30 new ones, more than the cache holds \(40\)"),
    ({"k_new": np.zeros((2, 2, 1, 8))}, "k_new, v_new: give both"),
    ({"k_new": np.zeros((2, 3, 1, 8)), "v_new": np.zeros((2, 3, 1, 6))}, "k_new"),
    ({"sinks": np.zeros(3)}, "sinks: expected one logit per query head"),
    ({"window": (1, 2, 3)}, "window"),
])
def test_bad_cache_arguments_are_refused_by_name(kwargs, message):
    q, k, v, lengths = _setup()
    if "block_table" in kwargs:
        k = np.zeros((4, 2, 32, 8))  # 4 pages of 32 keys
        v = np.zeros((4, 2, 32, 6))
    with pytest.raises((ValueError, TypeError), match=message):
        fm.flash_decode(q, k, v, kv_lengths=lengths, **kwargs)


def test_appending_needs_a_writable_array():
    q, k, v, lengths = _setup()
    with pytest.raises(TypeError, match="k_cache: appending k_new/v_new writes into the cache"):
        fm.flash_decode(q, k.tolist(), v, kv_lengths=lengths, k_new=np.zeros((2, 2, 1, 8)),
                        v_new=np.zeros((2, 2, 1, 6)))
