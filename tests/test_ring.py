"""Ring attention: layouts, the ring schedule in one process, and real gloo process groups.

The multi-process tests spawn 2 and 4 ranks on 127.0.0.1 (one spawn per world size runs
every check, then a failure), with hard deadlines: they never hang, and their rendezvous
port is picked by the OS, so parallel pytest-xdist workers never collide.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

import flashmath.distributed as fd  # noqa: E402
from flashmath import attention_reference, attention_reference_backward  # noqa: E402
from flashmath.distributed.launch import run_local  # noqa: E402
from flashmath.distributed.layouts import block_pairs  # noqa: E402
from flashmath.distributed.ring import (  # noqa: E402
    ring_attention,
    shard_ranges,
    shard_sequence,
    simulate_ring_attention,
    unshard_sequence,
)
from flashmath.dtypes import from_torch  # noqa: E402
from tests.ring_workers import (  # noqa: E402
    CASES,
    FAIL_RANK,
    FAIL_TIMEOUT,
    _bound,
    _inputs,
    _mp_worker,
    _oracle,
)

# --------------------------------------------------------------------------- layouts


@pytest.mark.parametrize(("layout", "world", "rank", "expected"), [
    ("contiguous", 1, 0, [(0, 8)]),
    ("contiguous", 2, 1, [(4, 8)]),
    ("contiguous", 4, 2, [(4, 6)]),
    ("zigzag", 1, 0, [(0, 4), (4, 8)]),
    ("zigzag", 2, 0, [(0, 2), (6, 8)]),
    ("zigzag", 2, 1, [(2, 4), (4, 6)]),
    ("zigzag", 4, 3, [(3, 4), (4, 5)]),
])
def test_shard_ranges(layout: str, world: int, rank: int, expected: list[tuple[int, int]]) -> None:
    assert shard_ranges(8, world, rank, layout) == expected


@pytest.mark.parametrize(("args", "name"), [
    ((10, 4, 0, "contiguous"), "seq_len"),
    ((12, 4, 0, "zigzag"), "seq_len"),
    ((8, 2, 2, "contiguous"), "rank"),
    ((8, 0, 0, "contiguous"), "world_size"),
    ((8, 2, 0, "striped"), "layout"),
])
def test_shard_ranges_errors_name_the_argument(args: tuple[Any, ...], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        shard_ranges(*args)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_unshard_round_trip(layout: str, world: int) -> None:
    x = torch.arange(2 * 3 * 24 * 2).reshape(2, 3, 24, 2)
    shards = [shard_sequence(x, world, r, layout=layout) for r in range(world)]
    assert all(s.is_contiguous() and s.shape[2] == 24 // world for s in shards)
    assert torch.equal(unshard_sequence(shards, layout=layout), x)
    lse = x[..., 0].numpy()  # (B, H, S) along dim -1, NumPy
    parts = [shard_sequence(lse, world, r, layout=layout, dim=-1) for r in range(world)]
    np.testing.assert_array_equal(unshard_sequence(parts, layout=layout, dim=-1), lse)


def test_zigzag_balances_causal_work() -> None:
    """Every rank computes the same number of visible (query, key) pairs at every step."""
    world, seq = 4, 64
    for step in range(world):
        work = []
        for r in range(world):
            q_r = shard_ranges(seq, world, r, "zigzag")
            k_r = shard_ranges(seq, world, (r - step) % world, "zigzag")
            pairs = block_pairs(q_r, k_r, causal=True)
            work.append(sum((p[0].stop - p[0].start) * (p[1].stop - p[1].start) * (
                0.5 if p[4] else 1.0) for p in pairs))
        assert len(set(work)) == 1, (step, work)


# --------------------------------------------------------------------------- one process


def test_public_names_stay_importable_from_ring_and_the_package() -> None:
    from flashmath.distributed import layouts, ring, transport

    for name in ("RingError", "ring_attention", "shard_sequence", "unshard_sequence",
                 "simulate_ring_attention"):
        assert getattr(fd, name) is getattr(ring, name)
    assert ring.RingError is transport.RingError and ring.shard_ranges is layouts.shard_ranges
    assert fd.replay_rank_memory is ring.replay_rank_memory


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_return_lse_is_the_merged_lse(dtype: torch.dtype, causal: bool) -> None:
    """One rank (no process group): out is unchanged by return_lse, lse is the oracle's
    (float32, float64 for float64 input, shape (B, H, S)) and is differentiable."""
    q, k, v, _ = _inputs(2, 4, 2, 24, 8, dtype=dtype, seed=5)
    q.requires_grad_(True)
    out, lse = ring_attention(q, k, v, causal=causal, return_lse=True)
    assert torch.equal(out, ring_attention(q, k, v, causal=causal))
    assert lse.shape == (2, 4, 24) and lse.requires_grad
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    arrs = [from_torch(t.detach()).astype(np.float64) for t in (q, k, v)]
    _, ref = attention_reference(*arrs, causal=causal, return_lse=True)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(lse.detach().numpy(), ref, rtol=tol, atol=tol)
    out.sum().backward()  # the backward still runs with the lse output unused
    assert q.grad is not None and torch.isfinite(q.grad).all()
    q.grad = None
    _, lse = ring_attention(q, k, v, causal=causal, return_lse=True)
    lse.sum().backward()  # only lse used: its gradient alone
    dlse = np.ones(lse.shape)
    want = attention_reference_backward(np.zeros((2, 4, 24, 8)), *arrs, causal=causal,
                                        dlse=dlse)[0]
    grad_tol = max(10 * tol, 4 * float(torch.finfo(dtype).eps) * np.abs(want).max())
    np.testing.assert_allclose(from_torch(q.grad).astype(np.float64), want, rtol=0,
                               atol=grad_tol)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize(("world", "h", "hk"), [(1, 2, 2), (2, 4, 2), (3, 2, 1), (4, 4, 4)])
def test_simulated_ring_matches_oracle(causal: bool, layout: str, world: int, h: int,
                                       hk: int) -> None:
    q, k, v, dout = _inputs(2, h, hk, 24, 8, dv=5, seed=world)
    out, grads = simulate_ring_attention(q, k, v, world, causal=causal, layout=layout,
                                         dout=dout)
    assert grads is not None
    for got, ref in zip((out, *grads), _oracle(q, k, v, dout, causal), strict=True):
        err = np.abs(got.numpy() - ref).max()
        assert err <= _bound(ref), (err, _bound(ref))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_simulated_ring_narrow_dtypes_meet_the_accuracy_rule(dtype: str) -> None:
    """Narrow shards compute and merge in float32, so the ring is no worse than the naive
    same-dtype formula (2x forward, 3x gradients: the accuracy rule)."""
    q, k, v, dout = _inputs(1, 2, 2, 32, 16, dtype=getattr(torch, dtype), seed=3)
    out, grads = simulate_ring_attention(q, k, v, 4, causal=True, layout="zigzag", dout=dout)
    assert grads is not None
    arrs = [from_torch(t) for t in (q, k, v, dout)]
    naive_out = attention_reference(*arrs[:3], causal=True, upcast=False)
    naive_grads = attention_reference_backward(arrs[3], *arrs[:3], causal=True, upcast=False)
    refs = _oracle(q, k, v, dout, True)
    for i, (got, naive) in enumerate(zip((out, *grads), (naive_out, *naive_grads), strict=True)):
        err = np.abs(got.double().numpy() - refs[i]).max()
        naive_err = np.abs(np.asarray(naive, np.float64) - refs[i]).max()
        assert err <= (2 if i == 0 else 3) * naive_err, (i, err, naive_err)


def test_ring_attention_without_process_group_is_plain_attention() -> None:
    q, k, v, dout = _inputs(1, 2, 1, 16, 4, seed=5)
    for t in (q, k, v):
        t.requires_grad_(True)
    out = ring_attention(q, k, v, causal=True)
    out.backward(dout)
    for got, ref in zip((out, q.grad, k.grad, v.grad), _oracle(q, k, v, dout, True),
                        strict=True):
        assert np.abs(got.detach().numpy() - ref).max() <= _bound(ref)


def test_rows_that_see_nothing_give_zeros_not_nan() -> None:
    """The first query of a causal ring sees one key; zero-weight blocks stay finite."""
    q, k, v, dout = _inputs(1, 1, 1, 8, 4, seed=6)
    q = q * 1e3  # extreme scores: lse of some blocks far below others
    out, grads = simulate_ring_attention(q, k, v, 4, causal=True, dout=dout)
    assert grads is not None
    assert all(torch.isfinite(t).all() for t in (out, *grads))


def test_top_left_is_causal_over_the_whole_sequence() -> None:
    """Sq == Sk overall, so both alignments are one mask: "top_left" equals True."""
    q, k, v, _ = _inputs(1, 2, 1, 16, 4, seed=9)
    a = simulate_ring_attention(q, k, v, 2, causal=True, layout="zigzag")[0]
    b = simulate_ring_attention(q, k, v, 2, causal="top_left", layout="zigzag")[0]
    assert torch.equal(a, b)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"q": np.zeros((1, 1, 4, 2))}, TypeError, "q: expected a torch.Tensor"),
    ({"k": torch.zeros(1, 1, 4)}, ValueError, "k: expected a 4-D"),
    ({"v": torch.zeros(1, 1, 3, 2, dtype=torch.float64)}, ValueError, "v: shape differs"),
    ({"k": torch.zeros(1, 1, 8, 2, dtype=torch.float64),
      "v": torch.zeros(1, 1, 8, 2, dtype=torch.float64)}, ValueError, "same positions"),
    ({"k": torch.zeros(1, 1, 4, 3, dtype=torch.float64),
      "v": torch.zeros(1, 1, 4, 3, dtype=torch.float64)}, ValueError, "k: head dims differ"),
    ({"v": torch.zeros(1, 1, 4, 2, dtype=torch.float32)}, TypeError, "share one dtype"),
    ({"q": torch.zeros(2, 2, 4, 2, dtype=torch.float64)}, ValueError, "batch sizes differ"),
    ({"k": torch.zeros(1, 3, 4, 2, dtype=torch.float64),
      "v": torch.zeros(1, 3, 4, 2, dtype=torch.float64)}, ValueError, "divide"),
    ({"q": torch.zeros(1, 2, 4, 2, dtype=torch.int64)}, TypeError, "q: expected a floating"),
    ({"layout": "striped"}, ValueError, "layout"),
    ({"causal": "bogus"}, ValueError, "causal:"),
    ({"causal": 2}, ValueError, "causal:"),
    ({"scale": float("nan")}, ValueError, "scale:"),
])
def test_validation_names_the_argument(kwargs: dict[str, Any], error: type, match: str) -> None:
    args: dict[str, Any] = {"q": torch.zeros(1, 2, 4, 2, dtype=torch.float64),
                            "k": torch.zeros(1, 1, 4, 2, dtype=torch.float64),
                            "v": torch.zeros(1, 1, 4, 2, dtype=torch.float64)}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        ring_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


def test_replay_memory_per_rank_shrinks_with_world_size() -> None:
    q, k, v, _ = _inputs(1, 2, 2, 256, 16, seed=7)
    peaks = {w: fd.replay_rank_memory(q, k, v, w, causal=True, layout="zigzag")["peak_bytes"]
             for w in (1, 2, 4)}
    assert peaks[1] > peaks[2] > peaks[4], peaks


# --------------------------------------------------------------------------- processes

def _run_world(world: int, mode: str) -> list[Any]:
    t0 = time.perf_counter()
    outcomes = run_local(_mp_worker, world, CASES, mode, timeout=30.0, deadline=90.0)
    assert time.perf_counter() - t0 < 90.0 + 15.0  # the launcher's own bound held
    return outcomes


def _assert_checks(outcomes: list[Any], world: int) -> None:
    for o in outcomes:
        assert o.ok, o.describe() + "\n" + (o.traceback or "")
        for case, errs in zip(CASES, o.value["checks"], strict=True):
            for name, (err, bound) in errs.items():
                assert err <= bound, (world, o.rank, case, name, err, bound)


def _assert_failure_reported(outcomes: list[Any], within: float) -> None:
    for o in outcomes:
        if o.rank == FAIL_RANK:
            continue
        f = o.value["failure"]
        assert f["error_type"] == "RingError", (o.rank, f)
        assert f"rank {o.rank} of" in f["message"] and "step" in f["message"], f["message"]
        assert f["seconds"] < within, (o.rank, f)


def test_two_processes_match_oracle_then_a_silent_rank_times_out() -> None:
    outcomes = _run_world(2, "hang")
    _assert_checks(outcomes, 2)
    assert outcomes[FAIL_RANK].value["failure"] == {"injected": True}
    _assert_failure_reported(outcomes, within=FAIL_TIMEOUT + 8.0)


def test_four_processes_match_oracle_then_a_crash_makes_every_rank_raise() -> None:
    """The crashing rank's own checks die with it; the two-process test covers every rank."""
    outcomes = _run_world(4, "crash")
    failing = outcomes[FAIL_RANK]
    assert not failing.ok and failing.error_type == "ValueError", failing.describe()
    _assert_checks([o for o in outcomes if o.rank != FAIL_RANK], 4)
    _assert_failure_reported(outcomes, within=FAIL_TIMEOUT + 8.0)


