"""Validation of an attention call and the normalised option set every backend reads.

:func:`resolve` checks q, k, v and the keyword options of ``attention_reference``,
``flash_attention`` and ``flash_attention_backward`` once, and returns an
:class:`AttentionOptions`: shapes, scale, softcap, the bias as a 4-D array and the
:class:`~flashmath.attention.masks.MaskSpec`. Bad input raises ValueError (shapes, ranges)
or TypeError (dtypes, types), naming the argument and what it got.

The rules every backend shares (the NumPy kernels, the oracle, split-KV decoding, the
Triton op and ring attention): :func:`check_shapes` (the (B, H, S, D) shape and dtype rule,
on anything with ``.shape`` and ``.dtype``: NumPy arrays, torch tensors), :func:`check_causal`
(the one reading of ``causal``, typed :data:`Causal`), :func:`check_window`,
:func:`check_lengths`, :func:`check_positive` / :func:`check_finite` (scalars) and
:func:`check_blocks` (tile sizes). May import: dtypes, attention.masks.

Legend: B batch, H query heads, H_kv key/value heads (H % H_kv == 0; query head h reads
key/value head h // (H // H_kv)), Sq/Sk query/key lengths, D the q/k head dim, Dv the v
head dim.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from flashmath.attention.blockmask import BlockMask
from flashmath.attention.masks import Alignment, MaskSpec, block_of
from flashmath.attention.mods import Mods
from flashmath.dtypes import FLOAT8_DTYPES, accumulate_dtype, as_float_array

__all__ = [
    "AttentionOptions",
    "Causal",
    "Window",
    "check_alibi_slopes",
    "check_backward_inputs",
    "check_blocks",
    "check_causal",
    "check_finite",
    "check_lengths",
    "check_mods",
    "check_positive",
    "check_qkv",
    "check_shapes",
    "check_sinks",
    "check_window",
    "resolve",
]

#: ``causal=``: False (no mask), True (bottom-right aligned: the last query sees every key,
#: FlashAttention >= 2.1) or "top_left" (query i sees keys 0..i, torch SDPA's is_causal).
#: :func:`check_causal` also takes "bottom_right", a spelled-out True.
Causal = bool | Literal["top_left", "bottom_right"]
#: ``window=``: (left, right) keys either side of the diagonal, None for an unbounded side.
Window = tuple[int | None, int | None] | None


@dataclass(frozen=True, eq=False)
class AttentionOptions:
    """The validated options of one attention call.

    batch, heads, kv_heads, sq, sk, d, dv: the shapes (local ones for a shard).
    dtype: the input dtype shared by q, k and v.
    scale: the factor on q . k (1/sqrt(D) unless given).
    softcap: c in s -> c * tanh(s / c), applied to scale * q . k before the bias; or None.
    bias: float, 4-D, broadcastable to (B, H, Sq, Sk), added after the softcap; or None.
    spec: which pairs may attend (causal, window, boolean mask, lengths, offsets).
    all_keys: the local keys are the whole key sequence (not a shard of it), so a row's
        probabilities over them sum to 1.
    alibi: (B|1, H) float64 ALiBi slopes, or None: pair (i, j) of head h gets the score
        term ``-alibi[b, h] * |j - i - spec.diag[b]|`` (the distance to the mask's diagonal,
        bottom-right unless causal="top_left"), added with the bias after the softcap.
    sinks: (H,) float64 attention-sink logits, or None: each row's softmax denominator
        gains ``exp(sinks[h])``, a key that carries no value (gpt-oss); lse includes it.
    """

    batch: int
    heads: int
    kv_heads: int
    sq: int
    sk: int
    d: int
    dv: int
    dtype: np.dtype[Any]
    scale: float
    softcap: float | None
    bias: np.ndarray | None
    spec: MaskSpec
    all_keys: bool = True
    alibi: np.ndarray | None = None
    sinks: np.ndarray | None = None
    mods: Mods | None = None  # score_mod / mask_mod / block_mask (see check_mods), or None
    q_offset: int = 0  # global position of local query row 0 (shards): where mods look
    k_offset: int = 0  # global position of local key 0

    @property
    def group(self) -> int:
        """Query heads per key/value head (1 for multi-head, H for multi-query attention)."""
        return self.heads // self.kv_heads

    @property
    def has_bias(self) -> bool:
        """Whether scores get an additive term (a bias or ALiBi)."""
        return self.bias is not None or self.alibi is not None

    def bias_block(self, b: int, h: int, i0: int, i1: int, j0: int, j1: int) -> Any:
        """The additive score terms (bias and ALiBi) of local rows [i0, i1), keys [j0, j1)
        of batch b, head h: float64 broadcastable to (i1 - i0, j1 - j0), or 0.0 if none."""
        term: Any = 0.0
        if self.bias is not None:
            term = block_of(self.bias, b, h, i0, i1, j0, j1)
        if self.alibi is not None:
            slope = self.alibi[b if self.alibi.shape[0] != 1 else 0, h]
            dist = np.arange(j0, j1)[None, :] - np.arange(i0, i1)[:, None] - self.spec.diag[b]
            term = term - slope * np.abs(dist)
        return term

    def dense_bias(self) -> Any:
        """The additive score terms for every pair, broadcastable to (B, H, Sq, Sk)."""
        term: Any = 0.0 if self.bias is None else self.bias
        if self.alibi is not None:
            dist = (np.arange(self.sk)[None, :] - np.arange(self.sq)[:, None])[None]
            dist = np.abs(dist - self.spec.diag[:, None, None])  # (B, Sq, Sk)
            term = term - self.alibi[:, :, None, None] * dist[:, None]
        return term

    @property
    def lse_dtype(self) -> np.dtype[Any]:
        """The accumulate dtype of the input: float64 for float64, float32 otherwise (the
        dtype of lse)."""
        return accumulate_dtype(self.dtype)


def check_causal(causal: Any) -> Alignment | None:
    """The alignment ``causal`` asks for: None (False), "bottom_right" (True or
    "bottom_right") or "top_left". Anything else (another string, 2, None is False) raises
    ValueError naming ``causal``."""
    if causal is None or causal is False or causal is np.False_:
        return None
    if causal is True or causal is np.True_ or causal == "bottom_right":
        return "bottom_right"
    if causal == "top_left":
        return "top_left"
    raise ValueError(
        f'causal: expected False, True (bottom-right aligned), "bottom_right" or "top_left", '
        f"got {causal!r}"
    )


def check_window(window: Any) -> Window:
    """(left, right) with each side a non-negative int or None (unbounded), or None."""
    if window is None:
        return None
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise ValueError(f"window: expected (left, right) with ints or None, got {window!r}")
    sides: list[int | None] = []
    for side, value in zip(("left", "right"), window, strict=True):
        if value is None:
            sides.append(None)
            continue
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
            raise TypeError(f"window: {side} must be an int or None, got {value!r}")
        if value < 0:
            raise ValueError(
                f"window: {side}={value} is negative; use None for an unbounded side "
                f"(flash-attn's -1)"
            )
        sides.append(int(value))
    return sides[0], sides[1]


def _broadcastable(x: Any, name: str, target: tuple[int, ...], *, boolean: bool) -> np.ndarray:
    arr = np.asarray(x)
    if boolean and arr.dtype != np.bool_:
        raise TypeError(
            f"{name}: expected a boolean array (True = may attend), got dtype {arr.dtype}; "
            f"pass additive float masks as bias="
        )
    if not boolean:
        if arr.dtype == np.bool_:  # a mask passed as bias would be added as 0/1: refuse it
            raise TypeError(f"{name}: got a boolean array; pass boolean masks as mask= "
                            f"(True = may attend), additive float masks as bias=")
        arr = as_float_array(arr, name=name)
    if arr.ndim > 4:
        raise ValueError(f"{name}: shape {arr.shape} has more than 4 axes; expected "
                         f"a shape broadcastable to (B, H, Sq, Sk) = {target}")
    try:
        fits = np.broadcast_shapes(arr.shape, target) == target
    except ValueError:
        fits = False
    if not fits:  # broadcasting *with* the target is not enough: it must broadcast *to* it
        raise ValueError(
            f"{name}: shape {arr.shape} does not broadcast to (B, H, Sq, Sk) = {target}; "
            f"each axis must be 1 or match"
        )
    return arr.reshape((1,) * (4 - arr.ndim) + arr.shape)


def check_alibi_slopes(x: Any, batch: int, heads: int) -> np.ndarray | None:
    """ALiBi slopes: None, or finite reals of shape (H,) or (B, H) (flash-attention's
    ``alibi_slopes``), returned as float64 (B|1, H). See :func:`masks.alibi_slopes` for
    the standard ones."""
    if x is None:
        return None
    arr = np.asarray(x)
    if arr.dtype.kind not in "iuf":
        raise TypeError(f"alibi_slopes: expected real numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if arr.shape not in ((heads,), (batch, heads)):
        raise ValueError(f"alibi_slopes: expected shape (H,) = ({heads},) or (B, H) = "
                         f"({batch}, {heads}), got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"alibi_slopes: must be finite, got {arr.tolist()}")
    return arr.reshape(-1, heads)


def check_sinks(x: Any, heads: int) -> np.ndarray | None:
    """Attention-sink logits: None, or (H,) reals, finite or -inf (no sink for that head),
    returned as float64."""
    if x is None:
        return None
    arr = np.asarray(x)
    if arr.dtype.kind not in "iuf" and str(arr.dtype) != "bfloat16":
        raise TypeError(f"sinks: expected real numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if arr.shape != (heads,):
        raise ValueError(f"sinks: expected one logit per query head, shape (H,) = ({heads},), "
                         f"got {arr.shape}")
    if np.isnan(arr).any() or np.isposinf(arr).any():
        raise ValueError(f"sinks: must be finite or -inf, got {arr.tolist()}")
    return arr


def check_lengths(x: Any, name: str, batch: int, upper: int) -> np.ndarray | None:
    """Per-batch lengths: None, or (batch,) integers in [0, upper] (upper: the key length
    Sk for key lengths, Sq for query lengths), returned as int64. Errors name ``name``."""
    if x is None:
        return None
    arr = np.asarray(x)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected integers, got dtype {arr.dtype}")
    if arr.shape != (batch,):
        raise ValueError(f"{name}: expected shape (B,) = ({batch},), got {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() > upper):
        raise ValueError(f"{name}: values must lie in [0, {upper}], got {arr.tolist()}")
    return arr.astype(np.int64)


def check_finite(x: Any, name: str) -> float:
    """``x`` as a float: a real number (not bool) that is finite; zero and negative values
    are allowed (``scale=-1`` flips the scores). TypeError / ValueError name ``name``."""
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {x!r}")
    value = float(x)
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {x!r}")
    return value


def check_positive(x: Any, name: str) -> float:
    """``x`` as a float: a finite real number > 0 (a softcap). Errors name ``name``."""
    value = check_finite(x, name)
    if value <= 0:
        raise ValueError(f"{name}: expected a finite positive number, got {x!r}")
    return value


def _dims(shape: Any) -> tuple[int, ...]:
    return tuple(int(n) for n in shape)


def check_shapes(q: Any, k: Any, v: Any, names: tuple[str, str, str] = ("q", "k", "v")) -> None:
    """The (B, H, S, D) rule of every backend, on anything with ``.shape`` and ``.dtype``
    (NumPy arrays, torch tensors; nothing is converted or copied).

    q (B, H, Sq, D), k (B, H_kv, Sk, D), v (B, H_kv, Sk, Dv), one dtype, H_kv >= 1 dividing
    H. Raises ValueError (shapes) or TypeError (dtypes) naming the argument by ``names``
    (``flash_decode`` passes ("q", "k_cache", "v_cache")) and the shapes it got."""
    qn, kn, vn = names
    legends = ("(B, H, Sq, D)", "(B, H_kv, Sk, D)", "(B, H_kv, Sk, Dv)")
    for name, x, legend in zip(names, (q, k, v), legends, strict=True):
        if len(x.shape) != 4:
            raise ValueError(f"{name}: expected a 4-D array {legend}, got shape {_dims(x.shape)}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"{qn}, {kn}, {vn} must share one dtype; got {qn} {q.dtype}, "
                        f"{kn} {k.dtype}, {vn} {v.dtype}")
    qs, ks, vs = _dims(q.shape), _dims(k.shape), _dims(v.shape)
    (batch, heads, _, d), kv_heads = qs, ks[1]
    if ks[0] != batch or vs[0] != batch:
        raise ValueError(f"{kn}, {vn}: batch sizes differ from {qn}'s B={batch}: "
                         f"{qn} {qs}, {kn} {ks}, {vn} {vs}")
    if ks[3] != d:
        raise ValueError(f"{kn}: head dims differ: {qn} {qs} has D={d}, "
                         f"{kn} {ks} has D={ks[3]}")
    if vs[1:3] != ks[1:3]:
        raise ValueError(f"{vn}: shape differs from {kn}'s (H_kv, Sk): "
                         f"{kn} {ks} and {vn} {vs} must share (H_kv, Sk)")
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"{kn}: H_kv={kv_heads} does not divide H: {qn} {qs} has "
                         f"H={heads} heads, not a multiple of H_kv={kv_heads}")


def check_qkv(
    q: Any, k: Any, v: Any, names: tuple[str, str, str] = ("q", "k", "v")
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """q, k, v as NumPy float arrays (lists and integer input are converted, float64 for
    integers) that follow :func:`check_shapes`. Errors name the arguments by ``names``."""
    q, k, v = (as_float_array(x, name=n) for x, n in zip((q, k, v), names, strict=True))
    check_shapes(q, k, v, names)
    return q, k, v


def resolve(
    q: Any,
    k: Any,
    v: Any,
    *,
    causal: Any = False,
    window: Any = None,
    mask: Any = None,
    bias: Any = None,
    kv_lengths: Any = None,
    q_lengths: Any = None,
    softcap: Any = None,
    scale: Any = None,
    alibi_slopes: Any = None,
    sinks: Any = None,
    q_offset: int = 0,
    k_offset: int = 0,
    q_total: int | None = None,
    k_total: int | None = None,
    score_mod: Any = None,
    mask_mod: Any = None,
    block_mask: Any = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, AttentionOptions]:
    """Validate an attention call; return (q, k, v) as float arrays and the options.

    q: (B, H, Sq, D); k: (B, H_kv, Sk, D); v: (B, H_kv, Sk, Dv); one float dtype (integer
    and bool input promotes to float64). See the module docs of ``masks`` for causal,
    window, mask, lengths and the shard arguments q_offset, k_offset, q_total, k_total.
    """
    q, k, v = check_qkv(q, k, v)
    (batch, heads, sq, d), (_, kv_heads, sk, _), dv = q.shape, k.shape, v.shape[3]
    if d == 0:
        raise ValueError(f"q: head dim D must be positive, got shape {q.shape}")
    for name, off in (("q_offset", q_offset), ("k_offset", k_offset)):
        if off < 0:
            raise ValueError(f"{name}: must be >= 0, got {off}")
    q_total = q_offset + sq if q_total is None else q_total
    k_total = k_offset + sk if k_total is None else k_total
    if q_total < q_offset + sq or k_total < k_offset + sk:
        raise ValueError(
            f"q_total={q_total}, k_total={k_total} do not cover the shard "
            f"(q_offset={q_offset}, Sq={sq}; k_offset={k_offset}, Sk={sk})"
        )
    target = (batch, heads, sq, sk)
    mask_arr = None if mask is None else _broadcastable(mask, "mask", target, boolean=True)
    bias_arr = None if bias is None else _broadcastable(bias, "bias", target, boolean=False)
    spec = MaskSpec.create(
        batch, sq, sk,
        causal=check_causal(causal),
        window=check_window(window),
        mask=mask_arr,
        q_lengths=check_lengths(q_lengths, "q_lengths", batch, q_total),
        kv_lengths=check_lengths(kv_lengths, "kv_lengths", batch, k_total),
        q_offset=q_offset, k_offset=k_offset, q_total=q_total, k_total=k_total,
    )
    opts = AttentionOptions(
        batch=batch, heads=heads, kv_heads=kv_heads, sq=sq, sk=sk, d=d, dv=dv,
        dtype=q.dtype,
        scale=1.0 / math.sqrt(d) if scale is None else check_finite(scale, "scale"),
        softcap=None if softcap is None else check_positive(softcap, "softcap"),
        bias=bias_arr,
        spec=spec,
        all_keys=k_offset == 0 and k_total == sk,
        alibi=check_alibi_slopes(alibi_slopes, batch, heads),
        sinks=check_sinks(sinks, heads),
        mods=check_mods(score_mod, mask_mod, block_mask, batch, heads, q_total, k_total),
        q_offset=q_offset, k_offset=k_offset,
    )
    return q, k, v, opts


def check_blocks(block_q: Any, block_k: Any) -> None:
    """block_q, block_k: None (the default) or positive ints."""
    for name, value in (("block_q", block_q), ("block_k", block_k)):
        if value is None:
            continue
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name}: expected a positive int or None, got {value!r}")
        if value < 1:
            raise ValueError(f"{name}: expected a positive int or None, got {value}")


def check_backward_inputs(opts: AttentionOptions, **arrays: Any) -> list[np.ndarray]:
    """Validate the backward's arrays, given by name, against the forward's options.

    dout, out: (B, H, Sq, Dv); lse: (B, H, Sq). Returns them as float arrays, in the order
    given. float8 is rejected: the backward is defined for float64, float32, float16 and
    bfloat16.
    """
    if opts.dtype in FLOAT8_DTYPES.values():
        raise TypeError(
            f"q, k, v: float8 input ({opts.dtype}) is forward-only (no backward); "
            f"cast q, k, v, dout to bfloat16 or float16 for gradients"
        )
    rows = (opts.batch, opts.heads, opts.sq)
    shapes = {"dout": (*rows, opts.dv), "out": (*rows, opts.dv), "lse": rows, "dlse": rows}
    checked = []
    for name, x in arrays.items():
        arr = as_float_array(x, name=name)
        if arr.shape != shapes[name]:
            raise ValueError(
                f"{name}: expected shape {shapes[name]} from q {(*rows, opts.d)} and "
                f"v (Dv={opts.dv}), got {arr.shape}"
            )
        checked.append(arr)
    return checked


def check_mods(score_mod: Any, mask_mod: Any, block_mask: Any, batch: int, heads: int,
               q_total: int, k_total: int) -> Mods | None:
    """score_mod, mask_mod: None or callables (see :mod:`flashmath.attention.mods`);
    block_mask: None or a BlockMask covering (batch|1, heads|1, q_total, k_total), the
    global lengths. Given alone, the block mask's mask_mod is the call's; given with a
    mask_mod, it must be that mod's. Returns None when all three are None."""
    if score_mod is None and mask_mod is None and block_mask is None:
        return None
    for name, mod in (("score_mod", score_mod), ("mask_mod", mask_mod)):
        if mod is not None and not callable(mod):
            raise TypeError(f"{name}: expected a callable or None, got {type(mod).__name__}")
    if block_mask is not None:
        if not isinstance(block_mask, BlockMask):
            raise TypeError(f"block_mask: expected a BlockMask (from create_block_mask) or "
                            f"None, got {type(block_mask).__name__}")
        bb, bh, bsq, bsk = block_mask.shape
        if bb not in (1, batch) or bh not in (1, heads) or (bsq, bsk) != (q_total, k_total):
            raise ValueError(f"block_mask: built for (B, H, Sq, Sk) = {block_mask.shape}, "
                             f"the call has ({batch}, {heads}, {q_total}, {k_total}) (B and "
                             f"H may be 1: broadcast)")
        if mask_mod is not None and mask_mod is not block_mask.mask_mod:
            raise ValueError("block_mask: built from another mask_mod than the mask_mod= "
                             "given; pass only block_mask= (its mod is used)")
        mask_mod = block_mask.mask_mod
    return Mods(score_mod=score_mod, mask_mod=mask_mod, block_mask=block_mask)
