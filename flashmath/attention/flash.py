"""Compatibility: this module moved to :mod:`flashmath.attention.tiled`; import from there."""

from flashmath.attention.tiled import (
    DEFAULT_BLOCK_K,
    DEFAULT_BLOCK_Q,
    flash_attention,
    flash_attention_backward,
)

__all__ = [
    "DEFAULT_BLOCK_K",
    "DEFAULT_BLOCK_Q",
    "flash_attention",
    "flash_attention_backward",
]
