"""create_block_mask: tile kinds against the dense mask classified block by block, the
library's exact tile_kind rules against evaluating the mod, and rectangle queries."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flashmath.attention import modlib
from flashmath.attention import tiles as tp
from flashmath.attention.blockmask import BlockMask, create_block_mask
from flashmath.attention.masks import MaskSpec, TileKind
from flashmath.attention.mods import Mods, mask_tile


def _dense(mod, b, h, sq, sk):
    return np.asarray(mask_tile(mod, b, h, 0, sq, 0, sk))


def _truth(dense, bq, bk):
    """The exact kind of every block of a (sq, sk) bool array."""
    sq, sk = dense.shape
    out = np.empty((-(-sq // bq), -(-sk // bk)), np.uint8)
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            t = dense[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
            out[i, j] = TileKind.FULL if t.all() else TileKind.PARTIAL if t.any() else 0
    return out


def _evaluated(mod):
    """The same mod without its tile_kind: create_block_mask must evaluate it."""
    def plain(b, h, q_idx, kv_idx):
        return mod(b, h, q_idx, kv_idx)
    return plain


def _sound(kinds, truth):
    """EMPTY and FULL claims are true (PARTIAL is always safe)."""
    return (((kinds != TileKind.EMPTY) | (truth == TileKind.EMPTY))
            & ((kinds != TileKind.FULL) | (truth == TileKind.FULL))).all()


IDS = np.repeat([0, 1, 2, 3], [5, 9, 1, 15])  # 30 tokens, uneven documents


def _exact_mods(sq, sk):
    return [
        modlib.causal(sq, sk), modlib.causal(sq, sk, align="top_left"),
        modlib.sliding_window(sq, sk, 4, 0), modlib.sliding_window(sq, sk, 3, 5, align="top_left"),
        modlib.sliding_window(sq, sk, None, 2), modlib.prefix_lm(6),
        modlib.document_mask(IDS[:sq], IDS[:sk]),
    ]


def _sound_mods(sq, sk):
    return [
        modlib.attention_sink(sq, sk, 3, 6),
        modlib.and_masks(modlib.document_mask(IDS[:sq], IDS[:sk]), modlib.causal(sq, sk)),
        modlib.or_masks(modlib.prefix_lm(4), modlib.sliding_window(sq, sk, 2, 2)),
    ]


@pytest.mark.parametrize("sq, sk", [(30, 30), (17, 30), (30, 23)])
@pytest.mark.parametrize("bq, bk", [(4, 4), (3, 7), (8, 5), (1, 1), (64, 64)])
def test_tile_kind_rules_are_exact_and_agree_with_evaluating_the_mod(sq, sk, bq, bk):
    for mod in _exact_mods(sq, sk):
        truth = _truth(_dense(mod, 0, 0, sq, sk), bq, bk)
        fast = create_block_mask(mod, None, None, sq, sk, block_q=bq, block_k=bk)
        slow = create_block_mask(_evaluated(mod), None, None, sq, sk, block_q=bq, block_k=bk)
        np.testing.assert_array_equal(fast.kinds[0, 0], truth, err_msg=mod.__name__)
        np.testing.assert_array_equal(slow.kinds[0, 0], truth, err_msg=mod.__name__)
    for mod in _sound_mods(sq, sk):
        truth = _truth(_dense(mod, 0, 0, sq, sk), bq, bk)
        fast = create_block_mask(mod, None, None, sq, sk, block_q=bq, block_k=bk)
        assert _sound(fast.kinds[0, 0], truth), mod.__name__
        slow = create_block_mask(_evaluated(mod), None, None, sq, sk, block_q=bq, block_k=bk)
        np.testing.assert_array_equal(slow.kinds[0, 0], truth, err_msg=mod.__name__)


@pytest.mark.parametrize("causal, window, lengths", [
    ("bottom_right", None, None), ("top_left", (3, None), None), (None, (2, 2), ([9, 5], [20, 7])),
    ("bottom_right", None, ([13, 13], [20, 11])),
])
def test_the_built_in_mask_as_a_mod_classifies_soundly(causal, window, lengths):
    q_len, kv_len = (None, None) if lengths is None else map(np.array, lengths)
    spec = MaskSpec.create(2, 13, 20, causal=causal, window=window, q_lengths=q_len,
                           kv_lengths=kv_len)
    mod = modlib.spec_mask_mod(spec)
    bm = create_block_mask(mod, 2, None, 13, 20, block_q=4, block_k=3)
    for b in range(2):
        truth = _truth(spec.dense()[b, 0], 4, 3)
        assert _sound(bm.kinds[b, 0], truth)
        assert (bm.kinds[b, 0] != TileKind.PARTIAL).sum() >= (truth != TileKind.PARTIAL).sum() - 6


def test_b_and_h_none_broadcast_and_given_ones_are_per_entry():
    ids = np.array([[0] * 8 + [1] * 8, [0] * 4 + [1] * 12])

    def head_window(b, h, q_idx, kv_idx):
        return np.abs(kv_idx - q_idx) <= 2 * h

    per_batch = create_block_mask(modlib.document_mask(ids), 2, None, 16, 16, block_q=4, block_k=4)
    assert per_batch.kinds.shape == (2, 1, 4, 4)
    for b in range(2):
        np.testing.assert_array_equal(per_batch.kinds[b, 0],
                                      _truth(ids[b][:, None] == ids[b][None, :], 4, 4))
    per_head = create_block_mask(head_window, None, 3, 16, 16, block_q=4, block_k=4)
    assert per_head.kinds.shape == (1, 3, 4, 4)
    for h in range(3):
        np.testing.assert_array_equal(per_head.kinds[0, h],
                                      _truth(_dense(head_window, 0, h, 16, 16), 4, 4))
    assert per_head.kind(0, 2, 0, 16, 0, 16) == TileKind.PARTIAL
    assert per_head.kind(5, 0, 0, 4, 8, 12) == TileKind.EMPTY  # b broadcasts


@given(sq=st.integers(1, 40), sk=st.integers(1, 40), bq=st.integers(1, 9), bk=st.integers(1, 9),
       which=st.integers(0, 6), rect=st.tuples(*[st.floats(0, 1)] * 4))
def test_any_rectangle_gets_a_sound_kind_and_whole_blocks_the_exact_one(sq, sk, bq, bk, which,
                                                                      rect):
    ids = np.sort(np.random.default_rng(sq * 41 + sk).integers(0, 4, max(sq, sk)))
    mods = [modlib.causal(sq, sk), modlib.sliding_window(sq, sk, 3, 1), modlib.prefix_lm(5),
            modlib.document_mask(ids[:sq], ids[:sk]), modlib.attention_sink(sq, sk, 2, 4),
            modlib.causal(sq, sk, align="top_left"),
            _evaluated(modlib.document_mask(ids[:sq], ids[:sk]))]
    mod = mods[which]
    bm = create_block_mask(mod, None, None, sq, sk, block_q=bq, block_k=bk)
    dense = _dense(mod, 0, 0, sq, sk)
    a, c = sorted(int(x * sq) for x in rect[:2])
    e, g = sorted(int(x * sk) for x in rect[2:])
    kind = bm.kind(0, 0, a, c, e, g)
    piece = dense[a:c, e:g]
    if kind == TileKind.EMPTY:
        assert not piece.any()
    elif kind == TileKind.FULL:
        assert piece.all() and piece.size
    if which not in (4,):  # whole blocks: the exact kind (the sink pattern is only sound)
        i, j = a // bq, e // bk
        q0, q1, k0, k1 = i * bq, min(sq, (i + 1) * bq), j * bk, min(sk, (j + 1) * bk)
        assert bm.kind(0, 0, q0, q1, k0, k1) == _truth(dense, bq, bk)[i, j]


def test_dense_of_a_block_mask_is_the_mask_and_sparsity_counts_empty_area():
    ids = np.repeat(np.arange(8), 64)  # 8 equal documents, S = 512
    bm = create_block_mask(modlib.document_mask(ids), None, None, 512, 512, block_q=64, block_k=64)
    np.testing.assert_array_equal(bm.dense()[0, 0], ids[:, None] == ids[None, :])
    assert bm.sparsity() == pytest.approx(7 / 8)
    assert (bm.kinds == TileKind.PARTIAL).sum() == 0  # tiles align with documents: none masked
    causal = create_block_mask(modlib.causal(100, 100), None, None, 100, 100, block_q=10,
                               block_k=10)
    assert causal.sparsity() == pytest.approx(45 / 100)


def test_mods_kind_reads_the_block_mask_or_the_tile_kind():
    mod = modlib.causal(32, 32)
    bm = create_block_mask(mod, None, None, 32, 32, block_q=8, block_k=8)
    for mods in (Mods(mask_mod=mod, block_mask=bm), Mods(mask_mod=mod)):
        assert mods.kind(0, 0, 0, 8, 8, 16) == TileKind.EMPTY
        assert mods.kind(0, 0, 8, 16, 0, 8) == TileKind.FULL
        assert mods.kind(0, 0, 0, 16, 0, 16) == TileKind.PARTIAL
    assert Mods(mask_mod=_evaluated(mod)).kind(0, 0, 8, 16, 0, 8) == TileKind.PARTIAL
    assert Mods(score_mod=modlib.softcap(1.0)).kind(0, 0, 0, 8, 0, 8) == TileKind.FULL


def test_bad_arguments_are_named():
    mod = modlib.causal(8, 8)
    with pytest.raises(TypeError, match="mask_mod: expected a callable"):
        create_block_mask(np.ones((8, 8), bool), None, None, 8, 8)
    with pytest.raises(ValueError, match="Sq: expected a positive int"):
        create_block_mask(mod, None, None, 0, 8)
    with pytest.raises(ValueError, match="block_k: expected a positive int"):
        create_block_mask(mod, None, None, 8, 8, block_k=True)
    with pytest.raises(ValueError, match="H: expected a positive int or None"):
        create_block_mask(mod, None, 2.0, 8, 8)
    bm = create_block_mask(mod, None, None, 8, 8)
    assert isinstance(bm, BlockMask) and bm.kinds.shape == (1, 1, 1, 1)
    with pytest.raises(ValueError, match=r"block_mask: rectangle \[0, 9\)"):
        bm.kind(0, 0, 0, 9, 0, 8)
    assert bm.kind(0, 0, 3, 3, 0, 8) == TileKind.EMPTY


def test_and_kinds_on_single_tiles_agrees_with_the_array_rule() -> None:
    """The scalar shortcut (one tile, TileKind ints) and the elementwise rule agree."""
    import itertools

    from flashmath.attention.mods import and_kinds

    kinds = list(TileKind)
    for n in (1, 2, 3):
        for combo in itertools.product(kinds, repeat=n):
            scalar = and_kinds(*combo)
            array = and_kinds(*(np.array([k], np.uint8) for k in combo))
            assert isinstance(scalar, TileKind) and int(scalar) == int(array[0]), combo


def test_block_mask_calls_on_the_fast_path_take_square_fast_tiles(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Block-mask calls on the fast loops tile by FAST_BLOCK_Q x FAST_BLOCK_Q multiples of
    the mask's grid (measured fastest for document and causal masks); the accurate
    loops keep the smaller default."""
    from flashmath.attention import schedule

    monkeypatch.setattr(schedule, "cores", lambda: 1)  # slices not cut: tiles not halved

    s = 2048
    q = np.zeros((1, 2, s, 64), np.float32)
    bm = create_block_mask(modlib.causal(s, s), None, None, s, s)
    fast = schedule.Plan.build(q, q, q, block_mask=bm)
    assert fast.fast and (fast.bq, fast.bk) == (schedule.FAST_BLOCK_Q, schedule.FAST_BLOCK_Q)
    small = schedule.Plan.build(q[:, :, :64], q[:, :, :64], q[:, :, :64],
                                block_mask=create_block_mask(modlib.causal(64, 64), None,
                                                             None, 64, 64))
    assert not small.fast and small.bq <= schedule.DEFAULT_BLOCK_Q


