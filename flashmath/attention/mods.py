"""Programmable attention: the ``score_mod`` / ``mask_mod`` protocol and its per-tile calls.

Two small functions describe an attention variant (PyTorch FlexAttention's names)::

    mask_mod(b, h, q_idx, kv_idx)         -> bool array, True = may attend
    score_mod(score, b, h, q_idx, kv_idx) -> float array, the modified scores

A mod is called **once per tile**, never per element: ``b`` and ``h`` are Python ints
(batch entry, *query* head), ``q_idx`` an int64 array of shape (nq, 1) and ``kv_idx`` one of
shape (1, nk), holding the **absolute** positions of the tile's rows and columns in the
query and key sequences (so a shard or a decoding step sees the positions it really has).
``score`` is the (nq, nk) tile of scores ``softcap(scale * q . k) + bias`` (ALiBi included).
A mask_mod returns a 2-D bool array broadcastable to (nq, nk); a score_mod a 2-D float array
broadcastable to (nq, nk). Write them with NumPy operations (``&``, ``|``, ``np.where``),
not ``if``/``and``/``or``: those raise on arrays, and a mod that returns a Python scalar
is refused (it would mean the same for every pair: return an array).

Order of operations (what the oracle and the kernels do)::

    s = softcap(scale * q . k) + bias (+ ALiBi)      the existing options
    s = score_mod(s, b, h, q_idx, kv_idx)            then the score mod
    keep = causal & window & lengths & mask & mask_mod(b, h, q_idx, kv_idx)

Gradients. The backward needs ``d score_mod(s) / d s`` elementwise. A score_mod declares it
as an attribute ``score_mod.dscore(score, b, h, q_idx, kv_idx)`` (the library's mods do;
:func:`with_dscore` attaches one). Otherwise flashmath differentiates the mod exactly by a
complex step, ``score_mod(s + 1e-30j, ...).imag / 1e-30``, which works for mods analytic in
NumPy ufuncs (+, *, exp, tanh, np.where on positions, table look-ups by position); on the
first tile it is checked against a central finite difference, and a mod that cannot be
differentiated this way (it drops the imaginary part, raises on complex input, or uses
``abs``/``floor`` of the score) gets a :class:`ModError` naming it and asking for
``dscore``. Gradients for parameters a score_mod captures (a bias table, ALiBi slopes)
are not computed: they are constants to flashmath.

Every function here raises :class:`ModError` (a TypeError and a ValueError) naming the mod
by its ``__name__`` for a wrong shape or dtype, a scalar result, or a mod that raises.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from flashmath.attention.masks import TileKind, band_span, shared_band, tile_positions

__all__ = [
    "MaskMod",
    "ModError",
    "Mods",
    "ScoreMod",
    "and_kinds",
    "apply_score_mod",
    "at_query_positions",
    "mask_tile",
    "mod_name",
    "or_kinds",
    "score_mod_grad",
    "with_dscore",
]

MaskMod = Callable[[int, int, np.ndarray, np.ndarray], Any]
ScoreMod = Callable[[np.ndarray, int, int, np.ndarray, np.ndarray], Any]

#: The complex step: exact to rounding for analytic mods (no subtractive cancellation).
_STEP = 1e-30
#: score_mods whose complex-step derivative passed the finite-difference check.
_VERIFIED: weakref.WeakSet[Any] = weakref.WeakSet()


class ModError(TypeError, ValueError):
    """A score_mod or mask_mod broke the protocol (the message names it and says how)."""


def mod_name(mod: Any) -> str:
    """The mod's ``__name__`` (or its type's name), for error messages."""
    return str(getattr(mod, "__name__", None) or type(mod).__name__)


def with_dscore(score_mod: ScoreMod, dscore: Callable[..., Any]) -> ScoreMod:
    """Attach the derivative ``dscore(score, b, h, q_idx, kv_idx)`` (d score_mod / d score,
    elementwise, broadcastable to the tile) to ``score_mod`` and return it."""
    score_mod.dscore = dscore  # type: ignore[attr-defined]
    return score_mod


def _indices(q0: int, q1: int, k0: int, k1: int) -> tuple[np.ndarray, np.ndarray]:
    return np.arange(q0, q1, dtype=np.int64)[:, None], np.arange(k0, k1, dtype=np.int64)[None, :]


def _call(role: str, mod: Any, args: tuple[Any, ...]) -> Any:
    try:
        return mod(*args)
    except ModError:
        raise
    except Exception as exc:  # a mod written for scalars raises on arrays
        raise ModError(
            f"{role} {mod_name(mod)!r} raised {type(exc).__name__}({exc}) when called on a "
            f"tile (q_idx (nq, 1), kv_idx (1, nk) int64 arrays); a mod must be vectorised: "
            f"use &, |, ~ and np.where on arrays, not if/and/or"
        ) from exc


def _as_tile(role: str, mod: Any, out: Any, shape: tuple[int, int], kinds: str) -> np.ndarray:
    """The mod's result checked (2-D, dtype kind in ``kinds``) and broadcast to ``shape``."""
    arr = np.asarray(out)
    what = "bool" if kinds == "b" else "float"
    if arr.ndim != 2:
        hint = (" (a Python scalar: the mod is not vectorised; return an array, e.g. "
                "np.broadcast_to(value, np.broadcast_shapes(q_idx.shape, kv_idx.shape)))"
                if arr.ndim == 0 else "")
        raise ModError(f"{role} {mod_name(mod)!r} returned shape {arr.shape}; expected a 2-D "
                       f"{what} array broadcastable to the tile {shape}{hint}")
    if arr.dtype.kind not in kinds:
        raise ModError(f"{role} {mod_name(mod)!r} returned dtype {arr.dtype}; expected {what}")
    if arr.shape == shape:
        return arr
    try:
        return np.broadcast_to(arr, shape)
    except ValueError:
        raise ModError(f"{role} {mod_name(mod)!r} returned shape {arr.shape}, which does not "
                       f"broadcast to the tile {shape}") from None


