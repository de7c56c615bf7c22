"""The answers a case is judged against: the float64 oracle, the naive same-dtype baseline,
and what the oracle itself may be off by.

For a case's inputs (already rounded to their dtype), the **oracle** is float64 arithmetic
on the same values (``softmax`` on the float64 copy; ``attention_reference(upcast=True)`` and
``attention_reference_backward(upcast=True)``), the **baseline** the naive formula in the
input dtype (``naive.softmax``; ``attention_reference(upcast=False)``): the error a plain
implementation in that dtype makes.

The oracle's own error is ``eps(float64) * kappa * T`` per quantity. ``kappa`` is the
problem's condition number: 1 for softmax (the max shift keeps its absolute error at an
ulp or two); for attention ``1 + max_ij scale * sum_d |q_id||k_jd| + max|bias|``, the
rounding error of the scores in units of eps (an error of one ulp in a score is a relative
error of that size in its probability). ``T`` is the magnitude of the terms the quantity
sums: max|oracle| for softmax; for attention max|v| (out), max(P^T |dout|) (dv), and for
dq / dk the bound ``2 scale max_i |dout_i|_1 max|v|`` on dS = P * (dP - delta) times max|k|
(dq) or max|q| times the largest column sum of P (dk) -- gradients cancel, so their own
magnitude is no measure of their rounding. It matters only for float64 inputs, where the
oracle is no more precise than the impl.

Owns: :class:`Answer`, :class:`Expected` and :func:`expected` (computed once per case and
cached while the case lives). May import: dtypes, softmax, attention, conformance.cases.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from flashmath.attention.reference import attention_reference, attention_reference_backward
from flashmath.conformance.cases import Case, attention_scale
from flashmath.softmax import naive
from flashmath.softmax.stable import softmax

__all__ = ["EPS64", "Answer", "Expected", "expected", "finite_max"]

#: float64's machine epsilon: the unit of the oracle's own rounding.
EPS64 = float(np.finfo(np.float64).eps)


@dataclass(frozen=True)
class Answer:
    """What the oracle or the baseline says: ``out`` and, for attention, ``grads``
    (dq, dk, dv; None unless gradients were asked for) and ``lse`` ((B, H, Sq))."""

    out: np.ndarray
    grads: tuple[np.ndarray, ...] | None = None
    lse: np.ndarray | None = None


@dataclass(frozen=True)
class Expected:
    """Everything about a case that does not depend on the impl.

    oracle / baseline: the two :class:`Answer`. noise: per quantity ("out", and "dq", "dk",
    "dv" with gradients), what the float64 oracle itself may be off by (module docstring).
    """

    oracle: Answer
    baseline: Answer
    noise: dict[str, float]


def finite_max(x: Any) -> float:
    """max |x| over the finite entries of ``x`` (0 when there are none), as a float."""
    a = np.abs(np.asarray(x, dtype=np.float64))
    a = a[np.isfinite(a)]
    return float(a.max()) if a.size else 0.0


_EXPECTED: weakref.WeakKeyDictionary[Case, dict[bool, Expected]] = weakref.WeakKeyDictionary()


def expected(case: Case, grads: bool) -> Expected:
    """The oracle, the baseline and the oracle's noise for ``case`` (with dq, dk, dv when
    ``grads`` and the case is attention); computed once per (case, grads)."""
    grads = grads and case.kind == "attention"
    per_case = _EXPECTED.setdefault(case, {})
    if grads not in per_case:
        if case.kind == "softmax":
            oracle, base = _softmax_answers(case.inputs["x"], case.options)
        else:
            oracle, base = _attention_answers(case.inputs, case.options, grads)
        per_case[grads] = Expected(oracle, base, _oracle_noise(case, oracle, grads))
    return per_case[grads]


def _softmax_answers(x: np.ndarray, opts: Mapping[str, Any]) -> tuple[Answer, Answer]:
    oracle = softmax(x.astype(np.float64), **opts)
    base_opts = {k: v for k, v in opts.items() if k != "where"}
    with np.errstate(all="ignore"):
        if "where" in opts:  # the textbook formula with masked entries set to -inf
            base = naive.softmax(np.where(opts["where"], x, x.dtype.type(-np.inf)), **base_opts)
        else:
            base = naive.softmax(x, **base_opts)
    return Answer(np.asarray(oracle)), Answer(np.asarray(base))


def _attention_answers(inputs: Mapping[str, np.ndarray], opts: Mapping[str, Any],
                       grads: bool) -> tuple[Answer, Answer]:
    q, k, v = (inputs[n] for n in ("q", "k", "v"))
    dout = inputs.get("dout")
    answers = []
    for upcast in (True, False):
        with np.errstate(all="ignore"):
            out, lse = attention_reference(q, k, v, upcast=upcast, return_lse=True, **opts)
            g = (tuple(attention_reference_backward(dout, q, k, v, upcast=upcast, **opts)[:3])
                 if grads else None)
        answers.append(Answer(np.asarray(out), g, np.asarray(lse)))
    return answers[0], answers[1]


def _kappa(case: Case, scale: float) -> float:
    """The condition number of an attention case (module docstring)."""
    q, k = (np.nan_to_num(np.abs(case.inputs[n].astype(np.float64)), nan=0.0, posinf=0.0)
            for n in ("q", "k"))
    k = np.repeat(k, q.shape[1] // k.shape[1], axis=1)  # GQA: each query head's kv head
    kappa = 1.0 + abs(scale) * float((q @ k.swapaxes(-1, -2)).max(initial=0.0))
    if case.options.get("bias") is not None:
        kappa += finite_max(case.options["bias"])
    return kappa


def _oracle_noise(case: Case, oracle: Answer, grads: bool) -> dict[str, float]:
    """eps64 * kappa * T per quantity (module docstring)."""
    if case.kind == "softmax":
        return {"out": EPS64 * finite_max(oracle.out)}
    q, k, v = (case.inputs[n] for n in ("q", "k", "v"))
    scale = attention_scale(q, k, v, case.options)
    terms = {"out": finite_max(v)}  # out = P V: sum_j p_ij |v_j| <= max|v|
    if grads:
        dout64 = np.nan_to_num(case.inputs["dout"].astype(np.float64))
        with np.errstate(all="ignore"):
            # P^T |dO| (the terms of dv) and P^T 1 (column sums of P, grouped like dk).
            abs_dv = attention_reference_backward(np.abs(dout64), q, k, v, **case.options)[2]
            colsum = attention_reference_backward(np.ones_like(dout64), q, k, v,
                                                  **case.options)[2]
        # dS_ij = p_ij (dO_i . v_j - dO_i . o_i): terms up to 2 p_ij |dO_i|_1 max|v|.
        ds_terms = 2.0 * abs(scale) * float(np.abs(dout64).sum(-1).max()) * finite_max(v)
        terms["dv"] = finite_max(abs_dv)
        terms["dq"] = ds_terms * finite_max(k)  # dq_i = scale sum_j dS_ij k_j
        terms["dk"] = ds_terms * finite_max(q) * finite_max(colsum)  # sum_i dS_ij q_i
    kappa = _kappa(case, scale)
    return {label: EPS64 * kappa * t for label, t in terms.items()}
