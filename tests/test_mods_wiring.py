"""The per-tile calls as a kernel makes them: a plain two-pass tiled attention (forward and
backward, float64) that asks MaskSpec.classify and Mods.kind for each tile, skips EMPTY
tiles, calls Mods.apply on the rest, and chains dS through the dscore buffer, matches the
oracle, with kernel tiles that do not line up with the block mask's."""

import numpy as np
import pytest

from flashmath.attention import modlib
from flashmath.attention.blockmask import create_block_mask
from flashmath.attention.masks import TileKind
from flashmath.attention.mods import and_kinds
from flashmath.attention.options import resolve
from flashmath.attention.reference import attention_reference, attention_reference_backward


def _tiles(opts, b, h, bq, bk):
    for i0 in range(0, opts.sq, bq):
        i1 = min(i0 + bq, opts.sq)
        tiles = []
        for j0 in range(0, opts.sk, bk):
            j1 = min(j0 + bk, opts.sk)
            kind = TileKind(int(and_kinds(opts.spec.classify(b, i0, i1, j0, j1),
                                          opts.mods.kind(b, h, i0, i1, j0, j1))))
            if kind != TileKind.EMPTY:
                tiles.append((j0, j1, kind))
        yield i0, i1, tiles


def _scores(opts, q, k, b, h, i0, i1, j0, j1, kind, dscore=None):
    s = q[i0:i1] @ k[j0:j1].T * opts.scale
    if opts.softcap is not None:
        s = opts.softcap * np.tanh(s / opts.softcap)
    s = s + opts.bias_block(b, h, i0, i1, j0, j1)
    opts.mods.apply(s, b, h, i0, j0, kind, dscore)  # the line the kernel gains
    if kind == TileKind.PARTIAL:
        np.copyto(s, -np.inf, where=~opts.spec.block(b, h, i0, i1, j0, j1))
    return s


def tiled(q, k, v, dout, bq, bk, **options):
    q, k, v, opts = resolve(q, k, v, **options)
    out = np.zeros(q.shape)
    grads = [np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape)]
    g = opts.group
    for b in range(opts.batch):
        for h in range(opts.heads):
            qh, kh, vh, do = q[b, h], k[b, h // g], v[b, h // g], dout[b, h]
            for i0, i1, tiles in _tiles(opts, b, h, bq, bk):
                ss = [(j0, j1, _scores(opts, qh, kh, b, h, i0, i1, j0, j1, kind))
                      for j0, j1, kind in tiles]
                m = np.max([s.max(1) for *_, s in ss], axis=0, initial=-np.inf)
                m = np.where(np.isfinite(m), m, 0)
                lse = np.log(sum((np.exp(s - m[:, None]).sum(1) for *_, s in ss),
                                 np.zeros(i1 - i0))) + m
                o = np.zeros((i1 - i0, v.shape[-1]))
                for j0, j1, s in ss:
                    o += np.exp(s - lse[:, None]) @ vh[j0:j1]
                out[b, h, i0:i1] = np.where(np.isfinite(lse)[:, None], o, 0)
                delta = np.sum(do[i0:i1] * out[b, h, i0:i1], axis=1)
                for j0, j1, kind in tiles:
                    dmod = np.empty((i1 - i0, j1 - j0))
                    s = _scores(opts, qh, kh, b, h, i0, i1, j0, j1, kind, dmod)
                    p = np.where(np.isfinite(lse)[:, None], np.exp(s - lse[:, None]), 0)
                    grads[2][b, h // g, j0:j1] += p.T @ do[i0:i1]
                    ds = p * (do[i0:i1] @ vh[j0:j1].T - delta[:, None]) * dmod
                    if opts.softcap is not None:  # then through the softcap option
                        raw = qh[i0:i1] @ kh[j0:j1].T * opts.scale
                        ds = ds * (1 - np.tanh(raw / opts.softcap) ** 2)
                    grads[0][b, h, i0:i1] += ds @ kh[j0:j1] * opts.scale
                    grads[1][b, h // g, j0:j1] += ds.T @ qh[i0:i1] * opts.scale
    return out, grads


IDS = np.repeat([0, 1, 2, 3], [7, 12, 3, 11])  # 33 tokens


@pytest.mark.parametrize("options", [
    {"mask_mod": modlib.document_mask(IDS), "causal": True},
    {"block_mask": create_block_mask(modlib.document_mask(IDS), None, None, 33, 33,
                                     block_q=8, block_k=8), "score_mod": modlib.alibi(33, 33,
                                                                                  heads=4)},
    {"block_mask": create_block_mask(modlib.attention_sink(33, 33, 3, 5), None, None, 33, 33,
                                     block_q=16, block_k=4), "kv_lengths": np.array([33, 20])},
    {"mask_mod": modlib.prefix_lm(6), "score_mod": modlib.softcap(1.5), "softcap": 6.0},
    {"score_mod": modlib.t5_bias(np.random.default_rng(0).standard_normal((4, 32)),
                                 max_distance=20), "window": (4, 2)},
])
@pytest.mark.parametrize("bq, bk", [(5, 7), (16, 16)])
def test_a_tiled_loop_calling_the_mods_per_tile_matches_the_oracle(options, bq, bk):
    rng = np.random.default_rng(1)
    q = 2 * rng.standard_normal((2, 4, 33, 8))
    k, v = rng.standard_normal((2, 2, 33, 8)), rng.standard_normal((2, 2, 33, 8))
    dout = rng.standard_normal((2, 4, 33, 8))
    out, grads = tiled(q, k, v, dout, bq, bk, **options)
    np.testing.assert_allclose(out, attention_reference(q, k, v, **options), atol=1e-13)
    for got, want in zip(grads, attention_reference_backward(dout, q, k, v, **options),
                         strict=True):
        np.testing.assert_allclose(got, want, atol=1e-12)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("mod", [modlib.causal(40, 50), modlib.causal(50, 40, align="top_left"),
                                 modlib.sliding_window(40, 50, 5, 3),
                                 modlib.sliding_window(50, 40, None, 2, align="top_left")])
def test_band_mods_mask_tiles_as_the_mod_says(mod, transposed):
    """The library's band mods mask a PARTIAL tile through the mask builder's cached
    patterns (mods._mask_band), in the tile's own memory order: the same pairs as calling
    the mod, for tiles at any position, held row-major or transposed as the fast loops do."""
    from flashmath.attention.mods import Mods, mask_tile

    mods = Mods(score_mod=None, mask_mod=mod, block_mask=None)
    rng = np.random.default_rng(0)
    for _ in range(30):
        q0, k0 = (int(x) for x in rng.integers(0, 40, 2))
        nq, nk = (int(x) for x in rng.integers(1, 12, 2))
        buf = rng.standard_normal((nk, nq) if transposed else (nq, nk))
        s = buf.T if transposed else buf
        want = np.where(mask_tile(mod, 0, 0, q0, q0 + nq, k0, k0 + nk), s, -np.inf)
        mods.apply(s, 0, 0, q0, k0, TileKind.PARTIAL)
        np.testing.assert_array_equal(s, want)