def mask_tile(mask_mod: MaskMod, b: int, h: int, q0: int, q1: int, k0: int,
              k1: int) -> np.ndarray:
    """The (q1 - q0, k1 - k0) bool mask of absolute query rows [q0, q1) x keys [k0, k1) of
    batch entry b, query head h: one call of ``mask_mod``; True = may attend. Read-only
    (it may be a broadcast view)."""
    q_idx, kv_idx = _indices(q0, q1, k0, k1)
    out = _call("mask_mod", mask_mod, (int(b), int(h), q_idx, kv_idx))
    return _as_tile("mask_mod", mask_mod, out, (q1 - q0, k1 - k0), "b")


def apply_score_mod(score_mod: ScoreMod, s: np.ndarray, b: int, h: int, q0: int,
                    k0: int) -> np.ndarray:
    """``score_mod`` applied to the (nq, nk) float tile ``s`` whose first row/column sit at
    absolute query/key positions q0/k0; writes the result into ``s`` (cast to its dtype)
    when ``s`` is writable and returns it, else returns a new array."""
    q_idx, kv_idx = _indices(q0, q0 + s.shape[0], k0, k0 + s.shape[1])
    out = _call("score_mod", score_mod, (s, int(b), int(h), q_idx, kv_idx))
    out = _as_tile("score_mod", score_mod, out, s.shape, "f")
    if out is s:
        return s
    if s.flags.writeable:
        s[...] = out
        return s
    return out.astype(s.dtype)


def score_mod_grad(score_mod: ScoreMod, s: np.ndarray, b: int, h: int, q0: int,
                   k0: int) -> np.ndarray:
    """d score_mod(s) / d s, elementwise: an (nq, nk) array in s's dtype (float64 for
    integer s), for the (nq, nk) tile ``s`` of pre-mod scores at absolute positions q0, k0.

    Uses ``score_mod.dscore`` if the mod has one, else the complex step (see the module
    docstring); raises :class:`ModError` naming the mod when neither works. Entries where
    the derivative is not finite (``s`` = -inf) are returned as 0: those pairs have
    probability 0.
    """
    s = np.asarray(s)
    dtype = s.dtype if s.dtype.kind == "f" else np.dtype(np.float64)
    q_idx, kv_idx = _indices(q0, q0 + s.shape[0], k0, k0 + s.shape[1])
    args = (int(b), int(h), q_idx, kv_idx)
    dscore = getattr(score_mod, "dscore", None)
    if dscore is not None:
        try:
            out = dscore(s, *args)
        except Exception as exc:
            raise ModError(f"score_mod {mod_name(score_mod)!r}: its dscore raised "
                           f"{type(exc).__name__}({exc}) on a tile") from exc
        g = _as_tile("the dscore of score_mod", score_mod, out, s.shape, "f")
    else:
        g = _complex_step(score_mod, s.astype(np.float64), args)
        if score_mod not in _VERIFIED:
            _check_against_differences(score_mod, s.astype(np.float64), args, g)
            _VERIFIED.add(score_mod)
    with np.errstate(invalid="ignore"):
        return np.where(np.isfinite(g), g, 0).astype(dtype)


