"""flashmath.torch: flashmath's attention as a differentiable torch op.

``flash_attention(q, k, v, **options)`` takes torch tensors: CPU tensors run the NumPy tiled
kernels (forward and backward) as the custom op ``flashmath::attention``, which
torch.compile treats as one opaque call; CUDA tensors run the Triton kernels. Needs the
optional extra ``pip install 'flashmath[torch]'``. Inside this package ``import torch`` is
the real torch (absolute imports).
"""

try:
    import torch  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("flashmath.torch needs torch: pip install 'flashmath[torch]'") from exc

from flashmath.torch.op import SUPPORTED_DTYPES, TRITON_OPTIONS, flash_attention, route

__all__ = ["SUPPORTED_DTYPES", "TRITON_OPTIONS", "flash_attention", "route"]
