#!/usr/bin/env python3
"""The two Quick start commands, needing only Python >= 3.11 and pip.

    python3 dev.py lab [LAB OPTIONS]   # install flashmath[lab] in .venv, run `flashmath lab` on CPU
    python3 dev.py test [PYTEST ARGS]  # install the test extras, run ruff, mypy and pytest

Both create ./.venv on first use and reinstall only when pyproject.toml changes.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / ("python.exe" if os.name == "nt" else "python")
EXTRAS = {"lab": "lab", "test": "test"}


def _ensure_env(extra: str) -> None:
    """Create .venv and `pip install -e .[extra]` unless the same install is already there."""
    if sys.version_info < (3, 11):  # noqa: UP036 (a clear message on old Pythons)
        sys.exit(f"flashmath needs Python >= 3.11; this is {sys.version.split()[0]}")
    if not PY.exists():
        print(f"creating {VENV} ...", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:16]
    stamp = VENV / f".installed-{extra}-{digest}"
    if stamp.exists():
        return
    print(f"installing flashmath[{extra}] into {VENV} (once) ...", flush=True)
    subprocess.run(
        [str(PY), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "-e", f"{ROOT}[{extra}]"],
        check=True,
    )
    stamp.touch()


def _run(cmd: list[str]) -> int:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT).returncode


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in EXTRAS:
        print(__doc__)
        return 2
    job, rest = argv[0], argv[1:]
    _ensure_env(EXTRAS[job])
    if job == "lab":
        return _run([str(BIN / "flashmath"), "lab", *rest])
    for cmd in (
        [str(PY), "-m", "ruff", "check", "flashmath", "tests", "benchmarks", "scripts", "dev.py"],
        [str(PY), "-m", "mypy"],
        [str(PY), "scripts/check_layers.py"],
        [str(PY), "-m", "pytest", "-n", "2", "--dist", "loadgroup", *rest],
    ):
        code = _run(cmd)
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
