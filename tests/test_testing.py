"""flashmath.testing: the batteries as data, the accuracy rule, the NaN policy, the
boundary between NumPy and torch, and what is skipped rather than passed."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

import flashmath as fm
from flashmath import testing
from flashmath.conformance import accuracy_rule
from flashmath.conformance.kernels import load_target
from flashmath.testing import (
    BATTERY_DTYPES,
    assert_attention_close,
    assert_softmax_close,
    attention_battery,
    declare,
    run_case,
    softmax_battery,
)
from tests import _kernels as K

ANY_NUMBER = r"-?[0-9.]+(e[-+]?\d+)?|nan|inf"


def _case(battery: tuple[testing.Case, ...], name: str, dtype: str) -> testing.Case:
    (case,) = [c for c in battery if c.name == name and c.dtype == dtype]
    return case


def _qkv(dtype: str, sq: int = 12, sk: int = 12, d: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    dt = fm.dtypes.as_dtype(dtype)
    return tuple(rng.standard_normal(s).astype(dt) for s in
                 ((1, 2, sq, d), (1, 2, sk, d), (1, 2, sk, d)))


# --------------------------------------------------------------------------- batteries


def test_softmax_battery_holds_seed_001_in_every_dtype() -> None:
    battery = softmax_battery()
    for dtype in BATTERY_DTYPES:
        for name, values in testing.SEED_001:
            case = _case(battery, name, dtype)
            np.testing.assert_array_equal(case.inputs["x"].astype(np.float64),
                                          np.array(values, dtype=case.inputs["x"].dtype))
    ids = [c.id for c in battery]
    assert len(ids) == len(set(ids))
    assert {c.dtype for c in battery} == set(BATTERY_DTYPES)


@pytest.mark.parametrize("dtype", BATTERY_DTYPES)
def test_threshold_cases_sit_beyond_each_dtypes_own_thresholds(dtype: str) -> None:
    sm = softmax_battery((dtype,))
    over = _case(sm, "above overflow threshold", dtype).inputs["x"].astype(np.float64)
    under = _case(sm, "below underflow threshold", dtype).inputs["x"].astype(np.float64)
    assert over.max() > float(fm.overflow_threshold(dtype))
    assert under.max() < float(fm.underflow_threshold(dtype))
    att = attention_battery((dtype,))
    for name, test in (("large logits", lambda s: np.abs(s).max() > fm.overflow_threshold(dtype)),
                       ("large negative logits",
                        lambda s: s.max() < fm.underflow_threshold(dtype))):
        case = _case(att, name, dtype)
        q, k = (case.inputs[n].astype(np.float64) for n in ("q", "k"))
        scores = q @ k.swapaxes(-1, -2) / math.sqrt(q.shape[-1])
        assert test(scores), name


def test_attention_battery_covers_the_shapes_and_options_it_names() -> None:
    battery = attention_battery(("float32",))
    shape = {c.name: (c.inputs["q"].shape, c.inputs["k"].shape, c.inputs["v"].shape)
             for c in battery}
    assert shape["Sq > Sk"][0][2] > shape["Sq > Sk"][1][2]
    assert shape["Sq < Sk"][0][2] < shape["Sq < Sk"][1][2]
    assert shape["single key"][1][2] == 1
    assert shape["odd head dim"][0][3] % 2 == 1
    assert shape["GQA"][0][1] > shape["GQA"][1][1] > 1
    assert shape["MQA"][1][1] == 1
    assert shape["value head dim"][2][3] != shape["value head dim"][0][3]
    assert shape["long rows"][1][2] >= 4096
    causal = _case(battery, "causal Sq > Sk", "float32")
    assert causal.options == {"causal": True} and causal.requires == {"causal"}
    assert causal.inputs["q"].shape[2] > causal.inputs["k"].shape[2]
    assert np.isnan(_case(battery, "NaN in a query", "float32").inputs["q"]).any()
    for case in battery:
        assert case.requires <= testing.ATTENTION_OPTIONS
        assert not case.inputs["q"].flags.writeable  # shared data: nobody may change it
    assert attention_battery(("float32",)) is battery  # built once


# --------------------------------------------------------------------------- the rule


@pytest.mark.parametrize("dtype", BATTERY_DTYPES)
def test_a_correct_kernel_passes_and_returns_the_result(dtype: str) -> None:
    q, k, v = _qkv(dtype, sq=12, sk=7)
    result = assert_attention_close(K.good_attention, q, k, v, causal=True, grads=True)
    assert result.verdict == "PASS" and result.nan_policy_ok
    assert result.ratio is not None and result.ratio <= testing.GRAD_LIMIT
    result = assert_softmax_close(K.good_softmax, np.linspace(-30, 30, 50), dtype=dtype)
    assert result.dtype == dtype and result.passed


def test_forgetting_the_scale_fails_naming_the_worst_element() -> None:
    q, k, v = _qkv("float16")
    with pytest.raises(AssertionError) as info:
        assert_attention_close(K.no_scale_attention, q, k, v)
    msg = str(info.value)
    pattern = (rf"at out\[0, \d+, \d+, \d+\] the impl gives ({ANY_NUMBER}) where the float64 "
               rf"oracle says ({ANY_NUMBER}).*baseline's max error is ({ANY_NUMBER}).*ratio "
               rf"({ANY_NUMBER}) > 2")
    match = re.search(pattern, msg)
    assert match, msg
    result = testing.compare_attention(K.no_scale_attention, q, k, v)
    assert result.verdict == "FAIL" and result.worst is not None
    idx = tuple(int(i) for i in re.findall(r"\d+", result.worst))
    out = K.no_scale_attention(q, k, v).astype(np.float64)
    oracle = fm.attention_reference(q, k, v)
    assert np.abs(out - oracle).max() == abs(out[idx] - oracle[idx]) == result.max_error


def test_forgetting_the_causal_mask_fails_only_the_causal_cases() -> None:
    battery = attention_battery(("float16",))
    failed = {c.name for c in battery
              if run_case(K.no_causal_attention, c).verdict == "FAIL"}
    assert failed == {"causal", "causal Sq > Sk", "causal Sq < Sk"}


def test_float16_accumulation_fails_on_long_rows() -> None:
    battery = attention_battery(("float16",))
    assert run_case(K.fp16_accumulation_attention, _case(battery, "basic", "float16")).passed
    result = run_case(K.fp16_accumulation_attention, _case(battery, "long rows", "float16"))
    assert result.verdict == "FAIL" and result.ratio is not None and result.ratio > 2
    assert re.search(r"at out\[0, \d+, \d+, \d+\] the impl gives", result.message)


def test_a_wrong_gradient_is_named_by_quantity() -> None:
    q, k, v = _qkv("bfloat16")
    with pytest.raises(AssertionError, match=r"dk: breaks the accuracy rule.*at dk\[0, \d+, "):
        assert_attention_close(K.bad_dk_attention, q, k, v, grads=True)
    assert testing.compare_attention(K.bad_dk_attention, q, k, v).passed  # forward is fine


def test_an_overflowing_baseline_tightens_the_rule_to_the_floor() -> None:
    case = _case(softmax_battery(("float16",)), "large positive", "float16")
    result = run_case(K.sloppy_softmax, case)  # 1% off; the naive float16 softmax is NaN here
    assert math.isnan(result.baseline_error)
    assert result.floor == pytest.approx(float(np.finfo(np.float16).eps), rel=1e-3)
    assert result.verdict == "FAIL" and result.ratio > 2
    assert "baseline broke" in result.message
    assert run_case(K.good_softmax, case).passed


def test_float64_uses_the_floor_where_the_baseline_is_the_oracle() -> None:
    case = _case(attention_battery(("float64",)), "large logits", "float64")
    result = run_case(K.good_attention, case)
    assert result.baseline_error == 0 and result.floor > 0 and result.passed


# --------------------------------------------------------------------------- NaN policy


@pytest.mark.parametrize(("impl", "case_name", "why"), [
    (K.uniform_empty_softmax, "all -inf", "nothing to attend to must be exactly zero"),
    (fm.naive.softmax, "large positive", "NaN/inf where the oracle is finite"),
    (fm.naive.softmax, "+inf in a row", "this row must be NaN"),
])
def test_nan_policy_breaches_fail_whatever_the_error(impl, case_name: str, why: str) -> None:
    result = run_case(impl, _case(softmax_battery(("float32",)), case_name, "float32"))
    assert result.verdict == "FAIL" and result.nan_policy_ok is False
    assert re.search(r"NaN policy broken at out\[\d+(, \d+)?\]", result.message)
    assert why in result.message


def test_nan_rows_stay_nan_and_masked_rows_zero_for_a_good_kernel() -> None:
    battery = attention_battery(("bfloat16",))
    for name in ("NaN in a query", "causal Sq > Sk"):
        result = run_case(K.good_attention, _case(battery, name, "bfloat16"))
        assert result.passed and result.nan_policy_ok, result.message


# --------------------------------------------------------------------------- skips, errors


def test_unsupported_options_and_dtypes_are_skipped_with_the_reason() -> None:
    battery = attention_battery(("float16",))
    gqa = _case(battery, "GQA", "float16")
    result = run_case(K.good_attention, gqa)  # its signature has causal and scale only
    assert result.verdict == "SKIP" and "needs gqa" in result.message
    narrow = declare(K.good_attention, dtypes={"float32"})
    result = run_case(narrow, _case(battery, "basic", "float16"))
    assert result.verdict == "SKIP" and "dtype float16" in result.message
    result = run_case(K.no_scale_attention, _case(battery, "basic", "float16"), grads=True)
    assert result.verdict == "SKIP" and "no backward" in result.message


def test_supports_come_from_declare_attributes_or_the_signature() -> None:
    assert testing.as_kernel(K.good_attention).supports == {"causal", "scale"}
    assert testing.as_kernel(fm.softmax).supports == {"axis", "where"}
    assert testing.as_kernel(K.torch_attention).backend == "torch"
    kernel = declare(K.good_attention, supports={"causal", "gqa"})
    assert kernel.supports == {"causal", "gqa"} and kernel.backward is not None

    @declare(supports={"mask"}, dtypes=["fp16"])
    def attn(q, k, v, mask=None):
        return q

    assert attn.supports == {"mask"} and attn.dtypes == {"float16"}
    pair = testing.as_kernel((K.no_scale_attention, K._good_backward))
    assert pair.backward is K._good_backward
    with pytest.raises(ValueError, match="unknown option"):
        declare(K.good_attention, supports={"causl"})


def test_signatures_that_do_not_fit_are_refused() -> None:
    with pytest.raises(testing.KernelSignatureError, match=r"cannot be called as f\(q, k, v\)"):
        testing.validate_kernel(K.one_arg, "attention")
    with pytest.raises(testing.KernelSignatureError, match=r"declared to support \['mask'\]"):
        testing.validate_kernel(declare(K.good_attention, supports={"mask"}), "attention")
    testing.validate_kernel(declare(lambda q, k, v, **kw: q, supports={"mask"}), "attention")


def test_an_impl_that_raises_or_returns_the_wrong_shape_is_an_error() -> None:
    case = _case(softmax_battery(("float32",)), "small magnitudes", "float32")

    def boom(x):
        raise RuntimeError("kernel exploded")

    result = run_case(boom, case)
    assert result.verdict == "ERROR" and "RuntimeError: kernel exploded" in result.message
    with pytest.raises(RuntimeError, match="exploded"):
        run_case(boom, case, catch=False)
    result = run_case(lambda x: x[:-1], case)
    assert result.verdict == "ERROR" and "shape (4,), expected (5,)" in result.message


# --------------------------------------------------------------------------- torch


def test_torch_impls_get_tensors_and_autograd_gives_their_gradients() -> None:
    torch = pytest.importorskip("torch")
    seen = []

    def spy(q, k, v, *, causal=False):
        seen.append((type(q), q.dtype))
        return K.torch_attention(q, k, v, causal=causal)

    kernel = declare(spy, backend="torch")
    for dtype in ("bfloat16", "float16"):
        q, k, v = _qkv(dtype, sq=9, sk=5)
        assert assert_attention_close(kernel, q, k, v, causal=True, grads=True).passed
    assert set(seen) == {(torch.Tensor, torch.bfloat16), (torch.Tensor, torch.float16)}
    # torch tensors are accepted as inputs too, bfloat16 included
    x = torch.linspace(-100, 100, 7, dtype=torch.bfloat16)
    assert assert_softmax_close(declare(lambda t: torch.softmax(t, -1), backend="torch"),
                                x).dtype == "bfloat16"


def test_a_torch_output_without_autograd_is_an_error_under_grads() -> None:
    pytest.importorskip("torch")
    detached = declare(lambda q, k, v: K.torch_attention(q, k, v).detach(), backend="torch")
    q, k, v = _qkv("float32")
    result = testing.compare_attention(detached, q, k, v, grads=True)
    assert result.verdict == "ERROR" and "does not require grad" in result.message


# --------------------------------------------------------------------------- one rule


FLASHMATH = load_target("flashmath", "attention")


def _agree(rec: dict, result: testing.CheckResult) -> None:
    """The lab's record and the checker's row say the same thing about the same answers."""
    assert rec["passes"] == result.passed, (rec, result.message)
    assert rec["nan_policy_ok"] == result.nan_policy_ok
    q = result.quantity  # the row reports this quantity: the record has the same numbers
    assert (rec[f"{q}_err"], rec[f"{q}_floor"]) == (result.max_error, result.floor)
    assert rec[f"{q}_ratio"] == result.ratio or (math.isnan(rec[f"{q}_ratio"])
                                                 and math.isnan(result.ratio))
    if result.passed:  # then the row's ratio is the worst of them
        assert max(rec[f"{x}_ratio"] for x in ("out", "dq", "dk", "dv")
                   if f"{x}_ratio" in rec) == result.ratio


@pytest.mark.parametrize("dtype", BATTERY_DTYPES)
def test_the_lab_and_the_checker_give_the_same_verdict_on_every_case(dtype: str) -> None:
    # A lab rule without the floor or the NaN policy would fail what the checker passes:
    # every float64 case (there the naive baseline is the oracle's algorithm: error 0) and
    # the NaN query (NaN errors).
    for case in attention_battery((dtype,)):
        i = case.inputs
        rec = accuracy_rule(i["q"], i["k"], i["v"], dtype=dtype, dout=i["dout"], **case.options)
        _agree(rec, run_case(FLASHMATH, case, grads=True))


def test_the_lab_and_the_checker_agree_where_the_baseline_overflows() -> None:
    # Scores near 9e4 overflow float16 in the naive formula (NaN); flashmath's float32 tiles
    # do not. The floor stands alone: the forward passes (a raw ratio would be nan: a FAIL),
    # and the gradients of these ill-conditioned scores get the same verdict in both views.
    rng = np.random.default_rng(0)
    q, k = (150 + rng.standard_normal((1, 2, 8, 16)) for _ in range(2))
    v, dout = (rng.standard_normal((1, 2, 8, 16)) for _ in range(2))
    rec = accuracy_rule(q, k, v, dtype="float16")
    result = testing.compare_attention(FLASHMATH, q, k, v, dtype="float16")
    assert math.isnan(rec["out_naive_err"]) and math.isnan(result.baseline_error)
    assert rec["out_ratio"] == rec["out_err"] / rec["out_floor"] <= testing.OUT_LIMIT
    _agree(rec, result)
    assert result.passed
    rec = accuracy_rule(q, k, v, dtype="float16", dout=dout)
    result = testing.compare_attention(FLASHMATH, q, k, v, dtype="float16", dout=dout,
                                       grads=True)
    _agree(rec, result)
    assert rec["passes"] == result.passed and result.quantity != "out"


def test_a_torch_callable_without_declare_is_told_how_to_get_gradients() -> None:
    """A torch function passed as is is taken as a NumPy impl: with grads=True the error
    says to declare it with backend="torch" (issue 17)."""
    torch = pytest.importorskip("torch")

    def sdpa(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    q = np.random.default_rng(0).standard_normal((1, 1, 4, 4)).astype(np.float32)
    with pytest.raises(TypeError, match=r'declare\(impl, backend="torch"\)'):
        testing.assert_attention_close(sdpa, q, q, q, grads=True)
