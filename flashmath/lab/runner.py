"""The lab runner: runs experiments and owns every file they produce.

Layout of one run (``<run-id>`` = UTC start time + seed, e.g. ``20250101T120000Z-seed42``,
with ``-2``, ``-3`` ... appended when that folder already exists)::

    <out>/<run-id>/manifest.json          seed, versions, machine, git, config, times, statuses
    <out>/<run-id>/report.md              every experiment: headline, README, results, plots
    <out>/<run-id>/<experiment>/results.json
    <out>/<run-id>/<experiment>/<figure>.png
    <out>/<run-id>/<experiment>/README.md
    <out>/<run-id>/<experiment>/traceback.txt   (only when it failed)

Guarantees:

- Every file is written atomically (temporary file in the same folder, fsync, ``os.replace``):
  a reader never sees half a file.
- An earlier run is never overwritten: the run folder is created with ``exist_ok=False``.
- manifest.json and report.md are rewritten after every experiment, so a crash keeps
  everything that finished. An experiment that raises is marked ``failed`` (its traceback
  saved) and the others still run; one that raises ``Skipped`` is marked ``skipped``;
  Ctrl-C marks the current and remaining ones ``interrupted`` and the run ends with 130.
- On 2 or more cores a helper process (:mod:`flashmath.lab.helper`) runs the experiments
  that time nothing two at a time, then each ``TIMED`` one alone; each entry's
  ``process`` says where it ran ("main" or "helper"). The helper writes an experiment's
  folder the same way (:func:`execute`), only this process writes manifest.json and
  report.md, and the guarantees above hold: a helper that dies hands its job back to run
  here, Ctrl-C stops it, and its results are those of a serial run (``--serial``).
- results.json is deterministic for a given seed (keys sorted, NaN/inf as the strings
  "nan"/"inf"/"-inf"); only keys ending in ``experiment.VOLATILE_SUFFIXES`` may differ.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from flashmath.files import atomic_write
from flashmath.lab import experiment, plotting, registry, report
from flashmath.lab import helper as helper_process
from flashmath.measure.machine import cpu_model

__all__ = [
    "DISK_ERRNOS",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "RunOutcome",
    "RunWriteError",
    "UnknownExperimentError",
    "atomic_write",
    "dumps_json",
    "execute",
    "listing",
    "make_run_dir",
    "run_lab",
    "save_figure",
    "select",
    "to_jsonable",
]

EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130

#: Packages whose versions go into the manifest (read from metadata: nothing is imported).
VERSIONED_PACKAGES = ("flashmath", "numpy", "ml_dtypes", "matplotlib", "tqdm", "scipy",
                      "mpmath", "torch", "triton")


#: Errors of the disk itself (full, over quota, read-only): they end the run, as no
#: experiment could write its files; anything else an experiment raises only fails it.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


class RunWriteError(OSError):
    """The run could not write its files (a full disk, say). ``recorded`` says whether
    manifest.json still took the run's failed status; finished experiments are kept."""

    def __init__(self, cause: OSError, recorded: bool) -> None:
        super().__init__(cause.errno, cause.strerror, cause.filename)
        self.recorded = recorded


class UnknownExperimentError(ValueError):
    """An --only name that no experiment has; the message lists the valid names."""


@dataclass(frozen=True)
class RunOutcome:
    """What ``run_lab`` did: where it wrote, each experiment's status, the exit code."""

    run_dir: Path
    statuses: dict[str, str]
    exit_code: int


# --------------------------------------------------------------------------- files


def to_jsonable(obj: Any, where: str = "$") -> Any:
    """``obj`` as plain JSON values: NumPy (and ml_dtypes) scalars and arrays unpacked, tuples
    as lists, int dict keys as strings, non-finite floats as "nan" / "inf" / "-inf". Anything
    else is a TypeError that names the path to the offending value (``where``, e.g.
    ``$.records[3].sum``)."""
    if isinstance(obj, np.generic):
        obj = obj.item()  # numpy and ml_dtypes scalars -> bool / int / float / str
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        if math.isnan(obj):
            return "nan"
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return obj
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            if isinstance(key, (int, np.integer)) and not isinstance(key, (bool, np.bool_)):
                key = str(int(key))  # as json.dumps writes int keys
            if not isinstance(key, str):
                raise TypeError(f"{where}: dict key {key!r} is neither a string nor an int")
            if key in out:
                raise TypeError(f"{where}: dict key {key!r} appears twice (int and string)")
            out[key] = to_jsonable(value, f"{where}.{key}")
        return out
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj[()] if obj.ndim == 0 else list(obj), where)
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    raise TypeError(f"{where}: cannot write a {type(obj).__name__} to JSON ({obj!r:.80})")


