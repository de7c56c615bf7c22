"""What each rank of tests/test_ring.py's process groups runs (spawned processes import this
module, which keeps to torch, NumPy and flashmath: no pytest, so a rank starts quickly)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from flashmath import attention_reference, attention_reference_backward
from flashmath.distributed import ring
from flashmath.distributed.ring import RingError, ring_attention, shard_sequence

EPS64 = np.finfo(np.float64).eps


def _inputs(b: int, h: int, hk: int, s: int, d: int, dtype: Any = None, seed: int = 0,
            dv: int | None = None) -> list[Any]:
    g = torch.Generator().manual_seed(seed)
    dt = dtype or torch.float64
    shapes = [(b, h, s, d), (b, hk, s, d), (b, hk, s, dv or d), (b, h, s, dv or d)]
    return [torch.randn(sh, generator=g, dtype=torch.float64).to(dt) for sh in shapes]


def _oracle(q: Any, k: Any, v: Any, dout: Any, causal: bool) -> list[np.ndarray]:
    """float64 out, dq, dk, dv of the whole sequence: the reference oracle."""
    arrs = [t.detach().double().numpy() for t in (q, k, v, dout)]
    out = attention_reference(*arrs[:3], causal=causal)
    return [out, *attention_reference_backward(arrs[3], *arrs[:3], causal=causal)]


def _bound(ref: np.ndarray, ulps: float = 64) -> float:
    """Tight float64 bound: ulps of the result's scale (these outputs are O(1)-O(10))."""
    return ulps * EPS64 * max(1.0, float(np.abs(ref).max()))


CASES: list[tuple[Any, ...]] = [  # (causal, layout, H, H_kv, S, D, dtype)
    (False, "contiguous", 4, 4, 48, 16, "float64"),
    (True, "contiguous", 4, 2, 48, 16, "float64"),
    (True, "zigzag", 4, 1, 48, 8, "float64"),
    (False, "zigzag", 2, 2, 48, 8, "float64"),
]
FAIL_RANK = 1
FAIL_TIMEOUT = 1.0  # seconds a transfer may wait in the failure phase


def _check_case(rank: int, world: int, causal: bool, layout: str, h: int, hk: int, s: int,
                d: int, dtype: str) -> dict[str, Any]:
    full = _inputs(2, h, hk, s, d, dtype=getattr(torch, dtype), seed=11)
    q, k, v, dout = (shard_sequence(t, world, rank, layout=layout) for t in full)
    for t in (q, k, v):
        t.requires_grad_(True)
    out = ring_attention(q, k, v, causal=causal, layout=layout, timeout=30.0)
    (out * dout).sum().backward()  # (a scalar loss: backward(dout) imports sympy, ~1 s a rank)
    errs = {}
    for name, got, ref in zip(("out", "dq", "dk", "dv"), (out, q.grad, k.grad, v.grad),
                              _oracle(*full, causal), strict=True):
        mine = shard_sequence(ref, world, rank, layout=layout)
        errs[name] = (float(np.abs(got.detach().double().numpy() - mine).max()), _bound(ref))
    return errs


def _failure_phase(rank: int, world: int, mode: str) -> dict[str, Any]:
    """Rank FAIL_RANK fails in its second block computation (step 2 of the forward ring);
    the others must each raise RingError, in the forward or the backward (which needs the
    failed rank's K/V). mode "crash": the failing process dies; "hang": it stays alive
    and silent, so the others can only learn of it from the timeout."""
    q, k, v, _ = _inputs(1, 2, 2, 8 * world, 4, seed=12)
    q, k, v = (shard_sequence(t, world, rank).requires_grad_(True) for t in (q, k, v))

    def run() -> None:
        ring_attention(q, k, v, timeout=FAIL_TIMEOUT).sum().backward()

    if rank == FAIL_RANK:
        calls = {"n": 0}
        real = ring._block_forward

        def failing(*args: Any, **kwargs: Any) -> Any:
            calls["n"] += 1
            if calls["n"] == 2:
                raise ValueError(f"injected failure on rank {rank}")
            return real(*args, **kwargs)

        ring._block_forward = failing  # type: ignore[assignment]
        if mode == "crash":
            run()  # raises: this process exits
        try:
            run()
        except ValueError:
            time.sleep(FAIL_TIMEOUT + 2.0)  # alive but silent, past the others' timeout
        return {"injected": True}
    t0 = time.perf_counter()
    try:
        run()
    except RingError as exc:
        return {"error_type": type(exc).__name__, "message": str(exc),
                "seconds": time.perf_counter() - t0}
    return {"error_type": None, "seconds": time.perf_counter() - t0}


def _mp_worker(rank: int, world: int, cases: list[tuple[Any, ...]], mode: str) -> dict[str, Any]:
    checks = [_check_case(rank, world, *case) for case in cases]
    dist.barrier()
    return {"checks": checks, "failure": _failure_phase(rank, world, mode)}
