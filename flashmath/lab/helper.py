"""A second process that runs experiments for the runner, so a 2-core machine does two at a
time (``flashmath lab``: the experiments that time nothing run two at a time, then each
timed one runs alone, here or in the runner).

Protocol (JSON lines). The runner writes one job at a time on the helper's stdin,
``{"module": "flashmath.lab.overflow", "name": "overflow", "exp_dir": "/abs/path",
"seed": 42, "quick": true}``; the helper imports the module, runs it with
:func:`flashmath.lab.runner.execute` (which writes the experiment's folder, atomically,
exactly as the runner would) and answers ``{"progress": "..."}`` lines while it runs
(at most ten a second), then one line: the entry fields for manifest.json, or
``{"oserror": [errno, strerror, filename]}`` when the disk failed. A line
``{"preload": ["torch"]}`` imports those modules ahead of the jobs that need them, and
answers nothing. Answers travel on a private copy of the original stdout; what an
experiment prints goes to stderr. End of stdin ends the helper.

The helper ignores SIGINT: Ctrl-C reaches the runner, which stops the helper itself and
marks the job it had ``interrupted``. It starts with the runner's ``sys.path``, so it
imports the same flashmath (and any experiment module the runner can import).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import IO, Any

__all__ = ["Helper", "serve"]


class Helper:
    """The runner's side: start the process, send a job, collect its answer.

    ``busy`` names the experiment the helper is running (None when idle); ``alive`` is
    False once the process has ended (its answer to the job in flight, if any, is lost).
    """

    def __init__(self) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "flashmath.lab.helper"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, env=env, text=True, encoding="utf-8")
        self._answers: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name="flashmath_lab_helper",
                                        daemon=True)
        self._reader.start()
        self.busy: str | None = None
        self.alive = True

    def _read(self) -> None:
        assert self._proc.stdout is not None
        try:
            for line in self._proc.stdout:
                self._answers.put(json.loads(line))
        except (OSError, ValueError):
            pass  # a garbled answer counts as the process ending
        finally:
            self._answers.put(None)  # the process ended

    def send(self, module: str, name: str, exp_dir: str, *, seed: int, quick: bool) -> None:
        """Start one experiment in the helper; raises OSError if the helper is gone."""
        if self.busy is not None:
            raise RuntimeError(f"the helper is still running {self.busy!r}")
        assert self._proc.stdin is not None
        job = {"module": module, "name": name, "exp_dir": exp_dir, "seed": seed,
               "quick": quick}
        try:
            self._proc.stdin.write(json.dumps(job) + "\n")
            self._proc.stdin.flush()
        except (OSError, ValueError) as exc:  # a broken pipe, a closed stdin
            self.alive = False
            raise OSError(f"the lab's helper process is gone: {exc}") from exc
        self.busy = name

    def preload(self, modules: Sequence[str]) -> None:
        """Have the helper import ``modules`` (those it can) before its next job."""
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(json.dumps({"preload": list(modules)}) + "\n")
            self._proc.stdin.flush()
        except (OSError, ValueError):
            self.alive = False

    def answer(self, timeout: float | None,
               progress: Callable[[str], None] | None = None) -> dict[str, Any] | None:
        """The answer to the job in flight, or None if none came within ``timeout`` seconds,
        if a progress message came instead (passed to ``progress``), or if the process
        ended (then ``alive`` is False and ``busy`` still names the job)."""
        if self.busy is None or not self.alive:
            return None
        try:
            got = self._answers.get(timeout=timeout)
        except queue.Empty:
            return None
        if got is None:
            self.alive = False
            return None
        if "progress" in got:
            if progress is not None:
                progress(str(got["progress"]))
            return None
        self.busy = None
        return got

    def arrived(self) -> dict[str, Any] | None:
        """The answer to the job in flight if it has already arrived (progress messages
        before it are dropped), else None; never waits."""
        while self.busy is not None and self.alive and not self._answers.empty():
            got = self.answer(0)
            if got is not None:
                return got
        return None

    def finish(self) -> None:
        """End the helper's stdin: once idle, it exits on its own (``close`` reaps it)."""
        try:
            if self._proc.stdin is not None:
                self._proc.stdin.close()
        except OSError:
            pass

    def close(self) -> None:
        """Stop the process: wait briefly if idle and finished, else kill it (a job still
        running is abandoned). Calling it again does nothing."""
        if self._proc.poll() is None:
            if self.busy is None and self.alive:
                self.finish()
                try:
                    self._proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
            if self._proc.poll() is None:
                self._proc.kill()
                self._proc.wait()
        self._reader.join(timeout=5)  # it has seen the end of the output
        for pipe in (self._proc.stdin, self._proc.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass
        self.alive = False


def serve(jobs: IO[str], answers: IO[str]) -> None:
    """The helper's loop: one JSON job per line of ``jobs``, its answers on ``answers``."""
    import importlib
    from pathlib import Path

    from flashmath.lab import runner

    def say(message: dict[str, Any]) -> None:
        answers.write(json.dumps(message, allow_nan=False) + "\n")
        answers.flush()

    last = [0.0]

    def progress(msg: str) -> None:
        now = time.monotonic()
        if now - last[0] >= 0.1:
            last[0] = now
            say({"progress": str(msg)[:200]})

    for line in jobs:
        job = json.loads(line)
        if "preload" in job:
            for name in job["preload"]:
                try:
                    importlib.import_module(name)
                except ImportError:
                    pass  # the experiment that wants it says so when it runs
            continue
        mod = importlib.import_module(job["module"])
        try:
            entry = runner.execute(job["name"], mod, Path(job["exp_dir"]), seed=job["seed"],
                                   quick=job["quick"], progress=progress)
        except OSError as exc:  # the disk failed (execute raises nothing else)
            entry = {"oserror": [exc.errno, exc.strerror or str(exc), exc.filename]}
        say(entry)


def _main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the runner handles Ctrl-C
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # prints (also C-level) go to stderr
    serve(sys.stdin, answers)
    answers.flush()
    os._exit(0)  # as multiprocessing's children do: every file is written, skip teardown


if __name__ == "__main__":
    _main()
