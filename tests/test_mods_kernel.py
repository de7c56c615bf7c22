"""The tiled kernel with score_mod / mask_mod / block masks: forward and every gradient
against the float64 oracle with the same mods, the library's mods alone and combined with
causal, GQA and lengths, in float64 (tight) and float32/16/bfloat16 (the accuracy rule)."""

import numpy as np
import pytest

import flashmath as fm
from flashmath.attention import modlib
from flashmath.dtypes import as_dtype

S = 24


def _mods():
    docs = np.repeat([0, 1, 2], 8)
    return {
        "document": {"mask_mod": modlib.document_mask(docs)},
        "document-block": {"block_mask": fm.create_block_mask(
            modlib.and_masks(modlib.document_mask(docs), modlib.causal(S, S)), None, None,
            S, S, block_q=8, block_k=8)},
        "prefix-lm": {"mask_mod": modlib.prefix_lm(6)},
        "sink-window": {"mask_mod": modlib.attention_sink(S, S, 2, 5)},
        "alibi": {"score_mod": modlib.alibi(S, S, heads=4)},
        "softcap": {"score_mod": modlib.softcap(2.0)},
        "t5": {"score_mod": modlib.t5_bias(np.linspace(-1, 1, 4 * 8).reshape(4, 8))},
        "doc+alibi": {"mask_mod": modlib.document_mask(docs),
                      "score_mod": modlib.alibi(S, S, heads=4)},
    }


MODS = _mods()
COMBOS = [{}, {"causal": True}, {"kv_lengths": np.array([S, 13])}]


def _inputs(dtype, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((2, 4, S, 8))
    k, v = (rng.standard_normal((2, 2, S, 8)) for _ in range(2))
    dout = rng.standard_normal((2, 4, S, 8))
    return tuple(x.astype(as_dtype(dtype)) for x in (q, k, v, dout))


@pytest.mark.parametrize("combo", COMBOS, ids=["alone", "causal", "lengths"])
@pytest.mark.parametrize("name", sorted(MODS))
def test_float64_equals_the_oracle(name, combo):
    q, k, v, dout = _inputs("float64")
    opts = {**MODS[name], **combo}
    out, lse = fm.flash_attention(q, k, v, return_lse=True, block_q=5, block_k=7, **opts)
    grads = fm.flash_attention_backward(dout, q, k, v, out, lse, block_q=5, block_k=7, **opts)
    ref = fm.attention_reference(q, k, v, **opts)
    ref_grads = fm.attention_reference_backward(dout, q, k, v, **opts)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-13)
    for got, want in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("name", ["document", "alibi", "doc+alibi", "softcap"])
def test_narrow_dtypes_meet_the_accuracy_rule(name, dtype):
    q, k, v, dout = _inputs(dtype, seed=1)
    opts = {**MODS[name], "causal": True}
    out, lse = fm.flash_attention(q, k, v, return_lse=True, **opts)
    grads = fm.flash_attention_backward(dout, q, k, v, out, lse, **opts)
    ref = [fm.attention_reference(q, k, v, **opts),
           *fm.attention_reference_backward(dout, q, k, v, **opts)]
    base = [fm.attention_reference(q, k, v, upcast=False, **opts),
            *fm.attention_reference_backward(dout, q, k, v, upcast=False, **opts)]
    eps = float(fm.dtypes.finfo(dtype).eps)
    for i, (got, want, naive) in enumerate(zip([out, *grads], ref, base, strict=True)):
        err = np.abs(np.asarray(got, np.float64) - want).max()
        naive_err = np.abs(np.asarray(naive, np.float64) - want).max()
        assert err <= (2 if i == 0 else 3) * max(naive_err, eps * np.abs(want).max()), i


def test_a_block_mask_skips_the_empty_tiles():
    """8 documents of 8 tokens, 8 x 8 tiles: with a block mask the kernel calls the mask_mod
    on no tile between two documents (EMPTY: skipped) and on none inside one (FULL: no mask
    needed); without one it calls it on every tile."""
    calls = []
    docs = np.repeat(np.arange(8), 8)
    inner = modlib.document_mask(docs)

    def counted(b, h, q_idx, kv_idx):
        calls.append((int(q_idx.min()) // 8, int(kv_idx.min()) // 8))
        return inner(b, h, q_idx, kv_idx)

    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((1, 1, 64, 8)) for _ in range(3))
    bm = fm.create_block_mask(counted, None, None, 64, 64, block_q=8, block_k=8)
    calls.clear()
    out = fm.flash_attention(q, k, v, block_mask=bm, block_q=8, block_k=8)
    np.testing.assert_allclose(out, fm.attention_reference(q, k, v, mask_mod=inner),
                               atol=1e-13)
    assert calls == []  # every tile was EMPTY or FULL
    fm.flash_attention(q, k, v, mask_mod=counted, block_q=8, block_k=8)
    assert len(calls) == 64  # no classification: the mod on every tile
