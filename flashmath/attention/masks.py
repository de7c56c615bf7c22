"""Which (query, key) pairs may attend: the one mask builder every attention backend uses.

Every positional mask in flashmath is a statement about *absolute positions*. Query row i
and key column j of the arrays a backend holds sit at global positions

    gi = q_offset + i        gj = k_offset + j

(offsets are 0 unless the arrays are shards of longer sequences, as in ring attention and
split-KV decoding). Pair (gi, gj) of batch entry b may attend iff all of

    gi < q_len[b]                              padding queries attend to nothing
    gj < kv_len[b]                             padding keys are never attended
    lo <= gj - gi - diag[b] <= hi              causal / sliding-window band
    mask[b, h, i, j]                           the caller's boolean mask (True = attend)

hold. ``diag[b]`` places the diagonal: ``kv_len[b] - q_len[b]`` for bottom-right alignment
(``causal=True``, FlashAttention >= 2.1 and its varlen API: the last valid query sees
every valid key) and 0 for ``causal="top_left"`` (torch SDPA). A window without causal
uses the bottom-right diagonal, as flash-attn does. ``window=(left, right)`` gives
``lo = -left``, ``hi = right`` (None: unbounded); ``causal`` caps ``hi`` at 0::

    causal=True, Sq=3, Sk=5          causal="top_left"          window=(1, 0)
       keys 0 1 2 3 4                   keys 0 1 2 3 4            keys 0 1 2 3 4
    q0      x x x . .                q0      x . . . .         q0      . x x . .
    q1      x x x x .                q1      x x . . .         q1      . . x x .
    q2      x x x x x                q2      x x x . .         q2      . . . x x
                                                                 (bottom-right, Sq=3, Sk=5)

The tiled loops never build a mask they do not need: :meth:`MaskSpec.key_span` and
:meth:`MaskSpec.query_span` give the contiguous range a tile row/column can see (so
whole tiles outside it are skipped), :meth:`MaskSpec.classify` says whether a tile is
EMPTY, FULL (no mask needed) or PARTIAL, and :meth:`MaskSpec.block` builds the boolean
mask of one tile from index ranges. The reference oracle materialises the whole
(B, H|1, Sq, Sk) mask with :meth:`MaskSpec.dense`, from the same positional rule.

The boolean ``mask`` (and the float ``bias``, which is a score term, not a mask) are
given in the coordinates of the arrays the backend holds; lengths and offsets are global.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

__all__ = ["Alignment", "MaskSpec", "TileKind", "alibi_bias", "alibi_slopes", "band", "band_span",
           "block_of", "shared_band", "tile_positions"]

Alignment = Literal["bottom_right", "top_left"]


def band(causal: Alignment | None,
         window: tuple[int | None, int | None] | None) -> tuple[int | None, int | None]:
    """The band ``lo <= j - i - diag <= hi`` that ``causal`` and ``window`` allow, as
    (lo, hi) (None: unbounded): ``window=(left, right)`` gives lo = -left, hi = right, and
    ``causal`` (either alignment) caps hi at 0. Options already validated
    (:func:`flashmath.attention.options.check_causal`, ``check_window``)."""
    left, right = (None, None) if window is None else window
    if causal is not None:
        right = 0 if right is None else min(right, 0)
    return (None if left is None else -left), right


class TileKind(enum.IntEnum):
    """What a tile of (query, key) pairs needs: nothing, no mask, or a mask."""

    EMPTY = 0  # no pair may attend: skip the tile
    FULL = 1  # every pair may attend: compute it, build no mask
    PARTIAL = 2  # some pairs may attend: compute it and apply MaskSpec.block


def alibi_slopes(heads: int) -> np.ndarray:
    """The standard ALiBi slopes (Press et al. 2022, as BLOOM and flash-attention use them),
    float64 of shape (heads,).

    For a power of two n: ``2 ** (-8 (h + 1) / n)`` for head h. Otherwise the slopes of
    the largest power of two p < n, followed by every other slope of 2p, up to n heads
    (6 heads: 1/4, 1/16, 1/64, 1/256, then 1/2, 1/8).
    """
    if isinstance(heads, (bool, np.bool_)) or not isinstance(heads, (int, np.integer)):
        raise TypeError(f"heads: expected an int, got {heads!r}")
    if heads < 1:
        raise ValueError(f"heads: expected a positive int, got {heads}")

    def power_of_two(n: int) -> np.ndarray:
        return 2.0 ** (-8.0 * np.arange(1, n + 1) / n)

    p = 1 << (int(heads).bit_length() - 1)
    if p == heads:
        return power_of_two(heads)
    return np.concatenate([power_of_two(p), power_of_two(2 * p)[0::2][: heads - p]])


def alibi_bias(
    heads: int, sq: int, sk: int, *, slopes: np.ndarray | None = None
) -> np.ndarray:
    """The standard ALiBi score bias, float64 of shape (1, heads, sq, sk).

    Head h has slope :func:`alibi_slopes` (heads)[h] unless ``slopes`` (one per head) is
    given. Query row i is aligned bottom-right, like ``causal=True``: its diagonal key is
    ``i + sk - sq``, and the bias of pair (i, j) is ``-slope_h * |j - (i + sk - sq)|``,
    minus the slope times the distance to that diagonal (0 on it). The leading size-1 axis
    broadcasts against (B, heads, sq, sk); pass the result as ``bias=``.
    """
    slopes = alibi_slopes(heads) if slopes is None else np.asarray(slopes, dtype=np.float64)
    if slopes.shape != (heads,):
        raise ValueError(f"slopes: expected shape ({heads},), got {slopes.shape}")
    dist = np.abs(np.arange(sk)[None, :] - np.arange(sq)[:, None] - (sk - sq))
    return -(slopes[:, None, None] * dist)[None]


def block_of(arr: np.ndarray, b: int, h: int, i0: int, i1: int, j0: int, j1: int) -> np.ndarray:
    """The [b, h, i0:i1, j0:j1] block of a 4-D array broadcastable to (B, H, Sq, Sk).

    Broadcast (size-1) axes are read at index 0 and stay size 1 in the 2-D result, so the
    block broadcasts against a (i1 - i0, j1 - j0) tile. Used for the boolean mask and the bias.
    """
    return arr[
        b if arr.shape[0] != 1 else 0,
        h if arr.shape[1] != 1 else 0,
        slice(i0, i1) if arr.shape[2] != 1 else slice(None),
        slice(j0, j1) if arr.shape[3] != 1 else slice(None),
    ]


@dataclass(frozen=True, eq=False)
class MaskSpec:
    """The attention mask of one call, in the local coordinates of the arrays it covers.

    Build it with :meth:`create`. Fields (local coordinates, offsets already applied):

    sq, sk: the local query and key counts.
    q_valid, k_valid: (B,) int64, the local rows/columns before the padding starts
        (``clip(q_len - q_offset, 0, sq)``, likewise for keys).
    diag: (B,) int64, the band's diagonal in local coordinates: pair (i, j) is in the
        band iff ``lo <= j - i - diag[b] <= hi``.
    lo, hi: the band's bounds; None is unbounded.
    mask: the caller's boolean mask as a 4-D array broadcastable to (B, H, sq, sk), or None.
    """

    sq: int
    sk: int
    q_valid: np.ndarray
    k_valid: np.ndarray
    diag: np.ndarray
    lo: int | None
    hi: int | None
    mask: np.ndarray | None

    @classmethod
    def create(
        cls,
        batch: int,
        sq: int,
        sk: int,
        *,
        causal: Alignment | None = None,
        window: tuple[int | None, int | None] | None = None,
        mask: np.ndarray | None = None,
        q_lengths: np.ndarray | None = None,
        kv_lengths: np.ndarray | None = None,
        q_offset: int = 0,
        k_offset: int = 0,
        q_total: int | None = None,
        k_total: int | None = None,
    ) -> MaskSpec:
        """The spec for local arrays of sq queries and sk keys (options already validated).

        causal: None, "bottom_right" (``causal=True``) or "top_left".
        window: (left, right), each a non-negative int or None (unbounded).
        mask: boolean, 4-D, broadcastable to (batch, H, sq, sk); True = may attend.
        q_lengths, kv_lengths: (batch,) global valid lengths; None means q_total, k_total.
        q_offset, k_offset: global position of local query row 0 and key column 0.
        q_total, k_total: global sequence lengths (default q_offset + sq, k_offset + sk);
            they place the bottom-right diagonal when no lengths are given.
        """
        q_total = q_offset + sq if q_total is None else q_total
        k_total = k_offset + sk if k_total is None else k_total
        q_len = np.full(batch, q_total, np.int64) if q_lengths is None else q_lengths
        kv_len = np.full(batch, k_total, np.int64) if kv_lengths is None else kv_lengths
        q_len = np.asarray(q_len, np.int64)
        kv_len = np.asarray(kv_len, np.int64)
        lo, hi = band(causal, window)
        diag = kv_len - q_len if causal != "top_left" else np.zeros(batch, np.int64)
        return cls(
            sq=sq,
            sk=sk,
            q_valid=np.clip(q_len - q_offset, 0, sq),
            k_valid=np.clip(kv_len - k_offset, 0, sk),
            diag=diag + (q_offset - k_offset),
            lo=lo,
            hi=hi,
            mask=mask,
        )

    @property
    def banded(self) -> bool:
        """True when a causal or window band restricts the pairs."""
        return self.lo is not None or self.hi is not None

    def key_span(self, b: int, i0: int, i1: int) -> tuple[int, int]:
        """Keys [j0, j1) that query rows [i0, i1) of batch b may see (j0 >= j1: none).

        Clipped to the valid keys; the rows are taken as given (clip them to
        ``q_valid[b]`` first). Every key outside the span is masked for every row.
        """
        if i0 >= i1:
            return 0, 0
        return band_span(self.lo, self.hi, int(self.diag[b]), i0, i1, 0, int(self.k_valid[b]))

    def live_rows(self, b: int) -> int:
        """How many valid query rows of batch b the band and the lengths let see at least
        one key (the boolean mask aside): rows i < q_valid with key_span(b, i, i + 1)
        non-empty, i.e. -diag - hi <= i < k_valid - diag - lo."""
        kv, d, qv = int(self.k_valid[b]), int(self.diag[b]), int(self.q_valid[b])
        if kv <= 0:
            return 0
        first = 0 if self.hi is None else max(0, -d - self.hi)
        stop = qv if self.lo is None else min(qv, kv - d - self.lo)
        return max(0, stop - first)

    def query_span(self, b: int, j0: int, j1: int) -> tuple[int, int]:
        """Query rows [i0, i1) that may see any of keys [j0, j1) (i0 >= i1: none).

        Clipped to the valid rows; the keys are taken as given.
        """
        i0, i1 = 0, int(self.q_valid[b])
        if j0 >= j1:
            return 0, 0
        d = int(self.diag[b])
        if self.hi is not None:
            i0 = max(i0, j0 - d - self.hi)
        if self.lo is not None:
            i1 = min(i1, j1 - 1 - d - self.lo + 1)
        return i0, i1

    def classify(self, b: int, i0: int, i1: int, j0: int, j1: int) -> TileKind:
        """EMPTY, FULL or PARTIAL for query rows [i0, i1) x keys [j0, j1) of batch b.

        Costs a few integer comparisons. A boolean mask makes every non-empty tile PARTIAL.
        """
        if i0 >= min(i1, self.q_valid[b]) or j0 >= min(j1, self.k_valid[b]):
            return TileKind.EMPTY
        d = int(self.diag[b])
        rel_min, rel_max = j0 - (i1 - 1) - d, (j1 - 1) - i0 - d  # extremes of j - i - diag
        if (self.lo is not None and rel_max < self.lo) or (
            self.hi is not None and rel_min > self.hi
        ):
            return TileKind.EMPTY
        inside = (self.lo is None or rel_min >= self.lo) and (self.hi is None or rel_max <= self.hi)
        within_lengths = i1 <= self.q_valid[b] and j1 <= self.k_valid[b]
        if inside and within_lengths and self.mask is None:
            return TileKind.FULL
        return TileKind.PARTIAL

    def shared_keys(self, b: int, i0: int, i1: int) -> tuple[int, int]:
        """Keys [j0, j1) that every query row of [i0, i1) of batch b may see (j0 >= j1:
        none; always none with a boolean mask). Rows at or past q_valid are taken as valid
        (clip them first)."""
        if self.mask is not None or i0 >= i1:
            return 0, 0
        j0, j1 = shared_band(self.lo, self.hi, int(self.diag[b]), i0, i1, int(self.k_valid[b]))
        return max(0, j0), j1

    def masked_columns(self, b: int, i0: int, i1: int, j0: int, j1: int) -> list[tuple[int, int]]:
        """The column ranges of a PARTIAL tile that need a mask; every pair outside them
        may attend. A causal tile needs only the columns right of its first row's diagonal
        (at most block_q - 1 of them once clipped to the key span), not the whole tile.
        """
        if self.mask is not None or i1 > self.q_valid[b] or j1 > self.k_valid[b]:
            return [(j0, j1)]
        shared0, shared1 = self.shared_keys(b, i0, i1)
        full0, full1 = max(j0, shared0), min(j1, shared1)
        if full0 >= full1:
            return [(j0, j1)]
        return [(a, z) for a, z in ((j0, full0), (full1, j1)) if a < z]

    def block(self, b: int, h: int, i0: int, i1: int, j0: int, j1: int,
              transposed: bool = False) -> np.ndarray:
        """Boolean (i1 - i0, j1 - j0) mask of query rows [i0, i1) x keys [j0, j1) of batch
        entry b, query head h; True = may attend. transposed: the (j1 - j0, i1 - i0) mask
        of the same pairs, keys first (row-major in that order). Read it, never write it:
        without a boolean mask it may be a shared, read-only cached array
        (:func:`tile_positions`)."""
        ok = self._positions(self.diag[b], self.q_valid[b], self.k_valid[b], i0, i1, j0, j1,
                             transposed)
        if self.mask is not None:
            user = block_of(self.mask, b, h, i0, i1, j0, j1)
            ok = ok & (user.T if transposed else user)
        return ok

    def hidden(self, b: int, h: int, i0: int, i1: int, j0: int, j1: int,
               transposed: bool = False) -> np.ndarray:
        """The complement of :meth:`block`: True where the pair may NOT attend, what a
        kernel writes -inf through. Read it, never write it: without a boolean mask it is
        a shared, read-only cached array (no inverted copy per tile)."""
        if self.mask is not None:
            return ~self.block(b, h, i0, i1, j0, j1, transposed)
        return self._positions(self.diag[b], self.q_valid[b], self.k_valid[b], i0, i1, j0, j1,
                               transposed, hidden=True)

    def dense(self) -> np.ndarray:
        """The whole boolean mask, (B, H|1, sq, sk): the head axis has size 1 unless the
        caller's mask varies by head. What the reference oracle materialises."""
        diag, q_valid, k_valid = (x[:, None, None] for x in (self.diag, self.q_valid, self.k_valid))
        ok = self._positions(diag, q_valid, k_valid, 0, self.sq, 0, self.sk)[:, None]  # (B,1,sq,sk)
        if self.mask is not None:
            ok = ok & self.mask
        return ok

    def _positions(
        self, diag: Any, q_valid: Any, k_valid: Any, i0: int, i1: int, j0: int, j1: int,
        transposed: bool = False, hidden: bool = False,
    ) -> np.ndarray:
        """Lengths and band for rows [i0, i1) x keys [j0, j1); diag, q_valid, k_valid are
        scalars (result (ni, nj), or (nj, ni) transposed; hidden: its complement) or
        (B, 1, 1) arrays (result (B, ni, nj)). Built from outer comparisons of index
        ranges, never from an (ni, nj) integer array."""
        if np.ndim(q_valid) == 0:  # one tile: its pattern depends on local offsets only
            diag, q_valid, k_valid = int(diag), int(q_valid), int(k_valid)
            return tile_positions(i1 - i0, j1 - j0, j0 - i0 - diag, self.lo, self.hi,
                                   q_valid - i0 if i1 > q_valid else None,
                                   k_valid - j0 if j1 > k_valid else None, transposed,
                                   hidden)
        rows = np.arange(i0, i1, dtype=np.int64)[:, None]
        cols = np.arange(j0, j1, dtype=np.int64)[None, :]
        tests = [rows < q_valid, cols < k_valid]
        # lo <= j - i - diag  <=>  i <= j - diag - lo;   j - i - diag <= hi  <=>  i >= j - diag - hi
        if self.lo is not None:
            tests.append(rows <= cols - diag - self.lo)
        if self.hi is not None:
            tests.append(rows >= cols - diag - self.hi)
        shape = np.broadcast_shapes(rows.shape, cols.shape, np.shape(diag), np.shape(q_valid))
        ok = tests[0]
        for t in tests[1:]:
            ok = ok & t
        ok = ok if ok.shape == shape else np.broadcast_to(ok, shape).copy()
        return np.logical_not(ok, out=ok) if hidden else ok


