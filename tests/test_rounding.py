"""flashmath.rounding: the fast exact conversions give NumPy's (and ml_dtypes') bits.

The oracle is the library cast itself, ``x.astype(np.float16)`` (IEEE round to nearest,
ties to even) and ``x.astype(ml_dtypes.bfloat16)``, on every class of float32 bit
pattern: normal, subnormal results, underflow to zero, overflow to inf, inf, NaN
payloads, -0.0 and the ties, with the float16 subnormal/normal boundary, the smallest
subnormal and the overflow threshold swept exhaustively (every float32 pattern there).
"""

from __future__ import annotations

import warnings

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from flashmath import rounding
from flashmath.rounding import (
    bfloat16_to_float32,
    cast,
    float16_to_float32,
    float32_to_bfloat16,
    float32_to_float16,
)

F16_MIN_NORMAL = 0x38800000  # 2**-14 as float32 bits
F16_MIN_SUB = 0x33800000  # 2**-24
F16_HALF_MIN_SUB = 0x33000000  # 2**-25: the tie between 0 and the smallest subnormal
F16_OVERFLOW = 0x477FF000  # 65520: the tie between 65504 and inf (rounds to inf)


def bits(*ranges: tuple[int, int]) -> np.ndarray:
    """Every float32 bit pattern in the given [lo, hi) ranges, both signs, as float32."""
    u = np.concatenate([np.arange(lo, hi, dtype=np.uint64) for lo, hi in ranges])
    u = u.astype(np.uint32)
    return np.concatenate([u, u | np.uint32(0x80000000)]).view(np.float32)


def numpy_f16(x: np.ndarray) -> np.ndarray:
    with np.errstate(all="ignore"):
        return x.astype(np.float16).view(np.uint16)


def numpy_bf16(x: np.ndarray) -> np.ndarray:
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # ml_dtypes warns on NaN
        return x.astype(ml_dtypes.bfloat16).view(np.uint16)


def assert_same_f16(x: np.ndarray) -> None:
    got, want = float32_to_float16(x).view(np.uint16), numpy_f16(x)
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, [
        (hex(int(u)), hex(int(g)), hex(int(w)))
        for u, g, w in zip(x.view(np.uint32)[bad[:5]], got[bad[:5]], want[bad[:5]], strict=True)
    ]


def every_float16_and_its_midpoints() -> np.ndarray:
    """Every finite float16 as float32, the midpoints between neighbours (the ties) and
    the float32 neighbours of each midpoint (just below/above a tie)."""
    h = np.arange(0, 0x7C00, dtype=np.uint16).view(np.float16).astype(np.float64)
    mid = (h[:-1] + h[1:]) / 2  # exact in float32: one bit more than float16
    mid = np.append(mid, 65520.0).astype(np.float32)
    below = np.nextafter(mid, np.float32(0))
    above = np.nextafter(mid, np.float32(np.inf))
    out = np.concatenate([h.astype(np.float32), mid, below, above])
    return np.concatenate([out, -out])


@pytest.mark.parametrize(
    "name, x",
    [
        ("every float16, every tie, and the float32 values beside each tie",
         every_float16_and_its_midpoints()),
        ("the subnormal/normal boundary, 2**16 patterns each side",
         bits((F16_MIN_NORMAL - 2**16, F16_MIN_NORMAL + 2**16))),
        ("the smallest subnormal and the underflow-to-zero tie",
         bits((F16_HALF_MIN_SUB - 2**15, F16_MIN_SUB + 2**15))),
        ("overflow: 65504 to inf", bits((F16_OVERFLOW - 2**14, F16_OVERFLOW + 2**14))),
        ("float32 subnormals and zeros (every 7th pattern)", bits((0, 0x00800000))[::7]),
        ("inf, huge values, max float32", bits((0x7F000000, 0x7F800001))[::101]),
    ],
)
def test_float32_to_float16_matches_numpy_exhaustively(name: str, x: np.ndarray) -> None:
    assert_same_f16(x)


def test_float32_to_float16_random_bit_patterns_all_classes() -> None:
    u = np.random.default_rng(0).integers(0, 2**32, 2**20, dtype=np.uint64).astype(np.uint32)
    assert_same_f16(u.view(np.float32))


