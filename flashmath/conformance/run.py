"""Conformance testing for any softmax or attention kernel: the oracle, the adversarial
battery and FlashAttention's accuracy rule, as a library (``flashmath check`` is its command).

Use it in your own tests::

    from flashmath.testing import assert_attention_close, attention_battery, run_case

    def test_my_kernel_matches_the_oracle():
        assert_attention_close(my_attention, q, k, v, causal=True, grads=True)

    @pytest.mark.parametrize("case", attention_battery(), ids=lambda c: c.id)
    def test_my_kernel_on_the_battery(case):
        result = run_case(my_kernel, case)
        if result.verdict == "SKIP":
            pytest.skip(result.message)
        assert result.passed, result.message

The accuracy rule (DESIGN.md, after flash-attention's tests)
-------------------------------------------------------------
For inputs of a given dtype, three answers are computed:

- the **oracle**: float64 arithmetic on the very same (already rounded) inputs --
  ``fm.softmax`` on the float64 copy, ``fm.attention_reference(upcast=True)`` and
  ``attention_reference_backward(upcast=True)``;
- the **baseline**: the naive formula computed in the input dtype -- ``fm.naive.softmax``,
  ``fm.attention_reference(upcast=False)`` -- the error a plain implementation in that
  dtype makes;
- the **impl**'s answer.

Errors are max absolute differences against the oracle over the elements where the oracle
is finite. The impl passes when ``max_error <= limit * reference_error`` with ``limit`` 2 for
the forward output and 3 for gradients, where

    reference_error = max(baseline_error, floor)   if the baseline is finite there,
    reference_error = floor                        if the baseline overflowed or is NaN,
    floor = FLOOR_ULPS * (eps(dtype) * max|oracle| + eps(float64) * kappa * T),

and ``ratio = max_error / reference_error``. ``FLOOR_ULPS`` is 1: an error within 2 ulps of
the dtype (relative to the largest finite magnitude of the oracle) always passes, however
lucky the baseline was -- a correctly rounded result is off by half an ulp. The floor is
needed twice: where the baseline is exact (error 0, so 2x of it would demand
bit-exactness) and where the baseline broke -- a baseline that overflowed never loosens
the rule, it *tightens* it to the floor.

The second term is what the float64 oracle itself may be off by. ``kappa`` is the
problem's condition number: 1 for softmax (the max shift keeps its absolute error at an
ulp or two); for attention ``1 + max_ij scale * sum_d |q_id||k_jd| + max|bias|``, the
rounding error of the scores in units of eps (an error of one ulp in a score is a relative
error of that size in its probability). ``T`` is the magnitude of the terms the quantity
sums: max|oracle| for softmax; for attention max|v| (out), max(P^T |dout|) (dv), and for
dq / dk the bound ``2 scale max_i |dout_i|_1 max|v|`` on dS = P * (dP - delta) times max|k|
(dq) or max|q| times the largest column sum of P (dk) -- gradients cancel, so their own
magnitude is no measure of their rounding. The term matters only for float64 inputs, where
the oracle is no more precise than the impl and the baseline *is* the oracle's algorithm
(its error is 0): there the floor is the whole rule.

NaN policy (DESIGN.md): where the oracle is finite the impl must be finite; where it is
NaN (a row with NaN or +inf input) the impl must be NaN; rows with nothing to attend to
(all -inf, fully masked: the oracle's lse is -inf) must be exactly zero, and so must their
query gradients. A breach fails the case whatever the error.

Implementations
---------------
An impl is a callable ``impl(x, **options)`` (softmax) or ``impl(q, k, v, **options)``
(attention) returning the output (a tuple ``(out, ...)`` is accepted; the rest is ignored).
Only the options a case uses are passed, so ``def attn(q, k, v)`` runs every case that
needs none. Options and their names (the ``requires`` of a :class:`Case`):

- softmax: ``axis`` (an int other than -1 is passed), ``where`` (boolean, True = keep).
- attention keyword options, as :func:`flashmath.attention_reference` takes them:
  ``causal`` (``causal=True``, bottom-right aligned), ``window``, ``mask``, ``bias``,
  ``kv_lengths``, ``q_lengths``, ``softcap``, ``scale``; and three capabilities that are
  not keywords: ``causal_top_left`` (``causal="top_left"`` with Sq != Sk), ``gqa``
  (k and v with fewer heads than q) and ``dv`` (v with a head dim other than q's).

What an impl supports comes from, in this order: :func:`declare`; attributes ``supports``,
``dtypes``, ``backend``, ``backward`` on the callable or object; else its signature (a
keyword parameter named like an option means it is supported; the three capabilities must
be declared). Cases needing anything else, or a dtype the impl does not declare, are
reported ``SKIP`` with the reason -- never passed.

Arrays cross the boundary in the impl's ``backend``: ``"numpy"`` (NumPy arrays; bfloat16 as
``ml_dtypes.bfloat16``) or ``"torch"`` (tensors on ``device``; torch is imported only then).
The default is ``"torch"`` for callables defined in a ``torch`` module and ``"numpy"``
otherwise. Outputs may be either kind.

Gradients (``grads=True``, attention): torch impls are differentiated with autograd
(``out.backward(dout)``). NumPy impls need a backward: ``declare(fwd, backward=bwd)``, a
pair ``(fwd, bwd)``, or an object with ``__call__`` and ``backward``; it is called as
``backward(dout, q, k, v, **options) -> (dq, dk, dv)`` with the same options as the
forward (a backward that needs the forward's out or lse recomputes or caches them). Without
one, grads cases are skipped.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import weakref
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from types import MappingProxyType
from typing import Any, Literal

import numpy as np

from flashmath import dtypes as _dt
from flashmath.attention.masks import alibi_bias
from flashmath.conformance.judge import FORWARD_FACTOR, GRADIENT_FACTOR

__all__ = [
    "ATTENTION_OPTIONS",
    "BATTERY_DTYPES",
    "FLOOR_ULPS",
    "GRAD_LIMIT",
    "OUT_LIMIT",
    "SEED_001",
    "SOFTMAX_OPTIONS",
    "Case",
    "CheckResult",
    "Kernel",
    "KernelSignatureError",
    "Kind",
    "as_kernel",
    "assert_attention_close",
    "assert_softmax_close",
    "attention_battery",
    "check_attention",
    "check_softmax",
    "compare_attention",
    "compare_softmax",
    "declare",
    "run_case",
    "softmax_battery",
    "validate_kernel",
]

#: The accuracy rule's limits: forward output, gradients (FlashAttention's 2x and 3x).
OUT_LIMIT = FORWARD_FACTOR
GRAD_LIMIT = GRADIENT_FACTOR
#: The floor, in ulps (see the module docstring).
FLOOR_ULPS = 1.0
_EPS64 = float(np.finfo(np.float64).eps)
#: The dtypes every battery case is made in.
BATTERY_DTYPES = ("float64", "float32", "float16", "bfloat16")

Kind = Literal["softmax", "attention"]
Verdict = Literal["PASS", "FAIL", "SKIP", "ERROR"]

#: Softmax options an impl may support (passed only where a case uses them).
SOFTMAX_OPTIONS = frozenset({"axis", "where"})
#: Attention keyword options, as fm.attention_reference names them.
ATTENTION_KEYWORDS = frozenset(
    {"causal", "window", "mask", "bias", "kv_lengths", "q_lengths", "softcap", "scale"}
)
#: Attention options: the keywords plus three capabilities that must be declared.
ATTENTION_OPTIONS = ATTENTION_KEYWORDS | {"causal_top_left", "gqa", "dv"}


# =========================================================================== data


@dataclass(frozen=True, eq=False)
class Case:
    """One named adversarial input, as data.

    name: what it is ("large positive", "causal Sq > Sk", ...); with ``dtype`` it is unique.
    kind: "softmax" or "attention".
    dtype: the inputs' dtype name ("float64", "float32", "float16", "bfloat16").
    inputs: softmax ``{"x"}``; attention ``{"q", "k", "v", "dout"}`` (dout: the upstream
      gradient used when gradients are checked), NumPy arrays in ``dtype``.
    options: the keyword options the impl is called with (``axis``/``where``; ``causal``,
      ``mask``, ``scale``, ...), NumPy arrays where they are arrays.
    requires: the option names (see ``SOFTMAX_OPTIONS``/``ATTENTION_OPTIONS``) an impl must
      support to run the case.
    note: what the case probes, in a few words.
    """

    name: str
    kind: Kind
    dtype: str
    inputs: Mapping[str, np.ndarray]
    options: Mapping[str, Any] = field(default_factory=dict)
    requires: frozenset[str] = frozenset()
    note: str = ""

    @property
    def id(self) -> str:
        """``"name[dtype]"``: a pytest id."""
        return f"{self.name}[{self.dtype}]"


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one case; what ``flashmath check`` tabulates.

    verdict: "PASS", "FAIL" (accuracy rule or NaN policy broken), "ERROR" (the impl raised or
      returned the wrong shape) or "SKIP" (an option or dtype the impl does not support;
      ``message`` says which).
    max_error / baseline_error: max |impl - oracle| and max |baseline - oracle| over the
      elements where the oracle is finite (baseline_error is inf or nan when the baseline
      overflowed); for gradients, of the quantity with the worst ratio (``quantity``).
    ratio: max_error / max(baseline_error, floor) (just floor when the baseline broke).
    limit: the ratio allowed (2 forward, 3 gradients). floor: see the module docstring.
    nan_policy_ok: no NaN/inf where the oracle is finite, NaN where it is NaN, zeros in
      fully masked rows. None when the impl did not run.
    worst: the worst element, e.g. "out[0, 1, 3, 7]". message: one paragraph for a human.
    """

    case: str
    dtype: str
    verdict: Verdict
    max_error: float | None = None
    baseline_error: float | None = None
    ratio: float | None = None
    nan_policy_ok: bool | None = None
    message: str = ""
    limit: float | None = None
    floor: float | None = None
    quantity: str | None = None
    worst: str | None = None
    requires: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return self.verdict == "PASS"

    def to_dict(self) -> dict[str, Any]:
        """Plain values for JSON (floats may be inf/nan: encode them as your writer does)."""
        return asdict(self) | {"requires": list(self.requires)}


