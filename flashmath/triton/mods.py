"""FlexAttention-style mods for the Triton kernels: ``@triton.jit`` mask_mods and score_mods,
with their NumPy twins, and the host side of a block mask.

A kernel cannot call the NumPy mods of :mod:`flashmath.attention.modlib`, so each mod here
is a :class:`Mod`: a ``@triton.jit`` function that the kernels take as a compile-time
constant, the tensor it reads (``data``: document ids, slopes, a bias table, its integer
parameters), and its NumPy twin (``numpy``: what the oracle, ``fm.create_block_mask`` and
the checker use). The signatures are FlexAttention's with the data pointer last::

    mask_fn(b, h, q_idx, kv_idx, data) -> bool tensor        (True: may attend)
    score_fn(score, b, h, q_idx, kv_idx, data) -> score      (natural units, float32)
    grad_fn(score, b, h, q_idx, kv_idx, data) -> d score_fn / d score

``q_idx`` and ``kv_idx`` are int32 tensors that broadcast to the tile ((BLOCK_M, 1) and
(1, BLOCK_N), or transposed in the dK/dV pass), clamped into the sequence (rows and keys
past the end are masked afterwards, so a mod may load ``data + q_idx`` safely); ``b`` and
``h`` are scalars. A score_mod sees the score after the scale, softcap and ALiBi; a
mask_mod ANDs with causal, window and kv_lengths, as in :func:`flashmath.flash_attention`.

Library (each the twin of the modlib mod of the same name): :func:`causal`,
:func:`sliding_window`, :func:`prefix_lm`, :func:`document_mask`, :func:`attention_sink`;
score mods :func:`alibi`, :func:`relative_bias`, :func:`t5_bias`, :func:`softcap`.
modlib's ``and_masks``/``or_masks``/``spec_mask_mod`` have no Triton twin: combine a
mask here with the built-in options instead (a causal document mask is
``mask_mod=document_mask(ids), causal=True``), or write one ``@triton.jit`` function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import triton
import triton.language as tl

from flashmath.attention import modlib
from flashmath.attention.blockmask import BlockMask
from flashmath.triton.kernels import tanh32

__all__ = [
    "NO_MODS",
    "KernelMods",
    "Mod",
    "alibi",
    "attention_sink",
    "causal",
    "check_tiles",
    "document_mask",
    "kernel_mods",
    "prefix_lm",
    "relative_bias",
    "sliding_window",
    "softcap",
    "t5_bias",
]

#: An unbounded window side, as the kernels' (larger than any distance).
_BIG = 1 << 30


@dataclass(frozen=True)
class Mod:
    """A mask_mod or score_mod for :func:`flashmath.triton.flash_attention`.

    fn: the ``@triton.jit`` function (signatures in the module docstring).
    data: what fn reads through its ``data`` pointer (a tensor, any device: it is moved to
        q's), or None. int32 for the library's masks, float32 for its score mods.
    grad: a score_mod's derivative in the score (``@triton.jit``, same signature); without
        it the score_mod works forward only (the backward raises, naming score_mod).
    numpy: the NumPy twin (flashmath.attention.mods conventions), for the oracle and for
        ``fm.create_block_mask``; None for a mod that has none.
    """

    fn: Any
    data: torch.Tensor | None = None
    grad: Any = None
    numpy: Any = None

    def __post_init__(self) -> None:
        for name in ("fn", "grad"):
            f = getattr(self, name)
            if f is not None and not _is_jit(f):
                raise TypeError(f"{name}: expected a @triton.jit function, got "
                                f"{type(f).__name__}")
        if self.data is not None and not isinstance(self.data, torch.Tensor):
            raise TypeError(f"data: expected a torch.Tensor or None, got "
                            f"{type(self.data).__name__}")


def _is_jit(f: Any) -> bool:
    """A @triton.jit function (an InterpretedFunction under TRITON_INTERPRET=1)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(f, (triton.runtime.JITFunction, InterpretedFunction))


def _ints(*values: Any) -> torch.Tensor:
    return torch.as_tensor(np.concatenate([np.ravel(np.asarray(v, np.int64)) for v in values]),
                           dtype=torch.int32)


def _floats(*values: Any) -> torch.Tensor:
    return torch.as_tensor(np.concatenate([np.ravel(np.asarray(v, np.float64)) for v in values]),
                           dtype=torch.float32)


# ---------------------------------------------------------------------------------------
# Mask mods
# ---------------------------------------------------------------------------------------


@triton.jit
def _band_fn(b, h, q_idx, kv_idx, data):
    """data = [diag, left, right]: lo <= kv - q - diag <= hi."""
    rel = kv_idx - q_idx - tl.load(data)
    return (rel >= -tl.load(data + 1)) & (rel <= tl.load(data + 2))


def _diag(Sq: int, Sk: int, align: str) -> int:
    """The diagonal's offset (align already checked by the NumPy twin)."""
    return Sk - Sq if align == "bottom_right" else 0


def causal(Sq: int, Sk: int, *, align: str = "bottom_right") -> Mod:
    """Query i sees key j iff ``j <= i + diag`` (modlib.causal)."""
    twin = modlib.causal(Sq, Sk, align=align)
    return Mod(_band_fn, _ints(_diag(Sq, Sk, align), _BIG, 0), numpy=twin)


def sliding_window(Sq: int, Sk: int, left: int | None, right: int | None = 0, *,
                   align: str = "bottom_right") -> Mod:
    """``left`` keys before to ``right`` after the diagonal, None unbounded
    (modlib.sliding_window)."""
    twin = modlib.sliding_window(Sq, Sk, left, right, align=align)
    return Mod(_band_fn, _ints(_diag(Sq, Sk, align), _BIG if left is None else left,
                               _BIG if right is None else right), numpy=twin)


@triton.jit
def _prefix_lm_fn(b, h, q_idx, kv_idx, data):
    return (kv_idx < tl.load(data)) | (kv_idx <= q_idx)


def prefix_lm(prefix: int) -> Mod:
    """Every query sees the first ``prefix`` keys, and key j <= i beyond (modlib.prefix_lm)."""
    return Mod(_prefix_lm_fn, _ints(prefix), numpy=modlib.prefix_lm(prefix))


@triton.jit
def _document_fn(b, h, q_idx, kv_idx, data):
    """data = [nb_q, S_q, nb_k, S_k, q ids (nb_q, S_q), kv ids (nb_k, S_k)]."""
    nbq = tl.load(data)
    sq = tl.load(data + 1)
    nbk = tl.load(data + 2)
    sk = tl.load(data + 3)
    qid = tl.load(data + 4 + (b % nbq) * sq + q_idx)
    kid = tl.load(data + 4 + nbq * sq + (b % nbk) * sk + kv_idx)
    return qid == kid


def document_mask(doc_ids: Any, kv_doc_ids: Any = None) -> Mod:
    """Query i sees key j iff they share a document id; ids (S,) or (B, S) integers
    (modlib.document_mask)."""
    twin = modlib.document_mask(doc_ids, kv_doc_ids)
    q = np.atleast_2d(np.asarray(doc_ids, np.int64))
    k = q if kv_doc_ids is None else np.atleast_2d(np.asarray(kv_doc_ids, np.int64))
    return Mod(_document_fn, _ints(q.shape[0], q.shape[1], k.shape[0], k.shape[1], q, k),
               numpy=twin)


@triton.jit
def _sink_fn(b, h, q_idx, kv_idx, data):
    """data = [diag, sinks, window]: causal, and a sink key or within the window."""
    rel = kv_idx - q_idx - tl.load(data)
    return (rel <= 0) & ((kv_idx < tl.load(data + 1)) | (rel >= 1 - tl.load(data + 2)))


def attention_sink(Sq: int, Sk: int, sinks: int, window: int, *,
                   align: str = "bottom_right") -> Mod:
    """StreamingLLM's pattern: the first ``sinks`` keys and the last ``window`` up to the
    diagonal (modlib.attention_sink)."""
    twin = modlib.attention_sink(Sq, Sk, sinks, window, align=align)
    return Mod(_sink_fn, _ints(_diag(Sq, Sk, align), sinks, window), numpy=twin)


# ---------------------------------------------------------------------------------------
# Score mods
# ---------------------------------------------------------------------------------------


@triton.jit
def _one(score, b, h, q_idx, kv_idx, data):
    """The derivative of any score + bias(position) mod."""
    return tl.full(score.shape, 1.0, tl.float32)


@triton.jit
def _alibi_fn(score, b, h, q_idx, kv_idx, data):
    """data = [diag, nb, H, slopes (nb, H)]: score - slope * |kv - q - diag|."""
    diag = tl.load(data).to(tl.int32)
    nb = tl.load(data + 1).to(tl.int32)
    heads = tl.load(data + 2).to(tl.int32)
    slope = tl.load(data + 3 + (b % nb) * heads + h)
    return score - slope * tl.abs(kv_idx - q_idx - diag).to(tl.float32)


def alibi(Sq: int, Sk: int, slopes: Any = None, *, heads: int | None = None,
          align: str = "bottom_right") -> Mod:
    """ALiBi as a score_mod (modlib.alibi): slopes (H,) or (B, H), default the standard ones
    for ``heads`` heads."""
    twin = modlib.alibi(Sq, Sk, slopes, heads=heads, align=align)
    if slopes is None:
        from flashmath.attention.masks import alibi_slopes

        slopes = alibi_slopes(heads or 0)
    sl = np.asarray(slopes, np.float64)
    sl = sl.reshape(-1, sl.shape[-1])
    return Mod(_alibi_fn, _floats(_diag(Sq, Sk, align), sl.shape[0], sl.shape[1], sl),
               grad=_one, numpy=twin)


@triton.jit
def _rel_fn(score, b, h, q_idx, kv_idx, data):
    """data = [W, Sq - 1, table (H, W)]: score + table[h, kv - q + Sq - 1]."""
    width = tl.load(data).to(tl.int32)
    shift = tl.load(data + 1).to(tl.int32)
    return score + tl.load(data + 2 + h * width + (kv_idx - q_idx + shift))


def _relative(twin: Any, heads: int, Sq: int, Sk: int) -> Mod:
    """A score + bias(h, kv - q) twin as a table over every relative position of an
    (Sq, Sk) call, evaluated once by the twin itself (one formula: the bucket rounding is
    NumPy's, never re-derived in float32)."""
    width = Sq + Sk - 1
    rel = np.arange(width)[None, :]  # kv_idx for q_idx = Sq - 1: kv - q in [1 - Sq, Sk - 1]
    table = np.stack([twin(np.zeros((1, width)), 0, h, np.array([[Sq - 1]]), rel)[0]
                      for h in range(heads)])
    return Mod(_rel_fn, _floats(width, Sq - 1, table), grad=_one, numpy=twin)


def relative_bias(table: Any, max_distance: int, Sq: int, Sk: int) -> Mod:
    """``score + table[h, clip(kv - q, -max, max) + max]`` (modlib.relative_bias); the
    Triton form is built for calls of Sq queries and Sk keys."""
    twin = modlib.relative_bias(table, max_distance)
    return _relative(twin, np.shape(table)[0], Sq, Sk)


def t5_bias(table: Any, Sq: int, Sk: int, *, max_distance: int = 128,
            bidirectional: bool = True) -> Mod:
    """T5's bucketed relative bias (modlib.t5_bias), for calls of Sq queries and Sk keys."""
    twin = modlib.t5_bias(table, max_distance=max_distance, bidirectional=bidirectional)
    return _relative(twin, np.shape(table)[0], Sq, Sk)


@triton.jit
def _softcap_fn(score, b, h, q_idx, kv_idx, data):
    cap = tl.load(data)
    return cap * tanh32(score / cap)


@triton.jit
def _softcap_grad(score, b, h, q_idx, kv_idx, data):
    t = tanh32(score / tl.load(data))
    return 1.0 - t * t


def softcap(cap: float) -> Mod:
    """``cap * tanh(score / cap)`` after the bias (modlib.softcap)."""
    return Mod(_softcap_fn, _floats(cap), grad=_softcap_grad, numpy=modlib.softcap(cap))


@dataclass(frozen=True)
class KernelMods:
    """A call's score_mod, mask_mod and block mask as the kernels take them: the
    ``@triton.jit`` functions (compile-time constants), the tensors they read, and the
    block mask's TileKinds (uint8, (B|1, H|1, nq, nk) of ``block`` tiles, with 0 strides
    on broadcast axes). Built by :func:`kernel_mods`."""

    mask_fn: Any = None
    mask_data: torch.Tensor | None = None
    score_fn: Any = None
    score_grad: Any = None
    score_data: torch.Tensor | None = None
    kinds: torch.Tensor | None = None
    kind_strides: tuple[int, int, int, int] = (0, 0, 0, 0)
    block: tuple[int, int] = (1, 1)

    def args(self) -> tuple[Any, ...]:
        """MaskData, ScoreData, Kinds, its four strides, MASK_BQ, MASK_BK."""
        return (self.mask_data, self.score_data, self.kinds, *self.kind_strides, *self.block)

    def consts(self) -> dict[str, Any]:
        return {"HAS_MASK_MOD": self.mask_fn is not None,
                "HAS_SCORE_MOD": self.score_fn is not None,
                "HAS_BLOCK_MASK": self.kinds is not None,
                "MASK_FN": self.mask_fn, "SCORE_FN": self.score_fn,
                "SCORE_GRAD": self.score_grad}


NO_MODS = KernelMods()


# ---------------------------------------------------------------------------------------
# The host side: validated mods and block mask -> what the kernels take
# ---------------------------------------------------------------------------------------


def kernel_mods(score_mod: Any, mask_mod: Any, block_mask: Any, B: int, H: int, Sq: int,
                Sk: int, device: torch.device) -> KernelMods:
    """Check ``score_mod`` / ``mask_mod`` (a :class:`Mod` or a bare ``@triton.jit``
    function) and ``block_mask`` (an ``fm.create_block_mask`` result over (B|1, H|1, Sq,
    Sk), which needs a mask_mod for its PARTIAL tiles); return their kernel form."""
    score, mask = _as_mod(score_mod, "score_mod"), _as_mod(mask_mod, "mask_mod")
    kinds, strides, block = None, (0, 0, 0, 0), (1, 1)
    if block_mask is not None:
        if not isinstance(block_mask, BlockMask):
            raise TypeError(f"block_mask: expected a BlockMask from fm.create_block_mask, got "
                            f"{type(block_mask).__name__}")
        if mask is None:
            raise ValueError("block_mask: give the mask_mod it was built from too (the "
                             "kernels call its @triton.jit form on PARTIAL tiles)")
        kb, kh = block_mask.kinds.shape[:2]
        if (block_mask.sq, block_mask.sk) != (Sq, Sk) or kb not in (1, B) or kh not in (1, H):
            raise ValueError(f"block_mask: covers {block_mask.shape}, the call needs "
                             f"(B|1, H|1, Sq, Sk) = ({B}|1, {H}|1, {Sq}, {Sk})")
        for name, size in (("block_q", block_mask.block_q), ("block_k", block_mask.block_k)):
            if size < 16 or size & (size - 1):
                raise ValueError(f"block_mask: its {name} must be a power of two >= 16 for "
                                 f"the Triton kernels, got {size}")
        kinds = torch.as_tensor(np.ascontiguousarray(block_mask.kinds, np.uint8), device=device)
        st = kinds.stride()
        strides = (st[0] if kb > 1 else 0, st[1] if kh > 1 else 0, st[2], st[3])
        block = (block_mask.block_q, block_mask.block_k)
    return KernelMods(
        mask_fn=None if mask is None else mask.fn,
        mask_data=None if mask is None else _data(mask, device),
        score_fn=None if score is None else score.fn,
        score_grad=None if score is None else score.grad,
        score_data=None if score is None else _data(score, device),
        kinds=kinds, kind_strides=strides, block=block)


def check_tiles(mods: KernelMods, block_q: int, block_k: int) -> None:
    """The kernel's tiles must fall inside the block mask's (divide them)."""
    if mods.kinds is not None and (mods.block[0] % block_q or mods.block[1] % block_k):
        raise ValueError(f"block_mask: its {mods.block[0]} x {mods.block[1]} tiles must be "
                         f"multiples of the kernel's block_q x block_k = {block_q} x "
                         f"{block_k}")


def _as_mod(mod: Any, name: str) -> Mod | None:
    if mod is None or isinstance(mod, Mod):
        return mod
    if _is_jit(mod):
        return Mod(mod)
    raise TypeError(f"{name}: expected a flashmath.triton.mods.Mod or a @triton.jit function, "
                    f"got {type(mod).__name__} (NumPy mods run in flashmath.flash_attention)")


def _data(mod: Mod, device: torch.device) -> torch.Tensor | None:
    return None if mod.data is None else mod.data.to(device).contiguous()
