"""The accuracy rule of DESIGN.md, measured: flashmath's error next to the naive same-dtype error.

For an attention implementation in a dtype, the rule compares its max error against the
float64 oracle with the max error of the naive formula computed in that same dtype
(``attention_reference(..., upcast=False)``): at most 2x for the output, 3x for the
gradients (FlashAttention's rule). flashmath aims at 1x. Both are measured on the same
inputs, already rounded to the dtype, so only the arithmetic differs.

:func:`accuracy_rule` measures one case; tests and the lab aggregate the records
(e.g. how often the ratio is <= 1).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flashmath.attention.reference import attention_reference, attention_reference_backward
from flashmath.attention.tiled import flash_attention, flash_attention_backward
from flashmath.dtypes import as_dtype, dtype_name

__all__ = ["FORWARD_FACTOR", "GRADIENT_FACTOR", "accuracy_rule"]

#: The rule's factors: flashmath's max error <= factor * the naive same-dtype max error.
FORWARD_FACTOR = 2.0
GRADIENT_FACTOR = 3.0


def _max_err(x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(x.astype(np.float64) - ref), initial=0.0))


def _ratio(err: float, base: float) -> float:
    """err / base; 0 when both are 0 (both exact), inf when only the baseline is exact."""
    if base == 0:
        return 0.0 if err == 0 else float("inf")
    return err / base


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
    """One case of the accuracy rule: errors and ratios, JSON-ready.

    q, k, v (and dout, when given, for the gradients) are rounded to ``dtype`` first; the
    oracle, the naive same-dtype reference and flash_attention then see the same values.
    ``options`` are the attention options (causal, window, mask, bias, lengths, ...).

    Returns a dict with, for each checked quantity x in out (and dq, dk, dv with dout):
    ``x_err`` (flashmath's max abs error against the float64 oracle), ``x_naive_err``
    (the naive same-dtype reference's), ``x_ratio`` (their quotient), and
    ``passes`` (every out ratio <= 2 and gradient ratio <= 3), ``at_or_below_1x``
    (every ratio <= 1), ``dtype``.
    """
    dt = as_dtype(dtype)
    q, k, v = (np.asarray(x).astype(dt) for x in (q, k, v))
    ref = np.asarray(attention_reference(q, k, v, upcast=True, **options))
    naive = np.asarray(attention_reference(q, k, v, upcast=False, **options))
    out, lse = flash_attention(q, k, v, block_q=block_q, block_k=block_k, return_lse=True,
                               **options)
    rec: dict[str, Any] = {"dtype": dtype_name(dt)}
    checks = [("out", out, naive, ref, FORWARD_FACTOR)]
    if dout is not None:
        do = np.asarray(dout).astype(dt)
        grads = flash_attention_backward(do, q, k, v, out, lse, block_q=block_q,
                                         block_k=block_k, **options)
        ref_g = attention_reference_backward(do, q, k, v, upcast=True, **options)
        naive_g = attention_reference_backward(do, q, k, v, upcast=False, **options)
        checks += [
            (name, g, n, r, GRADIENT_FACTOR)
            for name, g, n, r in zip(("dq", "dk", "dv"), grads, naive_g, ref_g, strict=True)
        ]
    passes, below = True, True
    for name, got, base, exact, factor in checks:
        err, base_err = _max_err(got, exact), _max_err(base, exact)
        ratio = _ratio(err, base_err)
        rec |= {f"{name}_err": err, f"{name}_naive_err": base_err, f"{name}_ratio": ratio}
        passes &= ratio <= factor
        below &= ratio <= 1
    rec |= {"passes": passes, "at_or_below_1x": below}
    return rec