def test_float32_to_float16_nan_payloads_signs_and_zero() -> None:
    payload = np.arange(1, 2**23, 997, dtype=np.uint32)
    nan = np.concatenate([0x7F800000 | payload, 0xFF800000 | payload,
                          np.array([0x7FC00000, 0x7F800001, 0x7FFFFFFF, 0x7F801FFF], np.uint32)])
    x = nan.view(np.float32)
    assert_same_f16(x)
    assert np.isnan(float32_to_float16(x)).all()  # a payload below bit 13 stays NaN (0x7c01)
    z = float32_to_float16(np.array([-0.0, 0.0, -1e-30, 1e-30], np.float32))
    assert z.view(np.uint16).tolist() == [0x8000, 0, 0x8000, 0]


def test_float32_to_float16_ties_go_to_even() -> None:
    # 2**-25 is halfway between 0 and 2**-24: ties to even gives 0; 3 * 2**-25 gives 2**-23.
    x = np.array([2.0**-25, 3 * 2.0**-25, 1 + 2.0**-11, 1 + 3 * 2.0**-11, 65520.0], np.float32)
    got = float32_to_float16(x).astype(np.float64).tolist()
    assert got == [0.0, 2.0**-23, 1.0, 1 + 2.0**-9, np.inf]


@given(st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=1,
                max_size=64))
def test_hypothesis_float32_to_float16(values: list[float]) -> None:
    assert_same_f16(np.array(values, np.float32))


def test_float16_to_float32_every_pattern() -> None:
    h = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    want = h.astype(np.float32).view(np.uint32)
    assert np.array_equal(float16_to_float32(h).view(np.uint32), want)


def test_bfloat16_to_float32_every_pattern() -> None:
    import ml_dtypes

    b = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(ml_dtypes.bfloat16)
    want = b.astype(np.float32).view(np.uint32)
    got = bfloat16_to_float32(b).view(np.uint32)
    nan = np.isnan(want.view(np.float32))
    assert np.array_equal(got[~nan], want[~nan])  # NaN: payload kept, as the bits say
    assert np.isnan(got[nan].view(np.float32)).all()
    assert np.array_equal(got, b.view(np.uint16).astype(np.uint32) << 16)


@pytest.mark.parametrize(
    "x",
    [
        every_float16_and_its_midpoints(),
        np.random.default_rng(1).integers(0, 2**32, 2**20, dtype=np.uint64)
        .astype(np.uint32).view(np.float32),
        bits((0x7F7F0000, 0x7F800400), (0x00000000, 0x00010000), (0x3F7F8000, 0x3F808000)),
    ],
    ids=["float16 grid and ties", "random patterns", "overflow, subnormals, ties near 1"],
)
def test_float32_to_bfloat16_matches_ml_dtypes(x: np.ndarray) -> None:
    got = float32_to_bfloat16(x).view(np.uint16)
    assert np.array_equal(got, numpy_bf16(x))


