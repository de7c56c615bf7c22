"""flashmath.triton: FlashAttention forward and backward as Triton kernels, a torch op.

Owns: ``kernels`` (the Triton kernels and their autotuning configs), ``op`` (the public
``flash_attention`` on torch tensors: validation, launches, autograd) and ``bench`` (its
TFLOP/s against torch SDPA on one GPU). May import: dtypes, text, attention (the shared
option rules and the mask band), measure (the FLOP count, the no-GPU wording); torch and
triton. Never imports distributed, lab or cli.

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
