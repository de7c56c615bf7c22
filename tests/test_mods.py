"""score_mod / mask_mod: the protocol's errors, the library against dense formulas written
out pair by pair, the oracle with mods against the built-in options, and every score_mod's
gradients against float64 finite differences."""

import math
import re
from pathlib import Path

import numpy as np
import pytest

import flashmath as fm
from flashmath.attention import modlib
from flashmath.attention.masks import MaskSpec, alibi_slopes
from flashmath.attention.mods import (
    ModError,
    apply_score_mod,
    mask_tile,
    score_mod_grad,
    with_dscore,
)

DOCS = Path(__file__).resolve().parents[1] / "docs" / "mods.md"


def _qkv(b=2, h=2, hkv=2, sq=9, sk=11, d=4, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((b, h, sq, d)), rng.standard_normal((b, hkv, sk, d)),
            rng.standard_normal((b, hkv, sk, d)), rng.standard_normal((b, h, sq, d)))


def _pairs(fn, sq, sk):
    """A (sq, sk) table of fn(i, j), one Python call per pair: the dense formula."""
    return np.array([[fn(i, j) for j in range(sk)] for i in range(sq)])


# ------------------------------------------------------------------ protocol and its errors


def _scalar_mod(b, h, q_idx, kv_idx):
    return True


def _if_mod(b, h, q_idx, kv_idx):
    if q_idx >= kv_idx:  # ambiguous on arrays
        return True
    return False


def _int_mod(b, h, q_idx, kv_idx):
    return q_idx - kv_idx


def _wrong_shape_mod(b, h, q_idx, kv_idx):
    return np.ones((3, 3), bool)


def _one_d_mod(b, h, q_idx, kv_idx):
    return np.ones(kv_idx.shape[1], bool)


@pytest.mark.parametrize("mod, message", [
    (_scalar_mod, r"'_scalar_mod' returned shape \(\).*not vectorised"),
    (_if_mod, r"'_if_mod' raised ValueError.*vectorised"),
    (_int_mod, r"'_int_mod' returned dtype int64; expected bool"),
    (_wrong_shape_mod, r"'_wrong_shape_mod' returned shape \(3, 3\), which does not broadcast"),
    (_one_d_mod, r"'_one_d_mod' returned shape \(5,\); expected a 2-D bool"),
])
def test_a_bad_mask_mod_gets_an_error_naming_it(mod, message):
    with pytest.raises(ModError, match=message):
        mask_tile(mod, 0, 0, 0, 4, 0, 5)
    q, k, v, _ = _qkv(sq=4, sk=5)
    with pytest.raises(ModError, match=re.escape(mod.__name__)):
        fm.attention_reference(q, k, v, mask_mod=mod)


def _bool_score_mod(score, b, h, q_idx, kv_idx):
    return score > 0


def _scalar_score_mod(score, b, h, q_idx, kv_idx):
    return 1.0


def _abs_score_mod(score, b, h, q_idx, kv_idx):
    return np.abs(score)


def _conj_score_mod(score, b, h, q_idx, kv_idx):
    return score * np.conj(score)  # |s|^2 written non-analytically: the complex step says 0


def _floor_score_mod(score, b, h, q_idx, kv_idx):
    return np.floor(score)


def _real_cast_score_mod(score, b, h, q_idx, kv_idx):
    return score.real * 2


@pytest.mark.parametrize("mod, message", [
    (_bool_score_mod, r"'_bool_score_mod' returned dtype bool; expected float"),
    (_scalar_score_mod, r"'_scalar_score_mod' returned shape \(\)"),
])
def test_a_bad_score_mod_gets_an_error_naming_it(mod, message):
    with pytest.raises(ModError, match=message):
        apply_score_mod(mod, np.zeros((3, 4)), 0, 0, 0, 0)


@pytest.mark.parametrize("mod, why", [
    (_abs_score_mod, "dropping the imaginary part"),
    (_conj_score_mod, "not analytic"),
    (_floor_score_mod, "raised"),
    (_real_cast_score_mod, "dropping the imaginary part"),
])
def test_a_score_mod_without_dscore_that_the_complex_step_cannot_differentiate_is_refused(
        mod, why):
    s = np.linspace(-2, 2, 12).reshape(3, 4) + 0.05
    with pytest.raises(ModError, match=f"'{mod.__name__}'.*{why}.*dscore"):
        score_mod_grad(mod, s, 0, 0, 0, 0)