@pytest.mark.parametrize("argv", [
    ["--world-size", "0", "--seq", "256"],
    ["--world-size", "2", "--seq", "0"],
    ["--world-size", "2", "--seq", "255"],
    ["--world-size", "4", "--seq", "260", "--causal"],
    ["--world-size", "2", "--seq", "256", "--timeout", "0"],
    ["--world-size", "2", "--seq", "256", "--timeout", "-1"],
    ["--world-size", "2", "--seq", "256", "--backend", "bogus"],
    ["--world-size", "2", "--seq", "256", "--heads", "4", "--kv-heads", "3"],
])
def test_regression_ring_cli_bad_arguments_exit_2_without_spawning(argv, capsys) -> None:
    from flashmath import cli

    try:
        code = cli.main(["ring", *argv])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert "error" in err and "Traceback" not in err


@pytest.mark.parametrize(("world_size", "layout", "causal"), [(2, "contiguous", False),
                                                              (4, "zigzag", True)])
def test_gradients_flow_through_the_merged_lse(world_size, layout, causal):
    """The ring's backward with an lse cotangent equals the float64 oracle's (dlse)."""
    from flashmath.distributed.ring import simulate_ring_attention

    rng = np.random.default_rng(3)
    q, k, v, dout = (torch.from_numpy(rng.standard_normal((1, 2, 16, 4))) for _ in range(4))
    dlse = torch.from_numpy(rng.standard_normal((1, 2, 16)))
    _, grads = simulate_ring_attention(q, k, v, world_size, causal=causal, layout=layout,
                                       dout=dout, dlse=dlse)
    assert grads is not None
    ref = attention_reference_backward(dout.numpy(), q.numpy(), k.numpy(), v.numpy(),
                                       causal=causal, dlse=dlse.numpy())
    for got, want in zip(grads, ref, strict=True):
        np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-12)
