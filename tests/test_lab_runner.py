"""The lab runner: layout, manifest, atomic files, failures, Ctrl-C, determinism, CLI.

Fake experiments (registered by monkeypatching ``registry.experiments``) make each
behaviour happen on purpose; the real experiments are run end to end at the bottom.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from flashmath import cli
from flashmath.lab import experiment, plotting, registry, runner
from flashmath.lab.experiment import Context, Result, Skipped, strip_volatile
from tests import lab_fakes

# --------------------------------------------------------------------------- fakes


def fake(name: str, run: Any, title: str = "", seeds: tuple[str, ...] = ("000",)) -> Any:
    return SimpleNamespace(NAME=name, TITLE=title or f"the {name} experiment", SEEDS=seeds,
                           run=run)


def ok_run(ctx: Context) -> Result:
    rng = ctx.rng()
    ctx.progress("drawing")
    fig, ax = plotting.figure()
    ax.plot([0, 1], [0, 1])
    return Result(
        records=[{"x": float(rng.normal()), "bad": float("nan"), "big": np.float32("inf"),
                  "neg": -np.inf, "n": np.int64(3), "arr": np.arange(3), "flag": np.bool_(True),
                  "elapsed_s": time.perf_counter()}],
        summary={"headline": f"{ctx.name} measured {ctx.seed}", "quick": ctx.quick},
        figures={"line": fig},
        readme=f"# {ctx.name}\n\nIt measured things.\n",
    )


def boom_run(ctx: Context) -> Result:
    raise ValueError("the experiment broke")


def interrupt_run(ctx: Context) -> Result:
    raise KeyboardInterrupt


def skip_run(ctx: Context) -> Result:
    raise Skipped("needs a GPU")


@pytest.fixture
def register(monkeypatch: pytest.MonkeyPatch):
    def _register(*mods: Any) -> None:
        table = {m.NAME: m for m in mods}
        monkeypatch.setattr(registry, "experiments", lambda: dict(table))
    return _register


def lab(tmp_path: Path, *args: str) -> int:
    return cli.main(["lab", "--out", str(tmp_path), "--no-progress", *args])


def only_run(tmp_path: Path) -> Path:
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    return run_dir


def read(path: Path) -> Any:
    return json.loads(path.read_text())


# --------------------------------------------------------------------------- layout


def test_layout_results_and_manifest(tmp_path: Path, register: Any) -> None:
    register(fake("alpha", ok_run), fake("beta", ok_run))
    assert lab(tmp_path, "--seed", "7") == 0
    run_dir = only_run(tmp_path)
    assert run_dir.name.endswith("Z-seed7")
    for name in ("alpha", "beta"):
        files = sorted(p.name for p in (run_dir / name).iterdir())
        assert files == ["README.md", "line.png", "results.json"]
        assert (run_dir / name / "line.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        res = read(run_dir / name / "results.json")
        assert res["experiment"] == name and res["seed"] == 7 and res["quick"] is False
        assert res["summary"]["headline"] == f"{name} measured 7"
        (rec,) = res["records"]
        assert (rec["bad"], rec["big"], rec["neg"]) == ("nan", "inf", "-inf")
        assert rec["n"] == 3 and rec["arr"] == [0, 1, 2] and rec["flag"] is True
    text = (run_dir / "alpha" / "results.json").read_text()
    assert text == json.dumps(json.loads(text), sort_keys=True, indent=2) + "\n"
    assert not list(run_dir.rglob(".*.tmp")), "no temporary files are left behind"

    m = read(run_dir / "manifest.json")
    assert m["run_id"] == run_dir.name and m["seed"] == 7 and m["status"] == "ok"
    assert m["config"] == {"out": str(tmp_path), "only": [], "quick": False, "seed": 7,
                           "serial": False}
    assert {"python", "flashmath", "numpy", "ml_dtypes", "matplotlib"} <= m["versions"].keys()
    assert {"platform", "cpu_count", "processor"} <= m["machine"].keys()
    assert m["git"] is None or {"commit", "dirty"} <= m["git"].keys()
    assert m["started_at"] <= m["ended_at"]
    assert [(e["name"], e["status"]) for e in m["experiments"]] == [("alpha", "ok"),
                                                                    ("beta", "ok")]
    assert all(e["duration_s"] >= 0 and e["files"] for e in m["experiments"])
    assert [e["process"] for e in m["experiments"]] == ["main", "main"]  # stand-ins stay here


def test_report_links_every_file_with_a_headline(tmp_path: Path, register: Any) -> None:
    register(fake("alpha", ok_run), fake("beta", boom_run))
    lab(tmp_path)
    run_dir = only_run(tmp_path)
    report = (run_dir / "report.md").read_text()
    for target in ("alpha/README.md", "alpha/results.json", "alpha/line.png",
                   "beta/traceback.txt", "manifest.json"):
        assert f"({target})" in report
        assert (run_dir / target).is_file()
    assert "alpha measured 42" in report
    assert "ValueError: the experiment broke" in report


def test_same_seed_same_results_json(tmp_path: Path, register: Any) -> None:
    register(fake("alpha", ok_run))
    lab(tmp_path / "a", "--seed", "3")
    lab(tmp_path / "b", "--seed", "3")
    lab(tmp_path / "c", "--seed", "4")
    a, b, c = (read(only_run(tmp_path / d) / "alpha" / "results.json") for d in "abc")
    assert a != b  # the timing differs ...
    assert strip_volatile(a) == strip_volatile(b)  # ... and nothing else
    assert strip_volatile(a) != strip_volatile(c)


def test_never_overwrites_an_earlier_run(tmp_path: Path, register: Any) -> None:
    register(fake("alpha", ok_run))
    for _ in range(3):  # same second, same seed
        assert lab(tmp_path, "--seed", "1") == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 3 and len(set(names)) == 3
    from datetime import UTC, datetime
    now = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    first = runner.make_run_dir(tmp_path, 9, now)
    second = runner.make_run_dir(tmp_path, 9, now)
    assert (first.name, second.name) == ("20250102T030405Z-seed9", "20250102T030405Z-seed9-2")


# --------------------------------------------------------------------------- failures


def test_a_failing_experiment_is_recorded_and_the_rest_still_run(
    tmp_path: Path, register: Any
) -> None:
    register(fake("alpha", boom_run), fake("beta", ok_run))
    assert lab(tmp_path) == runner.EXIT_FAILED
    run_dir = only_run(tmp_path)
    m = read(run_dir / "manifest.json")
    alpha, beta = m["experiments"]
    assert m["status"] == "failed"
    assert alpha["status"] == "failed" and beta["status"] == "ok"
    assert alpha["error"]["type"] == "ValueError"
    assert alpha["error"]["message"] == "the experiment broke"
    tb = (run_dir / alpha["error"]["traceback"]).read_text()
    assert "boom_run" in tb and "ValueError: the experiment broke" in tb
    assert (run_dir / "beta" / "results.json").is_file()


def test_unwritable_records_fail_that_experiment_only(tmp_path: Path, register: Any) -> None:
    def bad(ctx: Context) -> Result:
        return Result(records=[{"when": object()}])

    register(fake("bad", bad), fake("good", ok_run))
    assert lab(tmp_path) == runner.EXIT_FAILED
    m = read(only_run(tmp_path) / "manifest.json")
    assert [e["status"] for e in m["experiments"]] == ["failed", "ok"]
    assert "$.records[0].when" in m["experiments"][0]["error"]["message"]


def test_ctrl_c_keeps_finished_and_marks_the_rest(
    tmp_path: Path, register: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    register(fake("alpha", ok_run), fake("beta", interrupt_run), fake("gamma", ok_run))
    assert lab(tmp_path) == 130
    run_dir = only_run(tmp_path)
    m = read(run_dir / "manifest.json")
    assert m["status"] == "interrupted" and m["ended_at"]
    assert [e["status"] for e in m["experiments"]] == ["ok", "interrupted", "interrupted"]
    assert (run_dir / "alpha" / "results.json").is_file()
    assert not (run_dir / "gamma").exists()
    assert "interrupted" in (run_dir / "report.md").read_text()
    assert "interrupted" in capsys.readouterr().err


SIGINT_SCRIPT = lab_fakes.CTRL_C_PRELUDE + """
import sys, time, types
from flashmath import cli
from flashmath.lab import registry
from flashmath.lab.experiment import Result

