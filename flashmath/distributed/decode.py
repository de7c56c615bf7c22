"""Compatibility: this module moved to :mod:`flashmath.attention.decode`; import from there."""

from flashmath.attention.decode import (
    MIN_SPLIT_KEYS,
    choose_num_splits,
    flash_decode,
)

__all__ = [
    "MIN_SPLIT_KEYS",
    "choose_num_splits",
    "flash_decode",
]
