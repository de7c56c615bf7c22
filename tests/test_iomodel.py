"""The HBM traffic model: hand-counted small cases, the paper's tile rule, asymptotic ratios."""

from __future__ import annotations

import pytest

from flashmath.measure.iomodel import (
    flash_attention_bytes,
    key_intervals,
    seed002_estimate_mb,
    standard_attention_bytes,
    tiles_from_sram,
    visited_tiles,
)


def test_seed002_estimate_is_the_seed_formula():
    # the textbook estimate: standard 2*T*T*bytes/1e6, flash 4*T*d*bytes/1e6 (per head)
    assert seed002_estimate_mb(1024, 128) == (2 * 1024 * 1024 * 2 / 1e6, 4 * 1024 * 128 * 2 / 1e6)
    std, fla = seed002_estimate_mb(4096, 128)
    assert std / fla == pytest.approx(16.0)  # the seed prints ratio ~ T / (2 d)


def test_standard_hand_count():
    t = standard_attention_bytes(3, 5, 2, dv=4, elem_bytes=2)
    assert t.reads == {"q": 12, "k": 20, "s": 30, "p": 30, "v": 40}
    assert t.writes == {"s": 30, "p": 30, "o": 24}
    assert t.total_bytes == 216
    t6 = standard_attention_bytes(3, 5, 2, dv=4, elem_bytes=2, batch_heads=6)
    assert t6.total_bytes == 6 * 216


@pytest.mark.parametrize(
    ("M", "d", "order", "tiles"),
    [
        (48 * 1024, 64, "fa1", (64, 192)),  # B_r = min(B_c, d) = 64, B_c = ceil(M / 4d) = 192
        (48 * 1024, 64, "fa2", (192, 64)),  # the outer (Q) block takes the large size
        (48 * 1024, 128, "fa1", (96, 96)),
        (1024, 128, "fa1", (2, 2)),
        (100, 64, "fa1", (1, 1)),  # ceil keeps tiles non-empty
    ],
)
def test_tiles_from_sram_rule(M, d, order, tiles):
    assert tiles_from_sram(M, d, loop_order=order) == tiles


def test_tiles_from_sram_rejects_bad_input():
    with pytest.raises(ValueError, match="M and d"):
        tiles_from_sram(0, 64)
    with pytest.raises(ValueError, match="loop_order"):
        tiles_from_sram(1024, 64, loop_order="fa3")  # type: ignore[arg-type]


def test_fa2_hand_count_dense():
    # Sq = Sk = 8, d = 2, tiles 4x4: Q 16, K and V 2 Q blocks x 8 rows x 2, O 16, lse 8 (elements)
    t = flash_attention_bytes(8, 8, 2, block_q=4, block_k=4)
    assert t.reads == {"q": 64, "k": 128, "v": 128}
    assert t.writes == {"o": 64, "lse": 32}
    assert (t.tiles, t.tiles_total, t.total_bytes) == (4, 4, 416)


def test_fa2_hand_count_causal_skips_the_upper_tile():
    t = flash_attention_bytes(8, 8, 2, block_q=4, block_k=4, causal=True)
    assert t.reads == {"q": 64, "k": 96, "v": 96}  # 3 tiles of 4 key rows
    assert (t.tiles, t.total_bytes) == (3, 352)


def test_fa2_ragged_tiles_causal():
    # Q blocks [0,4) [4,8) [8,10); K tiles [0,3) [3,6) [6,9) [9,10); row i sees keys <= i,
    # so the blocks see keys [0,4), [0,8), [0,10). Visited tiles 2 + 3 + 4 = 9 of 12; the
    # K rows read are the tiles' rows inside those spans: 3+1, 3+3+2, 3+3+3+1 = 22.
    t = flash_attention_bytes(10, 10, 1, block_q=4, block_k=3, causal=True, elem_bytes=1)
    assert (t.reads["k"], t.tiles, t.tiles_total) == (22, 9, 12)
    # Algorithm 1 loads whole K blocks, once each
    t1 = flash_attention_bytes(10, 10, 1, block_q=4, block_k=3, causal=True, elem_bytes=1,
                               loop_order="fa1")
    assert (t1.reads["k"], t1.tiles) == (10, 9)


