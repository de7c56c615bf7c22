"""Online softmax (flashmath.softmax.online): each test is a line of the specification in issue 3.

Accuracy bounds are seed 000's: float64 1e-12, float32 1e-6, float16 1e-3, bfloat16 5e-3,
absolute for outputs of order one; where max|output| exceeds 1 the bound scales with it
(docs/conventions.md: relative to max|output|). The reference is softmax(s) @ V in float64 on the
exact values of the (possibly narrow) inputs, so the bound covers the online recurrence and
the final rounding to the input dtype, not the rounding of the inputs themselves.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from functools import reduce

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import flashmath as fm
from flashmath.softmax.rule import rescale, row_shift

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = [np.dtype(np.float64), np.dtype(np.float32), np.dtype(np.float16), BF16]
BOUND = {"float64": 1e-12, "float32": 1e-6, "float16": 1e-3, "bfloat16": 5e-3}


def softmax64(s: np.ndarray) -> np.ndarray:
    """fm.softmax over the last axis in float64 on the exact values of s (-inf rows: zeros)."""
    return fm.softmax(np.asarray(s, dtype=np.float64))


def reference(s: np.ndarray, V: np.ndarray) -> np.ndarray:
    """softmax(s) @ V in float64 on the exact values of s (..., N) and V (..., N, d)."""
    p = softmax64(s)
    V64 = np.asarray(V, dtype=np.float64)
    return p @ V64 if V64.ndim == 2 else (p[..., None, :] @ V64)[..., 0, :]


def assert_within_bound(out: np.ndarray, ref: np.ndarray, dtype: np.dtype) -> None:
    name = fm.dtypes.dtype_name(dtype)
    err = float(np.max(np.abs(np.asarray(out, np.float64) - ref), initial=0.0))
    bound = BOUND[name] * max(1.0, float(np.max(np.abs(ref), initial=0.0)))
    assert err <= bound, f"{name}: max abs error {err:.3g} > bound {bound:.3g}"


def random_problem(seed: int, n: int, d: int, dtype: np.dtype, scale: float = 3.0):
    rng = np.random.default_rng(seed)
    s = (scale * rng.standard_normal(n)).astype(dtype)
    V = rng.standard_normal((n, d)).astype(dtype)
    return s, V


def split(x: np.ndarray, cuts: list[int], axis: int = 0) -> list[np.ndarray]:
    """x cut along ``axis`` at the given positions (sorted, unique, inside 1..n-1)."""
    return np.split(x, cuts, axis=axis)


@st.composite
def chunked_problem(draw, dtypes=DTYPES, max_n=64):
    """(dtype, s, V, cut positions): any split of 1..max_n entries, sizes 1..N."""
    dtype = draw(st.sampled_from(dtypes))
    n = draw(st.integers(1, max_n))
    d = draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**32 - 1))
    cuts = sorted(draw(st.sets(st.integers(1, max(1, n - 1)), max_size=n - 1))) if n > 1 else []
    s, V = random_problem(seed, n, d, dtype)
    return dtype, s, V, cuts


def chunk_states(s, V, cuts):
    empty = fm.SoftmaxState.empty((), V.shape[-1])
    return [empty.update(sc, vc) for sc, vc in zip(split(s, cuts), split(V, cuts), strict=True)]


def left_fold(states, _rng):
    return reduce(fm.merge, states)


def right_fold(states, _rng):
    return reduce(lambda acc, x: fm.merge(x, acc), reversed(states))


def balanced(states, rng):
    if len(states) == 1:
        return states[0]
    half = len(states) // 2
    return fm.merge(balanced(states[:half], rng), balanced(states[half:], rng))


def random_order(states, rng):
    pool = list(states)
    while len(pool) > 1:
        a = pool.pop(rng.randrange(len(pool)))
        b = pool.pop(rng.randrange(len(pool)))
        pool.append(a.merge(b))
    return pool[0]


TREES: list[Callable] = [left_fold, right_fold, balanced, random_order]


# --- Equivalence with softmax(s) @ V for every split and every merge tree ---


@given(chunked_problem())
def test_chunked_matches_softmax_at_V_for_every_split(problem):
    dtype, s, V, cuts = problem
    out = fm.softmax_online_chunked(split(s, cuts), split(V, cuts))
    assert out.dtype == dtype
    assert_within_bound(out, reference(s, V), dtype)


@pytest.mark.parametrize("tree", TREES, ids=lambda t: t.__name__)
@given(problem=chunked_problem(), order_seed=st.integers(0, 2**16))
def test_every_merge_tree_matches_softmax_at_V(tree, problem, order_seed):
    dtype, s, V, cuts = problem
    state = tree(chunk_states(s, V, cuts), random.Random(order_seed))
    assert_within_bound(state.finalize(dtype=dtype), reference(s, V), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chunk", [1, 4, 16, 64, 256])
def test_grid_of_seed_000(dtype, chunk):
    s, V = random_problem(chunk, 300, 16, dtype)
    chunks = list(range(chunk, len(s), chunk))  # the last chunk is short
    assert_within_bound(fm.softmax_online_chunked(split(s, chunks), split(V, chunks)),
                        reference(s, V), dtype)


# --- Seed 000's pathological inputs, and empty rows ---

V4 = np.array([[1.0, -2.0], [0.5, 3.0], [-1.0, 0.25], [2.0, 1.5]])
PATHOLOGICAL = [  # (name, scores, expected output)
    ("one huge value", [60.0, 0.0, 0.0, 0.0], V4[0]),
    ("one near zero, rest very negative", [-100.0, -100.0, -100.0, 0.0], V4[3]),
    ("all zeros: uniform", [0.0, 0.0, 0.0, 0.0], V4.mean(axis=0)),
    ("all -inf: zeros", [-np.inf] * 4, np.zeros(2)),
    ("all -inf chunk before finite ones", [-np.inf, -np.inf, 1.0, 1.0], V4[2:].mean(axis=0)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chunk", [1, 2, 4])
@pytest.mark.parametrize(("case", "scores", "expected"), PATHOLOGICAL,
                         ids=[c[0] for c in PATHOLOGICAL])
def test_pathological_inputs(dtype, chunk, case, scores, expected):
    s, V = np.array(scores, dtype), V4.astype(dtype)
    cuts = list(range(chunk, 4, chunk))
    out = fm.softmax_online_chunked(split(s, cuts), split(V, cuts))
    assert np.all(np.isfinite(out)), case
    assert_within_bound(out, expected, dtype)


def test_huge_score_in_float16_does_not_overflow_with_float32_state():
    s = np.array([60.0, 0.0, 0.0, 0.0], np.float16)
    with np.errstate(over="raise"):
        state = fm.SoftmaxState.empty((), 2).update(s, V4.astype(np.float16))
    assert state.dtype == np.float32
    assert state.m == 60.0 and state.l == 1.0  # exp(-60) vanishes next to 1 in float32


def test_empty_rows_finalize_per_policy_and_have_lse_minus_inf():
    state = fm.SoftmaxState.empty((2,), 3).update(np.array([[-np.inf, -np.inf], [0.0, 0.0]]),
                                                  np.ones((2, 3)))
    np.testing.assert_array_equal(state.finalize(), [[0, 0, 0], [1, 1, 1]])
    np.testing.assert_array_equal(state.finalize("nan"), [[np.nan] * 3, [1, 1, 1]])
    np.testing.assert_array_equal(state.lse, [-np.inf, np.log(2.0)])
    with pytest.raises(ValueError, match="empty: expected one of"):
        state.finalize("uniform")  # type: ignore[arg-type]


def test_plus_inf_or_nan_makes_only_that_row_nan():
    s = np.array([[0.0, np.inf], [0.0, np.nan], [0.0, 0.0]])
    out = fm.SoftmaxState.empty((3,), 1).update(s, np.ones((2, 1))).finalize()
    assert np.isnan(out[:2]).all() and out[2, 0] == 1.0
    probs, _ = fm.softmax_online(s, 1)
    assert np.isnan(probs[:2]).all() and np.array_equal(probs[2], [0.5, 0.5])


# --- Batched states ---


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_batched_rows_agree_with_row_by_row(dtype):
    B, H, S, N, d = 2, 3, 4, 10, 5
    rng = np.random.default_rng(7)
    scores = (3 * rng.standard_normal((B, H, S, N))).astype(dtype)
    scores[0, 1, 2] = -np.inf  # one empty row
    V = rng.standard_normal((B, H, 1, N, d)).astype(dtype)  # shared by the S rows of a head
    cuts = [3, 4, 9]
    batched = fm.softmax_online_chunked(split(scores, cuts, axis=-1), split(V, cuts, axis=-2))
    assert batched.shape == (B, H, S, d)
    for b, h, q in np.ndindex(B, H, S):
        row = fm.softmax_online_chunked(split(scores[b, h, q], cuts), split(V[b, h, 0], cuts))
        np.testing.assert_allclose(batched[b, h, q].astype(np.float64), row.astype(np.float64),
                                   rtol=0, atol=4 * BOUND[fm.dtypes.dtype_name(dtype)])
    assert_within_bound(batched, reference(scores, np.broadcast_to(V, (B, H, S, N, d))), dtype)


def test_empty_state_of_shape_unit_absorbs_a_batched_chunk():
    rng = np.random.default_rng(1)
    s, V = rng.standard_normal((2, 3, 6)), rng.standard_normal((6, 4))
    state = fm.SoftmaxState.empty((), 4, dtype=np.float64).update(s, V)
    assert state.batch_shape == (2, 3) and state.d == 4
    np.testing.assert_allclose(state.finalize(), reference(s, V), rtol=0, atol=1e-14)


# --- merge_outputs: what split-KV decoding and ring attention exchange ---


@given(chunked_problem(dtypes=[np.dtype(np.float64), np.dtype(np.float32)]))
def test_merge_outputs_equals_merging_states(problem):
    dtype, s, V, cuts = problem
    states = chunk_states(s, V, cuts)
    out, lse = fm.merge_outputs([x.finalize(dtype=dtype) for x in states],
                                [x.lse for x in states])
    merged = reduce(fm.merge, states)
    tol = BOUND[fm.dtypes.dtype_name(dtype)]
    np.testing.assert_allclose(out, merged.finalize(dtype=dtype), rtol=0, atol=tol)
    np.testing.assert_allclose(lse, merged.lse, rtol=tol, atol=0)
    assert out.dtype == dtype and lse.dtype == merged.dtype
    assert_within_bound(out, reference(s, V), dtype)


def test_merge_outputs_all_minus_inf_gives_zeros_and_minus_inf():
    out, lse = fm.merge_outputs([np.full((2, 3), np.nan), np.ones((2, 3))],
                                [np.full(2, -np.inf), np.array([-np.inf, 0.5])])
    np.testing.assert_array_equal(out, [[0, 0, 0], [1, 1, 1]])  # the -inf part's NaN is ignored
    np.testing.assert_array_equal(lse, [-np.inf, 0.5])


def test_merge_outputs_closed_form():
    out, lse = fm.merge_outputs([np.array([1.0]), np.array([3.0])], [np.log(1.0), np.log(3.0)])
    np.testing.assert_allclose(out, [2.5], rtol=1e-15)  # weights 1/4 and 3/4
    np.testing.assert_allclose(lse, np.log(4.0), rtol=1e-15)


# --- The identity, associativity and commutativity ---


@st.composite
def states(draw, batch=(3,), d=2, dtype=np.float64):
    """Any valid state: rows empty (m = -inf, l = 0, o = 0) or with l > 0 and any o,
    including -0.0 (as a partial output from another kernel may hold)."""
    k = int(np.prod(batch))
    m = draw(st.lists(st.floats(-50, 50, width=16) | st.just(-np.inf), min_size=k, max_size=k))
    l = draw(st.lists(st.floats(0.125, 1024, width=16), min_size=k, max_size=k))
    o = draw(st.lists(st.floats(-10, 10, width=16) | st.just(-0.0),
                      min_size=k * d, max_size=k * d))
    m, l, o = np.array(m, dtype), np.array(l, dtype), np.array(o, dtype).reshape(k, d)
    empty = np.isneginf(m)
    l[empty], o[empty] = 0, 0
    return fm.SoftmaxState(m.reshape(batch), l.reshape(batch), o.reshape(*batch, d))


def bits(state: fm.SoftmaxState) -> tuple[bytes, ...]:
    return tuple(np.ascontiguousarray(x).tobytes() for x in (state.m, state.l, state.o))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@given(data=st.data())
def test_merging_with_the_identity_is_bit_for_bit(dtype, data):
    a = data.draw(states(dtype=dtype))
    e = fm.SoftmaxState.empty(a.batch_shape, a.d, dtype=dtype)
    assert bits(fm.merge(a, e)) == bits(a)
    assert bits(e.merge(a)) == bits(a)


def test_merging_two_empty_rows_stays_empty_without_nan():
    e = fm.SoftmaxState.empty((2, 3), 4)
    with np.errstate(all="raise"):
        m = fm.merge(e, e)
    assert bits(m) == bits(e)
    np.testing.assert_array_equal(m.finalize(), np.zeros((2, 3, 4)))


@given(a=states(), b=states())
def test_merge_is_commutative_exactly(a, b):
    ab, ba = fm.merge(a, b), fm.merge(b, a)
    for x, y in ((ab.m, ba.m), (ab.l, ba.l), (ab.o, ba.o)):
        np.testing.assert_array_equal(x, y)  # equal values; a max of +0 vs -0 keeps either sign


@given(a=states(), b=states(), c=states())
def test_merge_is_associative_within_rounding(a, b, c):
    left, right = fm.merge(fm.merge(a, b), c), fm.merge(a, fm.merge(b, c))
    np.testing.assert_array_equal(left.m, right.m)
    np.testing.assert_allclose(left.l, right.l, rtol=1e-14, atol=0)
    np.testing.assert_allclose(left.finalize(), right.finalize(), rtol=0, atol=1e-12)


# --- Dtypes: the state keeps its accumulate dtype ---

DTYPE_RULES = [  # (state dtype, chunk dtype, accum_dtype, resulting state dtype)
    (np.float32, np.float16, None, np.float32),  # narrow chunks keep a float32 state
    (np.float32, BF16, None, np.float32),
    (np.float32, np.float64, None, np.float64),  # float64 data widens the default state
    (np.float16, np.float16, None, np.float16),  # a narrow state stays narrow (the lab)
    (np.float32, np.float16, np.float16, np.float16),  # accum_dtype decides outright
    (BF16, BF16, None, BF16),
]


@pytest.mark.parametrize(("state_dt", "chunk_dt", "accum", "expected"), DTYPE_RULES)
def test_state_dtype_rule(state_dt, chunk_dt, accum, expected):
    state = fm.SoftmaxState.empty((2,), 3, dtype=state_dt)
    s, V = np.zeros((2, 4), chunk_dt), np.ones((4, 3), chunk_dt)
    new = state.update(s, V, accum_dtype=accum)
    assert new.dtype == expected and new.m.dtype == new.l.dtype == new.o.dtype == expected
    np.testing.assert_array_equal(new.finalize().astype(np.float64), np.ones((2, 3)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_chunked_returns_the_input_dtype_and_accum_dtype_applies(dtype):
    s, V = random_problem(0, 20, 4, dtype)
    assert fm.softmax_online_chunked([s], [V]).dtype == dtype
    narrow = fm.softmax_online_chunked(split(s, [5, 10]), split(V, [5, 10]),
                                       accum_dtype=np.float16)
    assert narrow.dtype == dtype
    assert_within_bound(narrow, reference(s, V), BF16 if dtype == BF16 else np.dtype(np.float16))


def test_chunked_continues_from_an_initial_state():
    s, V = random_problem(3, 12, 4, np.dtype(np.float64))
    first = fm.SoftmaxState.empty((), 4, dtype=np.float64).update(s[:5], V[:5])
    out = fm.softmax_online_chunked([s[5:]], [V[5:]], first.m, first.l, first.o)
    assert_within_bound(out, reference(s, V), np.dtype(np.float64))


def test_state_is_immutable():
    state = fm.SoftmaxState.empty((2,), 3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.m = np.zeros(2)  # type: ignore[misc]
    with pytest.raises(ValueError, match="read-only"):
        state.o[0, 0] = 1.0
    caller = np.zeros(2)
    fm.SoftmaxState(caller, np.zeros(2), np.zeros((2, 3)))
    caller[0] = 1.0  # the caller's own array stays writable


def test_shared_rule_row_shift_and_rescale():
    m_old = np.array([-np.inf, -np.inf, 1.0, 2.0])
    m_new = np.array([-np.inf, 3.0, 1.0, 5.0])
    np.testing.assert_array_equal(row_shift(m_new), [0.0, 3.0, 1.0, 5.0])
    np.testing.assert_array_equal(rescale(m_old, m_new), [0.0, 0.0, 1.0, np.exp(-3.0)])


# --- softmax_online: seed 002 ---


def test_seed_002_example_trace():
    scores = np.array([2.0, -1.5, 0.3, 4.2])
    probs, trace = fm.softmax_online(scores, 2)
    np.testing.assert_allclose(probs, softmax64(scores), rtol=1e-15, atol=0)
    assert trace == [(2.0, 1.0 + np.exp(-3.5)),
                     (4.2, (1.0 + np.exp(-3.5)) * np.exp(2.0 - 4.2) + np.exp(0.3 - 4.2) + 1.0)]
    assert all(type(v) is float for pair in trace for v in pair)


@given(n=st.integers(1, 40), block=st.integers(1, 50), seed=st.integers(0, 2**16),
       dtype=st.sampled_from(DTYPES))
def test_softmax_online_matches_softmax_for_every_block_size(n, block, seed, dtype):
    x = (5 * np.random.default_rng(seed).standard_normal((3, n))).astype(dtype)
    probs, trace = fm.softmax_online(x, block)
    assert probs.dtype == dtype and len(trace) == -(-n // block)
    assert_within_bound(probs, softmax64(x), dtype)
    m, l = trace[-1]
    x64 = x.astype(np.float64)
    np.testing.assert_array_equal(m, x64.max(axis=-1))
    np.testing.assert_allclose(l, np.exp(x64 - x64.max(-1, keepdims=True)).sum(-1),
                               rtol=64 * float(fm.dtypes.finfo(m.dtype).eps))


def test_softmax_online_axis_and_empty_rows():
    x = np.array([[0.0, -np.inf], [0.0, -np.inf], [-np.inf, -np.inf]]).T  # (2, 3): axis 0
    probs, trace = fm.softmax_online(x, 1, axis=0)
    np.testing.assert_array_equal(probs, [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    assert trace[-1][0].shape == (3,)
    np.testing.assert_array_equal(trace[-1][1], [1.0, 1.0, 0.0])


# --- Bad input: errors name the argument and the shapes ---

E = fm.SoftmaxState.empty((2,), 4)
BAD_INPUTS = [  # (call, exception, message pattern)
    (lambda: E.update(np.zeros((2, 3)), np.zeros((5, 4))), ValueError, r"n=3.*n=5"),
    (lambda: E.update(np.zeros((2, 3)), np.zeros((3, 8))), ValueError, r"d=8.*\(3, 8\).*d=4"),
    (lambda: E.update(np.zeros((3, 3)), np.zeros((3, 4))), ValueError, r"\(2,\), \(3,\)"),
    (lambda: E.update(np.zeros(3, complex), np.zeros((3, 4))), TypeError, "scores: dtype"),
    (lambda: fm.merge(E, fm.SoftmaxState.empty((2,), 5)), ValueError, "d differs: 4.*5"),
    (lambda: fm.merge(E, fm.SoftmaxState.empty((3,), 4)), ValueError, "merge: batch shapes"),
    (lambda: fm.merge(E, None), TypeError, "SoftmaxState"),
    (lambda: fm.SoftmaxState(np.zeros(2), np.zeros(3), np.zeros((2, 4))), ValueError, r"l \(3,\)"),
    (lambda: fm.SoftmaxState.empty((2,), -1), ValueError, "negative"),
    (lambda: fm.softmax_online(np.zeros(4), 0), ValueError, "block_size.*got 0"),
    (lambda: fm.softmax_online(np.zeros(4), 1.5), TypeError, "block_size"),
    (lambda: fm.softmax_online_chunked([np.zeros(2)], []), ValueError, "1 arrays.*V_chunks"),
    (lambda: fm.softmax_online_chunked([np.zeros(2), np.zeros(3)], [np.zeros((2, 4)),
                                       np.zeros((2, 4))]), ValueError, r"chunks\[1\].*n=3"),
    (lambda: fm.softmax_online_chunked([np.zeros(2), np.zeros(2)], [np.zeros((2, 4)),
                                       np.zeros((2, 5))]), ValueError, r"V_chunks\[1\].*d=5"),
    (lambda: fm.merge_outputs([np.zeros(4)] * 3, [0.0] * 2), ValueError, "3 arrays.*2"),
    (lambda: fm.merge_outputs([], []), ValueError, "at least one"),
    (lambda: fm.merge_outputs([np.zeros(4), np.zeros(5)], [0.0, 0.0]), ValueError,
     r"outs\[1\].*d = 4.*\(5,\)"),
    (lambda: fm.merge_outputs([np.zeros((2, 4))], [np.zeros(3)]), ValueError,
     r"outs\[0\] \(2, 4\) and lses\[0\] \(3,\)"),
]


@pytest.mark.parametrize(("call", "exc", "pattern"), BAD_INPUTS,
                         ids=[p for _, _, p in BAD_INPUTS])
def test_bad_input_errors_name_argument_and_shapes(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


@pytest.mark.parametrize("axis", [(0, 1), 1.0, 3, -4, True])
def test_regression_softmax_online_bad_axis_names_axis(axis) -> None:
    with pytest.raises((TypeError, ValueError), match="axis"):
        fm.softmax_online(np.zeros((3, 10, 4)), 3, axis=axis)


def test_regression_softmax_online_bool_block_size_refused() -> None:
    with pytest.raises(TypeError, match="block_size"):
        fm.softmax_online(np.zeros(4), True)


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "float8_e4m3fnuz", "float8_e8m0fnu"])
def test_regression_state_dtypes_without_neg_inf_refused(dtype) -> None:
    """The identity needs m = -inf; a dtype without it would make every state NaN."""
    with pytest.raises(ValueError, match=r"dtype: .* has no -inf"):
        fm.SoftmaxState.empty(2, 3, dtype=dtype)
    with pytest.raises(ValueError, match="accum_dtype"):
        fm.SoftmaxState.empty(1, 2).update(np.ones(2), np.eye(2), accum_dtype=dtype)
    with pytest.raises(ValueError, match="accum_dtype"):
        fm.softmax_online(np.array([1.0, 2.0]), 1, accum_dtype=dtype)
