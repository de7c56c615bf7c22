"""Stand-in experiments that a fresh interpreter can import (the lab's helper process runs
only such modules): one module, its behaviour chosen by the experiment's name.

    ok-*      a record drawn from ctx.rng(), a figure and a README
    sleep-*   writes its pid to $FM_LAB_FAKES_DIR/<name>.pid, then sleeps a minute
    die-*     kills its own process when that is not $FM_LAB_FAKES_PARENT (the helper dies)
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from flashmath.lab import plotting
from flashmath.lab.experiment import Context, Result

NAME = "lab-fakes"
TITLE = "stand-in experiments for the runner's tests"
SEEDS: tuple[str, ...] = ()


def run(ctx: Context) -> Result:
    if ctx.name.startswith("sleep"):
        (Path(os.environ["FM_LAB_FAKES_DIR"]) / f"{ctx.name}.pid").write_text(str(os.getpid()))
        for _ in range(600):  # a minute in short sleeps: Ctrl-C acts within 0.1 s even
            time.sleep(0.1)   # when the kernel hands the signal to another thread
    if ctx.name.startswith("die") and str(os.getpid()) != os.environ.get("FM_LAB_FAKES_PARENT"):
        os._exit(3)
    ctx.progress("drawing")
    fig, ax = plotting.figure()
    ax.plot([0, 1], [0, float(ctx.rng().normal())])
    return Result(records=[{"x": float(ctx.rng().normal()), "n": len(ctx.name),
                            "elapsed_s": time.perf_counter()}],
                  summary={"headline": f"{ctx.name} measured {ctx.seed}"},
                  figures={"line": fig}, readme=f"# {ctx.name}\n\nIt measured things.\n")


#: Put first in a child lab script: Ctrl-C raises KeyboardInterrupt there as in a terminal
#: (a child inherits an ignored or blocked SIGINT: under concurrent load the suite's
#: children sometimes ran 60 s past SIGINT, in the middle of their experiment, as if
#: never sent), and SIGUSR1 dumps every thread's stack to stderr.
CTRL_C_PRELUDE = (
    "import faulthandler, signal\n"
    "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
    "signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])\n"
    "faulthandler.register(signal.SIGUSR1, all_threads=True)\n"
)


def interrupt(proc: subprocess.Popen[str], timeout: float = 60.0) -> str:
    """Ctrl-C (SIGINT) to the child lab ``proc``; its stderr once it has exited. A child
    still running ``timeout`` s later fails the test with its threads' stacks (its script
    began with :data:`CTRL_C_PRELUDE`) and is killed, so that no child outlives its test."""
    proc.send_signal(signal.SIGINT)
    try:
        return proc.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)
        time.sleep(1.0)
        proc.kill()
        err = proc.communicate()[1]
        message = f"still running {timeout:.0f} s after SIGINT; stderr:\n{err}"
        raise AssertionError(message) from None
