"""Kernels: what an impl supports, how the checker calls it, and the built-in adapters.

An impl is a callable ``impl(x, **options)`` (softmax) or ``impl(q, k, v, **options)``
(attention) returning the output (a tuple ``(out, ...)`` is accepted; the rest is ignored).
Only the options a case uses are passed, so ``def attn(q, k, v)`` runs every case that
needs none. Options and their names (the ``requires`` of a
:class:`~flashmath.conformance.cases.Case`):

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
``ml_dtypes.bfloat16``) or ``"torch"`` (tensors on ``device``, made by
:func:`flashmath.dtypes.to_torch`; torch is imported only then). The default is ``"torch"``
for callables defined in a ``torch`` module and ``"numpy"`` otherwise. Outputs may be
either kind.

Gradients (attention): torch impls are differentiated with autograd (``out.backward(dout)``).
NumPy impls need a backward: ``declare(fwd, backward=bwd)``, a pair ``(fwd, bwd)``, or an
object with ``__call__`` and ``backward``; it is called as
``backward(dout, q, k, v, **options) -> (dq, dk, dv)`` with the same options as the forward
(a backward that needs the forward's out or lse recomputes or caches them).

Targets (:func:`load_target`, what ``flashmath check`` runs): ``MODULE:FUNC``, or the
built-in ``flashmath``, ``torch`` and ``naive``: flashmath's softmax and tiled attention;
torch.softmax and :func:`sdpa` (torch's scaled_dot_product_attention with flashmath's
options); the textbook formulas without the max shift, which must fail the overflow cases.

Owns: :class:`Kernel`, :func:`declare`, :func:`as_kernel`, :func:`validate_kernel`, the
NumPy/torch boundary (:func:`answer`, :func:`to_numpy`), loading a target
(:func:`load_target`) and the built-in adapters.
May import: dtypes, softmax, attention, conformance.cases; torch lazily.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from flashmath import dtypes as _dt
from flashmath.attention import naive as naive_attention
from flashmath.attention.options import Causal, resolve
from flashmath.attention.tiled import flash_attention, flash_attention_backward
from flashmath.conformance.cases import (
    ATTENTION_KEYWORDS,
    ATTENTION_OPTIONS,
    SOFTMAX_OPTIONS,
    Case,
    Kind,
)
from flashmath.softmax import naive as naive_softmax
from flashmath.softmax.stable import softmax

__all__ = [
    "BUILTIN_TARGETS",
    "Kernel",
    "KernelSignatureError",
    "TargetError",
    "answer",
    "as_kernel",
    "declare",
    "flashmath_attention_backward",
    "is_torch",
    "load_target",
    "sdpa",
    "to_numpy",
    "torch_softmax",
    "validate_kernel",
]

#: The built-in targets of :func:`load_target`.
BUILTIN_TARGETS = ("flashmath", "torch", "naive")


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


class TargetError(Exception):
    """A ``flashmath check`` target cannot be imported or called: the message is one line."""


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
    ``backward``), or a pair ``(forward, backward)``; a TypeError for anything else."""
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


# --------------------------------------------------------------------------- the boundary


def is_torch(x: Any) -> bool:
    """True for a torch tensor (checked without importing torch)."""
    return type(x).__module__.split(".")[0] == "torch" and hasattr(x, "detach")


def to_numpy(x: Any) -> np.ndarray:
    """A NumPy array from an array, a torch tensor (:func:`flashmath.dtypes.from_torch`:
    bfloat16 becomes ml_dtypes.bfloat16 bit for bit) or an impl's ``(out, ...)`` tuple (its
    first element)."""
    if isinstance(x, (tuple, list)) and x and not isinstance(x[0], (int, float)):
        x = x[0]  # (out, lse, ...): the output
    if is_torch(x):
        return _dt.from_torch(x)
    return np.asarray(x)


def _tensor(x: Any, device: str, *, grad: bool = False) -> Any:
    if not isinstance(x, np.ndarray):
        return x
    t = _dt.to_torch(x, device=device, copy=True)  # a writable copy: battery arrays are read-only
    return t.requires_grad_(True) if grad else t


def _copied(options: dict[str, Any]) -> dict[str, Any]:
    """The options with writable copies of their arrays (battery arrays are read-only)."""
    return {k: v.copy() if isinstance(v, np.ndarray) else v for k, v in options.items()}


