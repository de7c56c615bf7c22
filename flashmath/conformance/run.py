"""Running kernels through the judge: one case, a whole battery, or your own inputs.

Use it in your own tests (through :mod:`flashmath.testing`)::

    from flashmath.testing import assert_attention_close, attention_battery, run_case

    def test_my_kernel_matches_the_oracle():
        assert_attention_close(my_attention, q, k, v, causal=True, grads=True)

    @pytest.mark.parametrize("case", attention_battery(), ids=lambda c: c.id)
    def test_my_kernel_on_the_battery(case):
        result = run_case(my_kernel, case)
        if result.verdict == "SKIP":
            pytest.skip(result.message)
        assert result.passed, result.message

Every verdict here, and the lab's accuracy records (:func:`accuracy_rule`), comes from the
one rule of :mod:`flashmath.conformance.judge`; how an impl is declared and called is
:mod:`flashmath.conformance.kernels`.

Owns: :func:`run_case`, :func:`check_softmax` / :func:`check_attention` (batteries),
:func:`compare_softmax` / :func:`compare_attention` and the ``assert_*_close`` forms (one-off
inputs), and :func:`accuracy_rule` (flashmath's tiled attention judged on one input, as the
lab tabulates it). May import: dtypes, softmax, attention, conformance.cases, .judge,
.kernels, .oracle.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

import numpy as np

from flashmath import dtypes as _dt
from flashmath.attention.tiled import flash_attention, flash_attention_backward
from flashmath.conformance.cases import (
    ATTENTION_KEYWORDS,
    Case,
    Kind,
    attention_battery,
    battery_dtypes,
    case_rng,
    softmax_battery,
)
from flashmath.conformance.judge import CheckResult, judge_case, not_judged, result_of
from flashmath.conformance.kernels import (
    Kernel,
    answer,
    as_kernel,
    is_torch,
    to_numpy,
    validate_kernel,
)

__all__ = [
    "accuracy_rule",
    "assert_attention_close",
    "assert_softmax_close",
    "check_attention",
    "check_softmax",
    "compare_attention",
    "compare_softmax",
    "run_case",
]


def _skip_reason(kernel: Kernel, case: Case, grads: bool) -> str | None:
    missing = sorted(case.requires - kernel.supports)
    if missing:
        return f"needs {', '.join(missing)} (not declared by the impl)"
    if kernel.dtypes is not None and case.dtype not in kernel.dtypes:
        return f"dtype {case.dtype} not declared by the impl"
    if grads and kernel.backend == "numpy" and kernel.backward is None:
        return "no backward: declare(impl, backward=...) or use a torch impl"
    return None


def run_case(impl: Any, case: Case, *, grads: bool = False, catch: bool = True) -> CheckResult:
    """Run ``impl`` on one battery case and judge it (never raises for the impl's sake
    unless ``catch=False``: then the impl's own exception propagates, and a wrong output
    shape is an AssertionError).

    ``grads`` applies to attention: out, dq, dk and dv are each judged (3x for gradients)
    and the row reports the worst of them. SKIP when the impl does not declare an option
    or the dtype the case needs (or has no backward for ``grads``); ERROR when it raised or
    returned the wrong shape.
    """
    kernel = as_kernel(impl)
    grads = grads and case.kind == "attention"
    reason = _skip_reason(kernel, case, grads)
    if reason:
        return not_judged(case, "SKIP", reason)
    try:
        with np.errstate(all="ignore"):
            answers = answer(kernel, case, grads=grads)
    except Exception as exc:
        if not catch:
            raise
        return not_judged(case, "ERROR", f"the impl raised {type(exc).__name__}: {exc}")
    try:
        judged = judge_case(case, answers)
    except ValueError as exc:  # a shape that is not the oracle's
        if not catch:
            raise AssertionError(str(exc)) from None
        return not_judged(case, "ERROR", str(exc))
    return result_of(case, judged)


def check_softmax(impl: Any, *, dtypes: Iterable[str] | None = None) -> list[CheckResult]:
    """Run the whole softmax battery (optionally only some dtypes); one result per case.
    A KernelSignatureError when the impl cannot be called as ``impl(x)``."""
    kernel = validate_kernel(impl, "softmax")
    return [run_case(kernel, case) for case in softmax_battery(battery_dtypes(dtypes))]


def check_attention(impl: Any, *, dtypes: Iterable[str] | None = None,
                    grads: bool = False) -> list[CheckResult]:
    """Run the whole attention battery (optionally only some dtypes, with gradients); one
    result per case. A KernelSignatureError when the impl cannot be called as
    ``impl(q, k, v, **options)``."""
    kernel = validate_kernel(impl, "attention")
    return [run_case(kernel, case, grads=grads)
            for case in attention_battery(battery_dtypes(dtypes))]


# --------------------------------------------------------------------------- one-off checks


def _custom_case(kind: Kind, inputs: dict[str, Any], options: Mapping[str, Any],
                 dtype: Any, name: str) -> Case:
    arrays = {n: to_numpy(a) for n, a in inputs.items() if a is not None}
    target = _dt.as_dtype(dtype) if dtype is not None else None
    for n, a in arrays.items():
        if target is not None:
            arrays[n] = a.astype(target)
        else:
            arrays[n] = _dt.as_float_array(a, name=n)
    dt = _dt.dtype_name(arrays["x" if kind == "softmax" else "q"].dtype)
    opts = {k: (to_numpy(v) if is_torch(v) else v) for k, v in options.items() if v is not None}
    return Case(name=name, kind=kind, dtype=dt, inputs=MappingProxyType(arrays),
                options=MappingProxyType(opts))


def compare_softmax(impl: Any, x: Any, *, axis: int = -1, where: Any = None,
                    dtype: Any = None, name: str = "custom") -> CheckResult:
    """Judge ``impl(x, axis=..., where=...)`` on one input (cast to ``dtype`` if given).

    ``axis``/``where`` are passed only when set (axis != -1, where not None). The impl is
    run whatever it declares: you asked for this input. Returns a CheckResult (ERROR if the
    impl raised).
    """
    options: dict[str, Any] = {}
    if axis != -1:
        options["axis"] = axis
    if where is not None:
        options["where"] = np.asarray(where, dtype=bool)
    case = _custom_case("softmax", {"x": x}, options, dtype, name)
    return run_case(as_kernel(impl), case, catch=True)


def compare_attention(impl: Any, q: Any, k: Any, v: Any, *, grads: bool = False,
                      dout: Any = None, dtype: Any = None, name: str = "custom",
                      **options: Any) -> CheckResult:
    """Judge ``impl(q, k, v, **options)`` (and its gradients with ``grads=True``).

    q, k, v: (B, H, Sq, D), (B, H_kv, Sk, D), (B, H_kv, Sk, Dv), NumPy arrays or torch
    tensors. ``options`` are fm.attention_reference's (causal, window, mask, bias,
    kv_lengths, q_lengths, softcap, scale); None values are dropped, an unknown one is a
    TypeError. ``dout`` defaults to a fixed random tensor. Inputs are cast to ``dtype`` if
    given. ``grads=True`` with a NumPy impl and no backward is a TypeError.
    """
    unknown = set(options) - ATTENTION_KEYWORDS
    if unknown:
        raise TypeError(f"options: unknown attention option(s) {sorted(unknown)}")
    qa = to_numpy(q)
    if dout is None:
        shape = (*qa.shape[:-1], to_numpy(v).shape[-1])
        dout = case_rng("dout", name).standard_normal(shape)
    case = _custom_case("attention", {"q": q, "k": k, "v": v, "dout": dout}, options,
                        dtype if dtype is not None else qa.dtype, name)
    kernel = as_kernel(impl)
    if grads and kernel.backend == "numpy" and kernel.backward is None:
        raise TypeError("grads=True needs a backward: impl is taken as a NumPy impl, "
                        "which needs declare(impl, backward=...) or a (forward, backward) "
                        "pair; for a torch impl (gradients by autograd) say so with "
                        "declare(impl, backend=\"torch\")")
    return run_case(kernel, case, grads=grads, catch=True)


def _raise_unless_passed(result: CheckResult) -> None:
    if not result.passed:
        raise AssertionError(result.message)


def assert_softmax_close(impl: Any, x: Any, *, axis: int = -1, where: Any = None,
                         dtype: Any = None) -> CheckResult:
    """Assert that ``impl`` meets the accuracy rule and the NaN policy on ``x`` (see
    :mod:`flashmath.conformance.judge`); the AssertionError names the worst element, its
    value, the oracle's, the baseline's error and the ratio. Returns the CheckResult when
    it passes."""
    result = compare_softmax(impl, x, axis=axis, where=where, dtype=dtype)
    _raise_unless_passed(result)
    return result


def assert_attention_close(impl: Any, q: Any, k: Any, v: Any, *, grads: bool = False,
                           dout: Any = None, dtype: Any = None, **options: Any) -> CheckResult:
    """Assert that ``impl(q, k, v, **options)`` (and, with ``grads=True``, its dq, dk, dv)
    meets the accuracy rule and the NaN policy; the AssertionError names the worst element
    (e.g. ``dk[0, 1, 4, 2]``), its value, the oracle's, the baseline's error and the ratio.
    Returns the CheckResult when it passes."""
    result = compare_attention(impl, q, k, v, grads=grads, dout=dout, dtype=dtype, **options)
    _raise_unless_passed(result)
    return result


# --------------------------------------------------------------------------- the lab's view


def accuracy_rule(
    q: Any,
    k: Any,
    v: Any,
    *,
    dtype: Any,
    dout: Any = None,
    block_q: int | None = None,
    block_k: int | None = None,
    **options: Any,
) -> dict[str, Any]:
    """flashmath's tiled attention on one input, judged by the checker's rule: a JSON-ready
    record of errors and ratios.

    q, k, v: (B, H, Sq, D), (B, H_kv, Sk, D), (B, H_kv, Sk, Dv); with ``dout``
    ((B, H, Sq, Dv)) the gradients are judged too. All are rounded to ``dtype`` first, so the
    oracle, the naive same-dtype baseline and flash_attention (with ``block_q``/``block_k``)
    see the same values. ``options`` are the attention options (causal, window, mask, bias,
    lengths, ...), passed as given.

    Returns a dict with, for each judged quantity x in out (and dq, dk, dv with dout):
    ``x_err`` (flashmath's max abs error against the float64 oracle), ``x_naive_err`` (the
    baseline's; inf or nan where it overflowed), ``x_floor`` and ``x_ratio`` (``x_err`` over
    max(``x_naive_err``, ``x_floor``), the floor alone where the baseline broke), and
    ``nan_policy_ok``, ``passes`` (what ``flashmath check`` would say: every ratio within
    2x / 3x and the NaN policy kept), ``at_or_below_1x`` (passes with every ratio <= 1),
    ``dtype``. See :mod:`flashmath.conformance.judge` for the rule.
    """
    dt = _dt.as_dtype(dtype)
    inputs = {n: np.asarray(x).astype(dt) for n, x in (("q", q), ("k", k), ("v", v))}
    if dout is not None:
        inputs["dout"] = np.asarray(dout).astype(dt)
    case = Case(name="accuracy_rule", kind="attention", dtype=_dt.dtype_name(dt),
                inputs=MappingProxyType(inputs), options=MappingProxyType(dict(options)))
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    with np.errstate(all="ignore"):
        out, lse = flash_attention(q, k, v, return_lse=True, block_q=block_q, block_k=block_k,
                                   **options)
        answers = {"out": np.asarray(out)}
        if dout is not None:
            grads = flash_attention_backward(inputs["dout"], q, k, v, out, lse, block_q=block_q,
                                             block_k=block_k, **options)
            answers |= dict(zip(("dq", "dk", "dv"), map(np.asarray, grads[:3]), strict=True))
    judged = judge_case(case, answers)
    rec: dict[str, Any] = {"dtype": case.dtype}
    for j in judged:
        rec |= {f"{j.label}_err": j.max_error, f"{j.label}_naive_err": j.baseline_error,
                f"{j.label}_floor": j.floor, f"{j.label}_ratio": j.ratio}
    passes = all(j.ok for j in judged)
    rec |= {"nan_policy_ok": all(j.policy_ok for j in judged), "passes": passes,
            "at_or_below_1x": passes and all(j.ratio <= 1 for j in judged)}
    return rec