def test_float32_to_bfloat16_nan_is_quiet_nan_with_sign_and_no_warning() -> None:
    x = np.array([0x7F800001, 0xFFC00001, 0x7FFFFFFF], np.uint32).view(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = float32_to_bfloat16(x).view(np.uint16)
    assert got.tolist() == [0x7FC0, 0xFFC0, 0x7FC0] == numpy_bf16(x).tolist()


@pytest.mark.parametrize("block", [1, 7, 4096])
def test_results_do_not_depend_on_the_block_size(monkeypatch: pytest.MonkeyPatch,
                                                 block: int) -> None:
    x = np.random.default_rng(2).standard_normal(10_001).astype(np.float32) * 1e-5
    want = numpy_f16(x)
    monkeypatch.setattr(rounding, "BLOCK", block)
    assert np.array_equal(float32_to_float16(x).view(np.uint16), want)


def test_shapes_views_and_out() -> None:
    x = np.random.default_rng(3).standard_normal((3, 4, 5)).astype(np.float32)[:, ::2].T
    got = float32_to_float16(x)
    assert got.shape == x.shape and got.dtype == np.float16
    assert np.array_equal(got.view(np.uint16), numpy_f16(x))
    out = np.empty(x.shape, np.float16)
    assert float32_to_float16(x, out=out) is out
    assert float32_to_float16(np.float32(1e-6)).shape == ()
    assert float32_to_float16(np.zeros((0, 3), np.float32)).shape == (0, 3)


@pytest.mark.parametrize(
    "fn, arg, out, error, message",
    [
        (float32_to_float16, np.zeros(3), None, TypeError, r"x: expected a float32 array.*float64"),
        (float16_to_float32, np.zeros(3, np.float32), None, TypeError, r"h: expected a float16"),
        (float32_to_bfloat16, [1, 2], None, TypeError, r"x: expected a float32 array.*int64"),
        (float32_to_float16, np.zeros(3, np.float32), np.empty(4, np.float16), ValueError,
         r"out: expected a C-contiguous float16 array of shape \(3,\), got float16 \(4,\)"),
        (float32_to_float16, np.zeros(3, np.float32), np.empty(3, np.float32), ValueError,
         r"out: expected a C-contiguous float16"),
    ],
)
def test_bad_arguments(fn, arg, out, error, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=message):
        fn(arg, out=out)


@pytest.mark.parametrize(
    "src, dst",
    [("float32", "float16"), ("float16", "float32"), ("float32", "bfloat16"),
     ("float64", "float16"), ("bfloat16", "float32"), ("float32", "float8_e4m3fn"),
     ("float64", "float32")],
)
def test_cast_is_astype_bit_for_bit(src: str, dst: str) -> None:
    from flashmath.dtypes import as_dtype

    x = (np.random.default_rng(4).standard_normal(1000) * 1e-4).astype(as_dtype(src))
    with np.errstate(all="ignore"):
        want = x.astype(as_dtype(dst))
    got = cast(x, as_dtype(dst))
    assert got.dtype == want.dtype and got.tobytes() == want.tobytes()
    out = np.empty(x.shape, as_dtype(dst))
    assert cast(x, as_dtype(dst), out=out) is out and out.tobytes() == want.tobytes()


def test_online_softmax_float16_is_its_float32_result_rounded_by_numpy() -> None:
    from flashmath.softmax.online import SoftmaxState, softmax_online

    x = (2 * np.random.default_rng(5).standard_normal((8, 3000))).astype(np.float16)
    p16, _ = softmax_online(x, 512, axis=0)
    p32, _ = softmax_online(x.astype(np.float32), 512, axis=0)
    assert p16.dtype == np.float16 and np.array_equal(p16.view(np.uint16), numpy_f16(p32))
    v = np.random.default_rng(6).standard_normal((3000, 4)).astype(np.float32) * 1e-6
    state = SoftmaxState.empty(8, 4).update(x.astype(np.float32), v)
    out = state.finalize(dtype=np.float16)
    assert np.array_equal(out.view(np.uint16), numpy_f16(state.finalize()))


def test_probabilities_to_float16_matches_numpy_on_the_unit_interval() -> None:
    """Every float16 in [0, 1], its ties and their neighbours; the float32 patterns at the
    subnormal boundary and the underflow tie; random patterns in [0, 1]; 1.0 and NaNs."""
    from flashmath.rounding import probabilities_to_float16

    x = every_float16_and_its_midpoints()
    x = x[(x >= 0) & (x <= 1) & ~np.signbit(x)]
    u = np.random.default_rng(2).integers(0, 0x3F800001, 2**20, dtype=np.uint64)
    nan = np.array([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFFFFFFF], np.uint32)
    edges = [np.arange(a - 2**14, a + 2**14, dtype=np.uint32)
             for a in (F16_MIN_NORMAL, F16_MIN_SUB, F16_HALF_MIN_SUB)]
    x = np.concatenate([x, *(e.view(np.float32) for e in edges),
                        u.astype(np.uint32).view(np.float32), np.float32([0.0, 1.0]),
                        nan.view(np.float32)])
    want = numpy_f16(x)
    out = np.empty(x.shape, np.float16)
    probabilities_to_float16(x.copy(), out)
    bad = np.flatnonzero(out.view(np.uint16) != want)
    assert bad.size == 0, [(hex(int(x.view(np.uint32)[i])), hex(int(out.view(np.uint16)[i])),
                            hex(int(want[i]))) for i in bad[:5]]


@pytest.mark.parametrize("out", [np.empty((2, 3), ml_dtypes.bfloat16),
                                 np.empty(3, np.float16),
                                 np.empty(6, ml_dtypes.bfloat16)[::2]])
def test_cast_checks_out_for_every_route(out: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"^out: expected a C-contiguous bfloat16 array"):
        cast(np.zeros(3, np.float32), ml_dtypes.bfloat16, out=out)
