"""flashmath.parallel: every unit runs once, errors come back, blocks cover the rows."""

from __future__ import annotations

import threading

import pytest

from flashmath.parallel import cores, row_blocks, run_units


@pytest.mark.parametrize("parallel", [True, False])
def test_every_unit_runs_once(parallel: bool) -> None:
    seen: list[int] = []
    lock = threading.Lock()

    def work(u: int) -> None:
        with lock:
            seen.append(u)

    run_units(list(range(100)), work, parallel=parallel)
    assert sorted(seen) == list(range(100))


def test_serial_runs_in_order_in_the_calling_thread() -> None:
    seen: list[tuple[int, int]] = []
    run_units([3, 1, 2], lambda u: seen.append((u, threading.get_ident())), parallel=False)
    assert seen == [(3, threading.get_ident()), (1, threading.get_ident()),
                    (2, threading.get_ident())]


def test_nested_calls_run_inline_instead_of_waiting_on_the_pool() -> None:
    out: list[int] = []

    def inner(u: int) -> None:
        out.append(u)

    def outer(u: int) -> None:
        run_units([u * 10 + i for i in range(4)], inner)

    run_units(list(range(2 * cores() + 1)), outer)  # would deadlock if nested units queued
    assert len(out) == 4 * (2 * cores() + 1)


def test_first_error_is_raised_after_all_units_finished() -> None:
    done: list[int] = []

    def work(u: int) -> None:
        if u == 1:
            raise KeyError("unit 1")
        done.append(u)

    with pytest.raises(KeyError, match="unit 1"):
        run_units([0, 1, 2, 3], work)
    assert sorted(done) == [0, 2, 3]


@pytest.mark.parametrize(
    "rows, row_size, block, want",
    [
        (10, 3, 9, [(0, 3), (3, 6), (6, 9), (9, 10)]),
        (4, 100, 9, [(0, 1), (1, 2), (2, 3), (3, 4)]),  # a row longer than a block: one row
        (5, 0, 4, [(0, 4), (4, 5)]),  # empty rows still come in blocks
        (0, 7, 16, []),
    ],
)
def test_row_blocks(rows: int, row_size: int, block: int, want: list[tuple[int, int]]) -> None:
    assert [(s.start, s.stop) for s in row_blocks(rows, row_size, block=block)] == want


def test_row_blocks_bad_arguments() -> None:
    with pytest.raises(ValueError, match="row_blocks: expected rows, row_size >= 0"):
        row_blocks(-1, 3)