def band_span(lo: int | None, hi: int | None, diag: int, i0: int, i1: int, j0: int,
              j1: int) -> tuple[int, int]:
    """Keys of [j0, j1) that some row of [i0, i1) sees under the band
    ``lo <= j - i - diag <= hi`` (None: unbounded): row i0 bounds them below, row i1 - 1
    above (j0 >= j1: none). The band rule of MaskSpec.key_span and Mods.key_span; its
    twin :func:`shared_band` gives the keys every row sees."""
    return (j0 if lo is None else max(j0, i0 + diag + lo),
            j1 if hi is None else min(j1, i1 - 1 + diag + hi + 1))


def shared_band(lo: int | None, hi: int | None, diag: int, i0: int, i1: int,
                keys: int) -> tuple[int, int]:
    """Keys [j0, j1) with j1 <= keys that every row of [i0, i1) sees under the band
    ``lo <= j - i - diag <= hi`` (None: unbounded): row i1 - 1 bounds them below, row i0
    above (j0 >= j1: none; j0 may be negative). The one band rule of MaskSpec.shared_keys,
    Mods.shared_keys and the band mods' masks."""
    return (0 if lo is None else i1 - 1 + diag + lo,
            keys if hi is None else min(keys, i0 + diag + hi + 1))


#: Tiles of at most this many pairs keep their pattern in :func:`tile_positions`' cache.
_CACHED_PAIRS = 1 << 19


