"""MaskSpec, the one mask builder: positions, alignment, lengths, offsets, tile classification.

Every case is checked against ``allowed``, the rule of masks.py written out pair by pair.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flashmath.attention.masks import MaskSpec, TileKind, alibi_bias, band, block_of


def allowed(b, gi, gj, *, sq, sk, causal=None, window=None, q_len=None, kv_len=None):
    """The masking rule for global query gi, key gj of batch b (docs/conventions.md)."""
    ql = sq if q_len is None else q_len[b]
    kl = sk if kv_len is None else kv_len[b]
    if gi >= ql or gj >= kl:
        return False
    diag = gi + (kl - ql) if causal != "top_left" else gi  # the key on query gi's diagonal
    left, right = (None, None) if window is None else window
    if causal is not None:
        right = 0 if right is None else min(right, 0)
    return (left is None or gj >= diag - left) and (right is None or gj <= diag + right)


def brute(batch, sq, sk, **kw):
    return np.array([[[allowed(b, i, j, sq=sq, sk=sk, **kw) for j in range(sk)]
                      for i in range(sq)] for b in range(batch)])


def spec_kwargs(kw):
    return {"causal": kw.get("causal"), "window": kw.get("window"),
            "q_lengths": kw.get("q_len"), "kv_lengths": kw.get("kv_len")}


CASES = [  # (B, Sq, Sk, options of `allowed`)
    (1, 5, 5, {}),
    (1, 5, 5, {"causal": "bottom_right"}),
    (1, 3, 7, {"causal": "bottom_right"}),
    (1, 7, 3, {"causal": "bottom_right"}),
    (1, 7, 3, {"causal": "top_left"}),
    (1, 3, 7, {"causal": "top_left"}),
    (1, 6, 9, {"window": (2, 1)}),
    (1, 6, 9, {"window": (None, 0)}),
    (1, 9, 6, {"window": (0, None)}),
    (1, 8, 8, {"causal": "bottom_right", "window": (3, 5)}),
    (1, 8, 8, {"causal": "top_left", "window": (2, None)}),
    (3, 6, 8, {"kv_len": [8, 3, 0]}),
    (3, 6, 8, {"q_len": [6, 2, 0]}),
    (3, 6, 8, {"causal": "bottom_right", "q_len": [6, 2, 4], "kv_len": [5, 8, 1]}),
    (2, 6, 8, {"causal": "top_left", "window": (1, 1), "q_len": [3, 6], "kv_len": [7, 2]}),
    (2, 1, 8, {"causal": "bottom_right", "window": (3, 0), "kv_len": [8, 5]}),
    (2, 8, 1, {"causal": "bottom_right"}),
]


@pytest.mark.parametrize(("batch", "sq", "sk", "kw"), CASES)
def test_dense_mask_is_the_pairwise_rule(batch, sq, sk, kw):
    spec = MaskSpec.create(batch, sq, sk, **spec_kwargs(kw))
    np.testing.assert_array_equal(spec.dense()[:, 0], brute(batch, sq, sk, **kw))


@pytest.mark.parametrize(("batch", "sq", "sk", "kw"), CASES)
def test_block_is_the_dense_mask_sliced(batch, sq, sk, kw):
    spec = MaskSpec.create(batch, sq, sk, **spec_kwargs(kw))
    dense = spec.dense()
    for b, (i0, i1), (j0, j1) in itertools.product(
        range(batch), [(0, sq), (1, 3), (sq - 1, sq)], [(0, sk), (2, 5), (sk - 1, sk)]
    ):
        i1, j1 = min(i1, sq), min(j1, sk)
        if i0 < i1 and j0 < j1:
            np.testing.assert_array_equal(spec.block(b, 0, i0, i1, j0, j1),
                                          dense[b, 0, i0:i1, j0:j1])


@pytest.mark.parametrize(("batch", "sq", "sk", "kw"), CASES)
@pytest.mark.parametrize(("bq", "bk"), [(1, 1), (2, 3), (4, 4)])
def test_classify_and_spans_agree_with_the_mask(batch, sq, sk, kw, bq, bk):
    """EMPTY tiles hold no allowed pair, FULL tiles only allowed pairs, PARTIAL tiles only
    allowed pairs outside their masked columns; the key span of a row block and the query
    span of a key block contain every allowed pair."""
    spec = MaskSpec.create(batch, sq, sk, **spec_kwargs(kw))
    dense = spec.dense()[:, 0]
    for b in range(batch):
        for i0, j0 in itertools.product(range(0, sq, bq), range(0, sk, bk)):
            i1, j1 = min(i0 + bq, sq), min(j0 + bk, sk)
            tile = dense[b, i0:i1, j0:j1]
            kind = spec.classify(b, i0, i1, j0, j1)
            assert kind != TileKind.EMPTY or not tile.any()
            assert kind != TileKind.FULL or tile.all()
            if kind == TileKind.PARTIAL:  # outside the masked columns, every pair attends
                unmasked = np.ones(j1 - j0, bool)
                for c0, c1 in spec.masked_columns(b, i0, i1, j0, j1):
                    unmasked[c0 - j0:c1 - j0] = False
                assert tile[:, unmasked].all()
            if not tile.any():
                continue
            lo, hi = spec.key_span(b, i0, i1)
            assert not dense[b, i0:i1, :lo].any() and not dense[b, i0:i1, max(hi, 0):].any()
            lo, hi = spec.query_span(b, j0, j1)
            assert not dense[b, :lo, j0:j1].any() and not dense[b, max(hi, 0):, j0:j1].any()


def test_classification_is_tight_for_causal_tiles():
    """Square causal, aligned tiles: EMPTY above the diagonal, PARTIAL on it, FULL below."""
    spec = MaskSpec.create(1, 8, 8, causal="bottom_right")
    kinds = [[spec.classify(0, i, i + 2, j, j + 2) for j in range(0, 8, 2)] for i in range(0, 8, 2)]
    E, F, P = TileKind.EMPTY, TileKind.FULL, TileKind.PARTIAL
    assert kinds == [[P, E, E, E], [F, P, E, E], [F, F, P, E], [F, F, F, P]]


def test_a_boolean_mask_makes_non_empty_tiles_partial():
    mask = np.ones((1, 1, 4, 4), bool)
    spec = MaskSpec.create(1, 4, 4, mask=mask)
    assert spec.classify(0, 0, 4, 0, 4) == TileKind.PARTIAL


def test_docstring_diagrams():
    x = [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    np.testing.assert_array_equal(MaskSpec.create(1, 3, 5, causal="bottom_right").dense()[0, 0], x)
    x = [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]]
    np.testing.assert_array_equal(MaskSpec.create(1, 3, 5, causal="top_left").dense()[0, 0], x)
    x = [[0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]]
    np.testing.assert_array_equal(MaskSpec.create(1, 3, 5, window=(1, 0)).dense()[0, 0], x)


@pytest.mark.parametrize("causal", ["bottom_right", "top_left"])
@pytest.mark.parametrize(("sq_tot", "sk_tot"), [(12, 12), (7, 12), (12, 7)])
def test_shards_see_the_global_mask(causal, sq_tot, sk_tot):
    """A (q shard, k shard) spec built with offsets and totals is the global mask's block."""
    q_len, kv_len = np.array([sq_tot, sq_tot - 2]), np.array([sk_tot - 3, sk_tot])
    kw = {"causal": causal, "window": (4, None), "q_lengths": q_len, "kv_lengths": kv_len}
    full = MaskSpec.create(2, sq_tot, sk_tot, **kw).dense()
    for (q0, q1), (k0, k1) in itertools.product([(0, 5), (5, sq_tot)], [(0, 4), (4, sk_tot)]):
        shard = MaskSpec.create(2, q1 - q0, k1 - k0, q_offset=q0, k_offset=k0,
                                q_total=sq_tot, k_total=sk_tot, **kw)
        np.testing.assert_array_equal(shard.dense(), full[:, :, q0:q1, k0:k1])


