"""Start a process group on this machine: N spawned ranks on loopback, bounded in time.

``run_local(fn, world_size, *args)`` is what the tests, the `flashmath ring` demo and the
lab use instead of ``torch.multiprocessing.spawn``: spawn's ``join`` stops at the first
rank that fails and terminates the others, which hides exactly what a failure test wants
to see (did *every* rank raise, and how fast?), and it has no overall deadline.

- Rendezvous: the parent opens a ``TCPStore`` on 127.0.0.1 with port 0 (the OS picks a
  free one, so parallel test workers never race for a port) and every rank joins it.
- Gloo binds to the loopback interface (``GLOO_SOCKET_IFNAME=lo`` on Linux unless set).
- Each rank gets one BLAS/OpenMP thread (``OPENBLAS_NUM_THREADS`` etc. = 1 unless set):
  the ranks already share the cores, and a BLAS pool per rank on top of the NumPy kernels'
  own threads oversubscribes them (measured: 10x slower blocks on 2 cores).
- Each rank reports ``RankOutcome`` (its return value, or the exception's type, message
  and traceback, and the seconds it ran) through a queue and leaves with ``os._exit`` so
  no interpreter-exit hook of a broken process group can hang it.
- The parent waits at most ``deadline`` seconds in all, then terminates and kills what is
  left: a hung rank becomes an outcome ("no report"), never a hung caller.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import queue
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["RankOutcome", "init_rank", "run_local"]


@dataclass
class RankOutcome:
    """What one rank reported. ``ok`` with ``value``; or ``error_type``/``error`` (message)
    and ``traceback``; ``seconds`` from the rank's start to its report (None: no report)."""

    rank: int
    ok: bool
    value: Any = None
    error_type: str | None = None
    error: str | None = None
    traceback: str | None = None
    seconds: float | None = None
    exitcode: int | None = None

    def describe(self) -> str:
        if self.ok:
            return f"rank {self.rank}: ok ({self.seconds:.1f} s)"
        return f"rank {self.rank}: {self.error_type}: {self.error}"


def init_rank(
    rank: int,
    world_size: int,
    *,
    port: int,
    backend: str = "gloo",
    timeout: float = 30.0,
    host: str = "127.0.0.1",
) -> None:
    """Join this process to the default process group through the TCPStore at host:port."""
    import torch.distributed as dist

    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    td = datetime.timedelta(seconds=timeout)
    store = dist.TCPStore(host, port, None, False, timeout=td)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=td)


_BLAS_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@contextlib.contextmanager
def _child_env() -> Iterator[None]:
    """Environment for spawned ranks (read when each process starts), restored afterwards."""
    saved = {key: os.environ.get(key) for key in _BLAS_ENV}
    for key in _BLAS_ENV:
        os.environ.setdefault(key, "1")
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _child(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    timeout: float,
    args: tuple[Any, ...],
    results: Any,
) -> None:
    t0 = time.perf_counter()
    code = 0
    try:
        init_rank(rank, world_size, port=port, backend=backend, timeout=timeout)
        value = fn(rank, world_size, *args)
        outcome = RankOutcome(rank, True, value=value, seconds=time.perf_counter() - t0)
    except BaseException as exc:  # report everything, KeyboardInterrupt included
        code = 1
        outcome = RankOutcome(
            rank, False, error_type=type(exc).__name__, error=str(exc),
            traceback=traceback.format_exc(), seconds=time.perf_counter() - t0,
        )
    try:
        results.put(outcome)
        results.close()
        results.join_thread()  # the report is flushed before we leave
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # skip exit hooks: a broken process group must not hang the rank


def run_local(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str = "gloo",
    timeout: float = 30.0,
    deadline: float = 120.0,
) -> list[RankOutcome]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes joined into one
    process group (``backend``, collective/point-to-point ``timeout`` seconds) on 127.0.0.1.

    ``fn`` and ``args`` must be picklable (``fn`` defined at a module's top level). Returns one
    RankOutcome per rank, in rank order, within about ``deadline`` seconds whatever the ranks
    do: ranks still running then are terminated and reported as such. Never raises for a
    rank's failure; raise from the outcomes where that is what the caller wants.
    """
    if world_size < 1:
        raise ValueError(f"world_size: expected >= 1, got {world_size}")
    import torch.distributed as dist
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    store = dist.TCPStore(
        "127.0.0.1", 0, None, True, timeout=datetime.timedelta(seconds=timeout),
        wait_for_workers=False,
    )
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=_child, args=(fn, r, world_size, store.port, backend, timeout, args, results),
            daemon=True, name=f"flashmath-rank{r}",
        )
        for r in range(world_size)
    ]
    outcomes: dict[int, RankOutcome] = {}
    end = time.monotonic() + deadline
    try:
        with _child_env():
            for p in procs:
                p.start()
        while len(outcomes) < world_size:
            left = end - time.monotonic()
            if left <= 0:
                break
            try:
                o = results.get(timeout=min(left, 0.5))
            except queue.Empty:
                if all(not p.is_alive() for p in procs):
                    # everyone is gone; drain what may still be in the pipe, then stop
                    try:
                        while True:
                            o = results.get(timeout=0.5)
                            outcomes[o.rank] = o
                    except queue.Empty:
                        break
                continue
            outcomes[o.rank] = o
    finally:
        started = [p for p in procs if p.pid is not None]
        for p in started:
            p.join(timeout=max(0.0, min(5.0, end - time.monotonic())))
        for p in started:
            if p.is_alive():
                p.terminate()
                p.join(timeout=2.0)
            if p.is_alive():
                p.kill()
                p.join(timeout=2.0)
        results.close()
        del store
    out = []
    for r, p in enumerate(procs):
        o = outcomes.get(r) or RankOutcome(
            r, False, error_type="NoReport",
            error=f"rank {r} sent no report within {deadline:.0f} s (exit code {p.exitcode})",
        )
        o.exitcode = p.exitcode
        out.append(o)
    return out
