"""The lab's helper process: untimed experiments two at a time, timed ones alone, the same
results as a serial run, and Ctrl-C, a dying helper and a full disk handled as in one.

The stand-ins live in tests/lab_fakes.py (and lab_fakes_timed.py): the helper imports
experiment modules by name, so they must be real modules.
"""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from flashmath.lab import helper, registry, runner
from flashmath.lab.experiment import strip_volatile
from tests import lab_fakes, lab_fakes_timed


def register(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """Names starting with "timed" are TIMED stand-ins; the rest are not."""
    table = {n: lab_fakes_timed if n.startswith("timed") else lab_fakes for n in names}
    monkeypatch.setattr(registry, "experiments", lambda: dict(table))


def manifest(outcome: runner.RunOutcome) -> dict[str, Any]:
    return json.loads((outcome.run_dir / "manifest.json").read_text())


def test_untimed_run_two_at_a_time_then_timed_alone_with_serial_results(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    names = ["ok-a", "timed-x", "ok-b", "ok-c", "timed-y", "ok-d"]
    register(monkeypatch, *names)
    both = runner.run_lab(tmp_path / "both", seed=3, parallel=True, progress=False)
    alone = runner.run_lab(tmp_path / "alone", seed=3, parallel=False, progress=False)
    assert both.exit_code == alone.exit_code == 0
    m, s = manifest(both), manifest(alone)
    assert [e["name"] for e in m["experiments"]] == names  # registry order, as ever
    entries = {e["name"]: e for e in m["experiments"]}
    untimed = [n for n in names if not n.startswith("timed")]
    assert {entries[n]["process"] for n in untimed} == {"main", "helper"}
    assert {entries[n]["process"] for n in ("timed-x", "timed-y")} == {"helper"}
    assert {e["process"] for e in s["experiments"]} == {"main"}
    last_untimed = max(entries[n]["ended_at"] for n in untimed)
    assert entries["timed-x"]["started_at"] >= last_untimed  # nothing ran beside them
    assert entries["timed-y"]["started_at"] >= entries["timed-x"]["ended_at"]
    for name in names:
        a, b = (json.loads((o.run_dir / name / "results.json").read_text())
                for o in (both, alone))
        assert strip_volatile(a) == strip_volatile(b)
        assert sorted(p.name for p in (both.run_dir / name).iterdir()) == [
            "README.md", "line.png", "results.json"]
        assert entries[name]["headline"] == f"{name} measured 3"
    assert not list(both.run_dir.glob(".*"))  # no partial folder is left


def test_a_helper_that_dies_hands_its_job_back(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FM_LAB_FAKES_PARENT", str(os.getpid()))
    register(monkeypatch, "die-a", "ok-b", "ok-c")
    outcome = runner.run_lab(tmp_path, parallel=True, progress=False)
    assert outcome.exit_code == 0
    assert outcome.statuses == {"die-a": "ok", "ok-b": "ok", "ok-c": "ok"}
    entries = {e["name"]: e for e in manifest(outcome)["experiments"]}
    assert entries["die-a"]["process"] == "main"  # the helper died on it: rerun here
    assert (outcome.run_dir / "die-a" / "line.png").is_file()


def test_parallel_by_default_only_with_two_cores(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    register(monkeypatch, "ok-a", "ok-b")
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    one = runner.run_lab(tmp_path / "one", progress=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    two = runner.run_lab(tmp_path / "two", progress=False)
    assert {e["process"] for e in manifest(one)["experiments"]} == {"main"}
    assert {e["process"] for e in manifest(two)["experiments"]} == {"main", "helper"}


def _serve(tmp_path: Path, *jobs: dict[str, Any]) -> list[dict[str, Any]]:
    answers = io.StringIO()
    helper.serve(io.StringIO("".join(json.dumps(j) + "\n" for j in jobs)), answers)
    return [json.loads(line) for line in answers.getvalue().splitlines()]


def _job(tmp_path: Path, name: str) -> dict[str, Any]:
    return {"module": "tests.lab_fakes", "name": name, "exp_dir": str(tmp_path / name),
            "seed": 1, "quick": True}


def test_serve_answers_progress_then_the_entry_and_writes_the_folder(tmp_path: Path) -> None:
    got = _serve(tmp_path, {"preload": ["json", "no_such_module_here"]},
                 _job(tmp_path, "ok-z"))
    assert got[0] == {"progress": "drawing"}
    entry = got[-1]
    assert entry["status"] == "ok" and entry["headline"] == "ok-z measured 1"
    assert sorted(entry["files"]) == ["README.md", "line.png", "results.json"]
    assert {"started_at", "ended_at", "duration_s"} <= entry.keys()
    assert (tmp_path / "ok-z" / "line.png").read_bytes()[:4] == b"\x89PNG"


def test_a_full_disk_in_the_helper_ends_the_run_like_one_here(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(path: Path, *_args: Any, **_kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(runner, "atomic_write", full)
    (answer,) = _serve(tmp_path, _job(tmp_path, "ok-z"))[-1:]
    assert answer["oserror"][0] == errno.ENOSPC and "results.json" in answer["oserror"][2]
    run = runner._Run(tmp_path, {"experiments": [{"name": "ok-z", "status": "running"}]})
    with pytest.raises(OSError) as info:
        runner._record_answer(run, "ok-z", answer)
    assert info.value.errno == errno.ENOSPC


SIGINT_SCRIPT = lab_fakes.CTRL_C_PRELUDE + """
import sys
from flashmath import cli
from flashmath.lab import registry
from tests import lab_fakes

registry.experiments = lambda: {n: lab_fakes for n in ("sleep-h", "ok-m", "sleep-m")}
sys.exit(cli.main(["lab", "--out", sys.argv[1], "--no-progress"]))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_stops_the_helper_and_keeps_what_finished(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    pids.mkdir()
    env = dict(os.environ, FM_LAB_FAKES_DIR=str(pids),
               PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    out = tmp_path / "runs"
    proc = subprocess.Popen([sys.executable, "-c", SIGINT_SCRIPT, str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list(pids.glob("*.pid"))) < 2:
        time.sleep(0.05)  # both sleepers are running: one in the helper, one here
    assert len(list(pids.glob("*.pid"))) == 2
    err = lab_fakes.interrupt(proc)
    assert proc.returncode == 130, err
    (run_dir,) = out.iterdir()
    m = json.loads((run_dir / "manifest.json").read_text())
    assert m["status"] == "interrupted"
    assert {e["name"]: (e["status"], e["process"]) for e in m["experiments"]} == {
        "sleep-h": ("interrupted", "helper"), "ok-m": ("ok", "main"),
        "sleep-m": ("interrupted", "main")}
    assert sorted(p.name for p in run_dir.iterdir()) == ["manifest.json", "ok-m", "report.md"]
    helper_pid = int((pids / "sleep-h.pid").read_text())
    assert helper_pid != proc.pid
    with pytest.raises(ProcessLookupError):  # the runner stopped it before exiting
        os.kill(helper_pid, 0)


def test_arrived_skips_progress_and_never_waits(tmp_path: Path) -> None:
    proc = helper.Helper()
    try:
        assert proc.arrived() is None  # nothing in flight
        proc.send("tests.lab_fakes", "ok-x", str(tmp_path / "ok-x"), seed=0, quick=True)
        deadline, got = time.monotonic() + 60, None
        while got is None and time.monotonic() < deadline:
            got = proc.arrived()  # the "drawing" progress line comes first, then the entry
            time.sleep(0.05)
        assert got is not None and got["status"] == "ok" and proc.busy is None
        assert (tmp_path / "ok-x" / "results.json").is_file()
    finally:
        proc.close()
    assert not proc.alive
