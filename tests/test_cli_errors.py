"""Every flashmath command turns expected failures into one line on stderr and exit 2
(1 for a failed verdict), never a traceback: the real command, in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def flashmath(*args: str, cwd: Path | None = None,
              timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(cwd or ROOT)])}
    return subprocess.run([sys.executable, "-m", "flashmath", *args], capture_output=True,
                          text=True, cwd=cwd or ROOT, env=env, timeout=timeout)


def one_line_error(done: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert done.returncode == code, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    lines = [x for x in done.stderr.splitlines() if x.strip()]
    assert lines, "no message on stderr"
    for word in words:
        assert word in lines[-1], lines[-1]


@pytest.mark.parametrize(("args", "words"), [
    (["lab", "--out", "/proc/no/such/dir", "--only", "overflow"], ["--out", "cannot create"]),
    (["lab", "--out", "/proc", "--only", "overflow"], ["--out", "not writable"]),
    (["lab", "--only", "no-such-experiment"], ["no-such-experiment"]),
    (["check", "attention", "flashmath", "--json", "/proc/x.json"], ["--json", "cannot write"]),
    (["check", "attention", "flashmath", "--json", "/proc/no/x.json"],
     ["--json", "does not exist"]),
    (["check", "attention", "no_such_module_xyz:f"], ["cannot import module"]),
    (["bench", "attention", "--seq", "0"], ["--seq"]),
    (["bench", "attention", "--seq", "-8"], ["--seq"]),
    (["bench", "attention", "--dtype", "int32"], ["--dtype"]),
    (["bench", "attention", "--block-q", "0"], ["--block-q"]),
    (["bench", "attention", "--repeat", "0"], ["--repeat"]),
    (["ring", "--timeout", "0"], ["--timeout"]),
    (["ring", "--timeout", "-1"], ["--timeout"]),
    (["ring", "--backend", "bogus"], ["--backend"]),
    (["ring", "--heads", "4", "--kv-heads", "3"], ["--kv-heads", "does not divide"]),
])
def test_bad_arguments_get_one_line_and_exit_2(args, words):
    one_line_error(flashmath(*args), 2, *words)


def test_a_target_named_like_a_file_suggests_the_module_name(tmp_path):
    (tmp_path / "mykernel.py").write_text("def attn(q, k, v):\n    return q\n")
    one_line_error(flashmath("check", "attention", "mykernel.py:attn", cwd=tmp_path), 2,
                   "try mykernel:attn")


def test_a_target_that_returns_none_is_told_so(tmp_path):
    (tmp_path / "forgot.py").write_text(textwrap.dedent("""
        def attn(q, k, v):
            out = q  # no return
    """))
    done = flashmath("check", "attention", "forgot:attn", "--dtype", "float32", cwd=tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "returned None" in done.stdout + done.stderr


def test_lab_says_when_it_creates_the_out_folders(tmp_path):
    out = tmp_path / "new" / "parent" / "runs"
    done = flashmath("lab", "--out", str(out), "--only", "overflow", "--quick",
                     "--no-progress")
    assert done.returncode == 0, done.stderr
    assert "created 3 folder(s)" in done.stderr
    assert any(out.iterdir())


def test_version_and_python_dash_m():
    done = flashmath("--version")
    assert done.returncode == 0 and done.stdout.startswith("flashmath ")


def test_top_level_help_speaks_to_users():
    done = flashmath("--help")
    assert done.returncode == 0
    for command in ("lab", "check", "bench", "ring"):
        assert command in done.stdout
    assert "each command owned by its module" not in done.stdout
