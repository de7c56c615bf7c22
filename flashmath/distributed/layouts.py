"""How a sequence is cut across the ranks of a ring, and which blocks of it have work.

Legend: S the whole sequence, W world size (ranks), S_r = S / W the positions one rank holds.

    contiguous  rank r holds positions [r*S_r, (r+1)*S_r)            (needs S % W == 0)
    zigzag      the sequence cut into 2W chunks; rank r holds chunks  (needs S % 2W == 0)
                r and 2W-1-r ("head-tail"), so under a causal mask every rank has the
                same amount of work at every step

    S = 8 positions, W = 2:   contiguous  r0: 0 1 2 3 | r1: 4 5 6 7
                              zigzag      r0: 0 1 6 7 | r1: 2 3 4 5

:func:`shard_sequence` / :func:`unshard_sequence` cut and reassemble NumPy arrays or torch
tensors along one axis; :func:`block_pairs` lists the (query segment, key segment) pairs
of two ranks' shards a causal mask leaves work in. torch is not needed (tensors are
recognised by their type's module, not imported).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import numpy as np

__all__ = [
    "LAYOUTS",
    "BlockPair",
    "Layout",
    "block_pairs",
    "check_layout",
    "shard_ranges",
    "shard_sequence",
    "unshard_sequence",
]

Layout = Literal["contiguous", "zigzag"]
LAYOUTS: tuple[str, ...] = ("contiguous", "zigzag")


def check_layout(layout: Any) -> None:
    """ValueError naming ``layout`` unless it is one of :data:`LAYOUTS`."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")


def shard_ranges(
    seq_len: int, world_size: int, rank: int, layout: str = "contiguous"
) -> list[tuple[int, int]]:
    """The global [start, stop) position ranges rank ``rank`` holds, in its local order.

    contiguous: one range of S/W positions; zigzag: chunks r and 2W-1-r of S/(2W) positions.
    Raises ValueError naming the argument when S does not divide or rank/layout are invalid.
    """
    check_layout(layout)
    if world_size < 1:
        raise ValueError(f"world_size: expected >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: expected 0 <= rank < {world_size}, got {rank}")
    n_chunks = world_size if layout == "contiguous" else 2 * world_size
    if seq_len % n_chunks:
        raise ValueError(
            f"seq_len: {seq_len} is not divisible by {n_chunks} "
            f"(world_size {world_size}, layout {layout!r})"
        )
    c = seq_len // n_chunks
    chunks = [rank] if layout == "contiguous" else [rank, 2 * world_size - 1 - rank]
    return [(i * c, (i + 1) * c) for i in chunks]


def _is_tensor(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def _take(x: Any, axis: int, start: int, stop: int) -> Any:
    return x[(slice(None),) * axis + (slice(start, stop),)]


def _cat(parts: Sequence[Any], axis: int) -> Any:
    if _is_tensor(parts[0]):
        import torch

        return torch.cat(list(parts), dim=axis)
    return np.concatenate(parts, axis=axis)


def shard_sequence(x: Any, world_size: int, rank: int, *, layout: str = "contiguous",
                   dim: int = -2) -> Any:
    """Rank ``rank``'s shard of ``x`` (torch tensor or NumPy array) along ``dim`` (default -2,
    the S of (B, H, S, D); use -1 for an lse (B, H, S)). Returns a new contiguous tensor/array."""
    axis = dim % x.ndim
    ranges = shard_ranges(x.shape[axis], world_size, rank, layout)
    out = _cat([_take(x, axis, a, b) for a, b in ranges], axis)
    return out.contiguous() if _is_tensor(out) else np.ascontiguousarray(out)


def unshard_sequence(shards: Sequence[Any], *, layout: str = "contiguous", dim: int = -2) -> Any:
    """The inverse of ``shard_sequence``: the whole sequence from the W shards in rank order."""
    world = len(shards)
    if world < 1:
        raise ValueError("shards: expected at least one shard")
    axis = dim % shards[0].ndim
    seq_len = world * shards[0].shape[axis]
    pieces: list[tuple[int, Any]] = []
    for r, s in enumerate(shards):
        local = 0
        for a, b in shard_ranges(seq_len, world, r, layout):
            pieces.append((a, _take(s, axis, local, local + b - a)))
            local += b - a
    return _cat([p for _, p in sorted(pieces, key=lambda t: t[0])], axis)


class BlockPair(NamedTuple):
    """One (query segment, key segment) pair of two shards that has work.

    queries, keys: the local slices of the query shard and the key shard; q_offset,
    k_offset: their global start positions; masked: the causal mask cuts the pair (else
    every key is visible to every query)."""

    queries: slice
    keys: slice
    q_offset: int
    k_offset: int
    masked: bool


def block_pairs(q_ranges: list[tuple[int, int]], k_ranges: list[tuple[int, int]],
                causal: bool) -> list[BlockPair]:
    """Every (query segment, key segment) pair of the shards with global ``q_ranges`` and
    ``k_ranges`` (as :func:`shard_ranges` gives them) that has work; pairs a causal mask
    leaves empty (every key after the last query) are left out."""
    pairs = []
    ql = 0
    for qa, qb in q_ranges:
        kl = 0
        for ka, kb in k_ranges:
            visible_all = not causal or kb - 1 <= qa  # every key before the first query
            visible_none = causal and ka > qb - 1  # every key after the last query
            if not visible_none:
                pairs.append(BlockPair(slice(ql, ql + qb - qa), slice(kl, kl + kb - ka), qa,
                                       ka, not visible_all))
            kl += kb - ka
        ql += qb - qa
    return pairs
