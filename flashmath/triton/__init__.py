"""flashmath.triton: FlashAttention forward and backward as Triton kernels, a torch op.

Needs the optional extra: ``pip install 'flashmath[gpu]'`` (torch and triton). The kernels
run on CUDA tensors; with ``TRITON_INTERPRET=1`` set before this package is imported they
run in Triton's CPU interpreter instead (how the tests check them without a GPU).
"""

try:
    import torch  # noqa: F401
    import triton  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"flashmath.triton needs torch and triton ({exc.name} is missing): "
        "pip install 'flashmath[gpu]'"
    ) from exc

from flashmath.triton.op import flash_attention

__all__ = ["flash_attention"]
