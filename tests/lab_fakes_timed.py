"""A stand-in for a TIMED experiment (see tests/lab_fakes.py): it runs alone."""

from __future__ import annotations

from tests.lab_fakes import SEEDS, run

NAME = "lab-fakes-timed"
TITLE = "a stand-in that times something"
TIMED = True
PRELOAD = ("json", "a_module_that_does_not_exist")

__all__ = ["NAME", "PRELOAD", "SEEDS", "TIMED", "TITLE", "run"]
