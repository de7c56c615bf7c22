"""Bad input raises ValueError/TypeError naming the argument and the shapes it got."""

from __future__ import annotations

import numpy as np
import pytest

import flashmath as fm

Q = np.zeros((2, 4, 5, 3))
K = np.zeros((2, 2, 6, 3))
V = np.zeros((2, 2, 6, 7))

BAD = [  # (id, arguments over the good (Q, K, V), exception, message pattern)
    ("q rank", {"q": np.zeros((4, 5, 3))}, ValueError, r"q: expected a 4-D array .*\(4, 5, 3\)"),
    ("k rank", {"k": np.zeros(3)}, ValueError, r"k: expected a 4-D array"),
    ("batch", {"k": np.zeros((1, 2, 6, 3))}, ValueError, r"batch sizes differ.*\(1, 2, 6, 3\)"),
    ("head dim", {"k": np.zeros((2, 2, 6, 4))}, ValueError, r"head dims differ.*D=3.*D=4"),
    ("kv len", {"v": np.zeros((2, 2, 5, 7))}, ValueError, r"k \(2, 2, 6, 3\) and v \(2, 2, 5, 7\)"),
    ("groups", {"k": np.zeros((2, 3, 6, 3)), "v": np.zeros((2, 3, 6, 7))}, ValueError,
     r"H=4 heads, not a multiple of H_kv=3"),
    ("complex", {"q": Q.astype(complex)}, TypeError, r"q: dtype complex128 is not supported"),
    ("dtypes", {"q": Q.astype(np.float32)}, TypeError, r"share one dtype.*float32.*float64"),
    ("causal", {"causal": "bottom"}, ValueError, r"causal: expected"),
    ("window neg", {"window": (-1, 0)}, ValueError, r"window: left=-1 is negative.*None"),
    ("window shape", {"window": 3}, ValueError, r"window: expected \(left, right\)"),
    ("window type", {"window": (1.5, None)}, TypeError, r"window: left must be an int"),
    ("mask dtype", {"mask": np.zeros((5, 6))}, TypeError, r"mask: expected a boolean.*bias="),
    ("mask shape", {"mask": np.ones((5, 5), bool)}, ValueError,
     r"mask: shape \(5, 5\) does not broadcast to \(B, H, Sq, Sk\) = \(2, 4, 5, 6\)"),
    ("bias shape", {"bias": np.zeros((3, 1, 1))}, ValueError, r"bias: shape \(3, 1, 1\)"),
    ("bias rank", {"bias": np.zeros((1, 1, 1, 1, 1))}, ValueError, r"bias: .* more than 4 axes"),
    ("kv_lengths range", {"kv_lengths": [3, 7]}, ValueError, r"kv_lengths: .*\[0, 6\].*\[3, 7\]"),
    ("q_lengths shape", {"q_lengths": [1, 2, 3]}, ValueError, r"q_lengths: expected shape \(B,\)"),
    ("lengths dtype", {"q_lengths": [1.0, 2.0]}, TypeError, r"q_lengths: expected integers"),
    ("softcap", {"softcap": 0.0}, ValueError, r"softcap: expected a finite positive"),
    ("scale", {"scale": float("nan")}, ValueError, r"scale: expected a finite"),
    ("scale type", {"scale": "big"}, TypeError, r"scale: expected a real number"),
]


def call(fn, args):
    args = dict(args)
    q, k, v = args.pop("q", Q), args.pop("k", K), args.pop("v", V)
    return fn(q, k, v, **args)


