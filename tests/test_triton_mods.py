"""flashmath.triton's score_mod / mask_mod / block_mask: every library mod (flashmath.triton.mods)
against the float64 oracle run with its NumPy twin, forward and gradients, under the
accuracy rule, alone and with causal, GQA and kv_lengths; block masks skip EMPTY tiles.

Without a GPU the kernels run in Triton's CPU interpreter (see tests/test_triton.py).
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.triton_setup import DEVICE, torch

assert DEVICE  # the interpreter is chosen above, before flashmath.triton's import

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import flashmath as fm  # noqa: E402
from flashmath.testing import compare_attention, declare  # noqa: E402
from flashmath.triton import flash_attention, op  # noqa: E402
from flashmath.triton import mods as T  # noqa: E402

B, H, H_KV, SQ, SK, D = 2, 2, 1, 40, 56, 16
BLOCK = 32  # the block masks' tiles; the kernels run 16 x 16 tiles inside them


def _library() -> dict[str, tuple[T.Mod, str]]:
    """name -> (the Triton mod, "mask" or "score"), built for (B, H, SQ, SK)."""
    rng = np.random.default_rng(0)
    ids_q = np.sort(rng.integers(0, 4, (B, SQ)), axis=1)
    ids_k = np.sort(rng.integers(0, 4, (B, SK)), axis=1)
    return {
        "causal": (T.causal(SQ, SK), "mask"),
        "causal top-left": (T.causal(SQ, SK, align="top_left"), "mask"),
        "sliding window": (T.sliding_window(SQ, SK, 9, 2), "mask"),
        "prefix-LM": (T.prefix_lm(20), "mask"),
        "document": (T.document_mask(ids_q, ids_k), "mask"),
        "attention sink": (T.attention_sink(SQ, SK, 4, 12), "mask"),
        "ALiBi": (T.alibi(SQ, SK, heads=H), "score"),
        "relative bias": (T.relative_bias(rng.standard_normal((H, 2 * 8 + 1)), 8, SQ, SK),
                          "score"),
        "T5 bias": (T.t5_bias(rng.standard_normal((H, 16)), SQ, SK, max_distance=40), "score"),
        "softcap": (T.softcap(2.5), "score"),
    }


LIBRARY = _library()
TWINS = {id(mod.numpy): mod for mod, _ in LIBRARY.values()}


def _triton_with_twins(q, k, v, *, mask_mod=None, score_mod=None, block_mask=None, **opts):
    """flashmath.triton.flash_attention called with the Triton twins of the NumPy mods the
    checker passes (and a block mask built from the NumPy mask_mod when asked)."""
    tm = None if mask_mod is None else TWINS[id(mask_mod)]
    ts = None if score_mod is None else TWINS[id(score_mod)]
    if block_mask:
        block_mask = fm.create_block_mask(mask_mod, q.shape[0], q.shape[1], q.shape[2],
                                          k.shape[2], block_q=BLOCK, block_k=BLOCK)
    else:
        block_mask = None
    with op.fixed_blocks(16, 16):
        return flash_attention(q, k, v, mask_mod=tm, score_mod=ts, block_mask=block_mask,
                               **opts)


def _inputs(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(B, H, SQ, D), (B, H_KV, SK, D), (B, H_KV, SK, D), (B, H, SQ, D)]
    return [torch.randn(s, generator=gen).to(DEVICE, dtype) for s in shapes]


def _judge(name, dtype, block_mask=False, **extra):
    mod, role = LIBRARY[name]
    impl = declare(lambda q, k, v, **o: _triton_with_twins(q, k, v, block_mask=block_mask, **o),
                   backend="torch", device=DEVICE, name=f"triton {name}",
                   supports={"causal", "kv_lengths", "gqa", "mask_mod", "score_mod"},
                   dtypes=("float16", "bfloat16", "float32"))
    q, k, v, dout = _inputs(dtype)
    result = compare_attention(impl, q, k, v, grads=True, dout=dout, name=name,
                               **{f"{role}_mod": mod.numpy}, **extra)
    assert result.passed, result.message


DTYPES = [torch.float16, torch.bfloat16, torch.float32]
#: Every mod in float16 and in one of bfloat16 / float32, taken in turn (each of those on
#: five mods): the mods compute in float32 inside the kernel whatever the input dtype, and
#: each interpreter run costs ~3 s, so the full 10 x 3 grid cost a third of the suite's
#: Triton time for no path the pairs miss.
MOD_DTYPES = [(name, dtype) for i, name in enumerate(LIBRARY)
              for dtype in (torch.float16, DTYPES[1 + i % 2])]


@pytest.mark.parametrize(("name", "dtype"), MOD_DTYPES,
                         ids=[f"{n}-{str(d)[6:]}" for n, d in MOD_DTYPES])
def test_every_library_mod_meets_the_rule_forward_and_backward(name, dtype):
    _judge(name, dtype)


@pytest.mark.parametrize("name", [n for n, (_, r) in LIBRARY.items() if r == "mask"])
def test_block_masks_give_the_same_verdict(name):
    _judge(name, torch.float16, block_mask=True)


@pytest.mark.parametrize("name", ["document", "prefix-LM", "ALiBi", "softcap"])
def test_mods_compose_with_causal_and_kv_lengths(name):
    _judge(name, torch.float16, block_mask=LIBRARY[name][1] == "mask", causal=True,
           kv_lengths=[SK, 37])


def test_a_block_mask_skips_empty_tiles():
    """Three documents of 32 keys: NaN in document 2's values reaches only document 2's
    queries when its tiles are skipped for the others; without the block mask every tile
    is visited and 0 * NaN reaches them all (the reason to skip, besides the time)."""
    ids = np.repeat(np.arange(3), 32)
    mod = T.document_mask(ids)
    bm = fm.create_block_mask(mod.numpy, 1, 1, 96, 96, block_q=32, block_k=32)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 96, 16, generator=gen).to(DEVICE) for _ in range(3))
    v[:, :, 64:] = float("nan")
    with op.fixed_blocks(16, 16):
        skipped = flash_attention(q, k, v, mask_mod=mod, block_mask=bm)
        visited = flash_attention(q, k, v, mask_mod=mod)
    assert torch.isfinite(skipped[:, :, :64]).all() and torch.isnan(skipped[:, :, 64:]).all()
    assert torch.isnan(visited).all()
    clean = v.clone()
    clean[:, :, 64:] = 0
    with op.fixed_blocks(16, 16):
        want = flash_attention(q, k, clean, mask_mod=mod, block_mask=bm)
    assert torch.equal(skipped[:, :, :64], want[:, :, :64])


@triton.jit
def _even_keys(b, h, q_idx, kv_idx, data):
    return kv_idx % 2 == 0


@triton.jit
def _plus_b(score, b, h, q_idx, kv_idx, data):
    return score + b.to(tl.float32)


def test_a_users_own_jit_mods_forward_only_score_mod():
    """A bare @triton.jit mask_mod; a score_mod without a derivative runs forward and its
    backward says what is missing."""
    q, k, v, _ = _inputs(torch.float32)
    with op.fixed_blocks(16, 16):
        out = flash_attention(q, k, v, mask_mod=_even_keys)
    keep = (np.arange(SK) % 2 == 0)[None, None, None, :]
    want = fm.attention_reference(*(t.double().cpu().numpy() for t in (q, k, v)),
                                  mask=np.broadcast_to(keep, (B, H, SQ, SK)))
    np.testing.assert_allclose(out.cpu().numpy(), want, atol=2e-6)
    qs = q.clone().requires_grad_()
    with op.fixed_blocks(16, 16):
        out = flash_attention(qs, k, v, score_mod=_plus_b)  # a per-batch constant: no effect
        ref = flash_attention(q, k, v)
    torch.testing.assert_close(out.detach(), ref, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="score_mod: its derivative is needed"):
        out.sum().backward()


def test_bad_mods_name_the_argument():
    q, k, v, _ = _inputs(torch.float16)
    doc = LIBRARY["document"][0]
    bm = fm.create_block_mask(doc.numpy, B, H, SQ, SK, block_q=BLOCK, block_k=BLOCK)
    with pytest.raises(TypeError, match=r"mask_mod: expected a flashmath.triton.mods.Mod"):
        flash_attention(q, k, v, mask_mod=doc.numpy)
    with pytest.raises(TypeError, match=r"score_mod: expected"):
        flash_attention(q, k, v, score_mod=lambda s, *a: s)
    with pytest.raises(ValueError, match=r"block_mask: give the mask_mod"):
        flash_attention(q, k, v, block_mask=bm)
    with pytest.raises(TypeError, match=r"block_mask: expected a BlockMask"):
        flash_attention(q, k, v, mask_mod=doc, block_mask=np.ones((1, 1, 2, 2)))
    wrong = fm.create_block_mask(doc.numpy, B, H, SQ, SQ, block_q=BLOCK, block_k=BLOCK)
    with pytest.raises(ValueError, match=r"block_mask: covers"):
        flash_attention(q, k, v, mask_mod=doc, block_mask=wrong)
    with pytest.raises(ValueError, match=r"block_mask: its 32 x 32 tiles must be multiples"):
        flash_attention(q, k, v, mask_mod=doc, block_mask=bm, block_q=64, block_k=32)
    odd = fm.create_block_mask(doc.numpy, B, H, SQ, SK, block_q=24, block_k=32)
    with pytest.raises(ValueError, match=r"block_mask: its block_q must be a power of two"):
        flash_attention(q, k, v, mask_mod=doc, block_mask=odd)
    with pytest.raises(TypeError, match=r"fn: expected a @triton.jit function"):
        T.Mod(lambda *a: True)


@pytest.mark.parametrize(("mask_bq", "mask_bk"), [(16, 16), (32, 32), (128, 32), (128, 128)])
def test_autotuning_keeps_only_tiles_inside_the_block_masks(mask_bq, mask_bk):
    """On a GPU the tiles are autotuned: every config left (the fallback too, when none of
    the configs fits) must lie inside one block of the block mask."""
    from flashmath.triton import kernels

    for configs in (kernels.FWD_CONFIGS, kernels.BWD_DKDV_CONFIGS, kernels.BWD_DQ_CONFIGS):
        kept = kernels._prune(configs, {"MASK_BQ": mask_bq, "MASK_BK": mask_bk,
                                        "BLOCK_D": 64, "BLOCK_DV": 64}, HAS_BLOCK_MASK=True)
        assert kept and all(mask_bq % c.kwargs["BLOCK_M"] == 0
                            and mask_bk % c.kwargs["BLOCK_N"] == 0 for c in kept)
