"""flashmath as a Hugging Face transformers attention backend.

::

    from flashmath.integrations.transformers import register
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=register())

:func:`register` adds :func:`attention_forward` to transformers' ``AttentionInterface`` and
transformers' own boolean ``sdpa_mask`` to its ``AttentionMaskInterface``, under one name
(default ``"fmath"``). The name must not contain "flash": transformers 5.x takes any
implementation name containing "flash" as a request for a flash-attention kernel from the
Hub and refuses it ("flashmath" fails), so :func:`register` refuses such names up front.
Without the mask function a registered implementation would receive ``attention_mask=None``
and silently lose the padding of a batch.

What models pass, and what it becomes (legend: B batch, H heads, Sq/Sk query/key lengths):

- ``attention_mask`` None: the mask transformers skipped because it is plain causal (or
  full); causal is then torch SDPA's ``is_causal``, top-left aligned, when the module is
  causal and Sq > 1 (a single decoding query sees every key), as transformers' sdpa does.
- a (B, 1|H, Sq, Sk) bool mask (padding, sliding windows, packed sequences, user 4-D masks):
  ``mask=``, plus the causal/window band the mask implies, so that empty tiles are skipped.
- a (B, 1|H, Sq, Sk) float mask (a user's additive 4-D mask): ``bias=``, added after the
  softcap as eager attention adds it.
- a (B, Sk) 2-D padding mask (a direct call): keys where it is 0 are masked, causal
  bottom-right when the module is causal.
- GQA (key/value with fewer heads): passed through, no repeat; ``scaling`` -> ``scale``;
  ``softcap`` (Gemma 2) -> ``softcap``; ``sliding_window`` W (Mistral, Gemma) -> the window
  (W - 1 keys back) when the mask was skipped; ``position_bias`` -> ``bias``.
- attention sinks (``s_aux``, gpt-oss: one learnable logit per query head) -> ``sinks``.
- refused with NotImplementedError naming the option: ``dropout`` > 0 while training,
  ``output_attentions=True``.

Other keyword arguments models pass (position ids, cache positions, sequence lengths for
flash-attn's varlen API) are ignored, as transformers' sdpa backend ignores them: their
effect is in the mask. Needs the optional extra ``pip install 'flashmath[transformers]'``.
"""

from __future__ import annotations

from typing import Any

import torch

from flashmath.torch import flash_attention

__all__ = ["DEFAULT_NAME", "attention_forward", "register"]

#: The name :func:`register` uses by default (no "flash" in it: see the module docs).
DEFAULT_NAME = "fmath"


def register(name: str = DEFAULT_NAME) -> str:
    """Register flashmath with transformers under ``name`` and return it, for
    ``from_config(cfg, attn_implementation=register())`` or ``from_pretrained``.

    Registers :func:`attention_forward` in ``AttentionInterface`` and transformers'
    boolean ``sdpa_mask`` in ``AttentionMaskInterface`` (so padding reaches the kernels).
    Calling it again is harmless. Raises ValueError for a name containing "flash"
    (transformers would take it for a Hub kernel and refuse it) or naming one of
    transformers' own implementations; ImportError without transformers.
    """
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("flashmath.integrations.transformers needs transformers: "
                          "pip install 'flashmath[transformers]'") from exc
    if not isinstance(name, str) or not name:
        raise ValueError(f"name: expected a non-empty string, got {name!r}")
    if "flash" in name.lower():
        raise ValueError(
            f"name: {name!r} contains 'flash', which transformers takes as a request for a "
            f"flash-attention kernel from the Hub (and refuses); use e.g. {DEFAULT_NAME!r}")
    if name in ("eager", "sdpa", "flex_attention", "paged|eager") or name.startswith("paged|"):
        raise ValueError(f"name: {name!r} is one of transformers' own implementations")
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    s_aux: torch.Tensor | None = None,
    position_bias: torch.Tensor | None = None,
    output_attentions: bool = False,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature over :func:`flashmath.torch.flash_attention`.

    query (B, H, Sq, D), key (B, H_kv, Sk, D), value (B, H_kv, Sk, Dv) -> (out (B, Sq, H, Dv)
    contiguous, None): the layout transformers' attention modules reshape, and no
    attention weights. The options are mapped as the module docs say; what flashmath
    cannot express raises NotImplementedError naming it.
    """
    if any("sink" in key_ for key_ in kwargs):
        raise NotImplementedError(f"{[k for k in kwargs if 'sink' in k]}: an attention-sink "
                                  f"argument flashmath does not know; it takes s_aux (gpt-oss)")
    if dropout and module.training:
        raise NotImplementedError(
            f"dropout: attention dropout ({dropout}) at training time is not supported by "
            f"flashmath; set the config's attention_dropout to 0 or call model.eval()")
    if output_attentions:
        raise NotImplementedError("output_attentions: flashmath never forms the attention "
                                  "weights; use attn_implementation='eager' to get them")
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    options = _mask_options(attention_mask, query.shape[2], key.shape[2], causal,
                            sliding_window)
    if position_bias is not None:
        bias = options.get("bias")
        options["bias"] = position_bias if bias is None else bias + position_bias
    if s_aux is not None:  # gpt-oss: one learnable logit per query head, no value
        options["sinks"] = s_aux
    out = flash_attention(query, key, value, scale=scaling, softcap=softcap, **options)
    assert isinstance(out, torch.Tensor)  # no return_lse
    return out.transpose(1, 2).contiguous(), None


def _mask_options(mask: torch.Tensor | None, sq: int, sk: int, causal: bool,
                  sliding_window: int | None) -> dict[str, Any]:
    """flash_attention's causal / window / mask / bias options for transformers' mask."""
    if mask is None:  # transformers skipped a plain causal (or full) mask: sdpa's is_causal
        if not causal or sq == 1:
            return {}
        window = None if not sliding_window else (sliding_window - 1, 0)
        return {"causal": "top_left", "window": window}
    if mask.ndim == 2:  # (B, Sk) key padding, from a direct call
        if mask.shape[1] != sk:
            raise ValueError(f"attention_mask: a 2-D mask must be (B, Sk) with Sk={sk}, "
                             f"got {tuple(mask.shape)}")
        return {"mask": mask.bool()[:, None, None, :], "causal": bool(causal)}
    if mask.ndim != 4:
        raise ValueError(f"attention_mask: expected None, (B, Sk) or (B, 1|H, Sq, Sk), "
                         f"got shape {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        return {"bias": mask}  # additive, as eager attention adds it
    return {"mask": mask, "window": _band(mask, sq, sk)}


def _band(mask: torch.Tensor, sq: int, sk: int) -> tuple[int, int] | None:
    """The narrowest window=(left, right) around the bottom-right diagonal that holds every
    True of a bool (..., Sq, Sk) mask: intersecting it changes nothing, and lets the
    kernels skip the tiles outside it. None when the mask allows nothing."""
    union = mask.reshape(-1, mask.shape[-2], mask.shape[-1]).any(dim=0)  # (Sq|1, Sk)
    rows = union.any(dim=1)
    if not bool(rows.any()) or union.shape[0] != sq:
        return None
    cols = torch.arange(sk, device=mask.device)
    first = torch.where(union, cols, sk).min(dim=1).values[rows]
    last = torch.where(union, cols, -1).max(dim=1).values[rows]
    i = torch.arange(sq, device=mask.device)[rows]
    diag = sk - sq
    left = int((i + diag - first).max())
    right = int((last - i - diag).max())
    return max(left, 0), max(right, 0)
