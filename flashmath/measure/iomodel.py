"""HBM traffic of standard vs tiled attention: exact byte counts, not just big-O.

FlashAttention's argument (Dao et al. 2022, Theorem 2) is about IO, not FLOPs:
standard attention writes the Sq x Sk score and probability matrices to slow
memory (HBM) and reads them back, Theta(N d + N^2) elements; tiled attention
keeps a tile of scores in on-chip memory (SRAM) of size M and never writes
them, Theta(N^2 d^2 / M) elements. This module counts those bytes exactly for
given lengths, head dims, tile sizes and masks, so the count can be compared
with what an implementation actually moved (the hbm-traffic lab experiment).

Legend: Sq/Sk query/key lengths (N when equal), d the q/k head dim, dv the v
head dim (defaults to d), M on-chip memory in elements, block_q/block_k the
tile sizes (the paper's B_r/B_c). Every count is per query head and summed over
``batch * heads``; ``elem_bytes`` is the size of a Q/K/V/O/S/P element and
``stat_bytes`` that of a row statistic (lse, or FA1's l and m; float32 = 4).

What moves (one entry per tensor in :class:`Traffic`):

standard (Algorithm 0 of the paper)
    read Q, K; write S = Q K^T; read S, write P = softmax(S); read P, V; write O.
    Masks do not change it: the full Sq x Sk matrices are materialised.
flash, ``loop_order="fa2"`` (FlashAttention-2; what flashmath's NumPy forward does)
    outer loop over Q blocks, inner over K/V blocks. Each Q block that has at
    least one visited tile is read once (its rows below q_len); each visited tile
    reads the K and V rows it holds of the keys its Q block can see (the union of
    the block's rows' allowed keys: whole tiles without a mask, clipped to the
    causal/window band and kv_len with one); O and lse are written once per row.
flash, ``loop_order="fa1"`` (Algorithm 1 of the paper)
    O, l, m are initialised in HBM (written once); outer loop over K/V blocks,
    each read once if it has a visited tile; inner loop over Q blocks: every
    visited tile reads Q_i, O_i, l_i, m_i and writes O_i, l_i, m_i back.

A tile (Q block i, K block j) is *visited* unless the causal/window/length mask
leaves it empty (skipped tiles are neither read nor computed). A boolean
``mask`` or ``bias`` never skips a tile, so they do not enter the model.

Example: at N = 4096, d = 64 in float16, standard attention moves 136 MB per
head, 65x the 2.1 MB of Q, K, V and O; with M = 48 Ki elements (96 KiB) the FA2
order takes Q blocks of 192 rows, so it reads K and V 22 times: 24 MB.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from flashmath.attention.masks import MaskSpec, TileKind, block_of
from flashmath.attention.options import Causal, Window, check_causal
from flashmath.attention.schedule import Plan, schedule

__all__ = [
    "Traffic",
    "counted_bytes",
    "flash_attention_bytes",
    "key_intervals",
    "seed002_estimate_mb",
    "standard_attention_bytes",
    "tiles_from_sram",
    "visited_tiles",
]


@dataclass(frozen=True)
class Traffic:
    """Bytes read from and written to HBM, per tensor name ("q", "k", "s", "lse", ...).

    tiles / tiles_total: the (Q block, K block) tiles visited and the grid size,
    summed over batch and heads (0 for standard attention, which has no tiles).
    """

    reads: dict[str, int]
    writes: dict[str, int]
    tiles: int = 0
    tiles_total: int = 0

    @property
    def read_bytes(self) -> int:
        return sum(self.reads.values())

    @property
    def write_bytes(self) -> int:
        return sum(self.writes.values())

    @property
    def total_bytes(self) -> int:
        return self.read_bytes + self.write_bytes

    def as_record(self, prefix: str = "") -> dict[str, int]:
        """Flat JSON-ready dict: <prefix>read_<name>_bytes, ..., <prefix>total_bytes."""
        rec = {f"{prefix}read_{k}_bytes": v for k, v in self.reads.items()}
        rec |= {f"{prefix}write_{k}_bytes": v for k, v in self.writes.items()}
        rec |= {
            f"{prefix}read_bytes": self.read_bytes,
            f"{prefix}write_bytes": self.write_bytes,
            f"{prefix}total_bytes": self.total_bytes,
        }
        if self.tiles_total:
            rec |= {f"{prefix}tiles": self.tiles, f"{prefix}tiles_total": self.tiles_total}
        return rec


def seed002_estimate_mb(T: int, d: int, dtype_bytes: int = 2) -> tuple[float, float]:
    """The textbook rough per-head estimate: (standard MB, flash MB), MB = 1e6 B.

    standard ~ 2 * T^2 * bytes (S and P as two T x T matrices; d is ignored),
    flash ~ 4 * T * d * bytes (Q, K, V, O once each). Kept to be compared with
    the exact counts of :func:`standard_attention_bytes` and :func:`flash_attention_bytes`.
    """
    return 2 * T * T * dtype_bytes / 1e6, 4 * T * d * dtype_bytes / 1e6


def tiles_from_sram(
    M: int, d: int, *, loop_order: Literal["fa1", "fa2"] = "fa1"
) -> tuple[int, int]:
    """Tile sizes (block_q, block_k) from on-chip memory M (in elements) and head dim d.

    Algorithm 1 of the paper: B_c = ceil(M / (4 d)), B_r = min(B_c, d); B_c is the
    K/V block of its outer loop and B_r the Q block of its inner loop, so "fa1"
    returns (B_r, B_c). The FA2 order swaps the loops, and the same rule gives the
    large size to its outer (Q) block: "fa2" returns (B_c, B_r). Either way the
    outer operand is re-read ceil(N / outer block) ~ 4 N d / M times, which is
    where Theta(N^2 d^2 / M) comes from.

    >>> tiles_from_sram(48 * 1024, 64)          # 48 Ki elements = 96 KiB of float16
    (64, 192)
    >>> tiles_from_sram(48 * 1024, 64, loop_order="fa2")
    (192, 64)
    """
    if M < 1 or d < 1:
        raise ValueError(f"tiles_from_sram: M and d must be positive, got M={M}, d={d}")
    b_c = math.ceil(M / (4 * d))
    b_r = min(b_c, d)
    if loop_order == "fa1":
        return b_r, b_c
    if loop_order == "fa2":
        return b_c, b_r
    raise ValueError(f"loop_order must be 'fa1' or 'fa2', got {loop_order!r}")


def standard_attention_bytes(
    sq: int, sk: int, d: int, *, dv: int | None = None, elem_bytes: int = 4, batch_heads: int = 1
) -> Traffic:
    """HBM bytes of standard attention (Algorithm 0), Theta(N d + N^2) elements.

    Reads Q, K (S = Q K^T), S (P = softmax(S)), P and V (O = P V); writes S, P and O.
    Q and K are counted as read once (a generous lower bound for the matmul).
    """
    dv = d if dv is None else dv
    e = elem_bytes * batch_heads
    return Traffic(
        reads={"q": e * sq * d, "k": e * sk * d, "s": e * sq * sk, "p": e * sq * sk,
               "v": e * sk * dv},
        writes={"s": e * sq * sk, "p": e * sq * sk, "o": e * sq * dv},
    )


def key_intervals(
    sq: int, sk: int, *, causal: Causal = False, window: Window = None,
    q_len: int | None = None, kv_len: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per query row i, the keys [lo[i], hi[i]) the masks allow (empty when lo >= hi).

    The diagonal is bottom-right aligned (query i sits at key i + kv_len - q_len,
    the valid lengths defaulting to sk and sq) for causal=True and for a window
    without causal, top-left (key i) for causal="top_left": the rule of
    :mod:`flashmath.attention.masks`, taken row by row from
    :meth:`~flashmath.attention.masks.MaskSpec.key_span`.
    window=(left, right) keeps keys within left before and right after the diagonal,
    None unbounded; causal caps right at 0. Rows >= q_len are empty (hi = 0); keys
    >= kv_len are dropped.
    """
    spec = _mask_spec(1, sq, sk, causal, window,
                      None if q_len is None else [q_len], None if kv_len is None else [kv_len])
    spans = np.array([spec.key_span(0, i, i + 1) for i in range(sq)], np.int64).reshape(sq, 2)
    lo, hi = spans[:, 0].copy(), np.maximum(spans[:, 1], 0)
    hi[int(spec.q_valid[0]):] = 0
    return lo, hi


