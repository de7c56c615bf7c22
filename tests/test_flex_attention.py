"""The oracle with mods against torch.nn.attention.flex_attention on CPU (eager), forward
and backward, on every library mod, each written a second time as a torch mod.

flex_attention's eager CPU path materialises the scores (torch's own reference). Its
backward is refused on CPU (``_validate_device``: the compiled CPU kernel has no backward);
the eager path differentiates by autograd, so the backward test lifts that one check for its
duration. Gradients are also compared with torch autograd through a dense torch formula.
"""

import math

import numpy as np
import pytest

from flashmath.attention import modlib
from flashmath.attention.reference import attention_reference, attention_reference_backward

torch = pytest.importorskip("torch")
fa = pytest.importorskip("torch.nn.attention.flex_attention")
fa._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG = True  # eager on purpose: no performance warning

B, H, HKV, SQ, SK, D = 2, 4, 2, 40, 48, 16
DIAG = SK - SQ
IDS = np.repeat([0, 1, 2, 3], [10, 14, 4, 20])  # 48 tokens; queries take the first 40
SLOPES = np.array([0.5, 0.25, 0.125, 0.0625])
REL = np.random.default_rng(1).standard_normal((H, 2 * 6 + 1))
T5 = np.random.default_rng(2).standard_normal((H, 32))


def _t(x):
    return torch.as_tensor(x)


def _t5_bucket_torch(rel, num_buckets=32, max_distance=20):
    """Hugging Face's T5 bucket (bidirectional), in torch."""
    num_buckets //= 2
    out = (rel > 0).long() * num_buckets
    n = rel.abs()
    exact = num_buckets // 2
    large = exact + (torch.log(n.double().clamp(min=1) / exact) / math.log(max_distance / exact)
                     * (num_buckets - exact)).long()
    return out + torch.where(n < exact, n, large.clamp(max=num_buckets - 1))


# (name, flashmath options, torch mask_mod or None, torch score_mod or None)
CASES = [
    ("causal", {"mask_mod": modlib.causal(SQ, SK)}, lambda b, h, q, k: q + DIAG >= k, None),
    ("causal top-left", {"mask_mod": modlib.causal(SQ, SK, align="top_left")},
     lambda b, h, q, k: q >= k, None),
    ("sliding window", {"mask_mod": modlib.sliding_window(SQ, SK, 7, 0)},
     lambda b, h, q, k: (k - q - DIAG <= 0) & (k - q - DIAG >= -7), None),
    ("prefix-LM", {"mask_mod": modlib.prefix_lm(9)}, lambda b, h, q, k: (k < 9) | (k <= q), None),
    ("document", {"mask_mod": modlib.and_masks(modlib.document_mask(IDS[:SQ], IDS),
                                               modlib.causal(SQ, SK, align="top_left"))},
     lambda b, h, q, k: (_t(IDS)[q] == _t(IDS)[k]) & (q >= k), None),
    ("attention sink", {"mask_mod": modlib.attention_sink(SQ, SK, 4, 8)},
     lambda b, h, q, k: (k <= q + DIAG) & ((k < 4) | (k > q + DIAG - 8)), None),
    ("ALiBi", {"score_mod": modlib.alibi(SQ, SK, SLOPES)}, None,
     lambda s, b, h, q, k: s - _t(SLOPES)[h] * (k - q - DIAG).abs()),
    ("relative bias", {"score_mod": modlib.relative_bias(REL, 6)}, None,
     lambda s, b, h, q, k: s + _t(REL)[h, (k - q).clamp(-6, 6) + 6]),
    ("T5 bias", {"score_mod": modlib.t5_bias(T5, max_distance=20)}, None,
     lambda s, b, h, q, k: s + _t(T5)[h, _t5_bucket_torch(k - q)]),
    ("softcap", {"score_mod": modlib.softcap(2.0)}, None,
     lambda s, b, h, q, k: 2.0 * torch.tanh(s / 2.0)),
    ("document + ALiBi", {"mask_mod": modlib.document_mask(IDS[:SQ], IDS),
                          "score_mod": modlib.alibi(SQ, SK, SLOPES)},
     lambda b, h, q, k: _t(IDS)[q] == _t(IDS)[k],
     lambda s, b, h, q, k: s - _t(SLOPES)[h] * (k - q - DIAG).abs()),
]