def test_the_complex_step_gives_an_analytic_mods_exact_derivative():
    def quadratic(score, b, h, q_idx, kv_idx):
        return 0.5 * score * score + np.exp(-score) * (kv_idx - q_idx)

    s = np.random.default_rng(1).standard_normal((5, 6))
    g = score_mod_grad(quadratic, s, 0, 0, 3, 2)
    rel = np.arange(2, 8)[None, :] - np.arange(3, 8)[:, None]
    np.testing.assert_allclose(g, s - np.exp(-s) * rel, rtol=1e-15, atol=1e-15)


def test_dscore_is_used_when_declared_and_its_shape_checked():
    def doubled(score, b, h, q_idx, kv_idx):
        return 2 * score

    with_dscore(doubled, lambda score, *_: np.full((1, 1), 2.0))
    assert (score_mod_grad(doubled, np.ones((3, 4)), 0, 0, 0, 0) == 2).all()
    with_dscore(doubled, lambda score, *_: np.ones(7))
    with pytest.raises(ModError, match="'doubled'"):
        score_mod_grad(doubled, np.ones((3, 4)), 0, 0, 0, 0)


def test_mods_see_absolute_positions_and_their_b_and_h():
    seen = []

    def spy(b, h, q_idx, kv_idx):
        seen.append((b, h, q_idx.shape, kv_idx.shape, q_idx.dtype, int(q_idx[0, 0]),
                     int(kv_idx[0, 0])))
        return np.ones((1, 1), bool)

    mask_tile(spy, 1, 3, 40, 44, 100, 105)
    assert seen == [(1, 3, (4, 1), (1, 5), np.int64, 40, 100)]
    s = np.zeros((2, 3), np.float32)
    out = apply_score_mod(lambda s, b, h, q, k: s + q + 10 * k, s, 0, 0, 5, 7)
    assert out is s and s.dtype == np.float32  # in place, dtype kept
    np.testing.assert_array_equal(s, [[75, 85, 95], [76, 86, 96]])


# ------------------------------------------------------------------ the library, pair by pair

SQ, SK = 7, 10
IDS = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])


@pytest.mark.parametrize("mod, rule", [
    (modlib.causal(SQ, SK), lambda i, j: j <= i + SK - SQ),
    (modlib.causal(SQ, SK, align="top_left"), lambda i, j: j <= i),
    (modlib.sliding_window(SQ, SK, 2, 0), lambda i, j: -2 <= j - i - (SK - SQ) <= 0),
    (modlib.sliding_window(SQ, SK, 1, 2, align="top_left"), lambda i, j: -1 <= j - i <= 2),
    (modlib.sliding_window(SQ, SK, None, 1), lambda i, j: j - i - (SK - SQ) <= 1),
    (modlib.prefix_lm(3), lambda i, j: j < 3 or j <= i),
    (modlib.document_mask(IDS[:SQ], IDS), lambda i, j: IDS[i] == IDS[j]),
    (modlib.attention_sink(SQ, SK, 2, 3),
     lambda i, j: j <= i + 3 and (j < 2 or j >= i + 3 - 2)),
    (modlib.and_masks(modlib.document_mask(IDS[:SQ], IDS), modlib.causal(SQ, SK, align="top_left")),
     lambda i, j: IDS[i] == IDS[j] and j <= i),
    (modlib.or_masks(modlib.prefix_lm(2), modlib.causal(SQ, SK)),
     lambda i, j: j < 2 or j <= i or j <= i + 3),
])
def test_library_masks_match_their_dense_formula(mod, rule):
    np.testing.assert_array_equal(mask_tile(mod, 0, 0, 0, SQ, 0, SK), _pairs(rule, SQ, SK))
    # and on an inner tile, whose positions are absolute
    np.testing.assert_array_equal(mask_tile(mod, 0, 0, 2, 5, 3, 9), _pairs(rule, SQ, SK)[2:5, 3:9])


def test_document_mask_takes_per_batch_ids():
    ids = np.array([[0, 0, 1, 1], [0, 1, 1, 1]])
    mod = modlib.document_mask(ids)
    for b in range(2):
        np.testing.assert_array_equal(mask_tile(mod, b, 0, 0, 4, 0, 4),
                                      ids[b][:, None] == ids[b][None, :])