def test_block_of_reads_broadcast_axes_at_zero():
    arr = np.arange(2 * 3 * 4).reshape(2, 1, 3, 4)
    np.testing.assert_array_equal(block_of(arr, 1, 5, 1, 3, 0, 2), arr[1, 0, 1:3, 0:2])
    row = np.arange(4).reshape(1, 1, 1, 4)
    assert block_of(row, 0, 0, 2, 3, 1, 3).shape == (1, 2)


def test_user_mask_per_head_in_block_and_dense():
    rng = np.random.default_rng(0)
    mask = rng.random((1, 3, 4, 5)) < 0.5
    spec = MaskSpec.create(2, 4, 5, causal="top_left", mask=mask)
    dense = spec.dense()
    assert dense.shape == (2, 3, 4, 5)
    for h in range(3):
        np.testing.assert_array_equal(spec.block(1, h, 0, 4, 0, 5), dense[1, h])
        np.testing.assert_array_equal(dense[1, h], mask[0, h] & np.tri(4, 5, dtype=bool))


def test_alibi_bias_is_distance_to_the_bottom_right_diagonal():
    """alibi_bias: -slope_h * |j - (i + Sk - Sq)|, slopes 2^(-8 (h + 1) / H), float64."""
    bias = alibi_bias(2, 3, 5)
    assert bias.shape == (1, 2, 3, 5) and bias.dtype == np.float64
    for h, i, j in itertools.product(range(2), range(3), range(5)):
        assert bias[0, h, i, j] == -(2.0 ** (-8.0 * (h + 1) / 2)) * abs(j - (i + 2))
    assert np.array_equal(alibi_bias(2, 3, 5, slopes=np.array([1.0, 0.5]))[0, :, 2, 4], [0, 0])
    with pytest.raises(ValueError):
        alibi_bias(2, 3, 5, slopes=np.ones(3))