def answer(kernel: Kernel, case: Case, *, grads: bool = False) -> dict[str, np.ndarray]:
    """Call ``kernel`` on ``case``'s inputs and options in its backend; return its answers
    as NumPy arrays: ``{"out"}``, plus ``"dq"``, ``"dk"``, ``"dv"`` when ``grads`` (attention:
    autograd for torch, ``kernel.backward`` for NumPy). The kernel gets writable copies.
    Whatever the kernel raises propagates; a torch output that does not require grad is a
    TypeError."""
    opts = _copied(dict(case.options))
    data = [case.inputs[n] for n in (("x",) if case.kind == "softmax" else ("q", "k", "v"))]
    grads = grads and case.kind == "attention"
    if kernel.backend == "torch":
        tdata = [_tensor(a, kernel.device, grad=grads) for a in data]
        topts = {key: _tensor(val, kernel.device) for key, val in opts.items()}
        out = kernel.forward(*tdata, **topts)
        if out is None:
            raise TypeError(f"{kernel.name or 'the impl'} returned None: it must return "
                            f"the output tensor (did it forget a return statement?)")
        if not grads:
            return {"out": to_numpy(out)}
        out = out[0] if isinstance(out, (tuple, list)) else out
        if not getattr(out, "requires_grad", False):
            raise TypeError("the torch impl's output does not require grad: it is not "
                            "differentiable by autograd")
        out.backward(_tensor(case.inputs["dout"], kernel.device))
        got = [t.grad if t.grad is not None else t.detach() * 0 for t in tdata]
        return {"out": to_numpy(out), **dict(zip(("dq", "dk", "dv"), map(to_numpy, got),
                                                 strict=True))}
    out = kernel.forward(*(a.copy() for a in data), **opts)
    if out is None:
        raise TypeError(f"{kernel.name or 'the impl'} returned None: it must return the "
                        f"output array (did it forget a return statement?)")
    out = to_numpy(out)
    if not grads:
        return {"out": out}
    assert kernel.backward is not None
    got = kernel.backward(case.inputs["dout"].copy(), *(a.copy() for a in data), **opts)
    return {"out": out, **dict(zip(("dq", "dk", "dv"), map(to_numpy, got), strict=True))}


# --------------------------------------------------------------------------- built-in adapters


def flashmath_attention_backward(dout: Any, q: Any, k: Any, v: Any, **options: Any) -> Any:
    """flashmath's tiled backward as the checker calls a backward: the forward's out and
    lse are recomputed. Returns (dq, dk, dv)."""
    out, lse = flash_attention(q, k, v, return_lse=True, **options)
    return flash_attention_backward(dout, q, k, v, out, lse, **options)[:3]  # not dsinks


def torch_softmax(x: Any, axis: int = -1) -> Any:
    """torch.softmax over ``axis`` (a torch tensor in and out)."""
    import torch

    return torch.softmax(x, dim=axis)


def sdpa(q: Any, k: Any, v: Any, *, causal: Causal = False, window: Any = None,
         mask: Any = None, bias: Any = None, kv_lengths: Any = None, q_lengths: Any = None,
         scale: float | None = None) -> Any:
    """torch's scaled_dot_product_attention with flashmath's options (torch tensors in).

    ``causal="top_left"`` (and ``causal=True`` when Sq == Sk) is SDPA's own ``is_causal``;
    everything else that removes pairs (bottom-right causal with Sq != Sk, window, boolean
    mask, lengths) is expressed as SDPA's boolean ``attn_mask``, built by flashmath's one
    mask builder; a bias becomes a float ``attn_mask`` (-inf where masked). softcap is not
    expressible in SDPA and is not declared.
    """
    import torch
    import torch.nn.functional as F

    B, H, Sq, D = q.shape
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[3]
    native_causal = causal == "top_left" or (causal is True and Sq == Sk)
    rest = {"window": window, "mask": mask, "kv_lengths": kv_lengths, "q_lengths": q_lengths}
    attn_mask = None
    # is_causal and attn_mask cannot be combined: with a bias, causal comes from the mask too
    if (any(x is not None for x in rest.values()) or (causal and not native_causal)
            or (native_causal and bias is not None)):
        rest = {n: (_dt.from_torch(x) if isinstance(x, torch.Tensor) else x)
                for n, x in rest.items()}
        shapes = [np.empty((B, H, Sq, D), np.float32), np.empty((B, Hkv, Sk, D), np.float32),
                  np.empty((B, Hkv, Sk, Dv), np.float32)]
        *_, opts = resolve(*shapes, causal=causal, **rest)
        attn_mask = _dt.to_torch(opts.spec.dense(), device=q.device)
        native_causal = False
    if bias is not None:
        float_mask = bias.to(q.dtype).expand(B, H, Sq, Sk)
        if attn_mask is not None:
            float_mask = float_mask.masked_fill(~attn_mask, float("-inf"))
        attn_mask = float_mask
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=native_causal,
                                          scale=scale, enable_gqa=Hkv != H)


