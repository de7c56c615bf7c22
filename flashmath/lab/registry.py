"""The experiments `flashmath lab` knows, in run order (module names under flashmath.lab)."""

from __future__ import annotations

import importlib
from types import ModuleType

#: Module names in run order. Each defines NAME, TITLE, SEEDS and run(ctx) -> Result.
EXPERIMENT_MODULES: tuple[str, ...] = (
    "softmax_stability",
    "overflow",
    "online_softmax",
    "flash_attention",
    "hbm_traffic",
    "sdpa_benchmark",
    "ring_attention",
)


def experiments() -> dict[str, ModuleType]:
    """NAME -> module for every experiment module that exists, in run order."""
    found: dict[str, ModuleType] = {}
    for mod_name in EXPERIMENT_MODULES:
        try:
            mod = importlib.import_module(f"flashmath.lab.{mod_name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"flashmath.lab.{mod_name}":
                continue  # not written yet
            raise
        found[mod.NAME] = mod
    return found
