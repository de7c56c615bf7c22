"""The paged KV cache's pieces: gathering equals the contiguous cache, appending writes
exactly the new rows, and bad block tables are refused by name."""

import numpy as np
import pytest

from flashmath.attention.paged import append_kv, check_block_table, check_paged_cache, gather_keys


def _table(b, s, page, rng):
    """A shuffled block table for B sequences of S keys, with spare pages and -1 padding."""
    per = -(-s // page)
    order = rng.permutation(b * per + 3)
    table = np.full((b, per + 1), -1, np.int64)
    table[:, :per] = order[: b * per].reshape(b, per)
    return table


def _paged_copy(contiguous, page, table, rng):
    """The (B, H, S, D) cache laid out in pages through table; garbage in unused rows."""
    b, h, s, d = contiguous.shape
    cache = rng.standard_normal((int(table.max()) + 4, h, page, d))
    for i in range(b):
        for p in range(-(-s // page)):
            rows = contiguous[i, :, p * page : (p + 1) * page]
            cache[table[i, p], :, : rows.shape[1]] = rows
    return cache


@pytest.mark.parametrize("page", [1, 3, 4, 16])
@pytest.mark.parametrize(("start", "stop"), [(0, 12), (5, 11), (4, 8), (11, 12), (0, 1)])
def test_gathered_keys_equal_the_contiguous_cache(page, start, stop):
    rng = np.random.default_rng(page)
    kc = rng.standard_normal((2, 3, 12, 5))
    table = _table(2, 12, page, rng)
    got = gather_keys(_paged_copy(kc, page, table, rng), table, start, stop)
    np.testing.assert_array_equal(got, kc[:, :, start:stop])


@pytest.mark.parametrize("page", [8, 64, 96])  # one gather below _LOOP_PAGE, page by page above
@pytest.mark.parametrize(("start", "stop"), [(0, 300), (37, 290), (64, 128), (299, 300)])
@pytest.mark.parametrize("dtype", [None, np.float32])
def test_gathered_keys_in_either_copy_path_and_cast_on_the_way(page, start, stop, dtype):
    from flashmath.attention import paged

    assert 8 < paged._LOOP_PAGE <= 64  # the page sizes above take both paths
    rng = np.random.default_rng(page)
    kc = rng.standard_normal((2, 3, 300, 5)).astype(np.float16)
    table = _table(2, 300, page, rng)
    pages = _paged_copy(kc, page, table, rng).astype(np.float16)  # a float16 cache
    got = gather_keys(pages, table, start, stop, dtype)
    assert got.dtype == (np.float16 if dtype is None else dtype) and got.flags.c_contiguous
    np.testing.assert_array_equal(got, kc[:, :, start:stop].astype(got.dtype))


@pytest.mark.parametrize("page", [1, 4, 5, 16])
@pytest.mark.parametrize("paged", [False, True])
def test_append_writes_the_new_rows_at_each_length(page, paged):
    rng = np.random.default_rng(0)
    kc, vc = rng.standard_normal((2, 2, 2, 20, 3))
    lengths = np.array([7, 11])
    k_new, v_new = rng.standard_normal((2, 2, 2, 6, 3))
    want_k, want_v = kc.copy(), vc.copy()
    for b in range(2):
        want_k[b, :, lengths[b] : lengths[b] + 6] = k_new[b]
        want_v[b, :, lengths[b] : lengths[b] + 6] = v_new[b]
    if paged:
        table = _table(2, 20, page, rng)
        kp, vp = _paged_copy(kc, page, table, rng), _paged_copy(vc, page, table, rng)
        append_kv(kp, vp, k_new, v_new, lengths, table)
        k_got, v_got = gather_keys(kp, table, 0, 20), gather_keys(vp, table, 0, 20)
    else:
        append_kv(kc, vc, k_new, v_new, lengths)
        k_got, v_got = kc, vc
    np.testing.assert_array_equal(k_got, want_k)
    np.testing.assert_array_equal(v_got, want_v)


@pytest.mark.parametrize(("table", "lengths", "message"), [
    ([[0, 1], [2, 9]], [8, 8], r"block_table\[1, 1\] = 9 is not a page index in \[0, 4\)"),
    ([[0, 1], [2, -1]], [8, 5], r"block_table\[1, 1\] = -1"),
    ([[0], [2]], [8, 4], "block_table: sequence 0 needs 2 pages for 8 keys"),
    ([[0.0, 1.0], [2.0, 3.0]], [8, 8], "block_table: expected integers"),
    ([[0, 1]], [8, 8], r"block_table: expected shape \(B, max_pages\) with B=2"),
])
def test_bad_block_tables_are_refused(table, lengths, message):
    with pytest.raises((ValueError, TypeError), match=message):
        check_block_table(np.array(table), 2, 4, 4, np.array(lengths))


def test_unused_table_entries_are_never_checked():
    table = check_block_table(np.array([[0, -7], [1, 99]]), 2, 4, 4, np.array([4, 3]))
    assert table.dtype == np.int64


@pytest.mark.parametrize(("k", "v", "message"), [
    (np.zeros((2, 1, 4, 3)), np.zeros((2, 1, 4)), r"v_cache: a paged cache is 4-D"),
    (np.zeros((2, 1, 4, 3)), np.zeros((2, 1, 5, 3)), "v_cache: .* differs from k_cache's"),
    (np.zeros((2, 1, 4, 3)), np.zeros((2, 1, 4, 3), np.float32), "share one dtype"),
    (np.zeros((2, 1, 0, 3)), np.zeros((2, 1, 0, 3)), "page_size must be positive"),
])
def test_bad_paged_caches_are_refused(k, v, message):
    with pytest.raises((ValueError, TypeError), match=message):
        check_paged_cache(k, v)


@pytest.mark.parametrize("page", [4, 16, 64])
@pytest.mark.parametrize(("start", "stop"), [(0, 64), (3, 61), (16, 20), (5, 7)])
def test_gathered_into_out_and_from_a_strided_cache(page, start, stop):
    """out= is written and returned; a cache that is not C-contiguous takes the page loop."""
    rng = np.random.default_rng(page + start)
    kc = rng.standard_normal((2, 3, 64, 5)).astype(np.float32)
    table = _table(2, 64, page, rng)
    pages = _paged_copy(kc, page, table, rng).astype(np.float32)
    out = np.full((2, 3, stop - start, 5), np.nan, np.float32)
    assert gather_keys(pages, table, start, stop, out=out) is out
    np.testing.assert_array_equal(out, kc[:, :, start:stop])
    strided = np.asfortranarray(pages)  # not C-contiguous
    np.testing.assert_array_equal(gather_keys(strided, table, start, stop),
                                  kc[:, :, start:stop])


def test_gather_out_of_the_wrong_shape_or_dtype_is_refused():
    rng = np.random.default_rng(0)
    table = _table(1, 8, 4, rng)
    pages = rng.standard_normal((int(table.max()) + 4, 2, 4, 3))
    for out in (np.empty((1, 2, 5, 3)), np.empty((1, 2, 8, 3), np.float32),
                np.empty((1, 2, 3, 8)).transpose(0, 1, 3, 2)):
        with pytest.raises(ValueError, match="gather_keys: out must be a C-contiguous"):
            gather_keys(pages, table, 0, 8, out=out)