def _no_derivative(score_mod: Any, why: str) -> ModError:
    return ModError(
        f"score_mod {mod_name(score_mod)!r}: cannot differentiate it by a complex step ({why}); "
        f"give it its derivative, score_mod.dscore = lambda score, b, h, q_idx, kv_idx: ... "
        f"(d score_mod / d score), e.g. with flashmath.attention.mods.with_dscore"
    )


def _complex_step(score_mod: Any, s: np.ndarray, args: tuple[Any, ...]) -> np.ndarray:
    z = s + _STEP * 1j
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", np.exceptions.ComplexWarning)
            with np.errstate(all="ignore"):
                out = np.asarray(score_mod(z, *args))
    except Exception as exc:
        raise _no_derivative(score_mod, f"on complex input it raised {type(exc).__name__}: "
                                        f"{exc}") from exc
    if out.dtype.kind != "c":
        raise _no_derivative(score_mod, f"it returned dtype {out.dtype} for complex input, "
                                        f"dropping the imaginary part")
    g = _as_tile("score_mod", score_mod, out.imag, s.shape, "f") / _STEP
    return np.array(g, dtype=np.float64)


def _check_against_differences(score_mod: Any, s: np.ndarray, args: tuple[Any, ...],
                               g: np.ndarray) -> None:
    """Refuse a complex-step derivative that a central difference contradicts (abs, floor,
    real casts: operations that are not analytic in the score)."""
    finite = np.isfinite(s)
    if not finite.any():
        return
    step = 1e-6 * np.maximum(1.0, np.abs(np.where(finite, s, 0)))
    with np.errstate(all="ignore"):
        up = np.asarray(score_mod(np.where(finite, s + step, s), *args), np.float64)
        down = np.asarray(score_mod(np.where(finite, s - step, s), *args), np.float64)
        fd = (up - down) / (2 * step)
        bad = finite & np.isfinite(fd) & np.isfinite(g) & (np.abs(fd - g) > 1e-4 * (1 + np.abs(g)))
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise _no_derivative(score_mod, f"at score {s[i, j]!r} the complex step gives "
                                        f"{g[i, j]!r} but a finite difference {fd[i, j]!r}; "
                                        f"the mod is not analytic in the score")


def at_query_positions(score_mod: ScoreMod | None, mask_mod: MaskMod | None,
                       block_mask: Any, offsets: np.ndarray
                       ) -> tuple[ScoreMod | None, MaskMod | None]:
    """(score_mod, mask_mod) as a kernel over local query rows must call them when row i of
    batch entry b sits at absolute position ``offsets[b] + i`` (decoding: the new queries
    are the last tokens of sequences of different lengths). ``q_idx`` is shifted per entry;
    ``kv_idx`` is left alone. A ``block_mask`` (over absolute positions) becomes the
    shifted mod's ``tile_kind``, so its EMPTY tiles are still skipped; a mod's own
    ``tile_kind`` and ``dscore`` are shifted alike. The wrappers keep the mods' names, so
    errors still name them."""
    off = np.asarray(offsets, np.int64)
    score_out = None if score_mod is None else _shift_score(score_mod, off)
    if mask_mod is None:
        return score_out, None
    user = mask_mod

    @functools.wraps(user)
    def shifted(b: Any, h: Any, q_idx: np.ndarray, kv_idx: np.ndarray) -> Any:
        return user(b, h, q_idx + off[b], kv_idx)

    vars(shifted).pop("band", None)  # (wraps copied it: the shift moves the band per entry)
    kinds: Any = getattr(user, "tile_kind", None)
    if block_mask is not None:
        kinds = _block_tile_kind(block_mask)
    if kinds is not None:
        def tile_kind(b: Any, h: Any, q0: Any, q1: Any, k0: Any, k1: Any) -> Any:
            return kinds(b, h, np.asarray(q0) + off[b], np.asarray(q1) + off[b], k0, k1)
        shifted.tile_kind = tile_kind  # type: ignore[attr-defined]
    return score_out, shifted