@pytest.mark.parametrize("causal, window", [
    ("bottom_right", None), ("top_left", None), (None, (3, 1)), ("bottom_right", (2, None)),
    ("top_left", (1, 4)), (None, (None, 2)), (None, (0, 0)),
])
@pytest.mark.parametrize("sq, sk", [(7, 10), (10, 7), (8, 8)])
def test_library_causal_and_window_are_exactly_the_built_in_mask(causal, window, sq, sk):
    spec = MaskSpec.create(1, sq, sk, causal=causal, window=window)
    align = causal or "bottom_right"
    left, right = window or (None, None)
    if causal is not None:
        right = 0 if right is None else min(right, 0)
    mod = (modlib.causal(sq, sk, align=align) if window is None
           else modlib.sliding_window(sq, sk, left, right, align=align))
    np.testing.assert_array_equal(mask_tile(mod, 0, 0, 0, sq, 0, sk), spec.dense()[0, 0])
    np.testing.assert_array_equal(mask_tile(modlib.spec_mask_mod(spec), 0, 0, 0, sq, 0, sk),
                                  spec.dense()[0, 0])


def test_spec_mask_mod_carries_lengths_and_the_bool_mask():
    mask = np.random.default_rng(2).random((2, 2, 6, 8)) < 0.7
    spec = MaskSpec.create(2, 6, 8, causal="bottom_right", mask=mask,
                           q_lengths=np.array([6, 4]), kv_lengths=np.array([8, 5]))
    mod = modlib.spec_mask_mod(spec)
    for b in range(2):
        for h in range(2):
            np.testing.assert_array_equal(mask_tile(mod, b, h, 0, 6, 0, 8),
                                          spec.dense()[b, h])


def _t5_bucket_pair(rel, num_buckets, max_distance, bidirectional):
    """Hugging Face's T5 _relative_position_bucket for one integer, in plain Python."""
    out = 0
    if bidirectional:
        num_buckets //= 2
        out += num_buckets if rel > 0 else 0
        n = abs(rel)
    else:
        n = -min(rel, 0)
    exact = num_buckets // 2
    if n < exact:
        return out + n
    large = exact + int(math.log(n / exact) / math.log(max_distance / exact)
                        * (num_buckets - exact))
    return out + min(large, num_buckets - 1)


TABLE_T5 = np.random.default_rng(3).standard_normal((2, 32))
TABLE_REL = np.random.default_rng(4).standard_normal((2, 9))
SLOPES = np.array([0.5, 0.125])


@pytest.mark.parametrize("mod, term", [
    (modlib.alibi(SQ, SK, SLOPES), lambda h, i, j: -SLOPES[h] * abs(j - i - (SK - SQ))),
    (modlib.alibi(SQ, SK, SLOPES, align="top_left"), lambda h, i, j: -SLOPES[h] * abs(j - i)),
    (modlib.relative_bias(TABLE_REL, 4), lambda h, i, j: TABLE_REL[h, max(-4, min(4, j - i)) + 4]),
    (modlib.t5_bias(TABLE_T5, max_distance=20),
     lambda h, i, j: TABLE_T5[h, _t5_bucket_pair(j - i, 32, 20, True)]),
    (modlib.t5_bias(TABLE_T5, max_distance=20, bidirectional=False),
     lambda h, i, j: TABLE_T5[h, _t5_bucket_pair(j - i, 32, 20, False)]),
])
def test_library_biases_match_their_dense_formula(mod, term):
    s = np.random.default_rng(5).standard_normal((SQ, SK))
    for h in range(2):
        out = apply_score_mod(mod, s.copy(), 0, h, 0, 0)
        np.testing.assert_allclose(out, s + _pairs(lambda i, j, h=h: term(h, i, j), SQ, SK),
                                   rtol=0, atol=1e-15)
        assert (score_mod_grad(mod, s, 0, h, 0, 0) == 1).all()


def test_t5_buckets_reach_far_distances_and_stay_in_range():
    rel = np.arange(-300, 301)
    for bidirectional in (True, False):
        got = modlib.t5_bucket(rel, 32, 128, bidirectional)
        want = [_t5_bucket_pair(int(r), 32, 128, bidirectional) for r in rel]
        np.testing.assert_array_equal(got, want)
        assert got.min() >= 0 and got.max() <= 31


