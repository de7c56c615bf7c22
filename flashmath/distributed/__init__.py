"""flashmath.distributed: exact attention over a sequence sharded across processes.

Owns: ``layouts`` (how a sequence is cut across ranks: contiguous, zigzag; which blocks
have work), ``transport`` (how ranks exchange shards: torch.distributed, threads, replay;
RingError), ``ring`` (ring attention: the passes, the autograd op, ``ring_attention``,
``simulate_ring_attention``, ``replay_rank_memory``), ``launch`` (N local ranks on
loopback, bounded in time), ``demo`` (the `flashmath ring` demo, one rank's measured run)
and ``model`` (when the ring hides its transfers). May import: dtypes, text, softmax,
attention, measure; torch. Never imports triton, lab or cli.

``flash_decode`` (split-KV decoding, NumPy only; it lives in
:mod:`flashmath.attention.decode`) is re-exported here for existing callers. The ring
names need torch and are imported on first use, so ``import flashmath`` stays free of torch.
"""

from __future__ import annotations

from typing import Any

from flashmath.attention.decode import flash_decode

__all__ = [
    "LAYOUTS",
    "RingError",
    "RingStats",
    "flash_decode",
    "replay_rank_memory",
    "ring_attention",
    "shard_ranges",
    "shard_sequence",
    "simulate_ring_attention",
    "unshard_sequence",
]

_RING = set(__all__) - {"flash_decode"}


def __getattr__(name: str) -> Any:
    if name in _RING:
        from flashmath.distributed import ring

        return getattr(ring, name)
    raise AttributeError(f"module 'flashmath.distributed' has no attribute {name!r}")