@pytest.mark.parametrize(("causal", "window", "expected"), [
    (None, None, (None, None)),
    (None, (3, 2), (-3, 2)),
    (None, (None, 4), (None, 4)),
    ("bottom_right", None, (None, 0)),  # causal caps the right side at 0
    ("top_left", (2, 5), (-2, 0)),
    ("bottom_right", (1, None), (-1, 0)),
    ("bottom_right", (0, 0), (0, 0)),
])
def test_band_is_the_window_with_the_causal_cap(causal, window, expected):
    assert band(causal, window) == expected
    spec = MaskSpec.create(1, 4, 4, causal=causal, window=window)
    assert (spec.lo, spec.hi) == expected


@settings(max_examples=200, deadline=None)
@given(sq=st.integers(1, 12), sk=st.integers(1, 12), q_len=st.integers(0, 12),
       kv_len=st.integers(0, 12), causal=st.sampled_from([None, "bottom_right", "top_left"]),
       left=st.one_of(st.none(), st.integers(0, 6), st.just(2**40)),
       right=st.one_of(st.none(), st.integers(0, 6), st.just(2**40)),
       data=st.data())
def test_cached_tile_patterns_are_the_rule_for_every_tile(sq, sk, q_len, kv_len, causal,
                                                            left, right, data):
    """A tile's pattern depends on local offsets only and is cached: every tile, asked for
    twice and transposed, is still the pairwise rule, and the cached arrays are read-only."""
    window = None if left is None and right is None else (left, right)
    kw = {"causal": causal, "window": window, "q_len": [min(q_len, sq)],
          "kv_len": [min(kv_len, sk)]}
    spec = MaskSpec.create(1, sq, sk, **spec_kwargs(kw))
    want = brute(1, sq, sk, **kw)[0]
    i0 = data.draw(st.integers(0, sq - 1))
    j0 = data.draw(st.integers(0, sk - 1))
    i1 = data.draw(st.integers(i0 + 1, sq))
    j1 = data.draw(st.integers(j0 + 1, sk))
    for _ in range(2):
        got = spec.block(0, 0, i0, i1, j0, j1)
        np.testing.assert_array_equal(got, want[i0:i1, j0:j1])
        np.testing.assert_array_equal(spec.block(0, 0, i0, i1, j0, j1, transposed=True),
                                      want[i0:i1, j0:j1].T)
        assert not got.flags.writeable
        for transposed in (False, True):  # the complement, what the kernels mask through
            hidden = spec.hidden(0, 0, i0, i1, j0, j1, transposed)
            tile = ~want[i0:i1, j0:j1]
            np.testing.assert_array_equal(hidden, tile.T if transposed else tile)
            assert not hidden.flags.writeable


