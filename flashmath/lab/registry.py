"""The experiments `flashmath lab` knows, in registry order (module names under flashmath.lab).

manifest.json and report.md list them in this order; a serial run (``--serial``) also runs
them in it, while a run with the helper process runs the untimed ones first (see
:func:`flashmath.lab.runner.run_lab`).
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: Module names in registry order. Each defines NAME, TITLE, SEEDS and run(ctx) -> Result.
EXPERIMENT_MODULES: tuple[str, ...] = (
    "softmax_stability",
    "overflow",
    "online_softmax",
    "flash_attention",
    "hbm_traffic",
    "sdpa_benchmark",
    "ring_attention",
    "fp8_attention",
    "model_attention",
)


def experiments() -> dict[str, ModuleType]:
    """NAME -> module for every experiment, in registry order."""
    modules = (importlib.import_module(f"flashmath.lab.{name}") for name in EXPERIMENT_MODULES)
    return {mod.NAME: mod for mod in modules}