def visited_tiles(
    lo: np.ndarray, hi: np.ndarray, sk: int, block_q: int, block_k: int
) -> np.ndarray:
    """Boolean (n_q_blocks, n_k_blocks): tile (i, j) holds at least one allowed (query, key),
    given each row's allowed keys [lo, hi) (from :func:`key_intervals`).

    Blocks start at multiples of the block size; the last ones are clipped at Sq, Sk.
    """
    n_k = -(-sk // block_k)
    k0 = np.arange(n_k) * block_k
    k1 = np.minimum(k0 + block_k, sk)
    rows = []
    for i0 in range(0, lo.shape[0], block_q):
        rl, rh = lo[i0:i0 + block_q, None], hi[i0:i0 + block_q, None]
        rows.append(np.any((rl < rh) & (rl < k1) & (rh > k0), axis=0))
    return np.array(rows)


def _mask_spec(
    batch: int, sq: int, sk: int, causal: Causal, window: Window,
    q_lengths: Sequence[int] | None, kv_lengths: Sequence[int] | None,
) -> MaskSpec:
    """The MaskSpec every attention backend builds for these options (one mask rule)."""
    return MaskSpec.create(
        batch, sq, sk, causal=check_causal(causal), window=window,
        q_lengths=None if q_lengths is None else np.asarray(q_lengths, np.int64),
        kv_lengths=None if kv_lengths is None else np.asarray(kv_lengths, np.int64),
    )


def flash_attention_bytes(
    sq: int, sk: int, d: int, *, block_q: int, block_k: int, dv: int | None = None,
    elem_bytes: int = 4, stat_bytes: int = 4, batch: int = 1, heads: int = 1,
    causal: Causal = False, window: Window = None,
    q_lengths: Sequence[int] | None = None, kv_lengths: Sequence[int] | None = None,
    loop_order: Literal["fa1", "fa2"] = "fa2",
) -> Traffic:
    """Exact HBM bytes of the tiled forward with tiles (block_q, block_k); see the module doc.

    FA2 order, no tile skipped (N = Sq = Sk, n_q = ceil(Sq / block_q)), per head::

        elem * (Sq d  +  n_q Sk (d + dv)  +  Sq dv)  +  stat * Sq
                 Q read   K, V per Q block     O written    lse written

    FA1 order (n_k = ceil(Sk / block_k))::

        elem * (Sk (d + dv) + n_k Sq (d + 2 dv) + Sq dv) + stat * 2 Sq (2 n_k + 1)
                 K, V once    Q, O read, O written  O init   l, m read + written, init

    With masks, only visited tiles count (see :func:`visited_tiles`), and in the FA2
    order their K/V rows are clipped to the keys the Q block can see; lengths are per
    batch entry, so ``q_lengths`` / ``kv_lengths`` have ``batch`` entries.
    """
    dv = d if dv is None else dv
    if loop_order not in ("fa1", "fa2"):
        raise ValueError(f"loop_order must be 'fa1' or 'fa2', got {loop_order!r}")
    if block_q < 1 or block_k < 1:
        raise ValueError(f"block_q and block_k must be positive, got {block_q}, {block_k}")
    for name, lens in (("q_lengths", q_lengths), ("kv_lengths", kv_lengths)):
        if lens is not None and len(lens) != batch:
            raise ValueError(f"{name} has {len(lens)} entries for batch={batch}")
    n_q, n_k = -(-sq // block_q), -(-sk // block_k)
    k0 = np.arange(n_k) * block_k
    k1 = np.minimum(k0 + block_k, sk)
    fa2 = loop_order == "fa2"
    reads = dict.fromkeys(("q", "k", "v") if fa2 else ("q", "k", "v", "o", "l", "m"), 0)
    writes = dict.fromkeys(("o", "lse") if fa2 else ("o", "l", "m"), 0)
    tiles = 0
    spec = _mask_spec(batch, sq, sk, causal, window, q_lengths, kv_lengths)
    for b in range(batch):
        vis = np.zeros((n_q, n_k), bool)
        for i0, i1, block_tiles in schedule(spec, b, block_q, block_k):
            for j0, j1, _ in block_tiles:
                vis[i0 // block_q, j0 // block_k] = True
                if fa2:
                    reads["k"] += (j1 - j0) * d
                    reads["v"] += (j1 - j0) * dv
            if fa2 and block_tiles:
                reads["q"] += (i1 - i0) * d
        tiles += int(vis.sum())
        if fa2:
            writes["o"] += sq * dv
            writes["lse"] += sq
        else:  # whole tiles, as Algorithm 1 loads them
            q_rows = np.minimum(np.arange(n_q) * block_q + block_q, sq) - np.arange(n_q) * block_q
            kv_rows = int((k1 - k0)[vis.any(axis=0)].sum())
            reads["k"] += kv_rows * d
            reads["v"] += kv_rows * dv
            q_visits = int((vis * q_rows[:, None]).sum())  # rows of Q_i re-read per visit
            reads["q"] += q_visits * d
            reads["o"] += q_visits * dv
            reads["l"] += q_visits
            reads["m"] += q_visits
            writes["o"] += (sq + q_visits) * dv  # initialised, then written per visit
            writes["l"] += sq + q_visits
            writes["m"] += sq + q_visits

    def to_bytes(counts: dict[str, int]) -> dict[str, int]:
        size = {"lse": stat_bytes, "l": stat_bytes, "m": stat_bytes}
        return {k: v * heads * size.get(k, elem_bytes) for k, v in counts.items()}

    return Traffic(
        reads=to_bytes(reads),
        writes=to_bytes(writes),
        tiles=tiles * heads,
        tiles_total=n_q * n_k * batch * heads,
    )


def counted_bytes(q: Any, k: Any, v: Any, *, block_q: int | None = None,
                  block_k: int | None = None, **options: Any) -> dict[str, int]:
    """The bytes the tiled NumPy forward moves between the full arrays and its tiles, at
    the input's itemsize, counted by walking the very schedule it runs
    (:func:`flashmath.attention.schedule.schedule`) on these arrays and options.

    Keys (as :meth:`Traffic.as_record`): ``read_q_bytes`` (each query block with a visited
    tile, once), ``read_k_bytes``/``read_v_bytes`` (the key rows of each visited tile,
    clipped to the mask's band and lengths), ``read_mask_bytes`` (PARTIAL tiles only),
    ``read_bias_bytes``, ``write_o_bytes``/``write_lse_bytes`` (every row once),
    ``read_bytes``, ``write_bytes``, ``total_bytes``, and the tile counts ``tiles``
    (visited), ``tiles_full``, ``tiles_partial``, ``tiles_total`` (the grid).
    """
    plan = Plan.build(q, k, v, block_q=block_q, block_k=block_k, **options)
    opts, counts = plan.opts, Counter[str]()
    for b in range(opts.batch):
        for i0, i1, tiles in schedule(opts.spec, b, plan.bq, plan.bk):
            if tiles:
                counts["read_q_bytes"] += opts.heads * (i1 - i0) * opts.d * plan.q.itemsize
            for j0, j1, kind in tiles:
                for h in range(opts.heads):
                    _count_tile(plan, b, h, i0, i1, j0, j1, kind, counts)
    return _totals(plan, counts)


def _count_tile(plan: Plan, b: int, h: int, i0: int, i1: int, j0: int, j1: int,
                kind: TileKind, counts: Counter[str]) -> None:
    opts, nj = plan.opts, j1 - j0
    counts["tiles"] += 1
    counts["tiles_full" if kind is TileKind.FULL else "tiles_partial"] += 1
    counts["read_k_bytes"] += nj * opts.d * plan.k.itemsize
    counts["read_v_bytes"] += nj * opts.dv * plan.v.itemsize
    for name, arr in (("mask", opts.spec.mask), ("bias", opts.bias)):
        if arr is not None and (name == "bias" or kind is TileKind.PARTIAL):
            counts[f"read_{name}_bytes"] += block_of(arr, b, h, i0, i1, j0, j1).nbytes


def _totals(plan: Plan, counts: Counter[str]) -> dict[str, int]:
    opts = plan.opts
    rows = opts.batch * opts.heads * opts.sq
    counts["write_o_bytes"] += rows * opts.dv * plan.q.itemsize
    counts["write_lse_bytes"] += rows * opts.lse_dtype.itemsize
    counts["tiles_total"] += (
        opts.batch * opts.heads * -(-opts.sq // plan.bq) * -(-opts.sk // plan.bk)
    )
    keys = ("read_q_bytes", "read_k_bytes", "read_v_bytes", "read_mask_bytes",
            "read_bias_bytes", "write_o_bytes", "write_lse_bytes")
    stats = {key: counts[key] for key in (*keys, "tiles", "tiles_full", "tiles_partial",
                                          "tiles_total")}
    for total, prefix in (("read_bytes", "read_"), ("write_bytes", "write_")):
        stats[total] = sum(counts[x] for x in keys if x.startswith(prefix))
    stats["total_bytes"] = sum(counts[x] for x in keys)
    return stats