@settings(max_examples=300, deadline=None)
@given(sq=st.integers(1, 12), sk=st.integers(1, 12), q_len=st.integers(1, 12),
       kv_len=st.integers(0, 12), causal=st.sampled_from([None, "bottom_right", "top_left"]),
       left=st.one_of(st.none(), st.integers(0, 6)), right=st.one_of(st.none(), st.integers(0, 6)),
       data=st.data())
def test_shared_keys_are_the_keys_every_row_sees(sq, sk, q_len, kv_len, causal, left, right,
                                                data):
    window = None if left is None and right is None else (left, right)
    kw = {"causal": causal, "window": window, "q_len": [min(q_len, sq)],
          "kv_len": [min(kv_len, sk)]}
    spec = MaskSpec.create(1, sq, sk, **spec_kwargs(kw))
    rows = brute(1, sq, sk, **kw)[0]
    i0 = data.draw(st.integers(0, int(spec.q_valid[0]) - 1))
    i1 = data.draw(st.integers(i0 + 1, int(spec.q_valid[0])))
    j0, j1 = spec.shared_keys(0, i0, i1)
    assert np.flatnonzero(rows[i0:i1].all(axis=0)).tolist() == list(range(j0, j1))


def test_shared_keys_are_none_with_a_boolean_mask():
    spec = MaskSpec.create(1, 4, 4, mask=np.ones((1, 1, 4, 4), bool))
    j0, j1 = spec.shared_keys(0, 0, 4)
    assert j0 >= j1


def test_hidden_with_a_boolean_mask_is_the_complement_of_block():
    rng = np.random.default_rng(3)
    user = rng.random((2, 3, 7, 9)) < 0.5
    spec = MaskSpec.create(2, 7, 9, causal="bottom_right", mask=user)
    for b, h in ((0, 0), (1, 2)):
        for transposed in (False, True):
            np.testing.assert_array_equal(spec.hidden(b, h, 1, 6, 2, 9, transposed),
                                          ~spec.block(b, h, 1, 6, 2, 9, transposed))


@pytest.mark.parametrize(("batch", "sq", "sk", "kw"), CASES)
def test_live_rows_count_the_rows_that_see_a_key(batch, sq, sk, kw):
    spec = MaskSpec.create(batch, sq, sk, **spec_kwargs(kw))
    want = brute(batch, sq, sk, **kw).any(axis=2).sum(axis=1)
    assert [spec.live_rows(b) for b in range(batch)] == want.tolist()


@settings(max_examples=200, deadline=None)
@given(sq=st.integers(1, 12), sk=st.integers(1, 12), q_len=st.integers(0, 12),
       kv_len=st.integers(0, 12), causal=st.sampled_from([None, "bottom_right", "top_left"]),
       left=st.one_of(st.none(), st.integers(0, 6)), right=st.one_of(st.none(), st.integers(0, 6)))
def test_live_rows_for_any_band_and_lengths(sq, sk, q_len, kv_len, causal, left, right):
    window = None if left is None and right is None else (left, right)
    kw = {"causal": causal, "window": window, "q_len": [min(q_len, sq)],
          "kv_len": [min(kv_len, sk)]}
    spec = MaskSpec.create(1, sq, sk, **spec_kwargs(kw))
    assert spec.live_rows(0) == int(brute(1, sq, sk, **kw)[0].any(axis=1).sum())
