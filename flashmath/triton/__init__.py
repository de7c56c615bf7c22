"""flashmath.triton: FlashAttention forward and backward as Triton kernels, a torch op.

Owns: ``kernels`` (the Triton kernels and their autotuning configs), ``op`` (the public
``flash_attention`` on torch tensors: validation, launches, autograd), ``varlen``
(``flash_attention_varlen``: packed sequences), ``decode`` (``flash_decode``: a contiguous
or paged KV cache, appends) and ``bench`` (TFLOP/s against torch SDPA on one GPU). May
import: dtypes, text, attention (the shared option rules and the mask band, the cu_seqlens
and block-table checks), measure (the FLOP count, the no-GPU wording); torch and triton.
Never imports distributed, lab or cli.

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

from flashmath.triton.decode import flash_decode
from flashmath.triton.op import flash_attention
from flashmath.triton.varlen import flash_attention_varlen

__all__ = ["flash_attention", "flash_attention_varlen", "flash_decode"]
