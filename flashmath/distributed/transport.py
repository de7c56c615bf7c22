"""How ring ranks exchange shards: the exchange protocol, its transports, and RingError.

One rank's view of the ring is an :class:`Exchange`: ``start(send, recv, what, step)``
sends tensors to rank+1 and receives as many from rank-1 into ``recv``, and returns a
:class:`Pending` whose ``wait()`` blocks until both are done. ``what`` names the message
("K/V" or "dK/dV", see :data:`MESSAGES`: each has its own tag, so the two streams of the
backward never mix); ``step`` (0-based, -1 before the first step) is for error messages.

Transports:

    TorchExchange    torch.distributed (``batch_isend_irecv``, asynchronous on gloo/nccl)
    LocalExchange    a ring of one rank: nothing to exchange
    ThreadExchange   ranks as threads of one process, queues for wires (simulation)
    ReplayExchange   one rank alone, its peers replayed from the whole tensors (memory)

Failures: every wait is bounded by a timeout (the transport's, or the process group's);
a failed or silent peer becomes :class:`RingError` naming this rank, both peers of the
exchange and the step (:func:`ring_failure`), never a hang.
"""

from __future__ import annotations

import datetime
import queue
from collections.abc import Sequence
from typing import Any, Protocol

import torch
import torch.distributed as dist

__all__ = [
    "MESSAGES",
    "Exchange",
    "LocalExchange",
    "Pending",
    "ReplayExchange",
    "RingError",
    "ThreadExchange",
    "TorchExchange",
    "ring_failure",
]

#: The messages a ring sends, and the point-to-point tag of each.
MESSAGES = {"K/V": 0, "dK/dV": 1}


class RingError(RuntimeError):
    """A ring transfer failed: a peer crashed, left, or did not answer within the timeout."""


class Pending(Protocol):
    """A started exchange: ``wait()`` returns once it is done, or raises RingError."""

    def wait(self) -> None: ...


class Exchange(Protocol):
    """One rank's view of the ring: send to rank+1, receive from rank-1."""

    rank: int
    world_size: int

    def start(self, send: Sequence[torch.Tensor], recv: Sequence[torch.Tensor], what: str,
              step: int) -> Pending: ...


def ring_failure(ex: Exchange, what: str, step: int, timeout: float | None,
                 exc: BaseException) -> RingError:
    """The RingError for a failed exchange of ``what`` at ``step`` (-1: before the first),
    naming the rank, its two peers, the timeout and the cause."""
    w, r = ex.world_size, ex.rank
    limit = f"{timeout:g} s" if timeout else "the process group's timeout"
    when = f"at step {step + 1}/{w}" if step >= 0 else "before the first step"
    return RingError(
        f"ring_attention: rank {r} of {w}: exchanging {what} {when} failed "
        f"(receiving from rank {(r - 1) % w}, sending to rank {(r + 1) % w}); a peer crashed, "
        f"left the group, or did not answer within {limit}. Cause: {exc}"
    )


class _Done:
    """A Pending that is already complete."""

    def wait(self) -> None:
        pass


class _TorchPending:
    def __init__(self, ex: TorchExchange, works: list[Any], what: str, step: int):
        self.ex, self.works, self.what, self.step = ex, works, what, step

    def wait(self) -> None:
        t = self.ex.timeout
        try:
            for w in self.works:
                if t is None:
                    w.wait()
                else:
                    w.wait(timeout=datetime.timedelta(seconds=t))
        except RuntimeError as exc:
            raise ring_failure(self.ex, self.what, self.step, t, exc) from exc


