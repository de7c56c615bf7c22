"""``flash_attention`` on torch tensors: a differentiable torch op over flashmath's kernels.

Legend: B batch, H query heads, H_kv key/value heads (H % H_kv == 0), Sq/Sk query/key
lengths, D the q/k head dim, Dv the v head dim.

CPU tensors run the NumPy tiled kernels (:mod:`flashmath.attention.tiled`) through two
``torch.library`` custom ops, ``flashmath::attention`` and ``flashmath::attention_backward``:
torch.compile treats them as opaque calls (no graph break; their fake implementations give
the output shapes), and autograd reaches the tiled backward through ``register_autograd``.
Tensors cross to NumPy and back with :func:`flashmath.dtypes.from_torch` / ``to_torch``:
views, bfloat16 bit for bit, never a float32 round trip.

CUDA tensors go to :func:`flashmath.triton.flash_attention` (the Triton kernels), which has
the same signature less ``mask``, ``bias``, ``q_lengths`` and float64: those raise there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch

from flashmath.attention.options import Causal, Window, check_causal, check_window
from flashmath.attention.tiled import flash_attention_backward as _np_backward
from flashmath.attention.tiled import tiled_forward
from flashmath.dtypes import from_torch, to_torch

__all__ = ["SUPPORTED_DTYPES", "TRITON_OPTIONS", "flash_attention", "route"]

#: The dtypes the CPU path takes (the NumPy kernels compute narrow ones in float32 tiles).
SUPPORTED_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
#: The options the CUDA (Triton) path takes; mask, bias and q_lengths are CPU-only for now.
TRITON_OPTIONS = frozenset({"causal", "window", "kv_lengths", "softcap", "scale",
                            "alibi_slopes", "sinks"})



# ---------------------------------------------------------------------------------------
# The custom ops (CPU): NumPy kernels behind torch.library
# ---------------------------------------------------------------------------------------


def _np(t: torch.Tensor | None) -> Any:
    return None if t is None else from_torch(t)


def _options(causal: str, window_left: int | None, window_right: int | None,
             mask: torch.Tensor | None, bias: torch.Tensor | None,
             kv_lengths: torch.Tensor | None, q_lengths: torch.Tensor | None,
             sinks: torch.Tensor | None, alibi_slopes: torch.Tensor | None,
             softcap: float | None, scale: float | None) -> dict[str, Any]:
    """The keyword options of the NumPy kernels, from the ops' flat schema."""
    window = None if window_left is None and window_right is None else (window_left, window_right)
    return {
        "causal": False if causal == "none" else causal, "window": window, "mask": _np(mask),
        "bias": _np(bias), "kv_lengths": _np(kv_lengths), "q_lengths": _np(q_lengths),
        "sinks": None if sinks is None else from_torch(sinks.detach().double()),
        "alibi_slopes": _np(alibi_slopes), "softcap": softcap, "scale": scale,
    }


@torch.library.custom_op("flashmath::attention", mutates_args=(), device_types="cpu")
def _attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: str,
    window_left: int | None, window_right: int | None, mask: torch.Tensor | None,
    bias: torch.Tensor | None, kv_lengths: torch.Tensor | None, q_lengths: torch.Tensor | None,
    sinks: torch.Tensor | None, alibi_slopes: torch.Tensor | None,
    softcap: float | None, scale: float | None, block_q: int | None, block_k: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    opts = _options(causal, window_left, window_right, mask, bias, kv_lengths, q_lengths,
                    sinks, alibi_slopes, softcap, scale)
    out, lse = tiled_forward(from_torch(q), from_torch(k), from_torch(v), block_q=block_q,
                             block_k=block_k, **opts)
    return to_torch(out), to_torch(lse)


