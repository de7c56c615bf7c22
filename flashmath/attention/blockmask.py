"""Block masks: a mask_mod classified once per tile, EMPTY / FULL / PARTIAL, and reused.

:func:`create_block_mask` (FlexAttention's name) splits the (Sq, Sk) pairs of every
(batch entry, query head) into ``block_q x block_k`` tiles and records for each whether no
pair may attend (EMPTY: a kernel skips it), every pair may (FULL: no mask is built) or some
may (PARTIAL: the kernel calls the mask_mod on it). A mod with a ``tile_kind`` method (the
library's interval masks) is classified from it, a few integer operations per tile; any
other mod is evaluated once per row of tiles, over all keys, and reduced.

The result answers for any rectangle a kernel asks about (:meth:`BlockMask.kind`), so the
kernel's tiles need not be the block mask's: a rectangle is EMPTY if every block it touches
is EMPTY, FULL if every one is FULL, else PARTIAL. One BlockMask serves every call (and
layer) with the same mask, batch and head counts, and sequence lengths.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from flashmath.attention.masks import TileKind
from flashmath.attention.mods import MaskMod, ModError, mask_tile, mod_name

__all__ = ["DEFAULT_BLOCK", "BlockMask", "create_block_mask"]

#: The default block size (FlexAttention's).
DEFAULT_BLOCK = 128


@dataclass(frozen=True, eq=False)
class BlockMask:
    """A mask_mod's tile classification for (B, H, Sq, Sk).

    kinds: (B|1, H|1, ceil(Sq / block_q), ceil(Sk / block_k)) uint8 TileKind values (a size-1
        axis broadcasts: the mod did not depend on b or h). The last row/column of blocks
        may be smaller than block_q/block_k.
    mask_mod: the mod (the kernel calls it on PARTIAL tiles).
    sq, sk, block_q, block_k: the sequence lengths and block sizes.
    """

    kinds: np.ndarray
    mask_mod: MaskMod
    sq: int
    sk: int
    block_q: int
    block_k: int

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(B|1, H|1, Sq, Sk): what the block mask covers."""
        return (self.kinds.shape[0], self.kinds.shape[1], self.sq, self.sk)

    def sparsity(self) -> float:
        """The fraction of EMPTY blocks, weighted by their area (what skipping saves)."""
        rows = np.diff(np.minimum(np.arange(self.kinds.shape[2] + 1) * self.block_q, self.sq))
        cols = np.diff(np.minimum(np.arange(self.kinds.shape[3] + 1) * self.block_k, self.sk))
        area = rows[:, None] * cols[None, :]
        empty = (self.kinds == TileKind.EMPTY) * area
        return float(empty.sum() / (area.sum() * self.kinds.shape[0] * self.kinds.shape[1]))

    def kind(self, b: int, h: int, q0: int, q1: int, k0: int, k1: int) -> TileKind:
        """EMPTY, FULL or PARTIAL for absolute query rows [q0, q1) x keys [k0, k1) of batch
        entry b, query head h (any rectangle inside (Sq, Sk); an empty one is EMPTY)."""
        if not (0 <= q0 and q1 <= self.sq and 0 <= k0 and k1 <= self.sk):
            raise ValueError(f"block_mask: rectangle [{q0}, {q1}) x [{k0}, {k1}) lies outside "
                             f"its (Sq, Sk) = ({self.sq}, {self.sk})")
        if q0 >= q1 or k0 >= k1:
            return TileKind.EMPTY
        tiles = self.kinds[b if self.kinds.shape[0] != 1 else 0,
                           h if self.kinds.shape[1] != 1 else 0,
                           q0 // self.block_q: -(-q1 // self.block_q),
                           k0 // self.block_k: -(-k1 // self.block_k)]
        lo, hi = int(tiles.min()), int(tiles.max())
        if lo == hi:
            return TileKind(lo)
        return TileKind.PARTIAL

    def live_keys(self, b: int, h: int, q0: int, q1: int, k0: int, k1: int) -> tuple[int, int]:
        """The smallest [k0', k1') inside [k0, k1) that holds every key of the non-EMPTY
        blocks of rows [q0, q1) (k0' >= k1': none): every key outside is hidden from every
        one of those rows. Same rectangle rules as :meth:`kind`."""
        if not (0 <= q0 and q1 <= self.sq and 0 <= k0 and k1 <= self.sk):
            raise ValueError(f"block_mask: rectangle [{q0}, {q1}) x [{k0}, {k1}) lies outside "
                             f"its (Sq, Sk) = ({self.sq}, {self.sk})")
        if q0 >= q1 or k0 >= k1:
            return k0, k0
        tiles = self.kinds[b if self.kinds.shape[0] != 1 else 0,
                           h if self.kinds.shape[1] != 1 else 0,
                           q0 // self.block_q: -(-q1 // self.block_q),
                           k0 // self.block_k: -(-k1 // self.block_k)]
        live = np.flatnonzero(tiles.any(axis=0))  # EMPTY is 0
        if not live.size:
            return k0, k0
        first = k0 // self.block_k
        return (max(k0, int(first + live[0]) * self.block_k),
                min(k1, int(first + live[-1] + 1) * self.block_k))

    def dense(self) -> np.ndarray:
        """The whole mask, (B|1, H|1, Sq, Sk) bool, with EMPTY blocks False and FULL blocks
        True without calling the mod on them (for tests and small shapes)."""
        bb, hh, nqb, nkb = self.kinds.shape
        out = np.zeros((bb, hh, self.sq, self.sk), np.bool_)
        for b in range(bb):
            for h in range(hh):
                for i in range(nqb):
                    q0, q1 = i * self.block_q, min((i + 1) * self.block_q, self.sq)
                    for j in range(nkb):
                        k0, k1 = j * self.block_k, min((j + 1) * self.block_k, self.sk)
                        kind = self.kinds[b, h, i, j]
                        if kind == TileKind.FULL:
                            out[b, h, q0:q1, k0:k1] = True
                        elif kind == TileKind.PARTIAL:
                            out[b, h, q0:q1, k0:k1] = mask_tile(self.mask_mod, b, h, q0, q1,
                                                                k0, k1)
        return out


def _size(x: Any, name: str, *, allow_none: bool) -> int | None:
    if x is None and allow_none:
        return None
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Integral) or x < 1:
        raise ValueError(f"{name}: expected a positive int{' or None' if allow_none else ''}, "
                         f"got {x!r}")
    return int(x)


def create_block_mask(mask_mod: MaskMod, B: int | None, H: int | None, Sq: int, Sk: int, *,
                      block_q: int | None = None, block_k: int | None = None) -> BlockMask:
    """Classify every (b, h, query block, key block) tile of ``mask_mod`` as EMPTY / FULL /
    PARTIAL.

    Parameters
    ----------
    mask_mod : ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (see :mod:`flashmath.attention.mods`).
        If it has ``tile_kind(b, h, q0, q1, k0, k1)`` (vectorised: q0, q1 int64 (n, 1),
        k0, k1 (1, m) block bounds; returns TileKind values broadcastable to (n, m)), that
        exact rule is used and the mod is not evaluated.
    B, H : batch and query-head counts, or None: the mask does not depend on b (h), the mod
        is called with b = 0 (h = 0) and the axis has size 1 (broadcast).
    Sq, Sk : the query and key sequence lengths (absolute positions 0..Sq-1, 0..Sk-1).
    block_q, block_k : tile sizes, default 128.

    Returns
    -------
    BlockMask, whose ``kinds`` is (B|1, H|1, ceil(Sq / block_q), ceil(Sk / block_k)) uint8.

    Examples
    --------
    >>> from flashmath.attention.modlib import causal
    >>> create_block_mask(causal(4, 4), None, None, 4, 4, block_q=2, block_k=2).kinds[0, 0]
    array([[2, 0],
           [1, 2]], dtype=uint8)
    """
    if not callable(mask_mod):
        raise TypeError(f"mask_mod: expected a callable mask_mod(b, h, q_idx, kv_idx), got "
                        f"{type(mask_mod).__name__}")
    nb, nh = _size(B, "B", allow_none=True), _size(H, "H", allow_none=True)
    sq, sk = _size(Sq, "Sq", allow_none=False), _size(Sk, "Sk", allow_none=False)
    bq = _size(DEFAULT_BLOCK if block_q is None else block_q, "block_q", allow_none=False)
    bk = _size(DEFAULT_BLOCK if block_k is None else block_k, "block_k", allow_none=False)
    assert sq is not None and sk is not None and bq is not None and bk is not None
    q_starts = np.arange(0, sq, bq, dtype=np.int64)
    k_starts = np.arange(0, sk, bk, dtype=np.int64)
    kinds = np.empty((nb or 1, nh or 1, q_starts.size, k_starts.size), np.uint8)
    tile_kind = getattr(mask_mod, "tile_kind", None)
    for b in range(nb or 1):
        for h in range(nh or 1):
            if tile_kind is not None:
                kinds[b, h] = _from_tile_kind(mask_mod, tile_kind, b, h, q_starts, k_starts,
                                              sq, sk)
            else:
                kinds[b, h] = _from_evaluation(mask_mod, b, h, q_starts, k_starts, sq, sk)
    return BlockMask(kinds=kinds, mask_mod=mask_mod, sq=sq, sk=sk, block_q=bq, block_k=bk)


def _from_tile_kind(mask_mod: Any, tile_kind: Any, b: int, h: int, q_starts: np.ndarray,
                    k_starts: np.ndarray, sq: int, sk: int) -> np.ndarray:
    q0 = q_starts[:, None]
    q1 = np.minimum(np.append(q_starts[1:], sq), sq)[:, None]
    k0 = k_starts[None, :]
    k1 = np.minimum(np.append(k_starts[1:], sk), sk)[None, :]
    out = np.asarray(tile_kind(b, h, q0, q1, k0, k1))
    try:
        return np.broadcast_to(out, (q_starts.size, k_starts.size)).astype(np.uint8)
    except ValueError:
        raise ModError(f"mask_mod {mod_name(mask_mod)!r}: tile_kind returned shape {out.shape}, "
                       f"not broadcastable to the ({q_starts.size}, {k_starts.size}) tiles"
                       ) from None


def _from_evaluation(mask_mod: Any, b: int, h: int, q_starts: np.ndarray,
                     k_starts: np.ndarray, sq: int, sk: int) -> np.ndarray:
    """One mod call per row of tiles (all keys at once), reduced per key block."""
    out = np.empty((q_starts.size, k_starts.size), np.uint8)
    bounds = np.append(q_starts, sq)
    for i in range(q_starts.size):
        ok = mask_tile(mask_mod, b, h, int(bounds[i]), int(bounds[i + 1]), 0, sk)
        cols_any = np.logical_or.reduceat(ok.any(axis=0), k_starts)
        cols_all = np.logical_and.reduceat(ok.all(axis=0), k_starts)
        out[i] = np.where(cols_all, TileKind.FULL,
                          np.where(cols_any, TileKind.PARTIAL, TileKind.EMPTY))
    return out