def _inputs(dtype):
    rng = np.random.default_rng(0)
    q = 2 * rng.standard_normal((B, H, SQ, D))  # scores of a few units: softcap bends
    k = rng.standard_normal((B, HKV, SK, D))
    v = rng.standard_normal((B, HKV, SK, D))
    dout = rng.standard_normal((B, H, SQ, D))
    return [x.astype(dtype).astype(np.float64) for x in (q, k, v, dout)], dtype


def _flex(q, k, v, mask_mod, score_mod, dtype):
    tq, tk, tv = (torch.tensor(x, dtype=dtype) for x in (q, k, v))
    bm = None if mask_mod is None else fa.create_block_mask(mask_mod, None, None, SQ, SK,
                                                            device="cpu")
    return tq, tk, tv, bm


def _errors(out, oracle, baseline):
    return float(np.abs(out - oracle).max()), float(np.abs(baseline - oracle).max())


@pytest.mark.parametrize("name, opts, mask_mod, score_mod", CASES, ids=[c[0] for c in CASES])
def test_forward_agrees_with_flex_attention(name, opts, mask_mod, score_mod):
    (q, k, v, _), _ = _inputs(np.float32)
    oracle = attention_reference(q, k, v, **opts)
    # float64: the same formula, so agreement to rounding
    tq, tk, tv, bm = _flex(q, k, v, mask_mod, score_mod, torch.float64)
    out64 = fa.flex_attention(tq, tk, tv, score_mod=score_mod, block_mask=bm,
                              enable_gqa=True).numpy()
    np.testing.assert_allclose(out64, oracle, rtol=0, atol=1e-13)
    # float32: flex's error within 2x the naive float32 formula's (the accuracy rule), both
    # measured against the float64 oracle on the same float32 inputs
    tq, tk, tv, bm = _flex(q, k, v, mask_mod, score_mod, torch.float32)
    out32 = fa.flex_attention(tq, tk, tv, score_mod=score_mod, block_mask=bm,
                              enable_gqa=True).numpy()
    base = attention_reference(*(x.astype(np.float32) for x in (q, k, v)), upcast=False, **opts)
    err, base_err = _errors(out32, oracle, base)
    assert err <= 2 * max(base_err, 4 * np.finfo(np.float32).eps), (err, base_err)


def _dense_torch(q, k, v, mask_mod, score_mod):
    """Attention by torch ops over the whole score matrix, the torch mods called on
    broadcast index tensors: what autograd differentiates."""
    kk, vv = k.repeat_interleave(H // HKV, 1), v.repeat_interleave(H // HKV, 1)
    s = q @ kk.transpose(-1, -2) / math.sqrt(D)
    b = torch.arange(B)[:, None, None, None]
    h = torch.arange(H)[None, :, None, None]
    qi = torch.arange(SQ)[:, None]
    ki = torch.arange(SK)[None, :]
    if score_mod is not None:
        s = score_mod(s, b, h, qi, ki)
    if mask_mod is not None:
        s = s.masked_fill(~mask_mod(b, h, qi, ki).expand(s.shape), -math.inf)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ vv


@pytest.mark.parametrize("name, opts, mask_mod, score_mod", CASES, ids=[c[0] for c in CASES])
def test_backward_agrees_with_flex_attention_and_torch_autograd(name, opts, mask_mod, score_mod,
                                                               monkeypatch):
    (q, k, v, dout), _ = _inputs(np.float64)
    grads = attention_reference_backward(dout, q, k, v, **opts)
    tq, tk, tv, bm = _flex(q, k, v, mask_mod, score_mod, torch.float64)
    for t in (tq, tk, tv):
        t.requires_grad_(True)
    dense = _dense_torch(tq, tk, tv, mask_mod, score_mod)
    want = torch.autograd.grad(dense, (tq, tk, tv), torch.tensor(dout))
    monkeypatch.setattr(fa, "_validate_device", lambda *a: None)  # the eager path has autograd
    out = fa.flex_attention(tq, tk, tv, score_mod=score_mod, block_mask=bm, enable_gqa=True)
    flex = torch.autograd.grad(out, (tq, tk, tv), torch.tensor(dout))
    for g, w, f in zip(grads, want, flex, strict=True):
        np.testing.assert_allclose(g, w.numpy(), rtol=0, atol=1e-12)
        np.testing.assert_allclose(g, f.numpy(), rtol=0, atol=1e-12)
