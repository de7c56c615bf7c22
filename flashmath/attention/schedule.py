"""The tile plan of one attention call and its loop shape, shared by the tiled forward,
the tiled backward and the IO model (:mod:`flashmath.measure.iomodel`).

Legend: B batch, H query heads, H_kv key/value heads, Sq/Sk query/key lengths, D the q/k
head dim, Dv the v head dim; a tile is ``block_q`` query rows x ``block_k`` keys.

:func:`schedule` is the loop every tiled pass runs for one batch entry::

    for each block of query rows, clipped to the valid rows (q_lengths):
        for each key tile of the block_k grid the mask does not leave EMPTY,
                clipped to the keys the block can see (causal / window band, kv_lengths):
            yield (j0, j1, kind)      kind FULL: build no mask; PARTIAL: mask the tile

Tiles that a causal, window or length mask leaves empty are never read and never
computed; the IO model counts bytes by walking the same schedule.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from flashmath.attention.masks import MaskSpec, TileKind
from flashmath.attention.options import AttentionOptions, check_blocks, resolve
from flashmath.attention.threads import cores
from flashmath.dtypes import accumulate_dtype

__all__ = [
    "DEFAULT_BLOCK_K",
    "DEFAULT_BLOCK_Q",
    "FAST_BLOCK_Q",
    "FAST_MIN_BAND",
    "FAST_MIN_DIM",
    "FAST_MIN_KEYS",
    "FAST_MIN_OUTPUTS",
    "FAST_NARROW_BAND",
    "FORCE_FAST",
    "SMALL_PAIRS",
    "Plan",
    "Tile",
    "Unit",
    "fast_path",
    "parts_per_slice",
    "schedule",
    "units",
    "widest",
    "work_units",
]

#: Default tile sizes (query rows, keys), chosen by measurement (``flashmath bench``):
#: large enough to keep BLAS busy, small enough that a float32 tile stays in L2.
DEFAULT_BLOCK_Q = 256
DEFAULT_BLOCK_K = 1024

#: The fast loops' default query rows per tile (:func:`fast_path`): twice the accurate
#: loops', which halves the row blocks (each pays a row-max pass on its first tile and a
#: masked diagonal tile when causal); measured 10-15% faster at S = 4096.
FAST_BLOCK_Q = 512

#: ... and half that for a band (window) narrower than FAST_NARROW_BAND keys: a block's tiles
#: span its rows plus the band (767 keys for 256 rows of a 512-key window, against 1023 for
#: 512 rows, over the same 512 keys each row sees); measured at S = 4096, window 512, on a
#: noisy machine: 0.21-0.32x dense with 256 rows, 0.27-0.31x with 512, 0.28-0.41x with 128.
#: Such a band's key tiles default to the whole key length, so that each row block's span
#: is one tile (on a 1024-key grid half the blocks' spans were cut in two: 6-8% slower);
#: the loops size their buffers by the widest tile they visit (:func:`widest`).
FAST_NARROW_BAND = 2 * FAST_BLOCK_Q

#: A visited key tile: keys [j0, j1) and what it needs (FULL or PARTIAL).
Tile = tuple[int, int, TileKind]
#: Rows of one pass over a (batch, head) slice: (i0, i1, tiles) as :func:`schedule` yields.
Block = tuple[int, int, list[Tile]]


@dataclass(frozen=True, eq=False)
class Plan:
    """One call: validated inputs, options, dtypes and tile sizes.

    acc: the dtype of the tile arithmetic (scores, exp, the tile matmuls).
    state: the dtype of what is summed across tiles (the forward's m, l, o; the backward's
        dq, dk, dv): float64 when acc is float32 or wider (a few (rows, D) arrays per tile,
        so it is nearly free and removes the rounding of the running sums and rescales),
        acc itself when acc is narrower (``accum_dtype="float16"`` shows narrow sums).
    bq, bk: the tile sizes, clipped to Sq and Sk (the defaults are halved when the
        slices are cut into parts, see :func:`work_units`; on the fast path FAST_BLOCK_Q,
        halved for a narrow window, see :func:`_fast_block_q`).
    fast: whether the float32 fast loops run (:func:`fast_path`, :mod:`flashmath.attention.fast`).
    """

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    opts: AttentionOptions
    acc: np.dtype[Any]
    bq: int
    bk: int
    fast: bool = False

    @property
    def state(self) -> np.dtype[Any]:
        return np.dtype(np.float64) if self.acc.itemsize >= 4 else self.acc

    @classmethod
    def build(cls, q: Any, k: Any, v: Any, *, block_q: Any = None, block_k: Any = None,
              accum_dtype: Any = None, **options: Any) -> Plan:
        """Validate q, k, v and the options (:func:`~flashmath.attention.options.resolve`)
        and the tile sizes (None: the defaults)."""
        q, k, v, opts = resolve(q, k, v, **options)
        check_blocks(block_q, block_k)
        # Slices cut into parts (few slices, work_units) run a thread per part: default
        # tiles of half the rows and keys keep the threads' scratch memory below one's.
        split = 2 if parts_per_slice(opts.batch * opts.heads, cores(), 2) > 1 else 1
        acc = accumulate_dtype(opts.dtype, accum_dtype)
        fast = fast_path(opts, acc)
        fast_q = _fast_block_q(opts) if fast else FAST_BLOCK_Q
        # a narrow band's keys in one tile per row block (see FAST_NARROW_BAND)
        wide_k = opts.sk if fast_q != FAST_BLOCK_Q else DEFAULT_BLOCK_K
        mods = opts.mods
        if mods is not None and (mods.block_mask is not None
                                 or (fast and mods.mask_mod is not None)):
            # tiles of the block mask's grid (or a multiple), which EMPTY tiles skip. The
            # fast loops: square FAST_BLOCK_Q tiles (measured at S = 4096 against 256 x 256
            # and 512 x 1024: the fastest for document and causal block masks, and for a
            # causal mask_mod alone, 0.9x the time of 512 x 1024); a narrow window's
            # half-height rows (FAST_NARROW_BAND) over tiles as wide as the keys, which
            # mod_tiles clips to its band: one tile per row block (1024-key tiles, clipped,
            # measured window 512 at 0.30x dense against 0.33-0.37x for square tiles)
            top_q, top_k = (DEFAULT_BLOCK_Q, DEFAULT_BLOCK_K // 4)
            if fast:
                top_q = fast_q
                top_k = FAST_BLOCK_Q if fast_q == FAST_BLOCK_Q else wide_k
            top_q, top_k = top_q // split, top_k // split
            bm = mods.block_mask
            block_q = block_q or (top_q if bm is None else _multiple(bm.block_q, top_q))
            block_k = block_k or (top_k if bm is None else _multiple(bm.block_k, top_k))
        if accum_dtype is None and not fast and _small_float32(opts):
            acc = np.dtype(np.float64)
        return cls(
            q=q, k=k, v=v, opts=opts, acc=acc, fast=fast,
            bq=max(1, min(block_q or (fast_q if fast else DEFAULT_BLOCK_Q) // split,
                          opts.sq)),
            bk=max(1, min(block_k or wide_k // split, opts.sk)),
        )


#: The fast path needs H * (rows that see a key) * Dv >= FAST_MIN_OUTPUTS outputs and
#: Sk >= FAST_MIN_KEYS; over fewer outputs the max error is a coin toss between flashmath
#: and the baselines when both carry float32 scores.
FAST_MIN_OUTPUTS = 2**16
FAST_MIN_KEYS = 256
#: ... and a window band and every nonzero kv_length of at least FAST_MIN_BAND keys: rows
#: that see one or a few keys (window (0, 0)) are where a baseline can be exact (dq = dk = 0
#: for a single key) and the accurate loops keep them so.
FAST_MIN_BAND = 32
#: ... and head dims D, Dv >= FAST_MIN_DIM: with D = 1 or 3 the PyTorch-style baseline's
#: dq, dk came out up to 5x more accurate than the naive formula's and the fast loops'.
FAST_MIN_DIM = 16
#: A switch for measurements and tests: None decides by size, True / False forces.
FORCE_FAST: bool | None = None


def fast_path(opts: AttentionOptions, acc: np.dtype[Any]) -> bool:
    """Whether a call takes the float32 fast loops (:mod:`flashmath.attention.fast`):
    float32 input in float32 tiles, the whole key sequence (not a shard: the backward
    normalises each row's p to sum 1), no softcap, bias, ALiBi, score_mod or sinks, and a
    problem with at least :data:`FAST_MIN_OUTPUTS` outputs in rows that see a key and
    :data:`FAST_MIN_KEYS` keys,
    head dims of :data:`FAST_MIN_DIM` and rows that may see :data:`FAST_MIN_BAND` keys (or
    as :data:`FORCE_FAST` says).
    Smaller problems take the accurate loops, whose cost there is small and whose error
    is not a coin toss against the baselines' (see :mod:`flashmath.attention.fast`)."""
    # all_keys False is a shard of the keys: its rows' p do not sum to 1
    if not (opts.dtype == np.float32 and acc == np.float32 and opts.softcap is None
            and not opts.has_bias and opts.sinks is None and opts.all_keys
            and (opts.mods is None or opts.mods.score_mod is None)):
        return False
    if FORCE_FAST is not None:
        return FORCE_FAST
    spec = opts.spec
    band = None if spec.lo is None or spec.hi is None else spec.hi - spec.lo + 1
    # the rows that see a key: a window can leave most rows of a long query empty, and the
    # max error over a few live rows is a coin toss (2.09x the naive formula's on a medium
    # fuzz case where 1500 of 7800 rows were live)
    outputs = opts.heads * sum(spec.live_rows(b) for b in range(opts.batch)) * opts.dv
    keys = spec.k_valid[spec.k_valid > 0]
    return (outputs >= FAST_MIN_OUTPUTS and opts.sk >= FAST_MIN_KEYS
            and min(opts.d, opts.dv) >= FAST_MIN_DIM
            and keys.size > 0 and int(keys.min()) >= FAST_MIN_BAND
            and (band is None or band >= FAST_MIN_BAND))


#: float32 calls off the fast path with at most SMALL_PAIRS (batch, head, query, key)
#: pairs run float64 tiles (see :func:`_small_float32`).
SMALL_PAIRS = 2**18


def _small_float32(opts: AttentionOptions) -> bool:
    """Whether a float32 call is small enough for float64 tiles: its outputs and gradients
    are then correctly rounded. On a few outputs the error of float32 tiles is a coin toss
    against the baselines' (which also carry float32 scores): 5 of 2914 random small
    problems came out over the accuracy rule; with float64 tiles none does, and at
    SMALL_PAIRS the call costs 0.9-1.3x the float32 tiles' time (Python overhead rules
    there)."""
    return (opts.dtype == np.float32
            and opts.batch * opts.heads * opts.sq * opts.sk <= SMALL_PAIRS)


def _fast_block_q(opts: AttentionOptions) -> int:
    """The fast loops' query rows per tile: FAST_BLOCK_Q, halved when the call's band (a
    window, or a library band mask_mod's: ``modlib.sliding_window``) is narrower than
    FAST_NARROW_BAND keys."""
    spec = opts.spec
    bands = [(spec.lo, spec.hi)]
    if opts.mods is not None and opts.mods.mask_mod is not None:
        bands.append(getattr(opts.mods.mask_mod, "band", (None, None, 0))[:2])
    narrow = any(lo is not None and hi is not None and hi - lo + 1 < FAST_NARROW_BAND
                 for lo, hi in bands)
    return FAST_BLOCK_Q // 2 if narrow else FAST_BLOCK_Q


def _multiple(block: int, at_most: int) -> int:
    """The largest multiple of ``block`` not above ``at_most`` (``block`` if none is)."""
    return max(block, at_most // block * block)


def schedule(spec: MaskSpec, b: int, block_q: int, block_k: int
             ) -> Iterator[tuple[int, int, list[Tile]]]:
    """The loop shape of every tiled pass for batch entry b.

    Yields (i0, i1, tiles) per block of query rows (blocks start at multiples of block_q
    and stop at the valid rows); tiles lists (j0, j1, kind) for every key tile of the
    block_k grid that the mask does not leave empty, clipped to the keys the block can
    see (:meth:`MaskSpec.key_span`). A block with no visible key yields an empty list.
    """
    q_valid = int(spec.q_valid[b])
    for i0 in range(0, q_valid, block_q):
        i1 = min(i0 + block_q, q_valid)
        lo, hi = spec.key_span(b, i0, i1)
        tiles: list[Tile] = []
        for g0 in range(max(lo, 0) // block_k * block_k, hi, block_k):
            j0, j1 = max(g0, lo), min(g0 + block_k, hi)
            kind = spec.classify(b, i0, i1, j0, j1)
            if kind is not TileKind.EMPTY:
                tiles.append((j0, j1, kind))
        yield i0, i1, tiles


def widest(blocks: list[Block]) -> int:
    """The most keys of any tile of ``blocks`` (at least 1): what a unit's tile buffers
    need, at most block_k (a narrow band's block_k is the whole key length)."""
    return max((j1 - j0 for _, _, tiles in blocks for j0, j1, _ in tiles), default=1)


def units(opts: AttentionOptions) -> list[tuple[int, int]]:
    """The (batch, head) slices: the work units of forward and backward."""
    return [(b, h) for b in range(opts.batch) for h in range(opts.heads)]


@dataclass(frozen=True)
class Unit:
    """One work unit of the tiled passes: part ``part`` (of ``parts``) of slice (b, h),
    the row blocks ``blocks`` (a contiguous run of :func:`schedule`'s)."""

    b: int
    h: int
    part: int
    parts: int
    blocks: list[Block]


def parts_per_slice(slices: int, workers: int, max_parts: int) -> int:
    """How many parts to cut each (batch, head) slice into so that the workers stay busy:
    1 when the slices already divide evenly among the workers (B H = 16 on 2 cores), else
    the smallest count (at most 8 and ``max_parts``, the row blocks) that makes the units
    a multiple of the workers, or 8 when none does (B = 1, H = 3 on 2 cores: 2 parts)."""
    if workers <= 1 or slices % workers == 0:
        return 1
    for p in range(2, 9):
        if (slices * p) % workers == 0:
            return max(1, min(p, max_parts))
    return max(1, min(8, max_parts))


def work_units(plan: Plan, workers: int) -> list[Unit]:
    """The units of one pass: every (batch, head) slice, cut by query blocks into
    :func:`parts_per_slice` parts of about equal work (tile area: causal rows late in the
    sequence see more keys), so that few slices still keep ``workers`` threads busy."""
    opts = plan.opts
    per_b = [list(schedule(opts.spec, b, plan.bq, plan.bk)) for b in range(opts.batch)]
    n_blocks = max((len(x) for x in per_b), default=1)
    parts = parts_per_slice(opts.batch * opts.heads, workers, n_blocks)
    out: list[Unit] = []
    for b, blocks in enumerate(per_b):
        pieces = _split(blocks, parts)
        out += [Unit(b, h, p, parts, piece) for h in range(opts.heads)
                for p, piece in enumerate(pieces)]
    return out


def _split(blocks: list[Block], parts: int) -> list[list[Block]]:
    """blocks cut into ``parts`` contiguous runs of about equal tile area (some may be empty)."""
    if parts == 1:
        return [blocks]
    work = np.cumsum([(i1 - i0) * sum(j1 - j0 for j0, j1, _ in tiles) + 1
                      for i0, i1, tiles in blocks])
    total = float(work[-1]) if len(work) else 0.0
    cuts = [0] + [int(np.searchsorted(work, total * p / parts)) for p in range(1, parts)]
    cuts.append(len(blocks))
    return [blocks[cuts[p] : cuts[p + 1]] for p in range(parts)]
