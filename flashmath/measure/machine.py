"""The machine a figure was measured on, in one line, for every table that quotes timings.

Figures differ between machines (the same benchmark read 1.42x on one and 2.25x on
another), so every benchmark's output names where it ran: CPU model, cores, NumPy's
BLAS, and the peer libraries' versions.
"""

from __future__ import annotations

import os
import platform
from functools import cache

import numpy as np

__all__ = ["blas_name", "cpu_model", "describe"]


@cache
def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux, platform elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or platform.machine()


@cache
def blas_name() -> str:
    """NumPy's BLAS, e.g. "scipy-openblas 0.3.29" (unknown when NumPy does not say)."""
    try:
        info = np.show_config(mode="dicts")
        blas = info["Build Dependencies"]["blas"]
        return f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
    except Exception:  # NumPy's config format is not an API
        return "unknown BLAS"


def describe(*, torch: bool = True) -> str:
    """One line: CPU model, cores, NumPy and its BLAS, torch (when installed and asked)."""
    parts = [f"{cpu_model()}, {os.cpu_count()} cores", f"NumPy {np.__version__} ({blas_name()})"]
    if torch:
        try:
            import torch as _t

            parts.append(f"torch {_t.__version__} ({_t.get_num_threads()} threads)")
        except ImportError:
            pass
    return "; ".join(parts)
