"""The one FLOP count of attention, used by every benchmark, the lab and the ring model.

Forward: 4 B H Sq Sk D (two matmuls of 2 Sq Sk D each), halved for causal with Sq == Sk
(half the pairs are masked and skipped). The backward does 2.5x the forward's work (five
matmuls of the same size instead of two), so forward + backward is 3.5x.
"""

from __future__ import annotations

__all__ = ["FLOP_MODES", "attention_flops"]

#: What attention_flops counts, as multiples of the forward's count.
FLOP_MODES = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}


def attention_flops(b: float, h: float, sq: float, sk: float, d: float, *, causal: bool,
                    mode: str = "fwd") -> float:
    """FLOPs of one attention call: forward 4 B H Sq Sk D, halved for causal with
    Sq == Sk; the backward is 2.5x the forward. ``mode``: "fwd", "bwd" or "fwd_bwd"
    (forward + backward, 3.5x); anything else raises ValueError naming ``mode``.

    >>> attention_flops(1, 1, 8, 8, 2, causal=True)
    256.0
    """
    if mode not in FLOP_MODES:
        raise ValueError(f"mode: expected one of {sorted(FLOP_MODES)}, got {mode!r}")
    fwd = 4.0 * b * h * sq * sk * d * (0.5 if causal and sq == sk else 1.0)
    return fwd * FLOP_MODES[mode]
