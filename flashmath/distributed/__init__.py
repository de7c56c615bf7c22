"""flashmath.distributed: split-KV decoding and ring attention over torch.distributed.

``flash_decode`` (NumPy only) is imported eagerly; the ring (``ring_attention``,
``shard_sequence``, ``unshard_sequence``, ``simulate_ring_attention``, ``RingError``) needs
torch and is imported on first use, so ``import flashmath`` stays free of torch.
"""

from __future__ import annotations

from typing import Any

from flashmath.attention.decode import flash_decode

__all__ = [
    "RingError",
    "flash_decode",
    "ring_attention",
    "shard_sequence",
    "simulate_ring_attention",
    "unshard_sequence",
]

_RING = {"RingError", "ring_attention", "shard_sequence", "simulate_ring_attention",
         "unshard_sequence"}


def __getattr__(name: str) -> Any:
    if name in _RING:
        from flashmath.distributed import ring

        return getattr(ring, name)
    raise AttributeError(f"module 'flashmath.distributed' has no attribute {name!r}")