def _shift_score(score_mod: ScoreMod, off: np.ndarray) -> ScoreMod:
    @functools.wraps(score_mod)
    def shifted(score: np.ndarray, b: Any, h: Any, q_idx: np.ndarray, kv_idx: np.ndarray
                ) -> Any:
        return score_mod(score, b, h, q_idx + off[b], kv_idx)

    dscore = getattr(score_mod, "dscore", None)
    if dscore is not None:
        shifted.dscore = (  # type: ignore[attr-defined]
            lambda score, b, h, q_idx, kv_idx: dscore(score, b, h, q_idx + off[b], kv_idx))
    return shifted


def _block_tile_kind(block_mask: Any) -> Callable[..., Any]:
    """A ``tile_kind(b, h, q0, q1, k0, k1)`` reading the block mask (scalar b, h; the
    bounds may be arrays of rectangles)."""
    def tile_kind(b: Any, h: Any, q0: Any, q1: Any, k0: Any, k1: Any) -> Any:
        q0, q1, k0, k1 = np.broadcast_arrays(q0, q1, k0, k1)
        out = np.empty(q0.shape, np.uint8)
        for idx in np.ndindex(q0.shape):
            out[idx] = block_mask.kind(int(b), int(h), int(q0[idx]), int(q1[idx]),
                                       int(k0[idx]), int(k1[idx]))
        return out

    return tile_kind


#: Rows x keys of the pieces a PARTIAL tile is classified in for a mask_mod with a
#: ``tile_kind`` and no block mask (:meth:`Mods._mask`).
PIECE = 128


def and_kinds(*kinds: Any) -> Any:
    """The TileKind of an AND of masks (EMPTY if any is, FULL if all are, else PARTIAL);
    elementwise on arrays of TileKind values. Conservative: PARTIAL may hide an EMPTY."""
    if all(isinstance(k, int) for k in kinds):  # one tile (TileKind is an int): no arrays
        if TileKind.EMPTY in kinds:
            return TileKind.EMPTY
        return TileKind.FULL if all(k == TileKind.FULL for k in kinds) else TileKind.PARTIAL
    out = np.asarray(kinds[0], np.uint8)
    for k in kinds[1:]:
        k = np.asarray(k, np.uint8)
        out = np.where((out == TileKind.EMPTY) | (k == TileKind.EMPTY), TileKind.EMPTY,
                       np.where((out == TileKind.FULL) & (k == TileKind.FULL), TileKind.FULL,
                                TileKind.PARTIAL)).astype(np.uint8)
    return out


def or_kinds(*kinds: Any) -> Any:
    """The TileKind of an OR of masks (FULL if any is, EMPTY if all are, else PARTIAL)."""
    out = np.asarray(kinds[0], np.uint8)
    for k in kinds[1:]:
        k = np.asarray(k, np.uint8)
        out = np.where((out == TileKind.FULL) | (k == TileKind.FULL), TileKind.FULL,
                       np.where((out == TileKind.EMPTY) & (k == TileKind.EMPTY), TileKind.EMPTY,
                                TileKind.PARTIAL)).astype(np.uint8)
    return out