def test_softcap_mod_and_its_derivative():
    s = np.linspace(-40, 40, 21).reshape(3, 7)
    mod = modlib.softcap(15.0)
    np.testing.assert_allclose(apply_score_mod(mod, s.copy(), 0, 0, 0, 0),
                               15 * np.tanh(s / 15), rtol=1e-15)
    np.testing.assert_allclose(score_mod_grad(mod, s, 0, 0, 0, 0), 1 / np.cosh(s / 15) ** 2,
                               rtol=1e-13)


def test_standard_alibi_slopes_by_head_count():
    a = modlib.alibi(4, 4, heads=4)
    s = np.zeros((4, 4))
    np.testing.assert_allclose(apply_score_mod(a, s, 0, 1, 0, 0)[0, 3],
                               -alibi_slopes(4)[1] * 3)


# ------------------------------------------------------------------ the oracle with mods


@pytest.mark.parametrize("builtin, mods", [
    ({"causal": True}, {"mask_mod": modlib.causal(9, 11)}),
    ({"causal": "top_left"}, {"mask_mod": modlib.causal(9, 11, align="top_left")}),
    ({"window": (3, 1)}, {"mask_mod": modlib.sliding_window(9, 11, 3, 1)}),
    ({"alibi_slopes": SLOPES}, {"score_mod": modlib.alibi(9, 11, SLOPES)}),
    ({"softcap": 2.0}, {"score_mod": modlib.softcap(2.0)}),
    ({"causal": True, "alibi_slopes": SLOPES},
     {"mask_mod": modlib.causal(9, 11), "score_mod": modlib.alibi(9, 11, SLOPES)}),
])
def test_the_oracle_with_a_mod_equals_the_built_in_option(builtin, mods):
    q, k, v, dout = _qkv(h=2, hkv=1)
    out, lse = fm.attention_reference(q, k, v, return_lse=True, **builtin)
    out_m, lse_m = fm.attention_reference(q, k, v, return_lse=True, **mods)
    np.testing.assert_allclose(out_m, out, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(lse_m, lse, rtol=1e-13)
    g = fm.attention_reference_backward(dout, q, k, v, **builtin)
    g_m = fm.attention_reference_backward(dout, q, k, v, **mods)
    for a, b in zip(g_m, g, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)


def test_mask_mod_ands_with_the_built_in_masks_and_lengths():
    q, k, v, _ = _qkv()
    ids = np.array([0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    doc = modlib.document_mask(ids[:9], ids)
    out = fm.attention_reference(q, k, v, causal=True, kv_lengths=np.array([11, 8]),
                                 mask_mod=doc)
    mask = (ids[:9, None] == ids[None, :])[None, None]
    want = fm.attention_reference(q, k, v, causal=True, kv_lengths=np.array([11, 8]), mask=mask)
    np.testing.assert_allclose(out, want, rtol=1e-14, atol=1e-15)


def test_a_fully_masked_row_by_mask_mod_gives_zeros_and_zero_gradients():
    q, k, v, dout = _qkv(sq=4, sk=4)

    def no_row_two(b, h, q_idx, kv_idx):
        return np.broadcast_to(q_idx != 2, (q_idx.shape[0], kv_idx.shape[1]))

    out, lse = fm.attention_reference(q, k, v, mask_mod=no_row_two, return_lse=True)
    assert (out[:, :, 2] == 0).all() and np.isneginf(lse[:, :, 2]).all()
    dq, dk, dv = fm.attention_reference_backward(dout, q, k, v, mask_mod=no_row_two,
                                                 score_mod=modlib.softcap(3.0))
    assert (dq[:, :, 2] == 0).all() and np.isfinite(dk).all() and np.isfinite(dv).all()


def test_block_mask_in_the_oracle_uses_its_mod_and_checks_its_shape():
    q, k, v, _ = _qkv()
    bm = fm_block_mask(modlib.causal(9, 11), None, None, 9, 11, block_q=4, block_k=4)
    np.testing.assert_array_equal(fm.attention_reference(q, k, v, block_mask=bm),
                                  fm.attention_reference(q, k, v, causal=True))
    with pytest.raises(ValueError, match=r"block_mask: built for .*\(1, 1, 9, 12\)"):
        fm.attention_reference(q, k, v, block_mask=fm_block_mask(
            modlib.causal(9, 12), None, None, 9, 12))
    with pytest.raises(ValueError, match="another mask_mod"):
        fm.attention_reference(q, k, v, block_mask=bm, mask_mod=modlib.causal(9, 11))
    with pytest.raises(TypeError, match="score_mod: expected a callable"):
        fm.attention_reference(q, k, v, score_mod=3)
    with pytest.raises(TypeError, match="block_mask: expected a BlockMask"):
        fm.attention_reference(q, k, v, block_mask=np.ones((9, 11), bool))


def fm_block_mask(*args, **kwargs):
    from flashmath.attention.blockmask import create_block_mask

    return create_block_mask(*args, **kwargs)


# ------------------------------------------------------------------ gradients through score_mods


def _undeclared_polynomial(score, b, h, q_idx, kv_idx):
    return score + 0.1 * score ** 2 * np.cos(kv_idx - q_idx)  # no dscore: the complex step


SCORE_MODS = [
    modlib.alibi(5, 6, SLOPES), modlib.relative_bias(TABLE_REL, 4),
    modlib.t5_bias(TABLE_T5, max_distance=20), modlib.softcap(1.5), _undeclared_polynomial,
]


@pytest.mark.parametrize("mod", SCORE_MODS, ids=lambda m: m.__name__)
@pytest.mark.parametrize("extra", [{}, {"causal": True, "softcap": 4.0},
                                   {"mask_mod": modlib.prefix_lm(2), "bias": 0.3}])
def test_score_mod_gradients_match_finite_differences(mod, extra):
    q, k, v, dout = _qkv(b=1, h=2, hkv=1, sq=5, sk=6, d=3, seed=7)
    q, k = 2 * q, 2 * k  # scores of a few units: softcap(1.5) is in its curved part
    dlse = np.random.default_rng(8).standard_normal((1, 2, 5))

    def loss(q, k, v):
        out, lse = fm.attention_reference(q, k, v, score_mod=mod, return_lse=True, **extra)
        return np.sum(out * dout) + np.sum(lse * dlse)

    grads = fm.attention_reference_backward(dout, q, k, v, score_mod=mod, dlse=dlse, **extra)
    for which, g in enumerate(grads):
        x = [q, k, v][which]
        fd = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            args_p, args_m = [a.copy() for a in (q, k, v)], [a.copy() for a in (q, k, v)]
            args_p[which][idx] += 1e-6
            args_m[which][idx] -= 1e-6
            fd[idx] = (loss(*args_p) - loss(*args_m)) / 2e-6
        np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-7)


def test_the_same_dtype_baseline_runs_score_mods_in_the_input_dtype():
    q, k, v, dout = _qkv()
    mod = modlib.softcap(2.0)
    lo = fm.attention_reference(q.astype(np.float16), k.astype(np.float16),
                                v.astype(np.float16), score_mod=mod, upcast=False)
    hi = fm.attention_reference(q, k, v, score_mod=mod)
    assert lo.dtype == np.float16
    assert 1e-5 < np.abs(lo - hi).max() < 1e-2
    g = fm.attention_reference_backward(dout.astype(np.float16), q.astype(np.float16),
                                        k.astype(np.float16), v.astype(np.float16),
                                        score_mod=mod, upcast=False)
    assert all(x.dtype == np.float16 and np.isfinite(x).all() for x in g)


# ------------------------------------------------------------------ docs/mods.md runs


def test_the_docs_examples_print_what_they_show():
    import contextlib
    import io

    text = DOCS.read_text()
    blocks = re.findall(r"```python\n(.*?)```\n+```\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 2
    for code, shown in blocks:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(code, str(DOCS), "exec"), {})
        assert printed.getvalue() == shown


def test_a_score_mod_without_a_derivative_still_runs_forward():
    q, k, v, dout = _qkv()
    out = fm.attention_reference(q, k, v, score_mod=_abs_score_mod)
    assert np.isfinite(out).all()
    with pytest.raises(ModError, match=r"'_abs_score_mod'.*dscore"):
        fm.attention_reference_backward(dout, q, k, v, score_mod=_abs_score_mod)


def test_a_score_mod_writing_in_place_costs_no_copy():
    def add_one(score, b, h, q_idx, kv_idx):
        score += 1
        return score

    s = np.zeros((3, 4))
    assert apply_score_mod(add_one, s, 0, 0, 0, 0) is s and (s == 1).all()
    frozen = np.zeros((3, 4))
    frozen.setflags(write=False)
    out = apply_score_mod(lambda s, b, h, q, k: s + q, frozen, 0, 0, 2, 0)
    assert out is not frozen and (out[:, 0] == [2, 3, 4]).all()
