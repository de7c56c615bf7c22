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

__all__ = ["blas_name", "cpu_model", "describe", "simd"]


@cache
def cpu_model() -> str:
    """The CPU's model name, with its family and model numbers where /proc/cpuinfo gives
    them (a virtual machine may say only "AMD EPYC": family 25 model 1 is a Zen 3 without
    AVX-512, family 25 model 17 a Zen 4 with it); platform's name elsewhere."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "cpu family", "model") and key not in fields:
                    fields[key] = " ".join(value.split())
                if not line.strip() and fields:
                    break  # the first processor's block is enough
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        return f"{name} (family {fields['cpu family']}, model {fields['model']})"
    return name


def simd() -> str:
    """The widest vector unit NumPy found and uses on this CPU: "AVX-512", "AVX2", "NEON"
    or "baseline". It decides the speed of NumPy's exp (see
    :data:`flashmath.attention.fast.SIMD_EXP2`), so it belongs with every figure."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:  # other NumPy layouts
        return "baseline"
    for key, name in (("AVX512_SKX", "AVX-512"), ("AVX2", "AVX2"), ("ASIMD", "NEON")):
        if features.get(key):
            return name
    return "baseline"


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
    """One line: CPU model, cores and vector unit, NumPy and its BLAS, torch (when installed
    and asked)."""
    parts = [f"{cpu_model()}, {os.cpu_count()} cores, {simd()}",
             f"NumPy {np.__version__} ({blas_name()})"]
    if torch:
        try:
            import torch as _t

            parts.append(f"torch {_t.__version__} ({_t.get_num_threads()} threads)")
        except ImportError:
            pass
    return "; ".join(parts)