def fast(ctx):
    return Result(records=[{"x": 1}])

def slow(ctx):
    for _ in range(600):  # short sleeps: SIGINT acts within 0.1 s whichever thread gets it
        time.sleep(0.1)
    return Result(records=[])

mods = {n: types.SimpleNamespace(NAME=n, TITLE=n, SEEDS=(), run=f)
        for n, f in (("fast", fast), ("slow", slow), ("after", fast))}
registry.experiments = lambda: mods
sys.exit(cli.main(["lab", "--out", sys.argv[1], "--no-progress"]))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_real_sigint_exits_130_and_keeps_what_finished(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", SIGINT_SCRIPT, str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait until "slow" is running
        manifests = list(tmp_path.glob("*/manifest.json"))
        if manifests and read(manifests[0])["experiments"][1]["status"] == "running":
            break
        time.sleep(0.05)
    err = lab_fakes.interrupt(proc)
    assert proc.returncode == 130, err
    m = read(only_run(tmp_path) / "manifest.json")
    assert m["status"] == "interrupted"
    assert [e["status"] for e in m["experiments"]] == ["ok", "interrupted", "interrupted"]
    assert (only_run(tmp_path) / "fast" / "results.json").is_file()


def test_manifest_is_rewritten_after_each_experiment(tmp_path: Path, register: Any) -> None:
    seen: dict[str, Any] = {}

    def peek(ctx: Context) -> Result:  # what a crash at this moment would leave on disk
        (run_dir,) = list(tmp_path.iterdir())
        seen["manifest"] = read(run_dir / "manifest.json")
        seen["report"] = (run_dir / "report.md").read_text()
        return Result(records=[])

    register(fake("alpha", ok_run), fake("beta", peek), fake("gamma", ok_run))
    assert lab(tmp_path) == 0
    statuses = [e["status"] for e in seen["manifest"]["experiments"]]
    assert statuses == ["ok", "running", "pending"]
    assert seen["manifest"]["status"] == "running"
    assert "alpha/README.md" in seen["report"]


def test_skipped_experiments(tmp_path: Path, register: Any) -> None:
    register(fake("alpha", ok_run), fake("beta", skip_run), fake("gamma", ok_run))
    assert lab(tmp_path, "--only", "beta", "alpha", "--quick") == 0
    run_dir = only_run(tmp_path)
    m = read(run_dir / "manifest.json")
    by_name = {e["name"]: e for e in m["experiments"]}
    assert by_name["alpha"]["status"] == "ok"
    assert (by_name["beta"]["status"], by_name["beta"]["reason"]) == ("skipped", "needs a GPU")
    assert (by_name["gamma"]["status"], by_name["gamma"]["reason"]) == (
        "skipped", "not selected (--only)")
    assert m["config"]["only"] == ["beta", "alpha"] and m["quick"] is True
    assert read(run_dir / "alpha" / "results.json")["quick"] is True


def test_unknown_only_name_is_a_clear_error(
    tmp_path: Path, register: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    register(fake("alpha", ok_run), fake("beta", ok_run))
    assert lab(tmp_path, "--only", "alpha", "nope") == 2
    err = capsys.readouterr().err
    assert "'nope'" in err and "valid names: alpha, beta" in err
    assert not tmp_path.exists() or not any(tmp_path.iterdir()), "nothing is created"


def test_list(register: Any, capsys: pytest.CaptureFixture[str]) -> None:
    register(fake("alpha", ok_run, "Alpha things", ("001",)),
             fake("beta", ok_run, "Beta things", ("003", "004")))
    assert cli.main(["lab", "--list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["alpha  Alpha things  [seeds: 001]", "beta   Beta things  [seeds: 003, 004]"]


def test_progress_bar_shows_experiment_messages(
    tmp_path: Path, register: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    register(fake("alpha", ok_run))
    runner.run_lab(tmp_path, progress=True)
    err = capsys.readouterr().err
    assert "alpha" in err and "1/1" in err


def test_bad_seed_is_an_argument_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as info:
        lab(tmp_path, "--seed", "-1")
    assert info.value.code == 2


# --------------------------------------------------------------------------- helpers


@pytest.mark.parametrize(("value", "expected"), [
    (float("nan"), "nan"), (float("inf"), "inf"), (-np.inf, "-inf"), (np.float16(0.5), 0.5),
    (np.array(2.0), 2.0), (np.array([[1, 2]]), [[1, 2]]), ((1, "a"), [1, "a"]),
    (np.array([np.nan], dtype=np.float32), ["nan"]), (np.bool_(False), False),
    ({1: "a", np.int64(2): "b"}, {"1": "a", "2": "b"}),
])
def test_to_jsonable(value: Any, expected: Any) -> None:
    assert runner.to_jsonable(value) == expected


@pytest.mark.parametrize("bad", [{(1, 2): 0}, {1.5: 0}, {1: 0, "1": 1}, {"k": object()}])
def test_to_jsonable_refuses(bad: Any) -> None:
    with pytest.raises(TypeError, match=r"\$"):
        runner.to_jsonable(bad)


def test_to_jsonable_ml_dtypes_scalars() -> None:
    from flashmath.dtypes import DTYPES
    assert runner.to_jsonable(np.array([1.5, np.inf], dtype=DTYPES["bfloat16"])) == [1.5, "inf"]


def test_atomic_write_replaces_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "f.txt"
    runner.atomic_write(target, "old")
    runner.atomic_write(target, b"new")
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_atomic_write_failure_leaves_old_file(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "f.txt"
    runner.atomic_write(target, "old")

    def broken_replace(src: Any, dst: Any) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(runner.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk gone"):
        runner.atomic_write(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_versions_do_not_import_torch() -> None:
    code = ("import sys; from flashmath.lab import runner; v = runner.package_versions(); "
            "assert 'torch' not in sys.modules, 'torch imported'; print(v['numpy'])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == np.__version__


def test_strip_volatile_keeps_everything_else() -> None:
    data = {"a_s": 1, "b": [{"c_ms": 2, "d": 3}], "e_gflops": 4.0}
    assert strip_volatile(data) == {"b": [{"d": 3}]}
    assert experiment.VOLATILE_SUFFIXES  # the documented list exists


# --------------------------------------------------------------------------- the real ones


def test_real_experiments_end_to_end_and_deterministic(tmp_path: Path) -> None:
    """Run a as it runs by default (two at a time here where there are 2 cores), run b
    with --serial: the same results either way."""
    names = ["softmax-stability", "overflow"]
    for out, extra in (("a", []), ("b", ["--serial"])):
        assert lab(tmp_path / out, "--quick", "--seed", "5", "--only", *names, *extra) == 0
    run_a, run_b = only_run(tmp_path / "a"), only_run(tmp_path / "b")
    m = read(run_a / "manifest.json")
    assert {e["name"]: e["status"] for e in m["experiments"] if e["name"] in names} == {
        n: "ok" for n in names}
    two_cores = (os.cpu_count() or 1) >= 2
    assert {e["process"] for e in m["experiments"] if e["name"] in names} == (
        {"main", "helper"} if two_cores else {"main"})
    assert {e.get("process") for e in read(run_b / "manifest.json")["experiments"]
            if e["name"] in names} == {"main"}
    expected = {"softmax-stability": ["README.md", "results.json", "softmax_break.png"],
                "overflow": ["README.md", "exp_vs_dtype_max.png", "results.json",
                             "score_histograms.png"]}
    report = (run_a / "report.md").read_text()
    for name, files in expected.items():
        assert sorted(p.name for p in (run_a / name).iterdir()) == files
        for f in files:
            assert f"({name}/{f})" in report
        a, b = (read(r / name / "results.json") for r in (run_a, run_b))
        assert strip_volatile(a) == strip_volatile(b)
        assert (a["experiment"], a["seed"], a["quick"]) == (name, 5, True)


def test_list_names_the_real_experiments(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["lab", "--list"]) == 0
    out = capsys.readouterr().out
    assert "softmax-stability" in out and "[seeds: 001]" in out
    assert "overflow" in out and "[seeds: 004]" in out


def test_regression_out_that_is_a_file_is_a_clean_error(tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "afile"
    out.write_text("")
    assert cli.main(["lab", "--quick", "--only", "overflow", "--out", str(out)]) == 2
    assert "--out" in capsys.readouterr().err


def test_regression_ctrl_c_while_writing_leaves_no_half_written_folder(
    tmp_path: Path, register: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C after results.json but before the plots: the experiment is 'interrupted' and
    its folder does not exist (it appears whole or not at all)."""
    register(fake("alpha", ok_run), fake("beta", ok_run))
    calls = {"n": 0}
    real_save = runner.save_figure

    def save_then_interrupt(fig: Any, path: Path) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # beta's plot, after beta's results.json was written
            raise KeyboardInterrupt
        real_save(fig, path)

    monkeypatch.setattr(runner, "save_figure", save_then_interrupt)
    assert lab(tmp_path) == runner.EXIT_INTERRUPTED
    run_dir = only_run(tmp_path)
    m = json.loads((run_dir / "manifest.json").read_text())
    assert [e["status"] for e in m["experiments"]] == ["ok", "interrupted"]
    assert (run_dir / "alpha" / "line.png").exists()
    assert sorted(p.name for p in run_dir.iterdir()) == ["alpha", "manifest.json", "report.md"]


def test_list_honours_only(register: Any, capsys: pytest.CaptureFixture[str]) -> None:
    register(fake("alpha", ok_run, "Alpha things", ("001",)),
             fake("beta", ok_run, "Beta things", ("003", "004")))
    assert cli.main(["lab", "--list", "--only", "beta"]) == 0
    assert capsys.readouterr().out.splitlines() == ["beta  Beta things  [seeds: 003, 004]"]
    assert cli.main(["lab", "--list", "--only", "gamma"]) == 2
    assert "'gamma'" in capsys.readouterr().err


def test_lab_extra_installs_what_the_lab_imports() -> None:
    """`python3 dev.py lab` installs flashmath[lab]: torch pinned, scipy for softmax-stability's
    float64 cross-check, mpmath for its oracle."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    names = {req.split("=")[0].split(">")[0].split(";")[0].strip(): req for req in extras["lab"]}
    assert names["torch"] == "torch==2.13.0"
    assert {"scipy", "mpmath"} <= set(names)
    dev = (root / "dev.py").read_text()
    assert 'EXTRAS = {"lab": "lab", "test": "test"}' in dev


def test_headlines_are_whole_or_cut_at_a_word() -> None:
    from flashmath.lab import report

    ring = ("ring attention equals the float64 oracle to 1.78e-15 (relative, float64, W up to "
            "4); one rank's peak memory at S = 2048 falls from 27.9 MB (W = 1) to 5.55 MB "
            "(W = 8); transfers hide above 1.01e+03 tokens per rank on NVLink, 8.02e+03 on "
            "InfiniBand, 3.2e+04 on 100 GbE")
    assert report.headline_of(Result(records=[], headline=ring)) == ring
    long = " ".join(f"word{i}" for i in range(200))
    cut = report.headline_of(Result(records=[], headline=long), limit=50)
    assert cut.endswith("…") and len(cut) <= 50
    assert long.startswith(cut[:-1]) and long[len(cut) - 1] == " "  # ends at a word boundary


#: Files the overflow experiment writes (results.json, README.md, its plots).
OVERFLOW_FILES = 4


def _fill_disk_after(monkeypatch, runner_mod, writes_ok: int, manifest_fails: bool):
    """atomic_write raises ENOSPC after ``writes_ok`` experiment files (manifest writes too
    when ``manifest_fails``): a full disk, injected."""
    import errno as _errno

    real = runner_mod.atomic_write
    count = {"n": 0}

    def full(path, data, *args, **kwargs):
        name = Path(path).name
        if name in ("manifest.json", "report.md"):
            if manifest_fails and count["n"] > writes_ok:
                raise OSError(_errno.ENOSPC, "No space left on device", str(path))
            return real(path, data, *args, **kwargs)
        count["n"] += 1
        if count["n"] > writes_ok:
            raise OSError(_errno.ENOSPC, "No space left on device", str(path))
        return real(path, data, *args, **kwargs)

    monkeypatch.setattr(runner_mod, "atomic_write", full)


@pytest.mark.parametrize("manifest_fails", [False, True])
def test_a_full_disk_ends_the_run_with_one_line_and_keeps_what_finished(
        tmp_path, monkeypatch, capsys, manifest_fails):
    from flashmath.lab import runner as runner_mod

    _fill_disk_after(monkeypatch, runner_mod, writes_ok=OVERFLOW_FILES + 1,
                     manifest_fails=manifest_fails)
    code = cli.main(["lab", "--out", str(tmp_path), "--quick", "--no-progress", "--serial",
                     "--only", "overflow", "hbm-traffic", "online-softmax"])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert "No space left on device" in last and "finished experiments are kept" in last
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    if manifest_fails:
        assert "could not be updated" in last
    else:
        assert "manifest.json marks the run failed" in last
        assert manifest["status"] == "failed"
        assert "No space left" in manifest["error"]["message"]
        statuses = {e["name"]: e["status"] for e in manifest["experiments"]}
        assert "running" not in statuses.values() and "pending" not in statuses.values()
        assert statuses["overflow"] == "ok"  # finished before the disk filled: kept
        assert (run_dir / "overflow" / "results.json").exists()
        assert statuses["hbm-traffic"] == "failed"