@dataclass(frozen=True)
class Kernel:
    """An impl with what it supports (see the module docstring; made by :func:`declare`).

    forward: ``forward(x, **options)`` or ``forward(q, k, v, **options)``.
    supports: option names it handles. dtypes: dtype names it handles (None: every one).
    backend: "numpy" or "torch" (what its inputs are). device: torch device for inputs.
    backward: NumPy gradients, ``backward(dout, q, k, v, **options) -> (dq, dk, dv)``.
    """

    forward: Callable[..., Any]
    name: str = ""
    supports: frozenset[str] = frozenset()
    dtypes: frozenset[str] | None = None
    backend: Literal["numpy", "torch"] = "numpy"
    device: str = "cpu"
    backward: Callable[..., Any] | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)


class KernelSignatureError(TypeError):
    """The impl cannot be called the way the checker calls it (the message says how)."""


def declare(
    impl: Callable[..., Any] | None = None,
    *,
    supports: Iterable[str] | None = None,
    dtypes: Iterable[str] | None = None,
    backend: Literal["numpy", "torch"] | None = None,
    device: str | None = None,
    backward: Callable[..., Any] | None = None,
    name: str | None = None,
) -> Any:
    """Say what an impl supports: ``declare(fn, supports={"causal", "gqa"}, dtypes=...)``.

    Returns a :class:`Kernel`. Without ``impl`` it is a decorator (``@declare(supports=...)``).
    Anything not given is taken from the impl's attributes or signature (module docstring).
    ``supports`` names are checked against ``ATTENTION_OPTIONS | SOFTMAX_OPTIONS``, dtypes
    against flashmath's dtype names; an unknown one is a ValueError naming it.
    """
    if impl is None:
        return functools.partial(declare, supports=supports, dtypes=dtypes, backend=backend,
                                 device=device, backward=backward, name=name)
    base = as_kernel(impl)
    changes: dict[str, Any] = {}
    if supports is not None:
        wanted = frozenset(supports)
        unknown = wanted - ATTENTION_OPTIONS - SOFTMAX_OPTIONS
        if unknown:
            raise ValueError(f"supports: unknown option(s) {sorted(unknown)}; known: "
                             f"{sorted(ATTENTION_OPTIONS | SOFTMAX_OPTIONS)}")
        changes["supports"] = wanted
    if dtypes is not None:
        changes["dtypes"] = frozenset(_dt.dtype_name(_dt.as_dtype(d, name="dtypes"))
                                      for d in dtypes)
    if backend is not None:
        if backend not in ("numpy", "torch"):
            raise ValueError(f"backend: expected 'numpy' or 'torch', got {backend!r}")
        changes["backend"] = backend
    for key, value in (("device", device), ("backward", backward), ("name", name)):
        if value is not None:
            changes[key] = value
    return dataclasses.replace(base, **changes)


