"""The programmable-attention battery cases: the oracle takes them, a correctly rounded
kernel passes them, and a kernel that ignores the mods fails every one."""

import dataclasses

import numpy as np
import pytest

from flashmath.attention.reference import attention_reference, attention_reference_backward
from flashmath.conformance import ATTENTION_OPTIONS, as_kernel, run_case
from flashmath.conformance.mod_cases import MOD_OPTIONS, mod_cases

CASES = mod_cases(("float32", "bfloat16"))


def _kernel(forward, backward):
    base = as_kernel((forward, backward))
    return dataclasses.replace(base, supports=ATTENTION_OPTIONS | MOD_OPTIONS)


def _rounded(q, k, v, **opts):
    return attention_reference(q, k, v, **opts).astype(q.dtype)


def _rounded_backward(dout, q, k, v, **opts):
    return tuple(g.astype(q.dtype) for g in attention_reference_backward(dout, q, k, v, **opts))


def _ignoring_mods(q, k, v, mask_mod=None, score_mod=None, **opts):
    return _rounded(q, k, v, **opts)


def _ignoring_mods_backward(dout, q, k, v, mask_mod=None, score_mod=None, **opts):
    return _rounded_backward(dout, q, k, v, **opts)


def test_every_library_mod_has_cases_that_declare_what_they_need():
    names = {c.name for c in CASES}
    assert len(names) == 12 and len(CASES) == 24
    for case in CASES:
        assert case.requires & MOD_OPTIONS
        assert set(case.options) - {"mask_mod", "score_mod"} <= case.requires
        assert not case.inputs["q"].flags.writeable
    assert mod_cases(("float32", "bfloat16")) is CASES  # the same objects every call


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_a_correctly_rounded_kernel_passes_and_one_ignoring_the_mods_fails(case):
    good = run_case(_kernel(_rounded, _rounded_backward), case, grads=True)
    assert good.passed, good.message
    bad = run_case(_kernel(_ignoring_mods, _ignoring_mods_backward), case, grads=True)
    assert bad.verdict == "FAIL", bad.message


def test_a_kernel_not_declaring_the_mods_is_skipped():
    result = run_case(as_kernel((_rounded, _rounded_backward)), CASES[0])
    assert result.verdict == "SKIP" and "mask_mod" in result.message
    assert np.isfinite(CASES[0].inputs["q"]).all()


def test_flashmath_passes_every_mod_case_with_gradients():
    """The library's mods, alone and with causal/GQA/lengths, through the tiled kernel."""
    from flashmath.conformance.kernels import load_target
    from flashmath.conformance.mod_cases import mod_cases

    kernel = load_target("flashmath", "attention")
    failed = [(r.case, r.dtype, r.message) for case in mod_cases()
              for r in [run_case(kernel, case, grads=True)] if not r.passed]
    assert failed == []