def dumps_json(obj: Any) -> str:
    """Stable JSON: keys sorted, two-space indent, shortest round-trip floats, final newline."""
    return json.dumps(to_jsonable(obj), sort_keys=True, indent=2, ensure_ascii=False,
                      allow_nan=False) + "\n"


def save_figure(fig: Any, path: Path) -> None:
    """Render a matplotlib figure to PNG in memory, write it atomically, release the figure."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=plotting.DPI, metadata={"Software": None})
    atomic_write(path, buf.getvalue())
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:  # a figure made with pyplot stays registered until closed
        pyplot.close(fig)


def make_run_dir(out: Path, seed: int, now: datetime | None = None) -> Path:
    """Create ``<out>/<UTC time>-seed<N>`` (``-2``, ``-3``, ... if taken) and return it.

    The folder is created with ``exist_ok=False``: an earlier run is never reused.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    base = f"{stamp}-seed{seed}"
    for n in range(1, 10_000):
        candidate = out / (base if n == 1 else f"{base}-{n}")
        try:
            candidate.mkdir(exist_ok=False)
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"{out}: no free run folder for {base}")


# --------------------------------------------------------------------------- manifest


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def package_versions() -> dict[str, str | None]:
    """Installed versions (from package metadata, without importing anything) and Python's."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def machine_info() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python_implementation": platform.python_implementation(),
    }


def git_info() -> dict[str, Any] | None:
    """The commit of the flashmath source tree and whether it has uncommitted changes.

    None when git is missing or flashmath is not running from a git checkout (an installed
    wheel inside some other repository does not count).
    """
    package_dir = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=package_dir, capture_output=True, text=True,
                              timeout=10, check=True)
        return done.stdout.strip()

    try:
        top = Path(git("rev-parse", "--show-toplevel")).resolve()
        if top / "flashmath" != package_dir:
            return None
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


# --------------------------------------------------------------------------- running


def select(available: Sequence[str], only: Sequence[str] | None) -> list[str]:
    """The experiments to run, in run order: all of them, or those named in ``only``.

    Raises UnknownExperimentError (listing the valid names) for a name that does not exist.
    """
    if not only:
        return list(available)
    unknown = [name for name in only if name not in available]
    if unknown:
        raise UnknownExperimentError(
            f"unknown experiment{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"valid names: {', '.join(available) or '(none)'}"
        )
    return [name for name in available if name in set(only)]


def listing(modules: dict[str, ModuleType]) -> str:
    """``flashmath lab --list``: one line per experiment, ``NAME  TITLE  [seeds: ...]``,
    names padded to one width (the modules given, in their order)."""
    width = max((len(n) for n in modules), default=0)
    return "\n".join(
        f"{name:<{width}}  {mod.TITLE}  [seeds: {', '.join(getattr(mod, 'SEEDS', ())) or '-'}]"
        for name, mod in modules.items())


class _Run:
    """The state of one run: the manifest dict and the files it rewrites."""

    def __init__(self, run_dir: Path, manifest: dict[str, Any]) -> None:
        self.run_dir = run_dir
        self.manifest = manifest
        self.entries: dict[str, dict[str, Any]] = {e["name"]: e for e in manifest["experiments"]}
        self._t0 = time.perf_counter()

    def save(self) -> None:
        """Rewrite manifest.json and report.md (atomically) from the current state."""
        atomic_write(self.run_dir / "manifest.json", dumps_json(self.manifest))
        atomic_write(self.run_dir / "report.md", report.render_report(self.manifest))

    def finish(self, status: str) -> None:
        self.manifest["status"] = status
        self.manifest["ended_at"] = _utc_now()
        self.manifest["duration_s"] = round(time.perf_counter() - self._t0, 3)
        self.save()


def _new_manifest(run_dir: Path, modules: dict[str, ModuleType], chosen: list[str], *,
                  seed: int, quick: bool, config: dict[str, Any]) -> dict[str, Any]:
    entries = []
    for name, mod in modules.items():
        entry: dict[str, Any] = {
            "name": name,
            "title": str(getattr(mod, "TITLE", "")),
            "seeds": list(getattr(mod, "SEEDS", ())),
            "status": "pending" if name in chosen else "skipped",
        }
        if name not in chosen:
            entry["reason"] = "not selected (--only)"
        entries.append(entry)
    return {
        "run_id": run_dir.name,
        "seed": seed,
        "quick": quick,
        "config": config,
        "versions": package_versions(),
        "machine": machine_info(),
        "git": git_info(),
        "started_at": _utc_now(),
        "ended_at": None,
        "status": "running",
        "experiments": entries,
    }


def _write_result(exp_dir: Path, name: str, mod: ModuleType, result: experiment.Result, *,
                  seed: int, quick: bool) -> tuple[list[str], str]:
    """Write results.json, the PNGs and README.md; return (files written, headline)."""
    if not isinstance(result, experiment.Result):
        raise TypeError(f"{name}: run() returned {type(result).__name__}, not a Result")
    headline = report.headline_of(result)
    payload = {
        "experiment": name,
        "title": str(getattr(mod, "TITLE", "")),
        "seeds": list(getattr(mod, "SEEDS", ())),
        "seed": seed,
        "quick": quick,
        "headline": headline,
        "records": result.records,
        "summary": result.summary,
    }
    files: list[str] = []
    text = dumps_json(payload)  # encode first: a bad record fails before anything is written
    # Everything goes into a hidden folder renamed to exp_dir at the end: an experiment's
    # folder appears whole or not at all, also when Ctrl-C lands half-way through.
    partial = exp_dir.with_name(f".{exp_dir.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    atomic_write(partial / "results.json", text)
    files.append("results.json")
    for fig_name, fig in result.figures.items():
        save_figure(fig, partial / f"{fig_name}.png")
        files.append(f"{fig_name}.png")
    readme = result.readme.strip() or f"# {name}\n\n{headline}"
    atomic_write(partial / "README.md", readme + "\n")
    files.append("README.md")
    os.replace(partial, exp_dir)
    return files, headline


@contextlib.contextmanager
def _progress_bar(total: int, enabled: bool | None) -> Iterator[Any]:
    from tqdm import tqdm

    bar = tqdm(total=total, unit="exp", desc="flashmath lab",
               disable=None if enabled is None else not enabled,
               file=sys.stderr, leave=True)
    try:
        yield bar
    finally:
        bar.close()


def run_lab(out: Path | str = "lab-runs", *, only: Sequence[str] | None = None,
            quick: bool = False, seed: int = 42, config: dict[str, Any] | None = None,
            progress: bool | None = None, parallel: bool | None = None) -> RunOutcome:
    """Run the chosen experiments and write ``<out>/<run-id>/``; see the module docstring.

    progress: True shows the bar, False hides it, None shows it only on a terminal.
    parallel: True uses a helper process (:mod:`flashmath.lab.helper`): the experiments
    that time nothing run two at a time, one here and one there; then each ``TIMED`` one
    runs alone, in the helper, which imported what it needs (its ``PRELOAD`` modules,
    torch say) while the first ones ran. False runs everything here, one after another,
    in registry order. None (the default) is True on a machine with 2 or more cores when
    the experiments chosen include one that times nothing and another besides.
    manifest.json and report.md list the experiments in registry order either way, and
    the results are the same (each experiment seeds its own streams).
    Raises UnknownExperimentError before creating anything when ``only`` names an unknown
    experiment.
    """
    modules = registry.experiments()
    chosen = select(list(modules), only)
    run_dir = make_run_dir(Path(out), seed)
    config = dict(config or {"out": str(out), "only": list(only or []), "quick": quick,
                             "seed": seed})
    run = _Run(run_dir, _new_manifest(run_dir, modules, chosen, seed=seed, quick=quick,
                                      config=config))
    run.save()
    movable = [name for name in chosen if _importable(modules[name])]
    untimed = [name for name in movable if not getattr(modules[name], "TIMED", False)]
    if parallel is None:
        parallel = (os.cpu_count() or 1) >= 2 and len(movable) >= 2 and bool(untimed)
    helper = _start_helper(parallel, [modules[n] for n in movable if n not in untimed])
    pending = list(chosen)  # not finished yet (any order): what Ctrl-C marks
    with _progress_bar(len(chosen), progress) as bar:
        try:
            if helper is not None:
                _run_two_at_a_time(run, modules, untimed, pending, helper, seed=seed,
                                   quick=quick, bar=bar)
            for name in [n for n in chosen if n in pending]:
                if not (helper is not None and name in movable and _run_in_helper(
                        run, name, modules[name], helper, seed=seed, quick=quick, bar=bar)):
                    _run_one(run, name, modules[name], seed=seed, quick=quick, bar=bar)
                _finished(run, name, pending, bar)
        except KeyboardInterrupt:
            _stop_helper(run, helper)
            _abandon(run, pending, "interrupted")
            run.finish("interrupted")
            return RunOutcome(run_dir, _statuses(run), EXIT_INTERRUPTED)
        except OSError as exc:  # the disk (not an experiment) failed: end the run
            _stop_helper(run, helper)
            _abandon(run, pending, "failed", reason=f"not written: {exc.strerror or exc}")
            run.manifest["error"] = {"type": type(exc).__name__, "message": str(exc)}
            try:
                run.finish("failed")
            except OSError:
                raise RunWriteError(exc, recorded=False) from exc
            raise RunWriteError(exc, recorded=True) from exc
        finally:
            _stop_helper(run, helper)
    failed = any(e["status"] == "failed" for e in run.entries.values())
    run.finish("failed" if failed else "ok")
    return RunOutcome(run_dir, _statuses(run), EXIT_FAILED if failed else EXIT_OK)


def _importable(mod: ModuleType) -> bool:
    """Whether the helper can run this experiment: a module a fresh interpreter imports by
    name (the test suite's stand-ins, made at run time, run here)."""
    origin = getattr(getattr(mod, "__spec__", None), "origin", None)
    return (isinstance(mod, ModuleType) and sys.modules.get(mod.__name__) is mod
            and isinstance(origin, str) and Path(origin).is_file())


def _start_helper(wanted: bool, timed: list[ModuleType]) -> helper_process.Helper | None:
    """A helper process that preloads what the ``timed`` experiments import, or None when
    not wanted or it cannot start (then everything runs in this process)."""
    if not wanted:
        return None
    try:
        helper = helper_process.Helper()
    except OSError:
        return None
    preload = sorted({name for mod in timed for name in getattr(mod, "PRELOAD", ())})
    if preload:
        helper.preload(preload)
    return helper


def _stop_helper(run: _Run, helper: helper_process.Helper | None) -> None:
    """Stop the helper (again: a no-op). A job it was still running is kept if its answer
    has arrived, else abandoned: its folder, should it have appeared between the helper's
    last write and its answer, is removed, so no folder exists that manifest.json does not
    list as finished."""
    if helper is None:
        return
    name = helper.busy
    answer = helper.arrived()
    helper.close()
    if name is None:
        return
    if answer is not None and "oserror" not in answer:
        run.entries[name].update(answer)
    elif run.entries[name]["status"] == "running":
        shutil.rmtree(run.run_dir / name, ignore_errors=True)


def _run_two_at_a_time(run: _Run, modules: dict[str, ModuleType], names: list[str],
                       pending: list[str], helper: helper_process.Helper, *, seed: int,
                       quick: bool, bar: Any) -> None:
    """Run ``names``: the helper takes the next one whenever it is idle, this process the
    one after; returns when all have finished. A job the helper lost (it died) runs here."""
    todo = list(names)
    while todo or helper.busy:
        if helper.busy is None and helper.alive and todo:
            name = todo.pop(0)
            if not _send(run, name, modules[name], helper, seed=seed, quick=quick):
                todo.insert(0, name)  # it runs here below
        if todo:
            name = todo.pop(0)
            _run_one(run, name, modules[name], seed=seed, quick=quick, bar=bar)
            _finished(run, name, pending, bar)
            timeout: float | None = 0.0
        else:
            timeout = 0.1  # short waits, so Ctrl-C is seen at once on every platform
        name = helper.busy or ""
        if not name:
            continue
        answer = helper.answer(timeout)
        if answer is not None:
            _record_answer(run, name, answer)
            _finished(run, name, pending, bar)
        elif not helper.alive:  # the helper died with this job: run it here instead
            helper.busy = None
            todo.insert(0, name)


def _run_in_helper(run: _Run, name: str, mod: ModuleType, helper: helper_process.Helper, *,
                   seed: int, quick: bool, bar: Any) -> bool:
    """Run one experiment in the helper, nothing else meanwhile, and record it; False (and
    nothing recorded) when the helper is gone, so the caller runs it here."""
    if not helper.alive:
        return False
    bar.set_description(name)
    if not _send(run, name, mod, helper, seed=seed, quick=quick):
        return False
    while True:
        answer = helper.answer(0.1, progress=_progress_to(bar))
        if answer is not None:
            _record_answer(run, name, answer)
            return True
        if not helper.alive:
            helper.busy = None
            return False


def _send(run: _Run, name: str, mod: ModuleType, helper: helper_process.Helper, *,
          seed: int, quick: bool) -> bool:
    """Start ``name`` in the helper (its entry marked running there); False when the helper
    is gone, so the caller runs it here."""
    _started(run, name, process="helper")
    try:
        helper.send(mod.__name__, name, str((run.run_dir / name).resolve()), seed=seed,
                    quick=quick)
    except OSError:
        return False
    return True


def _progress_to(bar: Any) -> Any:
    """An experiment's progress callback: its message beside the bar."""
    def progress(msg: str) -> None:
        bar.set_postfix_str(str(msg)[:60], refresh=False)
        bar.update(0)  # redraws at most every mininterval
    return progress


def _started(run: _Run, name: str, *, process: str) -> None:
    run.entries[name].update(status="running", started_at=_utc_now(), process=process)
    run.save()


def _finished(run: _Run, name: str, pending: list[str], bar: Any) -> None:
    pending.remove(name)
    bar.set_postfix_str(run.entries[name]["status"], refresh=False)
    bar.update(1)


def _record_answer(run: _Run, name: str, answer: dict[str, Any]) -> None:
    """The helper's answer for ``name``: its entry fields, or the disk error it met."""
    if "oserror" in answer:
        code, message, filename = answer["oserror"]
        raise OSError(code, message, filename)
    run.entries[name].update(answer)
    run.save()


def _abandon(run: _Run, pending: list[str], status: str, reason: str | None = None) -> None:
    """Mark the experiments that were running (if any) and those not started."""
    for name in pending:
        if run.entries[name]["status"] in ("pending", "running"):
            run.entries[name]["status"] = status
            if reason:
                run.entries[name]["reason"] = reason
            shutil.rmtree(run.run_dir / f".{name}.partial", ignore_errors=True)


def _statuses(run: _Run) -> dict[str, str]:
    return {name: entry["status"] for name, entry in run.entries.items()}


def _run_one(run: _Run, name: str, mod: ModuleType, *, seed: int, quick: bool,
             bar: Any) -> None:
    """Run one experiment here, write its files, record its status; KeyboardInterrupt
    propagates."""
    _started(run, name, process="main")
    bar.set_description(name)
    run.entries[name].update(execute(name, mod, run.run_dir / name, seed=seed, quick=quick,
                                     progress=_progress_to(bar)))
    run.save()


def execute(name: str, mod: Any, exp_dir: Path, *, seed: int, quick: bool,
            progress: Any = None) -> dict[str, Any]:
    """Run ``mod`` and write its folder ``exp_dir``; return its manifest entry's fields
    (status, files, headline or reason/error, started_at, ended_at, duration_s).

    An experiment's exception is caught and recorded (status ``failed``, traceback.txt
    written); ``Skipped`` gives status ``skipped``. Only a disk error (``DISK_ERRNOS``)
    and KeyboardInterrupt propagate. The helper process runs experiments through this too.
    """
    entry: dict[str, Any] = {"started_at": _utc_now()}
    ctx = experiment.Context(name=name, seed=seed, quick=quick,
                             **({"progress": progress} if progress else {}))
    t0 = time.perf_counter()
    try:
        with plotting.style():
            result = mod.run(ctx)
            files, headline = _write_result(exp_dir, name, mod, result, seed=seed, quick=quick)
    except experiment.Skipped as exc:
        entry.update(status="skipped", reason=str(exc) or "skipped by the experiment")
    except OSError as exc:
        if exc.errno in DISK_ERRNOS:
            raise  # the disk is full or read-only: run_lab ends the run
        entry.update(_failure(name, exp_dir, exc))
    except Exception as exc:  # the experiment failed: record it, keep going
        entry.update(_failure(name, exp_dir, exc))
    else:
        entry.update(status="ok", files=files, headline=headline)
    finally:
        entry.update(duration_s=round(time.perf_counter() - t0, 3), ended_at=_utc_now())
    return entry


def _failure(name: str, exp_dir: Path, exc: BaseException) -> dict[str, Any]:
    """The experiment failed: its traceback beside its results; the entry fields saying why."""
    exp_dir.mkdir(exist_ok=True)
    atomic_write(exp_dir / "traceback.txt", traceback.format_exc())
    return {"status": "failed", "error": {
        "type": type(exc).__name__,
        "message": str(exc),
        "traceback": f"{name}/traceback.txt",
    }}