@_attention.register_fake
def _attention_fake(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: str,
    window_left: int | None, window_right: int | None, mask: torch.Tensor | None,
    bias: torch.Tensor | None, kv_lengths: torch.Tensor | None, q_lengths: torch.Tensor | None,
    sinks: torch.Tensor | None, alibi_slopes: torch.Tensor | None,
    softcap: float | None, scale: float | None, block_q: int | None, block_k: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, Sq, _ = q.shape
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty((B, H, Sq, v.shape[-1])), q.new_empty((B, H, Sq), dtype=lse_dtype)


@torch.library.custom_op("flashmath::attention_backward", mutates_args=(), device_types="cpu")
def _attention_backward(
    dout: torch.Tensor, dlse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
    v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, causal: str, window_left: int | None, window_right: int | None,
    mask: torch.Tensor | None, bias: torch.Tensor | None, kv_lengths: torch.Tensor | None,
    q_lengths: torch.Tensor | None, sinks: torch.Tensor | None,
    alibi_slopes: torch.Tensor | None, softcap: float | None, scale: float | None,
    block_q: int | None, block_k: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    opts = _options(causal, window_left, window_right, mask, bias, kv_lengths, q_lengths,
                    sinks, alibi_slopes, softcap, scale)
    grads = _np_backward(*(from_torch(t) for t in (dout, q, k, v, out, lse)),
                         dlse=None if dlse is None else from_torch(dlse),
                         block_q=block_q, block_k=block_k, **opts)
    dq, dk, dv = (to_torch(g) for g in grads[:3])
    dsinks = (to_torch(grads[3]).to(sinks.dtype) if sinks is not None
              else q.new_empty((0,), dtype=torch.float32))
    return dq, dk, dv, dsinks


@_attention_backward.register_fake
def _attention_backward_fake(
    dout: torch.Tensor, dlse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
    v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, causal: str, window_left: int | None, window_right: int | None,
    mask: torch.Tensor | None, bias: torch.Tensor | None, kv_lengths: torch.Tensor | None,
    q_lengths: torch.Tensor | None, sinks: torch.Tensor | None,
    alibi_slopes: torch.Tensor | None, softcap: float | None, scale: float | None,
    block_q: int | None, block_k: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dsinks = (torch.empty_like(sinks) if sinks is not None
              else q.new_empty((0,), dtype=torch.float32))
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dsinks


_OPTION_NAMES = ("causal", "window_left", "window_right", "mask", "bias", "kv_lengths",
                 "q_lengths", "sinks", "alibi_slopes", "softcap", "scale", "block_q", "block_k")
_SINKS = _OPTION_NAMES.index("sinks")


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    q, k, v, *options = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.options = options


def _backward(ctx: Any, dout: torch.Tensor | None, dlse: torch.Tensor | None,
              ) -> tuple[torch.Tensor | None, ...]:
    q, k, v, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv, dsinks = _attention_backward(dout, dlse, q, k, v, out, lse, *ctx.options)
    grads: list[torch.Tensor | None] = [None] * len(_OPTION_NAMES)
    if ctx.options[_SINKS] is not None:
        grads[_SINKS] = dsinks
    return (dq, dk, dv, *grads)


_attention.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------
# The public function
# ---------------------------------------------------------------------------------------


def route(device: torch.device | str, options: Sequence[str] = ()) -> Literal["numpy", "triton"]:
    """Which kernels :func:`flash_attention` runs for tensors on ``device`` with the given
    option names set (not None): "numpy" for CPU tensors, "triton" for CUDA tensors.

    Raises ValueError for other devices, and NotImplementedError on CUDA for an option the
    Triton kernels do not take (mask, bias, q_lengths), naming it.
    """
    kind = torch.device(device).type
    if kind == "cpu":
        return "numpy"
    if kind != "cuda":
        raise ValueError(f"q: flashmath runs CPU tensors (NumPy kernels) and CUDA tensors "
                         f"(Triton kernels), got a tensor on {device}")
    missing = sorted(set(options) - TRITON_OPTIONS - {"return_lse"})
    if missing:
        raise NotImplementedError(
            f"{', '.join(missing)}: not supported by the CUDA kernels (flashmath.triton takes "
            f"{', '.join(sorted(TRITON_OPTIONS))}); move the tensors to the CPU for these")
    return "triton"


def _tensor(x: Any, name: str, dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """An optional option as a CPU tensor (sequences of ints or NumPy arrays accepted)."""
    if x is None:
        return None
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(x)
    if t.device.type != "cpu":
        t = t.cpu()
    if name == "bias" and t.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError(
            "bias: flashmath computes no gradient for the bias; pass bias.detach()")
    return t.detach() if dtype is None else t.detach().to(dtype)


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: Causal = False,
    window: Window = None,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    kv_lengths: torch.Tensor | Sequence[int] | None = None,
    q_lengths: torch.Tensor | Sequence[int] | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    alibi_slopes: torch.Tensor | Sequence[float] | None = None,
    sinks: torch.Tensor | None = None,
    score_mod: Any = None,
    mask_mod: Any = None,
    block_mask: Any = None,
    block_q: int | None = None,
    block_k: int | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact attention ``softmax(softcap(scale q k^T) + bias, masked) v`` on torch tensors,
    differentiable with respect to q, k, v, the sinks and through lse.

    Shapes: q (B, H, Sq, D), k (B, H_kv, Sk, D), v (B, H_kv, Sk, Dv) -> out (B, H, Sq, Dv)
    in q's dtype; query head h reads K/V head ``h // (H // H_kv)`` (GQA, MQA). lse (with
    ``return_lse``): (B, H, Sq), natural log, float32 (float64 for float64 input).

    The options are :func:`flashmath.flash_attention`'s (docs/conventions.md)::

        causal=True / "bottom_right"  the last query sees every key (FlashAttention >= 2.1)
        causal="top_left"             query i sees keys 0..i (torch SDPA's is_causal)
        window=(left, right)          keys within left before .. right after the diagonal;
                                      None for an unbounded side
        mask                          bool, broadcastable to (B, H, Sq, Sk); True = attend
        bias                          float, broadcastable to (B, H, Sq, Sk), added after
                                      the softcap (ALiBi, additive masks); no gradient
        kv_lengths, q_lengths         (B,) ints: keys / queries past them are padding
        softcap                       s -> softcap * tanh(s / softcap), s already scaled
        scale                         defaults to 1 / sqrt(D)
        alibi_slopes                  (H,) or (B, H) ALiBi slopes (flash-attention's)
        sinks                         (H,) attention-sink logits (gpt-oss), learnable
        score_mod, mask_mod,          FlexAttention-style mods on NumPy arrays (docs/mods.md):
        block_mask                    CPU only; they run outside the custom op (Python
                                      callables cannot cross its schema), so torch.compile
                                      graph-breaks around such a call
        block_q, block_k              tile sizes of the CPU kernels (default: theirs)

    dtypes: float64, float32, float16, bfloat16 on the CPU (narrow ones in float32 tiles,
    results in the input dtype). A row with nothing to attend to gives output 0, lse -inf
    and zero gradients, never NaN.

    Devices: CPU tensors run the NumPy kernels as the custom op ``flashmath::attention``
    (opaque to torch.compile, with a fake implementation and a registered backward); CUDA
    tensors run :func:`flashmath.triton.flash_attention` (see :func:`route`). Gradients
    flow through lse too (the lse cotangent joins each row's dp - delta).

    Raises TypeError / ValueError naming the argument (the NumPy API's validation).

    Examples
    --------
    >>> import torch
    >>> from flashmath.torch import flash_attention
    >>> q, k, v = (torch.randn(1, 2, 5, 8, requires_grad=True) for _ in range(3))
    >>> out = flash_attention(q, k, v, causal=True)
    >>> ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    >>> bool((out - ref).abs().max() < 1e-6)
    True
    >>> out.sum().backward(); q.grad.shape
    torch.Size([1, 2, 5, 8])
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    given = [name for name, value in (("mask", mask), ("bias", bias), ("q_lengths", q_lengths),
                                      ("window", window), ("kv_lengths", kv_lengths),
                                      ("softcap", softcap), ("scale", scale),
                                      ("alibi_slopes", alibi_slopes), ("sinks", sinks))
             if value is not None]
    if route(q.device, given) == "triton":
        from flashmath.triton import flash_attention as triton_attention

        return triton_attention(q, k, v, causal=causal, window=window, kv_lengths=kv_lengths,
                                softcap=softcap, scale=scale, alibi_slopes=alibi_slopes,
                                sinks=sinks, return_lse=return_lse)
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"q: dtype {q.dtype} is not supported; expected one of "
                        f"{', '.join(str(d) for d in SUPPORTED_DTYPES)}")
    alignment = check_causal(causal)
    left, right = check_window(window) or (None, None)
    if score_mod is not None or mask_mod is not None or block_mask is not None:
        opts = _options(alignment or "none", left, right, _tensor(mask, "mask"),
                        _tensor(bias, "bias"), _tensor(kv_lengths, "kv_lengths", torch.int64),
                        _tensor(q_lengths, "q_lengths", torch.int64), None,
                        _tensor(alibi_slopes, "alibi_slopes", torch.float64),
                        None if softcap is None else float(softcap),
                        None if scale is None else float(scale))
        opts |= {"score_mod": score_mod, "mask_mod": mask_mod, "block_mask": block_mask,
                 "block_q": block_q, "block_k": block_k}
        out, lse = _ModAttention.apply(q, k, v, _sinks(sinks), opts)
        return (out, lse) if return_lse else out
    out, lse = _attention(
        q, k, v, alignment or "none", left, right, _tensor(mask, "mask"), _tensor(bias, "bias"),
        _tensor(kv_lengths, "kv_lengths", torch.int64), _tensor(q_lengths, "q_lengths",
                                                                torch.int64),
        _sinks(sinks), _tensor(alibi_slopes, "alibi_slopes", torch.float64),
        None if softcap is None else float(softcap), None if scale is None else float(scale),
        block_q, block_k,
    )
    return (out, lse) if return_lse else out


def _sinks(sinks: Any) -> torch.Tensor | None:
    """The sinks as a CPU tensor that keeps its autograd graph (they are learnable)."""
    if sinks is None:
        return None
    t = sinks if isinstance(sinks, torch.Tensor) else torch.as_tensor(sinks, dtype=torch.float32)
    return t if t.device.type == "cpu" else t.cpu()


class _ModAttention(torch.autograd.Function):
    """The tiled NumPy kernels with score_mod / mask_mod / block_mask (CPU tensors): the
    mods are Python callables, which the custom op's schema cannot carry."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                sinks: torch.Tensor | None, opts: dict[str, Any],
                ) -> tuple[torch.Tensor, torch.Tensor]:
        kernel_opts = dict(opts)
        if sinks is not None:
            kernel_opts["sinks"] = from_torch(sinks.detach().double())
        out, lse = tiled_forward(from_torch(q), from_torch(k), from_torch(v), **kernel_opts)
        out_t, lse_t = to_torch(out), to_torch(lse)
        ctx.save_for_backward(q, k, v, sinks, out_t, lse_t)
        ctx.kernel_opts = kernel_opts
        ctx.set_materialize_grads(False)
        return out_t, lse_t

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor | None, dlse: torch.Tensor | None,
                 ) -> tuple[torch.Tensor | None, ...]:
        q, k, v, sinks, out, lse = ctx.saved_tensors
        dout = torch.zeros_like(out) if dout is None else dout
        grads = _np_backward(*(from_torch(t.contiguous()) for t in (dout, q, k, v, out, lse)),
                             dlse=None if dlse is None else from_torch(dlse.contiguous()),
                             **ctx.kernel_opts)
        dq, dk, dv = (to_torch(g) for g in grads[:3])
        dsinks = None if sinks is None else to_torch(grads[3]).to(sinks.dtype)
        return dq, dk, dv, dsinks, None