def tile_positions(ni: int, nj: int, offset: int, lo: int | None, hi: int | None,
                   q_cut: int | None, k_cut: int | None, transposed: bool,
                   hidden: bool = False) -> np.ndarray:
    """Which pairs of an (ni, nj) tile may attend ((nj, ni) transposed), in local indices
    r < ni, c < nj: r < q_cut, c < k_cut (None: no cut), lo <= c - r + offset <= hi;
    hidden: which may not (the complement, what a kernel masks through). Read-only. A
    causal or windowed pass meets the same few patterns tile after tile (the diagonal
    tiles of a causal pass are all alike), so tiles of up to _CACHED_PAIRS pairs are built
    once: building one took as long as its exp."""
    if ni * nj <= _CACHED_PAIRS:
        return _cached_positions(ni, nj, offset, lo, hi, q_cut, k_cut, transposed, hidden)
    return _build_positions(ni, nj, offset, lo, hi, q_cut, k_cut, transposed, hidden)


@functools.lru_cache(maxsize=16)
def _cached_positions(*key: Any) -> np.ndarray:
    ok = _build_positions(*key)
    ok.flags.writeable = False
    return ok


def _build_positions(ni: int, nj: int, offset: int, lo: int | None, hi: int | None,
                     q_cut: int | None, k_cut: int | None, transposed: bool,
                     hidden: bool = False) -> np.ndarray:
    """:func:`tile_positions` itself, from outer comparisons of index ranges (int32:
    twice as fast as int64), never from an (ni, nj) integer array."""
    consts = [offset - x for x in (lo, hi) if x is not None] + [q_cut or 0, k_cut or 0]
    it = np.int32 if max(ni, nj) + max(map(abs, consts)) < 2**30 else np.int64
    rows: np.ndarray = np.arange(ni, dtype=it)
    cols: np.ndarray = np.arange(nj, dtype=it)
    rows, cols = (rows[None, :], cols[:, None]) if transposed else (rows[:, None], cols[None, :])
    tests = [] if q_cut is None else [rows < q_cut]
    if k_cut is not None:
        tests.append(cols < k_cut)
    # lo <= c - r + offset <=> r <= c + offset - lo;  c - r + offset <= hi <=> r >= c + offset - hi
    if lo is not None:
        tests.append(rows <= cols + (offset - lo))
    if hi is not None:
        tests.append(rows >= cols + (offset - hi))
    shape = (nj, ni) if transposed else (ni, nj)
    if not tests:
        return np.full(shape, not hidden)
    ok = tests[0]
    for t in tests[1:]:
        ok = ok & t
    ok = ok if ok.shape == shape else np.broadcast_to(ok, shape).copy()
    return np.logical_not(ok, out=ok) if hidden else ok