#: What SDPA expresses: every option but softcap.
_SDPA_SUPPORTS = ATTENTION_OPTIONS - {"softcap", "alibi_slopes", "sinks", "score_mod", "mask_mod"}
#: What flashmath's tiled kernels take: every option the battery knows.
_FLASHMATH_SUPPORTS = ATTENTION_OPTIONS
#: The textbook formula takes every option but the mods.
_NAIVE_SUPPORTS = ATTENTION_OPTIONS - {"score_mod", "mask_mod"}


def _torch_target(kind: Kind) -> Kernel:
    try:
        import torch  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        raise TargetError(f"the torch target needs torch, which cannot be imported "
                          f"({type(exc).__name__}: {exc}); pip install 'flashmath[torch]'"
                          ) from None
    if kind == "softmax":
        return declare(torch_softmax, backend="torch", name="torch.softmax")
    return declare(sdpa, backend="torch", supports=_SDPA_SUPPORTS,
                   name="torch.nn.functional.scaled_dot_product_attention")


def _builtin(target: str, kind: Kind) -> Kernel:
    if target == "flashmath":
        if kind == "softmax":
            return declare(softmax, name="flashmath.softmax")
        return declare(flash_attention, supports=_FLASHMATH_SUPPORTS,
                       backward=flashmath_attention_backward, name="flashmath.flash_attention")
    if target == "torch":
        return _torch_target(kind)
    if kind == "softmax":
        return declare(naive_softmax.softmax, name="flashmath.naive.softmax")
    return declare(naive_attention.attention, supports=_NAIVE_SUPPORTS,
                   name="textbook attention (no max shift)")


def load_target(target: str, kind: Kind) -> Kernel:
    """The Kernel that ``flashmath check KIND TARGET`` runs.

    target: one of :data:`BUILTIN_TARGETS` --

    - ``"flashmath"``: flashmath's softmax, or flash_attention with every option and
      :func:`flashmath_attention_backward`;
    - ``"torch"``: :func:`torch_softmax` or :func:`sdpa` (a torch backend, autograd for
      gradients);
    - ``"naive"``: the textbook softmax / attention in the input dtype (no max shift) --

    or ``"MODULE:FUNC"`` (FUNC may be dotted, ``pkg.mod:Class.method``; the current folder
    is put on ``sys.path`` if it is not there, as with ``python -m``), declared with the
    target as its name. kind: "softmax" or "attention".

    Raises TargetError with a one-line reason when torch cannot be imported for the torch
    target, the module cannot be imported (any exception while importing counts), the
    attribute is missing or is not a callable (or a (forward, backward) pair).
    """
    if target in BUILTIN_TARGETS:
        return _builtin(target, kind)
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise TargetError(f"target {target!r}: expected MODULE:FUNC or one of "
                          f"{', '.join(BUILTIN_TARGETS)}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # `flashmath check attention mykernel:attn` from here
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:
        hint = ""
        if module_name.endswith(".py"):
            hint = (f" (a target names a module, not a file: try "
                    f"{module_name.removesuffix('.py').replace('/', '.')}:{attr})")
        raise TargetError(f"cannot import module {module_name!r}: "
                          f"{type(exc).__name__}: {exc}{hint}") from None
    for i, part in enumerate(attr.split(".")):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            owner = ".".join([module_name, *attr.split(".")[:i]])
            raise TargetError(f"{owner!r} has no attribute {part!r}") from None
    if not callable(obj) and not isinstance(obj, tuple):
        raise TargetError(f"{target} is a {type(obj).__name__}, not a callable")
    try:
        kernel = as_kernel(obj)
    except TypeError as exc:
        raise TargetError(f"{target}: {exc}") from None
    return declare(kernel, name=target)