class TorchExchange:
    """The ring over torch.distributed: ``batch_isend_irecv`` to the neighbours, async.

    group: the process group (None: the default group); timeout: seconds per wait (None:
    the process group's)."""

    def __init__(self, group: Any, timeout: float | None):
        self.group = group
        self.timeout = timeout
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        w = self.world_size
        self.next, self.prev = (self._global((self.rank + d) % w) for d in (1, -1))

    def _global(self, group_rank: int) -> int:
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)

    def start(self, send: Sequence[torch.Tensor], recv: Sequence[torch.Tensor], what: str,
              step: int) -> Pending:
        tag = MESSAGES[what]
        ops = [dist.P2POp(dist.isend, t, self.next, self.group, tag) for t in send]
        ops += [dist.P2POp(dist.irecv, t, self.prev, self.group, tag) for t in recv]
        try:
            works = dist.batch_isend_irecv(ops)
        except RuntimeError as exc:
            raise ring_failure(self, what, step, self.timeout, exc) from exc
        return _TorchPending(self, works, what, step)

    def check_same_shapes(self, *tensors: torch.Tensor) -> None:
        """Every rank must hold tensors of one shape: one small all_gather of the shapes;
        ValueError naming the ranks that differ, RingError if a peer does not answer."""
        mine = torch.tensor([n for t in tensors for n in t.shape], dtype=torch.int64)
        if dist.get_backend(self.group) == "nccl":
            mine = mine.to(tensors[0].device)
        got = [torch.empty_like(mine) for _ in range(self.world_size)]
        try:
            dist.all_gather(got, mine, group=self.group)
        except RuntimeError as exc:
            raise ring_failure(self, "shapes", -1, self.timeout, exc) from exc
        for rank, g in enumerate(got):
            if not torch.equal(g.cpu(), mine.cpu()):
                raise ValueError(
                    f"q, k, v: rank {rank} holds shapes {g.tolist()} (q, k, v dims), rank "
                    f"{self.rank} holds {mine.tolist()}; every rank needs shards of the same "
                    f"shape")


class LocalExchange:
    """World size 1: nothing to exchange."""

    rank, world_size = 0, 1

    def start(self, send: Sequence[torch.Tensor], recv: Sequence[torch.Tensor], what: str,
              step: int) -> Pending:
        raise AssertionError("a ring of one rank exchanges nothing")


#: One queue per (receiving rank, message tag): ThreadExchange's wires.
Boxes = dict[tuple[int, int], "queue.Queue[Any]"]


class _QueuePending:
    def __init__(self, ex: ThreadExchange, recv: Sequence[torch.Tensor], what: str, step: int):
        self.ex, self.recv, self.what, self.step = ex, recv, what, step

    def wait(self) -> None:
        box = self.ex.boxes[(self.ex.rank, MESSAGES[self.what])]
        for t in self.recv:
            try:
                t.copy_(box.get(timeout=self.ex.timeout))
            except queue.Empty as exc:
                raise ring_failure(self.ex, self.what, self.step, self.ex.timeout,
                                   TimeoutError("no message")) from exc


class ThreadExchange:
    """The ring between threads of one process (simulation: same schedule, queues for wires).

    boxes: :meth:`boxes_for` ``world_size``, shared by every rank's exchange."""

    def __init__(self, rank: int, world_size: int, boxes: Boxes, timeout: float):
        self.rank, self.world_size, self.boxes, self.timeout = rank, world_size, boxes, timeout

    @staticmethod
    def boxes_for(world_size: int) -> Boxes:
        """The queues of a ring of ``world_size`` threads."""
        return {(r, t): queue.Queue() for r in range(world_size) for t in MESSAGES.values()}

    def start(self, send: Sequence[torch.Tensor], recv: Sequence[torch.Tensor], what: str,
              step: int) -> Pending:
        box = self.boxes[((self.rank + 1) % self.world_size, MESSAGES[what])]
        for t in send:
            box.put(t.clone())
        return _QueuePending(self, recv, what, step)


class ReplayExchange:
    """One rank alone, its peers replayed: K/V arrive as copies of the shards the ring would
    bring (``k_shards``, ``v_shards``: every rank's, in rank order); dK/dV messages arrive
    as zeros. For memory measurement."""

    def __init__(self, rank: int, world_size: int, k_shards: list[torch.Tensor],
                 v_shards: list[torch.Tensor]):
        self.rank, self.world_size = rank, world_size
        self.k_shards, self.v_shards = k_shards, v_shards

    def start(self, send: Sequence[torch.Tensor], recv: Sequence[torch.Tensor], what: str,
              step: int) -> Pending:
        if what == "K/V":
            j = (self.rank - step - 1) % self.world_size
            recv[0].copy_(self.k_shards[j])
            recv[1].copy_(self.v_shards[j])
        else:
            for t in recv:
                t.zero_()
        return _Done()