def as_kernel(impl: Any) -> Kernel:
    """A :class:`Kernel` for a Kernel, a callable, an object with ``__call__`` (and maybe
    ``backward``), or a pair ``(forward, backward)``."""
    if isinstance(impl, Kernel):
        return impl
    backward = None
    if isinstance(impl, tuple) and len(impl) == 2 and all(callable(f) for f in impl):
        impl, backward = impl
    if not callable(impl):
        raise TypeError(f"impl: expected a callable, a Kernel or a (forward, backward) pair, "
                        f"got {type(impl).__name__}")
    backward = backward or getattr(impl, "backward", None)
    supports = getattr(impl, "supports", None)
    dtypes = getattr(impl, "dtypes", None)
    module = getattr(impl, "__module__", None) or type(impl).__module__ or ""
    backend: Literal["numpy", "torch"] = getattr(impl, "backend", None) or (
        "torch" if module.split(".")[0] == "torch" else "numpy")
    name = getattr(impl, "__qualname__", None) or type(impl).__qualname__
    return Kernel(
        forward=impl,
        name=f"{module}:{name}" if module else name,
        supports=frozenset(supports) if supports is not None else _infer_supports(impl),
        dtypes=frozenset(dtypes) if dtypes is not None else None,
        backend=backend,
        device=getattr(impl, "device", None) or "cpu",
        backward=backward if callable(backward) else None,
    )