@pytest.mark.parametrize(("args", "exc", "pattern"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
@pytest.mark.parametrize("fn", [fm.attention_reference, fm.flash_attention])
def test_bad_input_is_named(fn, args, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call(fn, args)


@pytest.mark.parametrize(("block", "exc"), [({"block_q": 0}, ValueError),
                                            ({"block_k": 2.5}, TypeError)])
def test_bad_block_sizes(block, exc):
    with pytest.raises(exc, match=next(iter(block))):
        fm.flash_attention(Q, K, V, **block)


def test_bad_accum_dtype():
    with pytest.raises(TypeError, match="accum_dtype"):
        fm.flash_attention(Q, K, V, accum_dtype="int8")


@pytest.mark.parametrize(("which", "shape"), [("dout", (2, 4, 5, 3)), ("out", (2, 4, 5)),
                                               ("lse", (2, 4, 6))])
def test_backward_shapes_are_checked(which, shape):
    arrays = {"dout": np.zeros((2, 4, 5, 7)), "out": np.zeros((2, 4, 5, 7)),
              "lse": np.zeros((2, 4, 5))}
    arrays[which] = np.zeros(shape)
    with pytest.raises(ValueError, match=rf"{which}: expected shape"):
        fm.flash_attention_backward(arrays["dout"], Q, K, V, arrays["out"], arrays["lse"])
    if which == "dout":
        with pytest.raises(ValueError, match="dout: expected shape"):
            fm.attention_reference_backward(arrays["dout"], Q, K, V)


def test_good_input_broadcasts():
    """Masks and biases of any broadcastable rank, lengths as lists: accepted."""
    mask = np.ones((6,), bool)
    bias = np.zeros((4, 1, 6))
    out = fm.flash_attention(Q, K, V, mask=mask, bias=bias, kv_lengths=[6, 0], q_lengths=[5, 1],
                             window=[2, None], causal="bottom_right", scale=1)
    assert out.shape == (2, 4, 5, 7)


class Shaped:
    """Anything with .shape and .dtype: what options.check_shapes reads (nothing else)."""

    def __init__(self, shape, dtype="f8"):
        self.shape, self.dtype = shape, np.dtype(dtype)


SHAPE_CASES = [b for b in BAD if b[0] in ("q rank", "k rank", "batch", "head dim", "kv len",
                                          "groups", "dtypes")]


@pytest.mark.parametrize(("args", "exc", "pattern"), [b[1:] for b in SHAPE_CASES],
                         ids=[b[0] for b in SHAPE_CASES])
def test_one_shape_rule_for_arrays_shapes_and_tensors(args, exc, pattern):
    """check_shapes gives the NumPy kernels' message for bare shapes and torch tensors too
    (the Triton op and the ring use it)."""
    from flashmath.attention.options import check_shapes

    arrays = {"q": Q, "k": K, "v": V, **args}
    shaped = [Shaped(arrays[n].shape, arrays[n].dtype) for n in "qkv"]
    with pytest.raises(exc, match=pattern):
        check_shapes(*shaped)
    torch = pytest.importorskip("torch")
    tensors = [torch.from_numpy(np.ascontiguousarray(arrays[n])) for n in "qkv"]
    with pytest.raises(exc, match=pattern.replace("float64", "torch.float64").replace(
            "float32", "torch.float32")):
        check_shapes(*tensors)


def test_shape_rule_accepts_good_shapes_and_names_by_names():
    from flashmath.attention.options import check_shapes

    check_shapes(Shaped((2, 4, 5, 3)), Shaped((2, 2, 6, 3)), Shaped((2, 2, 6, 7)))
    with pytest.raises(ValueError, match="k_cache: head dims differ"):
        check_shapes(Shaped((1, 1, 1, 3)), Shaped((1, 1, 6, 4)), Shaped((1, 1, 6, 4)),
                     names=("q", "k_cache", "v_cache"))


@pytest.mark.parametrize(("value", "finite", "positive"), [
    (1.5, 1.5, 1.5), (-2, -2.0, ValueError), (0.0, 0.0, ValueError),
    (float("inf"), ValueError, ValueError), (float("nan"), ValueError, ValueError),
    (True, TypeError, TypeError), ("1", TypeError, TypeError), (np.float32(0.5), 0.5, 0.5),
])
def test_scalar_checks(value, finite, positive):
    from flashmath.attention.options import check_finite, check_positive

    for fn, want in ((check_finite, finite), (check_positive, positive)):
        if isinstance(want, type):
            with pytest.raises(want, match="x:"):
                fn(value, "x")
        else:
            assert fn(value, "x") == want and isinstance(fn(value, "x"), float)
