"""flashmath: the numerics under attention, exact and measured.

The public API, re-exported; nothing is defined here. Shapes use the legend
B batch, H query heads, H_kv key/value heads, Sq/Sk query/key lengths, D head dim.
"""

from flashmath import dtypes, naive
from flashmath.attention.blockmask import BlockMask, create_block_mask
from flashmath.attention.decode import flash_decode
from flashmath.attention.reference import attention_reference, attention_reference_backward
from flashmath.attention.tiled import flash_attention, flash_attention_backward
from flashmath.attention.varlen import flash_attention_varlen, flash_attention_varlen_backward
from flashmath.softmax.online import (
    SoftmaxState,
    merge,
    merge_outputs,
    softmax_online,
    softmax_online_chunked,
)
from flashmath.softmax.safety import (
    SafetyReport,
    analyze_softmax_safety,
    overflow_threshold,
    underflow_threshold,
)
from flashmath.softmax.stable import cross_entropy, log_softmax, logsumexp, softmax

__version__ = "0.1.0"

__all__ = [
    "BlockMask",
    "SafetyReport",
    "SoftmaxState",
    "__version__",
    "analyze_softmax_safety",
    "attention_reference",
    "attention_reference_backward",
    "create_block_mask",
    "cross_entropy",
    "dtypes",
    "flash_attention",
    "flash_attention_backward",
    "flash_attention_varlen",
    "flash_attention_varlen_backward",
    "flash_decode",
    "log_softmax",
    "logsumexp",
    "merge",
    "merge_outputs",
    "naive",
    "overflow_threshold",
    "softmax",
    "softmax_online",
    "softmax_online_chunked",
    "underflow_threshold",
]
