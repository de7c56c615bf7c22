"""Agreement with torch.nn.functional.scaled_dot_product_attention and its autograd.

On the options both share: causal="top_left" (torch's is_causal), a boolean mask
(True = attend), a float bias (torch's float attn_mask), GQA (enable_gqa) and scale.
"""

from __future__ import annotations

import numpy as np
import pytest

import flashmath as fm
from tests.attention_cases import assert_close, qkv

torch = pytest.importorskip("torch")
F = torch.nn.functional

CASES = [  # (name, flashmath options, torch keyword arguments builder)
    ("plain", {}, {}),
    ("causal", {"causal": "top_left"}, {"is_causal": True}),
    ("scale", {"scale": 0.3}, {"scale": 0.3}),
    ("bool_mask", "mask", None),
    ("bias", "bias", None),
    ("gqa_causal", {"causal": "top_left"}, {"is_causal": True, "enable_gqa": True}),
]


def build(name, opts, rng, sq, sk):
    if opts == "mask":
        mask = rng.random((2, 1, sq, sk)) < 0.6
        mask[..., 0] = True  # torch gives NaN for rows with nothing to attend to
        return {"mask": mask}, {"attn_mask": torch.from_numpy(mask)}
    if opts == "bias":
        bias = rng.standard_normal((1, 4, sq, sk))
        return {"bias": bias}, {"attn_mask": torch.from_numpy(bias)}
    return opts, {}


@pytest.mark.parametrize(("name", "opts", "torch_kw"), CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize(("sq", "sk"), [(16, 16), (9, 21), (21, 9)])
def test_forward_and_gradients_agree_with_torch(name, opts, torch_kw, sq, sk):
    rng = np.random.default_rng([sq, sk, len(name)])
    h_kv = 2 if name.startswith("gqa") else 4
    q, k, v = qkv(rng, 2, 4, sq, sk, 8, h_kv=h_kv, dv=6)
    ours, theirs = build(name, opts, rng, sq, sk)
    theirs = {**theirs, **(torch_kw or {})}
    out, lse = fm.flash_attention(q, k, v, block_q=4, block_k=8, return_lse=True, **ours)
    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    tout = F.scaled_dot_product_attention(tq, tk, tv, **theirs)
    assert_close(out, tout.detach().numpy(), rel=1e-13, what="out")
    dout = rng.standard_normal(out.shape)
    tout.backward(torch.from_numpy(dout))
    grads = fm.flash_attention_backward(dout, q, k, v, out, lse, block_q=4, block_k=8, **ours)
    for what, got, t in zip(("dq", "dk", "dv"), grads, (tq, tk, tv), strict=True):
        assert_close(got, t.grad.numpy(), rel=1e-12, what=what)


def test_float32_agrees_to_float32_precision():
    rng = np.random.default_rng(0)
    q, k, v = qkv(rng, 2, 4, 64, 80, 32, dtype=np.float32)
    out = fm.flash_attention(q, k, v, causal="top_left")
    tout = F.scaled_dot_product_attention(*map(torch.from_numpy, (q, k, v)), is_causal=True)
    assert_close(out, tout.numpy(), rel=2e-6)
