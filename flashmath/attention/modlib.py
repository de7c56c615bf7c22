"""A library of mask_mods and score_mods (FlexAttention style), each a few lines.

Every mod follows :mod:`flashmath.attention.mods`: called once per tile with ``b``, ``h``
ints and absolute positions ``q_idx`` (nq, 1), ``kv_idx`` (1, nk). Interval masks (causal,
sliding window, prefix-LM, sorted document ids, the sink pattern) carry an exact
``tile_kind`` so :func:`~flashmath.attention.blockmask.create_block_mask` never evaluates
them; score_mods carry ``dscore`` (their derivative in the score) for the backward.

Mask mods: :func:`causal`, :func:`sliding_window`, :func:`prefix_lm`,
:func:`document_mask`, :func:`attention_sink`, :func:`spec_mask_mod` (a built-in
:class:`~flashmath.attention.masks.MaskSpec` as a mask_mod), combined by
:func:`and_masks` / :func:`or_masks`. Score mods: :func:`alibi`,
:func:`relative_bias`, :func:`t5_bias`, :func:`softcap`.

Alignment: ``align="bottom_right"`` (``causal=True``'s: the diagonal of query i is key
``i + Sk - Sq``) or ``"top_left"`` (torch's: key i), as in :mod:`flashmath.attention.masks`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from flashmath.attention.masks import MaskSpec, TileKind, alibi_slopes, block_of
from flashmath.attention.mods import MaskMod, ScoreMod, and_kinds, or_kinds

__all__ = [
    "alibi",
    "and_masks",
    "attention_sink",
    "causal",
    "document_mask",
    "or_masks",
    "prefix_lm",
    "relative_bias",
    "sliding_window",
    "softcap",
    "spec_mask_mod",
    "t5_bias",
    "t5_bucket",
]


def _diag(sq: int, sk: int, align: str) -> int:
    if align not in ("bottom_right", "top_left"):
        raise ValueError(f'align: expected "bottom_right" or "top_left", got {align!r}')
    return sk - sq if align == "bottom_right" else 0


def _band(lo: int | None, hi: int | None, diag: int, name: str) -> MaskMod:
    """Pairs with lo <= kv - q - diag <= hi (None: unbounded), with an exact tile_kind."""

    def mod(b: int, h: int, q_idx: np.ndarray, kv_idx: np.ndarray) -> np.ndarray:
        rel = kv_idx - q_idx - diag
        ok = np.ones(rel.shape, np.bool_)
        if lo is not None:
            ok &= rel >= lo
        if hi is not None:
            ok &= rel <= hi
        return ok

    def tile_kind(b: int, h: int, q0: Any, q1: Any, k0: Any, k1: Any) -> np.ndarray:
        rmin, rmax = k0 - (q1 - 1) - diag, (k1 - 1) - q0 - diag  # extremes of kv - q - diag
        empty = np.zeros(np.broadcast(rmin, rmax).shape, np.bool_)
        full = np.ones_like(empty)
        if lo is not None:
            empty, full = empty | (rmax < lo), full & (rmin >= lo)
        if hi is not None:
            empty, full = empty | (rmin > hi), full & (rmax <= hi)
        return np.where(empty, TileKind.EMPTY, np.where(full, TileKind.FULL, TileKind.PARTIAL))

    mod.__name__ = mod.__qualname__ = name
    mod.tile_kind = tile_kind  # type: ignore[attr-defined]
    mod.band = (lo, hi, diag)  # type: ignore[attr-defined]  # tiles built by the mask builder
    return mod


def causal(Sq: int, Sk: int, *, align: str = "bottom_right") -> MaskMod:
    """Query i sees key j iff ``j <= i + diag`` (diag = Sk - Sq, or 0 top-left): the same
    pairs as ``causal=True`` / ``causal="top_left"``."""
    return _band(None, 0, _diag(Sq, Sk, align), f"causal_{align}")


def sliding_window(Sq: int, Sk: int, left: int | None, right: int | None = 0, *,
                   align: str = "bottom_right") -> MaskMod:
    """Query i sees keys from ``left`` before to ``right`` after its diagonal (None:
    unbounded): the same pairs as ``window=(left, right)`` (right=0: causal with a window)."""
    return _band(None if left is None else -left, right, _diag(Sq, Sk, align),
                 f"sliding_window_{left}_{right}")


def prefix_lm(prefix: int) -> MaskMod:
    """Prefix-LM: every query sees the first ``prefix`` keys (a bidirectional prefix), and
    key j <= i (top-left causal) beyond it."""

    def prefix_lm_mask(b: int, h: int, q_idx: np.ndarray, kv_idx: np.ndarray) -> np.ndarray:
        return (kv_idx < prefix) | (kv_idx <= q_idx)

    def tile_kind(b: int, h: int, q0: Any, q1: Any, k0: Any, k1: Any) -> np.ndarray:
        full = (k1 <= prefix) | (k1 - 1 <= q0)
        empty = (k0 >= prefix) & (k0 > q1 - 1)
        return np.where(full, TileKind.FULL, np.where(empty, TileKind.EMPTY, TileKind.PARTIAL))

    prefix_lm_mask.tile_kind = tile_kind  # type: ignore[attr-defined]
    return prefix_lm_mask


def document_mask(doc_ids: Any, kv_doc_ids: Any = None) -> MaskMod:
    """Packed sequences: query i sees key j iff they belong to the same document.

    doc_ids: integer document id per query position, (S,) or (B, S); kv_doc_ids likewise
    for the keys (default: doc_ids). With ids sorted along each row (documents laid end
    to end), the mod has an exact ``tile_kind`` from the ids at the tile's corners. AND it
    with :func:`causal` for causal packed sequences.
    """
    q_ids = _ids(doc_ids, "doc_ids")
    kv_ids = q_ids if kv_doc_ids is None else _ids(kv_doc_ids, "kv_doc_ids")

    def document(b: int, h: int, q_idx: np.ndarray, kv_idx: np.ndarray) -> np.ndarray:
        return q_ids[b % q_ids.shape[0], q_idx] == kv_ids[b % kv_ids.shape[0], kv_idx]

    def tile_kind(b: int, h: int, q0: Any, q1: Any, k0: Any, k1: Any) -> np.ndarray:
        qi, ki = q_ids[b % q_ids.shape[0]], kv_ids[b % kv_ids.shape[0]]
        qlo, qhi, klo, khi = qi[q0], qi[q1 - 1], ki[k0], ki[k1 - 1]
        empty = (qhi < klo) | (khi < qlo)
        full = (qlo == qhi) & (klo == khi) & (qlo == klo)
        return np.where(empty, TileKind.EMPTY, np.where(full, TileKind.FULL, TileKind.PARTIAL))

    if all(np.all(np.diff(x, axis=-1) >= 0) for x in (q_ids, kv_ids)):
        document.tile_kind = tile_kind  # type: ignore[attr-defined]
    return document


def _ids(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype.kind not in "iu" or arr.ndim not in (1, 2) or arr.shape[-1] == 0:
        raise ValueError(f"{name}: expected integer ids of shape (S,) or (B, S), got "
                         f"{arr.dtype} {arr.shape}")
    return arr.reshape(-1, arr.shape[-1])


def attention_sink(Sq: int, Sk: int, sinks: int, window: int, *,
                   align: str = "bottom_right") -> MaskMod:
    """StreamingLLM's pattern: query i sees the first ``sinks`` keys and the ``window``
    keys ending at its causal diagonal (``window - 1`` before it), never a future key."""
    first = _band(None, 0, _diag(Sq, Sk, align), "causal")
    recent = _band(-(window - 1), 0, _diag(Sq, Sk, align), "window")

    def streaming(b: int, h: int, q_idx: np.ndarray, kv_idx: np.ndarray) -> np.ndarray:
        return first(b, h, q_idx, kv_idx) & ((kv_idx < sinks) | recent(b, h, q_idx, kv_idx))

    def tile_kind(b: int, h: int, q0: Any, q1: Any, k0: Any, k1: Any) -> np.ndarray:
        head = np.where(k1 <= sinks, TileKind.FULL,
                        np.where(k0 >= sinks, TileKind.EMPTY, TileKind.PARTIAL))
        return and_kinds(first.tile_kind(b, h, q0, q1, k0, k1),  # type: ignore[attr-defined]
                         or_kinds(head, recent.tile_kind(  # type: ignore[attr-defined]
                             b, h, q0, q1, k0, k1)))

    streaming.tile_kind = tile_kind  # type: ignore[attr-defined]
    return streaming


def _combine(mods: tuple[MaskMod, ...], op: Any, kinds: Any, name: str) -> MaskMod:
    if not mods or not all(callable(m) for m in mods):
        raise TypeError(f"{name}: expected one or more mask_mods, got {mods!r}")

    def combined(b: int, h: int, q_idx: np.ndarray, kv_idx: np.ndarray) -> np.ndarray:
        out = mods[0](b, h, q_idx, kv_idx)
        for m in mods[1:]:
            out = op(out, m(b, h, q_idx, kv_idx))
        return np.asarray(out)

    combined.__name__ = combined.__qualname__ = (
        f"{name}({', '.join(getattr(m, '__name__', '?') for m in mods)})")
    if all(hasattr(m, "tile_kind") for m in mods):
        combined.tile_kind = lambda *a: kinds(*(m.tile_kind(*a) for m in mods))  # type: ignore
    return combined


def and_masks(*mods: MaskMod) -> MaskMod:
    """A mask_mod true where every one of ``mods`` is (FlexAttention's and_masks)."""
    return _combine(mods, np.logical_and, and_kinds, "and_masks")


def or_masks(*mods: MaskMod) -> MaskMod:
    """A mask_mod true where any of ``mods`` is (FlexAttention's or_masks)."""
    return _combine(mods, np.logical_or, or_kinds, "or_masks")


def spec_mask_mod(spec: MaskSpec, *, q_offset: int = 0, k_offset: int = 0) -> MaskMod:
    """The built-in options (causal, window, lengths, a bool mask) of ``spec`` as a mask_mod
    over absolute positions (local position = absolute - offset), with ``spec.classify`` as
    its tile_kind: the one mask builder behind the mod machinery."""

    def builtin(b: int, h: int, q_idx: np.ndarray, kv_idx: np.ndarray) -> np.ndarray:
        i, j = q_idx - q_offset, kv_idx - k_offset
        rel = j - i - spec.diag[b]
        ok = (i < spec.q_valid[b]) & (j < spec.k_valid[b])
        if spec.lo is not None:
            ok = ok & (rel >= spec.lo)
        if spec.hi is not None:
            ok = ok & (rel <= spec.hi)
        if spec.mask is not None:
            m = block_of(spec.mask, b, h, 0, spec.sq, 0, spec.sk)
            ok = ok & m[i if m.shape[0] != 1 else 0, j if m.shape[1] != 1 else 0]
        return ok

    def tile_kind(b: int, h: int, q0: Any, q1: Any, k0: Any, k1: Any) -> np.ndarray:
        q0, q1, k0, k1 = np.broadcast_arrays(q0, q1, k0, k1)
        out = np.empty(q0.shape, np.uint8)
        for idx in np.ndindex(q0.shape):
            out[idx] = spec.classify(b, int(q0[idx]) - q_offset, int(q1[idx]) - q_offset,
                                     int(k0[idx]) - k_offset, int(k1[idx]) - k_offset)
        return out

    builtin.tile_kind = tile_kind  # type: ignore[attr-defined]
    return builtin


def _bias_mod(term: Any, name: str) -> ScoreMod:
    """score + term(b, h, q_idx, kv_idx): a position-only bias, derivative 1."""

    def mod(score: np.ndarray, b: int, h: int, q_idx: np.ndarray,
            kv_idx: np.ndarray) -> np.ndarray:
        return score + term(b, h, q_idx, kv_idx)

    mod.__name__ = mod.__qualname__ = name
    mod.dscore = lambda score, *_: np.ones_like(score)  # type: ignore[attr-defined]
    return mod


def alibi(Sq: int, Sk: int, slopes: Any = None, *, heads: int | None = None,
          align: str = "bottom_right") -> ScoreMod:
    """ALiBi as a score_mod: ``score - slope[h] * |kv - q - diag|`` (the same term as the
    ``alibi_slopes=`` option). slopes: (H,) or (B, H) reals; default the standard ones for
    ``heads`` heads (:func:`flashmath.attention.masks.alibi_slopes`)."""
    if slopes is None:
        if heads is None:
            raise ValueError("alibi: give slopes or heads")
        slopes = alibi_slopes(heads)
    sl = np.asarray(slopes, np.float64)
    sl = sl.reshape(-1, sl.shape[-1])
    diag = _diag(Sq, Sk, align)
    return _bias_mod(lambda b, h, q, k: -sl[b % sl.shape[0], h] * np.abs(k - q - diag), "alibi")


def relative_bias(table: Any, max_distance: int) -> ScoreMod:
    """A learned relative-position bias: ``score + table[h, clip(kv - q, -max, max) + max]``;
    table (H, 2 * max_distance + 1) reals (a constant: no gradient for it)."""
    tab = np.asarray(table, np.float64)
    if tab.ndim != 2 or tab.shape[1] != 2 * max_distance + 1:
        raise ValueError(f"table: expected shape (H, {2 * max_distance + 1}), got {tab.shape}")
    return _bias_mod(lambda b, h, q, k: tab[h, np.clip(k - q, -max_distance, max_distance)
                                            + max_distance], "relative_bias")


def t5_bucket(rel: Any, num_buckets: int, max_distance: int, bidirectional: bool) -> Any:
    """T5's relative-position bucket of ``rel = kv - q`` (Raffel et al., as Hugging Face's
    ``_relative_position_bucket``): exact buckets for short distances, log-spaced ones up
    to ``max_distance``; int64, in [0, num_buckets)."""
    rel = np.asarray(rel, np.int64)
    out = np.zeros(rel.shape, np.int64)
    if bidirectional:
        num_buckets //= 2
        out += (rel > 0) * num_buckets
        rel = np.abs(rel)
    else:
        rel = -np.minimum(rel, 0)
    exact = num_buckets // 2
    with np.errstate(divide="ignore", invalid="ignore"):  # max_distance <= exact: no large
        large = exact + (np.log(np.maximum(rel, 1) / exact) / math.log(max_distance / exact)
                         * (num_buckets - exact)).astype(np.int64)
    return out + np.where(rel < exact, rel, np.minimum(large, num_buckets - 1))


def t5_bias(table: Any, *, max_distance: int = 128, bidirectional: bool = True) -> ScoreMod:
    """T5's bucketed relative bias: ``score + table[h, t5_bucket(kv - q)]``, table
    (H, num_buckets) reals (a constant: no gradient for it)."""
    tab = np.asarray(table, np.float64)
    if tab.ndim != 2:
        raise ValueError(f"table: expected shape (H, num_buckets), got {tab.shape}")
    nb = tab.shape[1]
    return _bias_mod(lambda b, h, q, k: tab[h, t5_bucket(k - q, nb, max_distance, bidirectional)],
                     "t5_bias")


def softcap(cap: float) -> ScoreMod:
    """``cap * tanh(score / cap)`` (Gemma 2's logit softcap) as a score_mod; dscore is
    ``1 - tanh(score / cap) ** 2``. Applied after the bias, unlike the ``softcap=`` option."""
    if not cap > 0:
        raise ValueError(f"cap: expected a positive number, got {cap!r}")

    def softcap_mod(score: np.ndarray, b: int, h: int, q_idx: np.ndarray,
                    kv_idx: np.ndarray) -> np.ndarray:
        return cap * np.tanh(score / cap)

    def dscore(score: np.ndarray, *_: Any) -> np.ndarray:
        return 1 - np.tanh(score / cap) ** 2

    softcap_mod.dscore = dscore  # type: ignore[attr-defined]
    return softcap_mod