def _infer_supports(fn: Callable[..., Any]) -> frozenset[str]:
    """Keyword parameters of ``fn`` named like an option (``**kwargs`` tells nothing)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return frozenset()
    named = {p.name for p in params.values()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return frozenset(named & (ATTENTION_KEYWORDS | SOFTMAX_OPTIONS))


def validate_kernel(impl: Any, kind: Kind) -> Kernel:
    """The impl as a Kernel, after checking it can be called as the checker calls it.

    Raises KernelSignatureError when the forward does not take ``(x)`` / ``(q, k, v)``
    positionally, when a supported keyword option is not among its parameters (and it has
    no ``**kwargs``), or when a NumPy backward does not take ``(dout, q, k, v)``.
    Callables whose signature cannot be read (some builtins) are taken on trust.
    """
    kernel = as_kernel(impl)
    data = ("x",) if kind == "softmax" else ("q", "k", "v")
    keywords = kernel.supports & (SOFTMAX_OPTIONS if kind == "softmax" else ATTENTION_KEYWORDS)
    _check_call(kernel.forward, f"{kernel.name or 'impl'}", data, keywords)
    if kind == "attention" and kernel.backward is not None and kernel.backend == "numpy":
        _check_call(kernel.backward, f"{kernel.name or 'impl'}.backward",
                    ("dout", "q", "k", "v"), keywords)
    return kernel


def _check_call(fn: Callable[..., Any], label: str, data: tuple[str, ...],
                keywords: frozenset[str]) -> None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    try:
        sig.bind(*data)
    except TypeError as exc:
        raise KernelSignatureError(
            f"{label}{sig} cannot be called as f({', '.join(data)}): {exc}") from None
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return
    missing = sorted(k for k in keywords if k not in sig.parameters)
    if missing:
        raise KernelSignatureError(
            f"{label}{sig} is declared to support {missing} but takes no such keyword")


# =========================================================================== boundary


def _is_torch(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch" and hasattr(x, "detach")


def _to_numpy(x: Any) -> np.ndarray:
    """A NumPy array from an array or a torch tensor (bfloat16 -> ml_dtypes.bfloat16)."""
    if isinstance(x, (tuple, list)) and x and not isinstance(x[0], (int, float)):
        x = x[0]  # (out, lse, ...): the output
    if _is_torch(x):
        return _dt.from_torch(x)
    return np.asarray(x)


def _to_torch(x: Any, device: str, *, grad: bool = False) -> Any:
    if not isinstance(x, np.ndarray):
        return x
    t = _dt.to_torch(x, device=device, copy=True)  # a writable copy: battery arrays are read-only
    return t.requires_grad_(True) if grad else t


# =========================================================================== oracles


@dataclass(frozen=True)
class _Answer:
    """What the oracle or the baseline says: the output and, for attention, gradients."""

    out: np.ndarray
    grads: tuple[np.ndarray, ...] | None = None
    lse: np.ndarray | None = None


def _softmax_answers(x: np.ndarray, opts: Mapping[str, Any]) -> tuple[_Answer, _Answer]:
    import flashmath as fm

    oracle = fm.softmax(x.astype(np.float64), **opts)
    base_opts = {k: v for k, v in opts.items() if k != "where"}
    with np.errstate(all="ignore"):
        if "where" in opts:  # the textbook formula with masked entries set to -inf
            base = fm.naive.softmax(np.where(opts["where"], x, x.dtype.type(-np.inf)),
                                    **base_opts)
        else:
            base = fm.naive.softmax(x, **base_opts)
    return _Answer(np.asarray(oracle)), _Answer(np.asarray(base))


def _attention_answers(inputs: Mapping[str, np.ndarray], opts: Mapping[str, Any],
                       grads: bool) -> tuple[_Answer, _Answer]:
    import flashmath as fm
    from flashmath.attention.reference import attention_reference_backward

    q, k, v, dout = (inputs[n] for n in ("q", "k", "v", "dout"))
    answers = []
    for upcast in (True, False):
        with np.errstate(all="ignore"):
            out, lse = fm.attention_reference(q, k, v, upcast=upcast, return_lse=True, **opts)
            g = (tuple(attention_reference_backward(dout, q, k, v, upcast=upcast, **opts))
                 if grads else None)
        answers.append(_Answer(np.asarray(out), g, np.asarray(lse)))
    return answers[0], answers[1]


@dataclass(frozen=True)
class _Expected:
    """Everything about a case that does not depend on the impl (computed once per case)."""

    oracle: _Answer
    baseline: _Answer
    noise: dict[str, float]  # per quantity: what the float64 oracle itself may be off by


_EXPECTED: weakref.WeakKeyDictionary[Case, dict[bool, _Expected]] = weakref.WeakKeyDictionary()


def _expected(case: Case, grads: bool) -> _Expected:
    per_case = _EXPECTED.setdefault(case, {})
    if grads not in per_case:
        if case.kind == "softmax":
            oracle, base = _softmax_answers(case.inputs["x"], case.options)
        else:
            oracle, base = _attention_answers(case.inputs, case.options, grads)
        per_case[grads] = _Expected(oracle, base, _oracle_noise(case, oracle, grads))
    return per_case[grads]


# =========================================================================== judging


@dataclass(frozen=True)
class _Judged:
    label: str
    ok: bool
    policy_ok: bool
    max_error: float
    baseline_error: float
    floor: float
    ratio: float
    limit: float
    worst: str | None
    text: str


def _fmt(x: float) -> str:
    """An error or a ratio."""
    return f"{x:.6g}"


def _val(x: float) -> str:
    """A value: enough digits to tell float32 neighbours apart."""
    return f"{x:.9g}"


def _judge(label: str, got: np.ndarray, oracle: np.ndarray, base: np.ndarray, *,
           dtype: str, limit: float, noise: float, dead: np.ndarray | None) -> _Judged:
    """Apply the NaN policy and the accuracy rule to one quantity (out, dq, dk or dv)."""
    g = got.astype(np.float64)
    o = oracle.astype(np.float64)
    b = base.astype(np.float64)
    finite = np.isfinite(o)
    # --- NaN policy: finite where the oracle is, NaN where it is NaN, zeros in dead rows.
    bad = (finite & ~np.isfinite(g)) | (np.isnan(o) & ~np.isnan(g))
    bad |= np.isinf(o) & (g != o)
    if dead is not None:
        bad |= np.broadcast_to(dead, o.shape) & (g != 0)
    # --- accuracy against the oracle, over the elements where the oracle is finite.
    both = finite & np.isfinite(g)
    err = np.where(both, np.abs(g - o), 0.0)
    max_error = float(err.max()) if err.size else 0.0
    base_bad = finite & ~np.isfinite(b)
    if base_bad.any():
        baseline_error = math.nan if np.isnan(b[base_bad]).any() else math.inf
    else:
        baseline_error = float(np.where(finite, np.abs(b - o), 0.0).max()) if b.size else 0.0
    scale = float(np.abs(o[finite]).max()) if finite.any() else 0.0
    floor = FLOOR_ULPS * (float(_dt.finfo(dtype).eps) * scale + noise)
    reference = floor if not math.isfinite(baseline_error) else max(baseline_error, floor)
    if reference > 0:
        ratio = max_error / reference
    else:
        ratio = 0.0 if max_error == 0 else math.inf
    baseline_text = (f"the naive {dtype} baseline's max error is {_fmt(baseline_error)}"
                     if math.isfinite(baseline_error) else
                     f"the naive {dtype} baseline broke ({baseline_error}: it overflowed or "
                     f"produced NaN), so the floor {_fmt(floor)} stands in for it")
    policy_ok = not bad.any()
    if not policy_ok:
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        where = f"{label}{list(idx)}"
        gv, ov = g[idx], o[idx]
        if dead is not None and np.broadcast_to(dead, o.shape)[idx]:
            why = "a row with nothing to attend to must be exactly zero"
        elif np.isnan(ov):
            why = "the input row holds NaN or +inf, so this row must be NaN"
        else:
            why = "NaN/inf where the oracle is finite"
        text = (f"NaN policy broken at {where}: the impl gives {_val(gv)} where the float64 "
                f"oracle says {_val(ov)} ({why}); {int(bad.sum())} element(s) break it. "
                f"Max error elsewhere {_fmt(max_error)}, {baseline_text}, ratio {_fmt(ratio)}.")
        return _Judged(label, False, False, max_error, baseline_error, floor, ratio, limit,
                       where, text)
    worst: str | None = None
    at = "the output is empty"
    if err.size:
        idx = tuple(int(i) for i in np.unravel_index(int(np.argmax(err)), err.shape))
        worst = f"{label}{list(idx)}"
        at = (f"at {worst} the impl gives {_val(g[idx])} where the float64 oracle says "
              f"{_val(o[idx])}")
    ok = ratio <= limit
    verdict = "breaks" if not ok else "meets"
    text = (f"{label}: {verdict} the accuracy rule: max error {_fmt(max_error)} ({at}); "
            f"{baseline_text}; ratio {_fmt(ratio)} {'>' if not ok else '<='} {limit:g}.")
    return _Judged(label, ok, True, max_error, baseline_error, floor, ratio, limit, worst, text)


def _result(case: Case, judged: list[_Judged]) -> CheckResult:
    """One row from the per-quantity judgements: the first policy breach, else the worst ratio."""
    breach = [j for j in judged if not j.policy_ok]
    worst = breach[0] if breach else max(judged, key=lambda j: (not j.ok, j.ratio))
    ok = all(j.ok for j in judged)
    prefix = f"{case.kind} case {case.name!r} [{case.dtype}]: "
    return CheckResult(
        case=case.name, dtype=case.dtype, verdict="PASS" if ok else "FAIL",
        max_error=worst.max_error, baseline_error=worst.baseline_error, ratio=worst.ratio,
        nan_policy_ok=not breach, message=prefix + worst.text, limit=worst.limit,
        floor=worst.floor, quantity=worst.label, worst=worst.worst,
        requires=tuple(sorted(case.requires)))


def _skip_or_error(case: Case, verdict: Verdict, message: str) -> CheckResult:
    prefix = f"{case.kind} case {case.name!r} [{case.dtype}]: "
    return CheckResult(case=case.name, dtype=case.dtype, verdict=verdict,
                       message=prefix + message, requires=tuple(sorted(case.requires)))


def _finite_max(x: Any) -> float:
    a = np.abs(np.asarray(x, dtype=np.float64))
    a = a[np.isfinite(a)]
    return float(a.max()) if a.size else 0.0


def _kappa(case: Case) -> float:
    """The condition number of the case (module docstring): 1 for softmax; for attention
    1 + max_ij scale * sum_d |q_id| |k_jd| (+ max|bias|), the size of the scores' rounding
    error in units of eps."""
    if case.kind == "softmax":
        return 1.0
    q, k = (np.nan_to_num(np.abs(case.inputs[n].astype(np.float64)), nan=0.0, posinf=0.0)
            for n in ("q", "k"))
    k = np.repeat(k, q.shape[1] // k.shape[1], axis=1)  # GQA: each query head's kv head
    kappa = 1.0 + abs(_scale(case)) * float((q @ k.swapaxes(-1, -2)).max(initial=0.0))
    if case.options.get("bias") is not None:
        kappa += _finite_max(case.options["bias"])
    return kappa


def _scale(case: Case) -> float:
    scale = case.options.get("scale")
    return 1.0 / math.sqrt(case.inputs["q"].shape[-1]) if scale is None else float(scale)


def _oracle_noise(case: Case, oracle: _Answer, grads: bool) -> dict[str, float]:
    """What the float64 oracle itself may be off by, per quantity: eps64 * kappa * T, with
    T the magnitude of the terms the quantity sums (module docstring)."""
    kappa = _kappa(case)
    if case.kind == "softmax":
        return {"out": _EPS64 * _finite_max(oracle.out)}
    from flashmath.attention.reference import attention_reference_backward

    q, k, v, dout = (case.inputs[n] for n in ("q", "k", "v", "dout"))
    terms = {"out": _finite_max(v)}  # out = P V: sum_j p_ij |v_j| <= max|v|
    if grads:
        dout64 = np.nan_to_num(dout.astype(np.float64))
        with np.errstate(all="ignore"):
            # P^T |dO| (the terms of dv) and P^T 1 (column sums of P, grouped like dk).
            abs_dv = attention_reference_backward(np.abs(dout64), q, k, v, **case.options)[2]
            colsum = attention_reference_backward(np.ones_like(dout64), q, k, v,
                                                  **case.options)[2]
        # dS_ij = p_ij (dO_i . v_j - dO_i . o_i): terms up to 2 p_ij |dO_i|_1 max|v|.
        ds_terms = 2.0 * abs(_scale(case)) * float(np.abs(dout64).sum(-1).max()) * _finite_max(v)
        terms["dv"] = _finite_max(abs_dv)
        terms["dq"] = ds_terms * _finite_max(k)  # dq_i = scale sum_j dS_ij k_j
        terms["dk"] = ds_terms * _finite_max(q) * _finite_max(colsum)  # sum_i dS_ij q_i
    return {label: _EPS64 * kappa * t for label, t in terms.items()}


# =========================================================================== running


def _skip_reason(kernel: Kernel, case: Case, grads: bool) -> str | None:
    missing = sorted(case.requires - kernel.supports)
    if missing:
        return f"needs {', '.join(missing)} (not declared by the impl)"
    if kernel.dtypes is not None and case.dtype not in kernel.dtypes:
        return f"dtype {case.dtype} not declared by the impl"
    if grads and kernel.backend == "numpy" and kernel.backward is None:
        return "no backward: declare(impl, backward=...) or use a torch impl"
    return None


def _call_forward(kernel: Kernel, case: Case) -> np.ndarray:
    if case.kind == "softmax":
        data = [case.inputs["x"]]
    else:
        data = [case.inputs[n] for n in ("q", "k", "v")]
    if kernel.backend == "torch":
        tdata = [_to_torch(a, kernel.device) for a in data]
        topts = {k: _to_torch(v, kernel.device) for k, v in case.options.items()}
        return _to_numpy(kernel.forward(*tdata, **topts))
    return _to_numpy(kernel.forward(*(a.copy() for a in data), **_copied(case.options)))


def _copied(options: Mapping[str, Any]) -> dict[str, Any]:
    """The options with writable copies of their arrays (battery arrays are read-only)."""
    return {k: v.copy() if isinstance(v, np.ndarray) else v for k, v in options.items()}


def _call_with_grads(kernel: Kernel, case: Case) -> tuple[np.ndarray, list[np.ndarray]]:
    q, k, v, dout = (case.inputs[n] for n in ("q", "k", "v", "dout"))
    opts = _copied(case.options)
    if kernel.backend == "torch":
        tq, tk, tv = (_to_torch(a, kernel.device, grad=True) for a in (q, k, v))
        topts = {key: _to_torch(val, kernel.device) for key, val in opts.items()}
        out = kernel.forward(tq, tk, tv, **topts)
        out = out[0] if isinstance(out, (tuple, list)) else out
        if not getattr(out, "requires_grad", False):
            raise TypeError("the torch impl's output does not require grad: it is not "
                            "differentiable by autograd")
        out.backward(_to_torch(dout, kernel.device))
        grads = [t.grad if t.grad is not None else t.detach() * 0 for t in (tq, tk, tv)]
        return _to_numpy(out), [_to_numpy(g) for g in grads]
    assert kernel.backward is not None
    out = _to_numpy(kernel.forward(q.copy(), k.copy(), v.copy(), **opts))
    grads = kernel.backward(dout.copy(), q.copy(), k.copy(), v.copy(), **opts)
    return out, [_to_numpy(g) for g in grads]


def _dead_rows(case: Case, oracle: _Answer) -> np.ndarray | None:
    """Rows with nothing to attend to: zeros by policy (a mask broadcastable to out)."""
    if case.kind == "softmax":
        x = case.inputs["x"].astype(np.float64)
        axis = case.options.get("axis", -1)
        keep = ~np.isneginf(x)
        if "where" in case.options:
            keep &= np.asarray(case.options["where"], dtype=bool)
        return ~np.any(keep, axis=axis, keepdims=True)
    assert oracle.lse is not None
    return np.isneginf(oracle.lse)[..., None]


def run_case(impl: Any, case: Case, *, grads: bool = False, catch: bool = True) -> CheckResult:
    """Run ``impl`` on one battery case and judge it (never raises for the impl's sake
    unless ``catch=False``: then the impl's own exception propagates).

    ``grads`` applies to attention: out, dq, dk and dv are each judged (3x for gradients)
    and the row reports the worst of them.
    """
    kernel = as_kernel(impl)
    grads = grads and case.kind == "attention"
    reason = _skip_reason(kernel, case, grads)
    if reason:
        return _skip_or_error(case, "SKIP", reason)
    expected = _expected(case, grads)
    oracle, base = expected.oracle, expected.baseline
    try:
        with np.errstate(all="ignore"):
            if grads:
                out, got_grads = _call_with_grads(kernel, case)
            else:
                out, got_grads = _call_forward(kernel, case), []
    except Exception as exc:
        if not catch:
            raise
        return _skip_or_error(case, "ERROR", f"the impl raised {type(exc).__name__}: {exc}")
    quantities = [("out", out, oracle.out, base.out)]
    if grads:
        assert oracle.grads is not None and base.grads is not None
        quantities += list(zip(("dq", "dk", "dv"), got_grads, oracle.grads, base.grads,
                               strict=True))
    for label, got, want, _ in quantities:
        if got.shape != want.shape:
            msg = f"{label} has shape {got.shape}, expected {want.shape}"
            if not catch:
                raise AssertionError(msg)
            return _skip_or_error(case, "ERROR", msg)
    dead = _dead_rows(case, oracle)
    judged = [
        _judge(label, got, want, b, dtype=case.dtype, noise=expected.noise[label],
               limit=OUT_LIMIT if label == "out" else GRAD_LIMIT,
               dead=dead if label in ("out", "dq") else None)
        for label, got, want, b in quantities
    ]
    return _result(case, judged)


def _battery_dtypes(dtypes: Iterable[str] | None) -> tuple[str, ...]:
    if dtypes is None:
        return BATTERY_DTYPES
    names = tuple(_dt.dtype_name(_dt.as_dtype(d, name="dtypes")) for d in dtypes)
    unknown = [n for n in names if n not in BATTERY_DTYPES]
    if unknown:
        raise ValueError(f"dtypes: the battery is made in {list(BATTERY_DTYPES)}, not {unknown}")
    return names


def check_softmax(impl: Any, *, dtypes: Iterable[str] | None = None) -> list[CheckResult]:
    """Run the whole softmax battery (optionally only some dtypes); one result per case."""
    kernel = validate_kernel(impl, "softmax")
    return [run_case(kernel, case) for case in softmax_battery(_battery_dtypes(dtypes))]


def check_attention(impl: Any, *, dtypes: Iterable[str] | None = None,
                    grads: bool = False) -> list[CheckResult]:
    """Run the whole attention battery (optionally only some dtypes, with gradients)."""
    kernel = validate_kernel(impl, "attention")
    return [run_case(kernel, case, grads=grads)
            for case in attention_battery(_battery_dtypes(dtypes))]


# =========================================================================== one-off checks


def _custom_case(kind: Kind, inputs: dict[str, Any], options: Mapping[str, Any],
                 dtype: Any, name: str) -> Case:
    arrays = {n: _to_numpy(a) for n, a in inputs.items() if a is not None}
    target = _dt.as_dtype(dtype) if dtype is not None else None
    for n, a in arrays.items():
        if target is not None:
            arrays[n] = a.astype(target)
        else:
            arrays[n] = _dt.as_float_array(a, name=n)
    dt = _dt.dtype_name(arrays["x" if kind == "softmax" else "q"].dtype)
    opts = {k: (_to_numpy(v) if _is_torch(v) else v) for k, v in options.items() if v is not None}
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

    ``options`` are fm.attention_reference's (causal, window, mask, bias, kv_lengths,
    q_lengths, softcap, scale); None values are dropped. ``dout`` defaults to a fixed
    random tensor. Inputs are cast to ``dtype`` if given.
    """
    unknown = set(options) - ATTENTION_KEYWORDS
    if unknown:
        raise TypeError(f"options: unknown attention option(s) {sorted(unknown)}")
    qa = _to_numpy(q)
    if dout is None:
        shape = (*qa.shape[:-1], _to_numpy(v).shape[-1])
        dout = _rng("dout", name).standard_normal(shape)
    case = _custom_case("attention", {"q": q, "k": k, "v": v, "dout": dout}, options,
                        dtype if dtype is not None else qa.dtype, name)
    kernel = as_kernel(impl)
    if grads and kernel.backend == "numpy" and kernel.backward is None:
        raise TypeError("grads=True needs a backward for a NumPy impl: declare(impl, "
                        "backward=...), a (forward, backward) pair, or a torch impl")
    return run_case(kernel, case, grads=grads, catch=True)


def _raise_unless_passed(result: CheckResult) -> None:
    if not result.passed:
        raise AssertionError(result.message)


def assert_softmax_close(impl: Any, x: Any, *, axis: int = -1, where: Any = None,
                         dtype: Any = None) -> CheckResult:
    """Assert that ``impl`` meets the accuracy rule and the NaN policy on ``x`` (see the
    module docstring); the AssertionError names the worst element, its value, the oracle's,
    the baseline's error and the ratio. Returns the CheckResult when it passes."""
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


# =========================================================================== the batteries


def _rng(*key: str) -> np.random.Generator:
    """A generator seeded by the case's name: every battery is the same on every machine."""
    return np.random.default_rng(zlib.crc32("/".join(key).encode()))


def _freeze(d: Mapping[str, Any]) -> Mapping[str, Any]:
    for value in d.values():
        if isinstance(value, np.ndarray):
            value.setflags(write=False)
    return MappingProxyType(dict(d))


#: Seed 001's battery (the tense-classification logits; "verb vocabulary" is 600 zeros).
SEED_001 = (
    ("small magnitudes", [0.1, 0.2, 0.3, 0.4, 0.5]),
    ("mixed magnitudes", [-3.0, 0.0, 1.0, 2.0, 5.0]),
    ("large positive", [1.0, 92.0, 3.0, 0.0, 2.0]),
    ("large negative", [-100.0, -200.0, -300.0, -400.0, -500.0]),
    ("all identical", [5.0, 5.0, 5.0, 5.0, 5.0]),
    ("masked entry", [1.0, -np.inf, 3.0, 0.0, 2.0]),
    ("single element", [42.0]),
    ("verb vocabulary", [0.0] * 600),
)


def _softmax_specs(dtype: str) -> list[tuple[str, np.ndarray, dict[str, Any], str]]:
    """(name, x in float64, options, note) for one dtype."""
    import flashmath as fm

    inf, nan = np.inf, np.nan
    over = float(fm.overflow_threshold(dtype))
    under = float(fm.underflow_threshold(dtype))
    specs: list[tuple[str, np.ndarray, dict[str, Any], str]] = [
        (name, np.array(x), {}, "seed 001") for name, x in SEED_001
    ]
    specs += [
        ("above overflow threshold", 2 * over + np.array([0.0, -1.0, -2.0, -3.0, -8.0]), {},
         f"max = 2x overflow_threshold({dtype}) = {2 * over:.6g}: exp overflows"),
        ("below underflow threshold", 2 * under + np.array([0.0, -1.0, -2.0, -3.0, -8.0]), {},
         f"every entry < underflow_threshold({dtype}) = {under:.6g}: exp underflows to 0"),
        ("all -inf", np.full(5, -inf), {}, "nothing to attend to: zeros"),
        ("fully masked row in a batch",
         np.array([[1.0, 2.0, 3.0], [-inf, -inf, -inf], [0.0, -inf, 5.0]]), {},
         "the -inf row gives zeros, the others are untouched"),
        ("NaN in a row", np.array([[1.0, nan, 2.0], [1.0, 2.0, 3.0]]), {},
         "that row NaN, the other untouched"),
        ("+inf in a row", np.array([[1.0, inf, 2.0], [1.0, 2.0, 3.0]]), {},
         "that row NaN (inf - inf), the other untouched"),
        ("long row", 3.0 * _rng("softmax", "long row").standard_normal(8192), {},
         "8192 entries: summation error"),
        ("batched 3-D", 5.0 * _rng("softmax", "3-D").standard_normal((2, 3, 7)), {},
         "softmax over the last axis of a (2, 3, 7) array"),
        ("axis 0", 4.0 * _rng("softmax", "axis 0").standard_normal((7, 3)), {"axis": 0},
         "softmax over axis 0"),
        ("where mask", np.array([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]),
         {"where": np.array([[True, False, True, True], [False, False, False, False]])},
         "where=False entries get 0; a row with nothing left gives zeros"),
    ]
    return specs


@functools.cache
def _softmax_battery(dtypes: tuple[str, ...]) -> tuple[Case, ...]:
    cases = []
    for dtype in dtypes:
        dt = _dt.as_dtype(dtype)
        for name, x, options, note in _softmax_specs(dtype):
            with np.errstate(over="ignore"):
                xd = x.astype(dt)
            cases.append(Case(name=name, kind="softmax", dtype=dtype,
                              inputs=_freeze({"x": xd}), options=_freeze(options),
                              requires=frozenset(options) & SOFTMAX_OPTIONS, note=note))
    return tuple(cases)


def softmax_battery(dtypes: Iterable[str] = BATTERY_DTYPES) -> tuple[Case, ...]:
    """The named adversarial softmax cases, in each of ``dtypes``: seed 001's eight, exp
    overflow and underflow at the dtype's own thresholds (fm.overflow_threshold /
    fm.underflow_threshold), all -inf and fully masked rows, NaN and +inf rows, a long row,
    N-d input, another axis and a ``where`` mask. Arrays are read-only; the same objects are
    returned on every call."""
    return _softmax_battery(tuple(dtypes))


@dataclass(frozen=True)
class _AttnSpec:
    name: str
    note: str
    # B, H, H_kv, Sq, Sk, D, Dv
    shape: tuple[int, int, int, int, int, int, int] = (1, 2, 2, 16, 16, 16, 16)
    options: Callable[[np.random.Generator], dict[str, Any]] = lambda _rng: {}
    requires: frozenset[str] = frozenset()
    # Scale q so the largest |score| becomes this multiple of a threshold of the dtype.
    logits: Literal["overflow", "underflow"] | None = None
    nan_query: bool = False


def _spec(name: str, note: str, *, B: int = 1, H: int = 2, Hkv: int | None = None,
          Sq: int = 16, Sk: int = 16, D: int = 16, Dv: int | None = None,
          options: Callable[[np.random.Generator], dict[str, Any]] | None = None,
          requires: Iterable[str] = (), **extra: Any) -> _AttnSpec:
    shape = (B, H, Hkv or H, Sq, Sk, D, Dv or D)
    return _AttnSpec(name, note, shape, options or (lambda _rng: {}), frozenset(requires),
                     **extra)


def _mask_with_dead_row(rng: np.random.Generator) -> dict[str, Any]:
    mask = rng.random((1, 1, 16, 16)) < 0.6
    mask[..., 5, :] = False  # query 5 sees nothing
    return {"mask": mask}


ATTENTION_SPECS: tuple[_AttnSpec, ...] = (
    _spec("basic", "B=2, H=2, S=16, D=16", B=2),
    _spec("Sq < Sk", "5 queries, 37 keys", Sq=5, Sk=37),
    _spec("Sq > Sk", "37 queries, 5 keys", Sq=37, Sk=5),
    _spec("single key", "Sk = 1: every probability is 1", Sk=1),
    _spec("single query", "Sq = 1 (decoding)", Sq=1, Sk=33),
    _spec("odd head dim", "D = 33", D=33),
    _spec("head dim 1", "D = 1", D=1),
    _spec("GQA", "4 query heads over 2 kv heads", H=4, Hkv=2, requires={"gqa"}),
    _spec("MQA", "4 query heads over 1 kv head", H=4, Hkv=1, requires={"gqa"}),
    _spec("value head dim", "Dv = 24 != D = 16", Dv=24, requires={"dv"}),
    _spec("causal", "causal, Sq = Sk", options=lambda _r: {"causal": True},
          requires={"causal"}),
    _spec("causal Sq > Sk", "bottom-right causal: the first 12 queries see nothing (zeros)",
          Sq=20, Sk=8, options=lambda _r: {"causal": True}, requires={"causal"}),
    _spec("causal Sq < Sk", "bottom-right causal, 8 queries over 20 keys", Sq=8, Sk=20,
          options=lambda _r: {"causal": True}, requires={"causal"}),
    _spec("causal top-left Sq < Sk", "torch's alignment: query i sees keys 0..i", Sq=8, Sk=20,
          options=lambda _r: {"causal": "top_left"}, requires={"causal_top_left"}),
    _spec("sliding window", "window (3, 1)", options=lambda _r: {"window": (3, 1)},
          requires={"window"}),
    _spec("boolean mask", "random mask, query 5 fully masked (zeros)",
          options=_mask_with_dead_row, requires={"mask"}),
    _spec("ALiBi bias", "float bias, one slope per head",
          options=lambda _r: {"bias": alibi_bias(2, 16, 16)}, requires={"bias"}),
    _spec("padded keys", "kv_lengths = [16, 5]", B=2,
          options=lambda _r: {"kv_lengths": np.array([16, 5])}, requires={"kv_lengths"}),
    _spec("padded queries", "q_lengths = [16, 6]", B=2,
          options=lambda _r: {"q_lengths": np.array([16, 6])}, requires={"q_lengths"}),
    _spec("softcap", "softcap = 5 (s -> 5 tanh(s / 5)) on scores up to ~30",
          options=lambda _r: {"softcap": 5.0}, requires={"softcap"}, logits="overflow"),
    _spec("custom scale", "scale = 0.5 instead of 1/sqrt(D)",
          options=lambda _r: {"scale": 0.5}, requires={"scale"}),
    _spec("large logits", "max |score| = 3x the dtype's overflow threshold: exp overflows",
          logits="overflow"),
    _spec("large negative logits",
          "every score below 1.5x the dtype's underflow threshold: exp underflows to 0",
          logits="underflow"),
    _spec("long rows", "4 queries over 4096 keys: accumulation error", Sq=4, Sk=4096),
    _spec("NaN in a query", "q[0, 0, 3, 0] = NaN: that output row NaN, the rest untouched",
          nan_query=True),
)


def _attention_inputs(spec: _AttnSpec, dtype: str) -> tuple[dict[str, np.ndarray],
                                                            dict[str, Any]]:
    """q, k, v, dout and the options for one spec in one dtype (float64 before the cast)."""
    import flashmath as fm

    B, H, Hkv, Sq, Sk, D, Dv = spec.shape
    rng = _rng("attention", spec.name)
    q = rng.standard_normal((B, H, Sq, D))
    k = rng.standard_normal((B, Hkv, Sk, D))
    v = rng.standard_normal((B, Hkv, Sk, Dv))
    dout = rng.standard_normal((B, H, Sq, Dv))
    options = spec.options(rng)
    scale = options.get("scale", 1.0 / math.sqrt(D))
    if spec.logits == "overflow":
        # Scale q so that max |score| = 3x the exp overflow threshold of the dtype.
        kk = np.repeat(k, H // Hkv, axis=1)
        top = np.abs(scale * q @ kk.swapaxes(-1, -2)).max()
        q = q * (3.0 * float(fm.overflow_threshold(dtype)) / top)
    elif spec.logits == "underflow":
        # Keys all near -u, queries near c*u: every score near -c, below the underflow point.
        u = np.ones(D) / math.sqrt(D)
        c = 1.5 * abs(float(fm.underflow_threshold(dtype))) / scale
        q = c * u + 0.5 * rng.standard_normal((B, H, Sq, D))
        k = -u + 0.05 * rng.standard_normal((B, Hkv, Sk, D))
    if spec.nan_query:
        q[0, 0, 3, 0] = np.nan
    dt = _dt.as_dtype(dtype)
    inputs = {"q": q.astype(dt), "k": k.astype(dt), "v": v.astype(dt), "dout": dout.astype(dt)}
    if "bias" in options:
        options["bias"] = options["bias"].astype(dt)
    return inputs, options


@functools.cache
def _attention_battery(dtypes: tuple[str, ...]) -> tuple[Case, ...]:
    cases = []
    for dtype in dtypes:
        for spec in ATTENTION_SPECS:
            inputs, options = _attention_inputs(spec, dtype)
            cases.append(Case(name=spec.name, kind="attention", dtype=dtype,
                              inputs=_freeze(inputs), options=_freeze(options),
                              requires=spec.requires, note=spec.note))
    return tuple(cases)


def attention_battery(dtypes: Iterable[str] = BATTERY_DTYPES) -> tuple[Case, ...]:
    """The named adversarial attention cases, in each of ``dtypes``: Sq != Sk both ways, a
    single key or query, odd head dims, GQA/MQA, Dv != D, causal in both alignments
    (including bottom-right with Sq > Sk, whose first rows see nothing), a sliding window, a
    boolean mask with a fully masked row, an ALiBi bias, padded keys and queries, softcap, a
    custom scale, scores above the dtype's exp overflow threshold and below its underflow
    threshold, 4096-key rows, and a NaN query. Each case's ``requires`` names the options it
    needs. Arrays are read-only; the same objects are returned on every call."""
    return _attention_battery(tuple(dtypes))