@settings(max_examples=60, deadline=None)
@given(which=st.sampled_from(["causal", "window", "document", "prefix", "sink"]),
       q0=st.integers(0, 300), k0=st.integers(0, 300), nq=st.integers(1, 420),
       nk=st.integers(1, 420), grid=st.sampled_from([16, 64, 128]),
       use_block_mask=st.booleans())
def test_a_partial_tile_is_masked_piecewise_exactly_as_whole(
        which: str, q0: int, k0: int, nq: int, nk: int, grid: int,
        use_block_mask: bool) -> None:
    """Mods.apply classifies a PARTIAL tile's pieces (block-mask grid, or PIECE squares
    by the mod's tile_kind) and calls the mod only on PARTIAL pieces: the -inf pattern is
    the whole-tile mask's, for tiles at any offset and size."""
    from flashmath.attention.mods import mask_tile

    s = 768
    ids = np.repeat(np.arange(6), s // 6)
    mod = {"causal": modlib.causal(s, s), "window": modlib.sliding_window(s, s, 40, 3),
           "document": modlib.document_mask(ids), "prefix": modlib.prefix_lm(100),
           "sink": modlib.attention_sink(s, s, 4, 64)}[which]
    nq, nk = min(nq, s - q0), min(nk, s - k0)
    bm = (create_block_mask(mod, None, None, s, s, block_q=grid, block_k=grid)
          if use_block_mask else None)
    tile = np.zeros((nq, nk))
    Mods(mask_mod=mod, block_mask=bm).apply(tile, 0, 0, q0, k0, TileKind.PARTIAL)
    want = mask_tile(mod, 0, 0, q0, q0 + nq, k0, k0 + nk)
    assert np.array_equal(np.isneginf(tile), ~want)
    assert np.all(tile[want] == 0)


@given(sq=st.integers(1, 40), sk=st.integers(1, 40), bq=st.integers(1, 9), bk=st.integers(1, 9),
       which=st.integers(0, 4), use_block_mask=st.booleans(),
       rect=st.tuples(*[st.floats(0, 1)] * 4))
def test_key_span_hides_nothing_it_cuts_and_shared_keys_are_seen_by_every_row(
        sq, sk, bq, bk, which, use_block_mask, rect):
    """Mods.key_span (a block mask's live blocks, a band mod's band) cuts only keys no row
    of the rectangle sees, keeping the first and last live block (exactly the band's
    keys for a band mod); Mods.shared_keys are keys every row sees, all of them for a band."""
    ids = np.sort(np.random.default_rng(sq * 41 + sk).integers(0, 4, max(sq, sk)))
    mods = [modlib.causal(sq, sk), modlib.sliding_window(sq, sk, 3, 1), modlib.prefix_lm(5),
            modlib.document_mask(ids[:sq], ids[:sk]), modlib.causal(sq, sk, align="top_left")]
    mod = mods[which]
    bm = create_block_mask(mod, None, None, sq, sk, block_q=bq, block_k=bk) \
        if use_block_mask else None
    m = Mods(mask_mod=mod, block_mask=bm)
    dense = _dense(mod, 0, 0, sq, sk)
    a, c = sorted(int(x * sq) for x in rect[:2])
    e, g = sorted(int(x * sk) for x in rect[2:])
    if a == c or e == g:
        return
    j0, j1 = m.key_span(0, 0, a, c, e, g)
    seen = dense[a:c].any(axis=0)
    assert not seen[e:max(e, j0)].any() and not seen[min(j1, g):g].any()
    if seen[e:g].any():
        first, last = e + int(np.argmax(seen[e:g])), g - 1 - int(np.argmax(seen[e:g][::-1]))
        assert j0 <= first and last < j1
        if bm is None and hasattr(mod, "band"):  # exact for a band
            assert (j0, j1) == (first, last + 1)
    shared = m.shared_keys(0, 0, a, c)
    if hasattr(mod, "band"):
        assert shared is not None
        everyone = dense[a:c].all(axis=0)
        s0, s1 = max(shared[0], 0), min(shared[1], sk)
        assert np.flatnonzero(everyone).tolist() == list(range(s0, s1))
    else:
        assert shared is None


def test_mods_without_a_mask_mod_share_every_key():
    assert Mods().shared_keys(0, 0, 3, 9) == (0, 2**62)


def test_narrow_windows_take_half_height_fast_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """A window (built-in or a library band mod) narrower than FAST_NARROW_BAND keys takes
    FAST_BLOCK_Q / 2 query rows on the fast path; causal and dense keep FAST_BLOCK_Q."""
    from flashmath.attention import schedule

    monkeypatch.setattr(schedule, "cores", lambda: 1)  # slices not cut: tiles not halved

    s = 2048
    q = np.zeros((1, 2, s, 64), np.float32)
    half = schedule.FAST_BLOCK_Q // 2
    assert schedule.Plan.build(q, q, q, window=(511, 0)).bq == half
    assert schedule.Plan.build(q, q, q, window=(600, 600)).bq == schedule.FAST_BLOCK_Q
    assert schedule.Plan.build(q, q, q, causal=True).bq == schedule.FAST_BLOCK_Q
    win = modlib.sliding_window(s, s, 511, 0)
    assert schedule.Plan.build(q, q, q, mask_mod=win).bq == half
    bm = create_block_mask(win, None, None, s, s)
    plan = schedule.Plan.build(q, q, q, block_mask=bm)  # one key tile per row block's span
    assert (plan.bq, plan.bk) == (half, s)
    blocks = tp.visible_blocks(plan, 0, 0, list(schedule.schedule(plan.opts.spec, 0,
                                                                  plan.bq, plan.bk)))
    assert all(len(tiles) == 1 for _, _, tiles in blocks)
    assert schedule.widest(blocks) == 511 + half  # the band's span, not the whole key length


@pytest.mark.parametrize("mod", [modlib.causal(9, 12), modlib.sliding_window(9, 12, 3, 1),
                                 modlib.sliding_window(9, 12, 0, 2),
                                 modlib.causal(9, 12, align="top_left")],
                         ids=["causal", "window-3-1", "window-0-2", "causal-top-left"])
def test_a_band_mods_key_span_and_shared_keys_are_exact_for_every_row_block(mod):
    dense = _dense(mod, 0, 0, 9, 12)
    m = Mods(mask_mod=mod)
    for a in range(9):
        for c in range(a + 1, 10):
            seen = np.flatnonzero(dense[a:c].any(axis=0))
            j0, j1 = m.key_span(0, 0, a, c, 0, 12)
            assert (j0, j1) == ((int(seen[0]), int(seen[-1]) + 1) if seen.size else (j0, j0)) \
                or (not seen.size and j0 >= j1), (a, c)
            s0, s1 = m.shared_keys(0, 0, a, c)
            assert list(range(max(s0, 0), min(s1, 12))) == \
                np.flatnonzero(dense[a:c].all(axis=0)).tolist(), (a, c)