@dataclass(frozen=True, eq=False)
class Mods:
    """The validated mods of one attention call (what a kernel reads from its options).

    score_mod, mask_mod: the callables or None; mask_mod is the block mask's own when only
    ``block_mask`` was given. block_mask: a :class:`~flashmath.attention.blockmask.BlockMask`
    or None.
    """

    score_mod: ScoreMod | None = None
    mask_mod: MaskMod | None = None
    block_mask: Any = None

    def kind(self, b: int, h: int, q0: int, q1: int, k0: int, k1: int) -> TileKind:
        """What the mask_mod says of absolute rows [q0, q1) x keys [k0, k1): from the block
        mask if there is one, else the mod's ``tile_kind``, else PARTIAL (FULL with no
        mask_mod). AND it with MaskSpec.classify by :func:`and_kinds`."""
        if self.mask_mod is None:
            return TileKind.FULL
        if self.block_mask is not None:
            return self.block_mask.kind(b, h, q0, q1, k0, k1)
        tile_kind = getattr(self.mask_mod, "tile_kind", None)
        if tile_kind is None:
            return TileKind.PARTIAL
        return TileKind(int(np.asarray(tile_kind(b, h, q0, q1, k0, k1))))

    def key_span(self, b: int, h: int, q0: int, q1: int, k0: int, k1: int) -> tuple[int, int]:
        """The keys of [k0, k1) that absolute rows [q0, q1) may see under the mask_mod, as
        far as its block mask (by blocks) and a library band mod (``.band``, exactly) tell:
        every key outside is hidden from every row (j0 >= j1: none). The band first: it
        costs a few integer operations, the block mask a look at its table."""
        lo, hi, diag = getattr(self.mask_mod, "band", (None, None, 0))
        k0, k1 = band_span(lo, hi, diag, q0, q1, k0, k1)
        if self.block_mask is not None and k0 < k1:
            k0, k1 = self.block_mask.live_keys(b, h, q0, q1, k0, k1)
        return k0, k1

    def shared_keys(self, b: int, h: int, q0: int, q1: int) -> tuple[int, int] | None:
        """Keys [j0, j1) that every absolute row of [q0, q1) may see under the mask_mod
        (j0 >= j1: none), or None when that is unknown: known only for no mask_mod (every
        key) and a library band mod (``.band``); clip to the keys that exist yourself."""
        if self.mask_mod is None:
            return 0, 2**62
        band = getattr(self.mask_mod, "band", None)
        if band is None:
            return None
        lo, hi, diag = band
        return shared_band(lo, hi, diag, q0, q1, 2**62)

    def apply(self, s: np.ndarray, b: int, h: int, q0: int, k0: int, kind: TileKind,
              dscore: np.ndarray | None = None, fill: float = -np.inf) -> np.ndarray:
        """What a kernel does to a tile of scores after softcap and bias: the score_mod (in
        place), then, on a PARTIAL tile, ``fill`` (-inf; 0 on a tile of probabilities)
        where the mask_mod says no. ``s`` (nq, nk) sits
        at absolute positions q0, k0; ``kind`` is the tile's combined kind (and_kinds of
        MaskSpec.classify and :meth:`kind`). With ``dscore`` (an (nq, nk) buffer, for the
        backward), d score_mod / d s at the pre-mod scores is written there first (1 with
        no score_mod). Returns ``s``."""
        if dscore is not None:
            if self.score_mod is None:
                dscore[...] = 1
            else:
                dscore[...] = score_mod_grad(self.score_mod, s, b, h, q0, k0)
        if self.score_mod is not None:
            s = apply_score_mod(self.score_mod, s, b, h, q0, k0)
        if self.mask_mod is not None and kind == TileKind.PARTIAL:
            self._mask(s, b, h, q0, k0, fill)
        return s

    def _mask(self, s: np.ndarray, b: int, h: int, q0: int, k0: int, fill: float) -> None:
        """``fill`` where the mask_mod says no, on the PARTIAL tile s. Where the pieces of the
        tile can be classified (:meth:`_pieces`), FULL pieces are left alone, EMPTY ones
        filled, and the mod is called on the PARTIAL ones only (on a causal diagonal tile
        of 512 x 512 that is 4 of 16 pieces): the same mask, a fraction of the work."""
        mod = self.mask_mod
        assert mod is not None
        nq, nk = s.shape
        band = getattr(mod, "band", None)
        if band is not None:  # a library band (modlib): the mask builder's cached tiles
            _mask_band(s, band, q0, k0, fill)
            return
        pieces = self._pieces(b, h, q0, q0 + nq, k0, k0 + nk)
        if pieces is None:
            np.copyto(s, fill, where=~mask_tile(mod, b, h, q0, q0 + nq, k0, k0 + nk))
            return
        rows, cols, kinds = pieces
        empty = int(TileKind.EMPTY)
        for i, j in zip(*np.nonzero(kinds != int(TileKind.FULL)), strict=True):
            r0, r1, c0, c1 = rows[i], rows[i + 1], cols[j], cols[j + 1]
            sub = s[r0 - q0 : r1 - q0, c0 - k0 : c1 - k0]
            if kinds[i, j] == empty:
                sub[...] = fill
            else:
                np.copyto(sub, fill, where=~mask_tile(mod, b, h, r0, r1, c0, c1))

    def _pieces(self, b: int, h: int, q0: int, q1: int, k0: int, k1: int
                ) -> tuple[list[int], list[int], np.ndarray] | None:
        """(row bounds, column bounds, kinds) of the tile cut on the block mask's grid, or
        into PIECE x PIECE squares for a mod with ``tile_kind``; None when the tile is one
        piece or nothing classifies pieces. Each kind holds for its whole piece."""
        bm = self.block_mask
        tile_kind: Any = getattr(self.mask_mod, "tile_kind", None)
        if bm is not None:
            step_q, step_k = bm.block_q, bm.block_k
        elif tile_kind is not None:
            step_q = step_k = PIECE
        else:
            return None
        if q1 - q0 <= step_q and k1 - k0 <= step_k:
            return None
        rows = [q0, *range((q0 // step_q + 1) * step_q, q1, step_q), q1]
        cols = [k0, *range((k0 // step_k + 1) * step_k, k1, step_k), k1]
        if bm is not None:  # a piece lies inside one cell of the grid: that cell's kind
            grid = bm.kinds[b if bm.kinds.shape[0] != 1 else 0,
                            h if bm.kinds.shape[1] != 1 else 0]
            kinds = grid[np.ix_([r // step_q for r in rows[:-1]],
                                [c // step_k for c in cols[:-1]])]
        else:
            r, c = np.array(rows), np.array(cols)
            kinds = np.broadcast_to(np.asarray(tile_kind(
                b, h, r[:-1, None], r[1:, None], c[None, :-1], c[None, 1:])),
                (len(rows) - 1, len(cols) - 1))
        return rows, cols, kinds

    def dense_mask(self, batch: int, heads: int, sq: int, sk: int) -> np.ndarray | None:
        """The mask_mod over every pair, (B, H, sq, sk) bool (positions from 0), or None:
        one call per (b, h), what the reference oracle materialises."""
        if self.mask_mod is None:
            return None
        out = np.empty((batch, heads, sq, sk), np.bool_)
        for b in range(batch):
            for h in range(heads):
                out[b, h] = mask_tile(self.mask_mod, b, h, 0, sq, 0, sk)
        return out


def _mask_band(s: np.ndarray, band: tuple[int | None, int | None, int], q0: int,
               k0: int, fill: float) -> None:
    """``fill`` where a band mod (``lo <= kv - q - diag <= hi``, :func:`modlib.causal` and its
    kin) hides a pair of the (nq, nk) tile s at absolute positions q0, k0: the pattern of
    :func:`~flashmath.attention.masks.tile_positions` (cached, as the built-in masks'),
    written in s's own memory order (the fast loops hold s transposed), on the columns
    some row may not see only (as MaskSpec.masked_columns: a window tile's two triangles)."""
    lo, hi, diag = band
    nq, nk = s.shape
    transposed = not s.flags.c_contiguous and s.T.flags.c_contiguous
    j0, j1 = shared_band(lo, hi, diag, q0, q0 + nq, k0 + nk)  # keys every row sees
    full0, full1 = min(nk, max(0, j0 - k0)), max(0, j1 - k0)
    if full0 >= full1:
        full0 = full1 = nk  # no such column: mask the whole tile
    for c0, c1 in ((0, full0), (full1, nk)):
        if c0 < c1:
            hidden = tile_positions(nq, c1 - c0, k0 + c0 - q0 - diag, lo, hi, None, None,
                                    transposed, True)
            np.copyto(s.T[c0:c1] if transposed else s[:, c0:c1], fill, where=hidden)
