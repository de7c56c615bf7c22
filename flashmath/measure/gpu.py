"""What the GPU benchmarks share that needs no GPU: whether one is there, and what they say
when it is not.

:mod:`flashmath.triton.bench` (``benchmarks/bench_triton.py``) and the lab's
sdpa-benchmark experiment both print :data:`SKIPPED` on a machine without a CUDA device;
neither needs torch installed to say so.
"""

from __future__ import annotations

__all__ = ["SKIPPED", "cuda_available"]

#: What a GPU benchmark says, and records, where there is no CUDA device.
SKIPPED = "skipped: no CUDA device"


def cuda_available() -> bool:
    """True when torch is installed and sees a CUDA device (torch is imported here, lazily)."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())
