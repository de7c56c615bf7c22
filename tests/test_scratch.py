"""flashmath.scratch: a tag's block is reused in its thread, never shared by two live
borrowers, and large or nested requests get fresh arrays."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from flashmath import scratch


@pytest.fixture(autouse=True)
def _empty_pools():
    scratch.release()
    yield
    scratch.release()


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def test_a_tag_reuses_its_block_and_grows_it() -> None:
    with scratch.borrow("t", (4, 8), np.float32) as a:
        assert a.shape == (4, 8) and a.dtype == np.float32 and a.flags.c_contiguous
        first = _address(a)
        a[...] = 1.0
    with scratch.borrow("t", (2, 3), np.float64) as b:  # smaller, another dtype: same block
        assert _address(b) == first and b.shape == (2, 3) and b.dtype == np.float64
    assert scratch.kept_bytes() == 4 * 8 * 4
    with scratch.borrow("t", (100, 8), np.float32) as c:  # larger: the block grows
        c[...] = 2.0
    assert scratch.kept_bytes() == 100 * 8 * 4


def test_a_tag_borrowed_twice_at_once_gets_two_arrays() -> None:
    with scratch.borrow("t", (16,), np.float64) as outer:
        outer[...] = 1.0
        with scratch.borrow("t", (16,), np.float64) as inner:  # a nested call
            assert not np.shares_memory(outer, inner)
            inner[...] = 2.0
        np.testing.assert_array_equal(outer, 1.0)
    with scratch.borrow("t", (16,), np.float64) as again:  # the kept block is free again
        assert np.shares_memory(again, outer)


def test_other_tags_and_other_threads_do_not_share() -> None:
    seen: dict[str, int] = {}
    with scratch.borrow("a", (64,), np.float32) as a, scratch.borrow("b", (64,), np.float32) as b:
        assert not np.shares_memory(a, b)

        def other() -> None:
            with scratch.borrow("a", (64,), np.float32) as x:
                seen["other"] = _address(x)

        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert seen["other"] != _address(a)


def test_large_requests_are_not_kept_and_an_error_returns_the_tag() -> None:
    n = scratch.MAX_BYTES // 8 + 1
    with scratch.borrow("big", (n,), np.float64) as big:
        assert big.shape == (n,)
    assert scratch.kept_bytes() == 0
    with pytest.raises(RuntimeError), scratch.borrow("t", (8,), np.float32):
        raise RuntimeError("the borrower failed")
    with scratch.borrow("t", (8,), np.float32) as a, scratch.borrow("u", (8,), np.float32):
        assert scratch.kept_bytes() == 64 and a.size == 8  # "t" came back despite the error


def test_release_drops_kept_blocks_but_a_borrowed_one_stays_valid() -> None:
    with scratch.borrow("t", (32,), np.float32) as a:
        a[...] = 3.0
        scratch.release()
        assert scratch.kept_bytes() == 0
        np.testing.assert_array_equal(a, 3.0)


def test_a_score_mod_calling_flashmath_leaves_the_outer_call_its_keys() -> None:
    """float16 keys are widened into scratch arrays per unit; a score_mod that runs another
    float16 attention inside its tile borrows the same tags, and must get its own arrays."""
    import flashmath as fm

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, 48, 16)).astype(np.float16) for _ in range(3))
    inner = [rng.standard_normal((1, 1, 40, 16)).astype(np.float16) for _ in range(3)]

    def plain(score, b, h, q_idx, kv_idx):
        return score

    def calls_flashmath(score, b, h, q_idx, kv_idx):
        fm.flash_attention(*inner)  # widens its own keys on this very thread
        return score

    want = fm.flash_attention(q, k, v, score_mod=plain)
    got = fm.flash_attention(q, k, v, score_mod=calls_flashmath)
    np.testing.assert_array_equal(got, want)
