"""Regression tests for answers that used to be silently wrong (issue 17)."""

import numpy as np
import pytest

import flashmath as fm
from flashmath.attention.masks import alibi_bias, alibi_slopes


def _qkv(sq=1, sk=8, b=1, h=2, d=4):
    rng = np.random.default_rng(0)
    return (rng.standard_normal((b, h, sq, d)), rng.standard_normal((b, h, sk, d)),
            rng.standard_normal((b, h, sk, d)))


BACKENDS = [fm.attention_reference, fm.flash_attention, fm.naive.attention]


@pytest.mark.parametrize("fn", BACKENDS, ids=lambda f: f.__module__ + "." + f.__name__)
@pytest.mark.parametrize("shape", [(1, 1, 8, 8), (3, 1, 1, 8), (2, 2, 1, 8), (1, 3, 1, 8),
                                   (1, 1, 1, 9)])
@pytest.mark.parametrize("what", ["mask", "bias"])
def test_a_mask_or_bias_that_only_broadcasts_with_the_scores_is_refused(fn, shape, what):
    """q (1, 2, 1, 4), k (1, 2, 8, 4): scores (1, 2, 1, 8). A (1, 1, 8, 8) mask broadcasts
    *with* them to (1, 2, 8, 8), but not *to* them: it used to be silently sliced or to
    change the output's shape."""
    q, k, v = _qkv()
    arr = np.ones(shape, bool) if what == "mask" else np.zeros(shape)
    with pytest.raises(ValueError, match=rf"{what}: shape \(.*\) does not broadcast to "
                                         r"\(B, H, Sq, Sk\) = \(1, 2, 1, 8\)"):
        fn(q, k, v, **{what: arr})


@pytest.mark.parametrize("shape", [(1, 8), (2, 1, 8), (1, 2, 1, 8), (1, 1, 1, 1), (8,)])
def test_masks_that_broadcast_to_the_scores_still_work(shape):
    q, k, v = _qkv()
    mask = np.ones(shape, bool)
    ref = fm.attention_reference(q, k, v)
    np.testing.assert_allclose(fm.attention_reference(q, k, v, mask=mask), ref, rtol=1e-15)
    np.testing.assert_allclose(fm.flash_attention(q, k, v, mask=mask), ref, rtol=1e-13)


def test_flash_attention_backward_checks_the_mask_shape_too():
    q, k, v = _qkv()
    out, lse = fm.flash_attention(q, k, v, return_lse=True)
    with pytest.raises(ValueError, match="mask: shape"):
        fm.flash_attention_backward(np.ones_like(out), q, k, v, out, lse,
                                    mask=np.ones((1, 1, 8, 8), bool))


@pytest.mark.parametrize(("heads", "expected"), [
    # Press et al. / BLOOM: a power of two p, then every other slope of 2p
    (6, [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3]),
    (8, [2.0 ** -(h + 1) for h in range(8)]),
    (4, [2**-2, 2**-4, 2**-6, 2**-8]),
    (12, [2.0 ** -(h + 1) for h in range(8)] + [2**-0.5, 2**-1.5, 2**-2.5, 2**-3.5]),
    (1, [2**-8]),
    (3, [2**-4, 2**-8, 2**-2]),
])
def test_alibi_slopes_are_the_standard_ones(heads, expected):
    np.testing.assert_allclose(alibi_slopes(heads), expected, rtol=1e-15)


def test_alibi_slopes_match_the_reference_construction():
    """The closed form of the ALiBi paper's reference code, written out independently."""
    import math

    def get_slopes(n):
        def pow2(n):
            start = 2 ** (-(2 ** -(math.log2(n) - 3)))
            return [start * start**i for i in range(n)]

        if math.log2(n).is_integer():
            return pow2(n)
        closest = 2 ** math.floor(math.log2(n))
        return pow2(closest) + get_slopes(2 * closest)[0::2][: n - closest]

    for n in range(1, 40):
        np.testing.assert_allclose(alibi_slopes(n), get_slopes(n), rtol=1e-14, err_msg=str(n))


def test_alibi_bias_uses_the_standard_slopes():
    bias = alibi_bias(6, 3, 5)
    np.testing.assert_allclose(bias[0, :, 2, 3], -alibi_slopes(6))  # distance 1 at the last row


@pytest.mark.parametrize("bad", [0, -2, 2.5, True])
def test_alibi_slopes_refuses_bad_head_counts(bad):
    with pytest.raises((TypeError, ValueError), match="heads"):
        alibi_slopes(bad)