def test_fa2_dense_closed_form():
    for sq, sk, d, dv, bq, bk in [(7, 13, 3, 5, 2, 4), (64, 33, 8, 8, 16, 64), (1, 9, 4, 2, 3, 3)]:
        n_q = -(-sq // bq)
        t = flash_attention_bytes(sq, sk, d, dv=dv, block_q=bq, block_k=bk, elem_bytes=2,
                                  stat_bytes=4, batch=2, heads=3)
        per_head = 2 * (sq * d + n_q * sk * (d + dv) + sq * dv) + 4 * sq
        assert t.total_bytes == 6 * per_head


def test_fa1_hand_count_and_closed_form():
    # Algorithm 1, Sq = Sk = 8, d = 2, tiles 4x4 (n_k = 2): K, V once; Q, O, l, m read and
    # O, l, m written on each of the 4 tile visits (4 rows each); O, l, m initialised once.
    t = flash_attention_bytes(8, 8, 2, block_q=4, block_k=4, loop_order="fa1", elem_bytes=1,
                              stat_bytes=1)
    assert t.reads == {"q": 32, "k": 16, "v": 16, "o": 32, "l": 16, "m": 16}
    assert t.writes == {"o": 48, "l": 24, "m": 24}
    for sq, sk, d, dv, bq, bk in [(8, 8, 2, 2, 4, 4), (9, 14, 3, 5, 2, 4), (33, 7, 8, 4, 5, 3)]:
        n_k = -(-sk // bk)
        t = flash_attention_bytes(sq, sk, d, dv=dv, block_q=bq, block_k=bk, loop_order="fa1",
                                  elem_bytes=2, stat_bytes=4)
        elems = sk * (d + dv) + n_k * sq * (d + 2 * dv) + sq * dv
        assert t.total_bytes == 2 * elems + 4 * 2 * sq * (2 * n_k + 1)


@pytest.mark.parametrize(
    ("kw", "lo", "hi"),
    [
        ({}, [0, 0, 0], [5, 5, 5]),
        ({"causal": True}, [0, 0, 0], [3, 4, 5]),  # bottom-right: diagonal at i + 2
        ({"causal": "top_left"}, [0, 0, 0], [1, 2, 3]),
        ({"window": (1, 1)}, [1, 2, 3], [4, 5, 5]),  # diagonal at i + 2, clipped at Sk
        ({"window": (1, None), "causal": True}, [1, 2, 3], [3, 4, 5]),
        ({"window": (None, 0)}, [0, 0, 0], [3, 4, 5]),
        ({"causal": True, "kv_len": 4}, [0, 0, 0], [2, 3, 4]),  # diagonal i + 1
        ({"q_len": 2}, [0, 0, 0], [5, 5, 0]),
        ({"causal": True, "q_len": 2, "kv_len": 4}, [0, 0, 0], [3, 4, 0]),  # diagonal i + 2
        ({"causal": True, "q_len": 2, "kv_len": 2}, [0, 0, 0], [1, 2, 0]),  # diagonal i
    ],
)
def test_key_intervals(kw, lo, hi):
    got_lo, got_hi = key_intervals(3, 5, **kw)
    assert got_lo.tolist() == lo and got_hi.tolist() == hi


def test_alignment_changes_the_visited_tiles():
    # Sq = 2, Sk = 8, one query per block, key tiles of 4: bottom-right rows see keys <= 6, 7
    # (both tiles); top-left rows see keys <= 0, 1 (first tile only).
    br = flash_attention_bytes(2, 8, 1, block_q=1, block_k=4, causal=True)
    tl = flash_attention_bytes(2, 8, 1, block_q=1, block_k=4, causal="top_left")
    assert (br.tiles, tl.tiles) == (4, 2)


def test_window_tiles_by_hand():
    lo, hi = key_intervals(8, 8, window=(2, 0))
    vis = visited_tiles(lo, hi, 8, 2, 2)
    assert vis.astype(int).tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]


def test_lengths_are_per_batch_entry():
    # batch 0 sees everything (4 tiles); batch 1 has 3 keys (first key tile, 3 of its rows
    # read) and 4 queries (first Q block): 1 tile, and its empty Q block is not read.
    # O and lse are written whole.
    t = flash_attention_bytes(8, 8, 1, block_q=4, block_k=4, batch=2, kv_lengths=[8, 3],
                              q_lengths=[8, 4], elem_bytes=1, stat_bytes=1)
    assert (t.tiles, t.tiles_total) == (5, 8)
    assert t.reads == {"q": 8 + 4, "k": 16 + 3, "v": 16 + 3}
    assert t.writes == {"o": 16, "lse": 16}
    # q rows past q_len inside a read block are not read: q_len 6 reads rows 0..5
    t = flash_attention_bytes(8, 8, 1, block_q=4, block_k=4, q_lengths=[6], elem_bytes=1)
    assert t.reads["q"] == 6
    with pytest.raises(ValueError, match="kv_lengths has 1 entries for batch=2"):
        flash_attention_bytes(8, 8, 1, block_q=4, block_k=4, batch=2, kv_lengths=[8])


def test_traffic_record_is_flat():
    rec = flash_attention_bytes(8, 8, 2, block_q=4, block_k=4).as_record("flash_")
    assert rec["flash_read_k_bytes"] == 128 and rec["flash_total_bytes"] == 416
    assert rec["flash_tiles"] == 4


# --- asymptotics: Theorem 2's Theta(N^2 d^2 / M) against standard's Theta(N^2) -------------


@pytest.mark.parametrize("d", [64, 128])
def test_ratio_to_standard_tends_to_M_over_2d2(d):
    M = 4 * d * 256  # tiles divide N exactly: FA2 Q block 256, K block d
    bq, bk = tiles_from_sram(M, d, loop_order="fa2")
    ratios = []
    for n in (2048, 8192, 32768):
        std = standard_attention_bytes(n, n, d, elem_bytes=2).total_bytes
        fla = flash_attention_bytes(n, n, d, block_q=bq, block_k=bk, elem_bytes=2).total_bytes
        ratios.append(std / fla)
    limit = M / (2 * d * d)  # 4 N^2 / (N / B_q * 2 N d), B_q = M / 4d
    assert ratios == sorted(ratios)  # lower-order terms fade as N grows
    assert ratios[-1] == pytest.approx(limit, rel=0.03)


def test_fa1_ratio_tends_to_M_over_3d2():
    d, M = 64, 4 * 64 * 256
    bq, bk = tiles_from_sram(M, d, loop_order="fa1")
    n = 32768
    std = standard_attention_bytes(n, n, d, elem_bytes=2).total_bytes
    fla = flash_attention_bytes(n, n, d, block_q=bq, block_k=bk, elem_bytes=2, stat_bytes=2,
                                loop_order="fa1").total_bytes
    # per visit: Q, O read, O written (3 N d) + l, m read and written (4 N): 4 N / B_c visits
    assert std / fla == pytest.approx(M / (3 * d * d) * d / (d + 4 / 3), rel=0.03)


def test_kv_traffic_halves_when_M_doubles():
    d, n = 64, 8192
    kv = []
    for M in (4 * d * 128, 4 * d * 256):
        bq, bk = tiles_from_sram(M, d, loop_order="fa2")
        kv.append(flash_attention_bytes(n, n, d, block_q=bq, block_k=bk).reads["k"])
    assert kv[0] == 2 * kv[1]


def test_causal_halves_kv_traffic_asymptotically():
    n, d, b = 16384, 64, 128
    dense = flash_attention_bytes(n, n, d, block_q=b, block_k=b).reads["k"]
    causal = flash_attention_bytes(n, n, d, block_q=b, block_k=b, causal=True).reads["k"]
    n_q = n // b
    assert causal / dense == pytest.approx((n_q + 1) / (2 * n_q))  # the diagonal tiles stay


def test_sliding_window_makes_traffic_linear():
    d, b = 64, 128
    t = [flash_attention_bytes(n, n, d, block_q=b, block_k=b, causal=True, window=(256, 0))
         .total_bytes for n in (2048, 4096, 8192)]
    assert t[2] - t[1] == 2 * (t[1] - t[0])  # a * N + c: each Q block reads 3 key tiles
