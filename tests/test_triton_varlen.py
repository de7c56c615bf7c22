"""flashmath.triton.flash_attention_varlen: packed sequences against the float64 oracle, run
sequence by sequence, and against the padded Triton op on the same data.

Without a GPU the kernels run in Triton's CPU interpreter (see tests/test_triton.py).
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.triton_setup import DEVICE, torch

assert DEVICE  # the interpreter is chosen above, before flashmath.triton's import

import flashmath as fm  # noqa: E402
from flashmath.conformance.judge import GRAD_LIMIT, OUT_LIMIT  # noqa: E402
from flashmath.triton import flash_attention, flash_attention_varlen, op  # noqa: E402

#   id              q lengths        k lengths        H Hkv  D  Dv  options
CASES = [
    ("plain",       [5, 17, 40],     [9, 17, 33],     2, 2, 16, 16, {}),
    ("causal",      [5, 17, 40],     [9, 17, 33],     2, 1, 16, 16, {"causal": True}),
    ("top-left",    [20, 3],         [7, 36],         2, 2, 16, 16, {"causal": "top_left"}),
    ("window",      [33, 1, 12],     [33, 40, 12],    4, 2, 24, 8,  {"window": (5, 2)}),
    ("empty-seqs",  [0, 9, 4],       [6, 0, 11],      2, 2, 16, 16, {"causal": True}),
    ("softcap",     [18, 30],        [18, 30],        2, 2, 16, 16, {"softcap": 3.0}),
    ("alibi-sinks", [7, 26],         [31, 26],        2, 2, 16, 16,
     {"causal": True, "alibi_slopes": np.array([0.5, 0.125]),
      "sinks": np.array([0.3, -1.0])}),
]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _case(case, dtype, seed=0):
    _, lq, lk, H, Hkv, D, Dv, opts = case
    gen = torch.Generator().manual_seed(seed)
    shapes = [(sum(lq), H, D), (sum(lk), Hkv, D), (sum(lk), Hkv, Dv), (sum(lq), H, Dv)]
    q, k, v, dout = (torch.randn(s, generator=gen).to(DEVICE, dtype) for s in shapes)
    cu_q = torch.tensor(np.concatenate([[0], np.cumsum(lq)]), dtype=torch.int32)
    cu_k = torch.tensor(np.concatenate([[0], np.cumsum(lk)]), dtype=torch.int32)
    return q, k, v, dout, cu_q, cu_k, opts


def _np(t):
    return t.detach().float().cpu().numpy()


def _oracle(q, k, v, dout, cu_q, cu_k, opts, upcast=True):
    """out (total_q, H, Dv), lse (H, total_q), dq, dk, dv: fm.attention_reference per sequence
    (float64 with upcast, else the naive formula in the inputs' dtype)."""
    dt = fm.dtypes.as_dtype(str(q.dtype)[6:])
    qn, kn, vn, don = (_np(t).astype(dt) for t in (q, k, v, dout))
    if upcast:
        qn, kn, vn, don = (x.astype(np.float64) for x in (qn, kn, vn, don))
    out = np.zeros(don.shape)
    lse = np.zeros((q.shape[1], q.shape[0]))
    dq, dk, dv = np.zeros(qn.shape), np.zeros(kn.shape), np.zeros(vn.shape)
    for b in range(len(cu_q) - 1):
        q0, q1, k0, k1 = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        heads = [x.transpose(1, 0, 2)[None] for x in (qn[q0:q1], kn[k0:k1], vn[k0:k1],
                                                    don[q0:q1])]
        o, l = fm.attention_reference(*heads[:3], **opts, upcast=upcast, return_lse=True)
        g = fm.attention_reference_backward(heads[3], *heads[:3], **opts, upcast=upcast)
        out[q0:q1] = o[0].transpose(1, 0, 2)
        lse[:, q0:q1] = l[0]
        dq[q0:q1], dk[k0:k1], dv[k0:k1] = (x[0].transpose(1, 0, 2) for x in g[:3])
    return out, lse, dq, dk, dv


def _run(q, k, v, dout, cu_q, cu_k, opts, tiles=(16, 32)):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = flash_attention_varlen(q, k, v, cu_q, cu_k, **opts, block_q=tiles[0],
                                      block_k=tiles[1], return_lse=True)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    return out, lse, grads


#: Every case in float16 and in one of bfloat16 / float32, taken in turn: the kernels are
#: the padded op's (tests/test_triton.py runs its battery in all three dtypes), and each
#: interpreter run here costs 2-4 s, a sixth of the suite's Triton time for the full grid.
CASE_DTYPES = [(case, dtype) for i, case in enumerate(CASES)
               for dtype in (torch.float16, DTYPES[1 + i % 2])]


@pytest.mark.parametrize(("case", "dtype"), CASE_DTYPES,
                         ids=[f"{c[0]}-{str(d)[6:]}" for c, d in CASE_DTYPES])
def test_accuracy_rule_per_sequence(case, dtype):
    """Forward within 2x and gradients within 3x of the naive same-dtype formula's error
    (floor: 2 ulps of the largest value), run sequence by sequence; lse to float32."""
    q, k, v, dout, cu_q, cu_k, opts = _case(case, dtype)
    out, lse, grads = _run(q, k, v, dout, cu_q, cu_k, opts)
    exact = _oracle(q, k, v, dout, cu_q, cu_k, opts)
    naive = _oracle(q, k, v, dout, cu_q, cu_k, opts, upcast=False)
    eps = float(torch.finfo(dtype).eps)
    for name, got, want, base, limit in zip(
            ("out", "dq", "dk", "dv"), (out, *grads), exact[:1] + exact[2:],
            naive[:1] + naive[2:], (OUT_LIMIT, GRAD_LIMIT, GRAD_LIMIT, GRAD_LIMIT), strict=True):
        err = np.abs(_np(got) - want).max(initial=0.0)
        ref = max(np.abs(base - want).max(initial=0.0), eps * np.abs(want).max(initial=0.0))
        assert err <= limit * ref, f"{name}: error {err:.3g} > {limit} x {ref:.3g}"
    finite = np.isfinite(exact[1])
    np.testing.assert_array_equal(np.isneginf(_np(lse)), np.isneginf(exact[1]))
    np.testing.assert_allclose(_np(lse)[finite], exact[1][finite], atol=1e-4, rtol=1e-5)


def test_sequences_with_no_keys_give_zeros_and_lse_minus_inf():
    case = next(c for c in CASES if c[0] == "empty-seqs")
    q, k, v, dout, cu_q, cu_k, opts = _case(case, torch.float16)
    out, lse, (dq, _, _) = _run(q, k, v, dout, cu_q, cu_k, opts)
    rows = slice(int(cu_q[1]), int(cu_q[2]))  # sequence 1: 9 queries, no keys
    assert (out[rows] == 0).all() and (dq[rows] == 0).all()
    assert torch.isneginf(lse[:, rows]).all()
    assert not any(torch.isnan(t).any() for t in (out, lse, dq))


@pytest.mark.parametrize("causal", [False, True])
def test_equals_the_padded_op_with_kv_lengths(causal):
    """Two sequences with equal query counts, packed, against the padded op on the same
    rows with kv_lengths: the same kernels over the same tiles, so the same values (GQA)."""
    lq, lk = [24, 24], [40, 13]
    q, k, v, dout, cu_q, cu_k, _ = _case(("pad", lq, lk, 4, 2, 16, 16, {}), torch.float32)
    got, lse, grads = _run(q, k, v, dout, cu_q, cu_k, {"causal": causal})
    qp = q.reshape(2, 24, 4, 16).transpose(1, 2)
    kp = torch.zeros(2, 2, 40, 16, device=DEVICE)
    vp = torch.zeros_like(kp)
    for b, (k0, k1) in enumerate(((0, 40), (40, 53))):
        kp[b, :, : k1 - k0] = k[k0:k1].transpose(0, 1)
        vp[b, :, : k1 - k0] = v[k0:k1].transpose(0, 1)
    qp, kp, vp = (t.detach().clone().requires_grad_() for t in (qp, kp, vp))
    with op.fixed_blocks(16, 32):
        ref, ref_lse = flash_attention(qp, kp, vp, causal=causal, kv_lengths=lk,
                                       return_lse=True)
    ref_dq, ref_dk, _ = torch.autograd.grad(ref, (qp, kp, vp),
                                            dout.reshape(2, 24, 4, 16).transpose(1, 2))
    torch.testing.assert_close(got, ref.transpose(1, 2).reshape(48, 4, 16), rtol=0, atol=0)
    torch.testing.assert_close(lse, ref_lse.transpose(0, 1).reshape(4, 48), rtol=0, atol=0)
    torch.testing.assert_close(grads[0], ref_dq.transpose(1, 2).reshape(48, 4, 16),
                               rtol=0, atol=0)
    torch.testing.assert_close(grads[1][40:], ref_dk[1, :, :13].transpose(0, 1),
                               rtol=0, atol=0)


def test_matches_the_numpy_varlen_api():
    case = CASES[1]
    q, k, v, _, cu_q, cu_k, opts = _case(case, torch.float32)
    got = flash_attention_varlen(q, k, v, cu_q, cu_k, **opts)
    want = fm.flash_attention_varlen(*(_np(t).astype(np.float64) for t in (q, k, v)),
                                     cu_q.numpy(), cu_k.numpy(), **opts)
    np.testing.assert_allclose(_np(got), want, atol=2e-6)


def test_lse_and_sinks_are_differentiable():
    """Gradients through lse (dlse) and into the sinks, against the float64 oracle."""
    case = next(c for c in CASES if c[0] == "alibi-sinks")
    q, k, v, dout, cu_q, cu_k, opts = _case(case, torch.float32)
    sinks = torch.tensor(opts["sinks"], dtype=torch.float32, requires_grad=True)
    rest = {key: val for key, val in opts.items() if key != "sinks"}
    qs, ks = q.clone().requires_grad_(), k.clone().requires_grad_()
    out, lse = flash_attention_varlen(qs, ks, v, cu_q, cu_k, sinks=sinks, **rest,
                                      return_lse=True)
    dlse = torch.randn(lse.shape, generator=torch.Generator().manual_seed(5))
    dq, dsink = torch.autograd.grad((out * dout).sum() + (lse * dlse).sum(), (qs, sinks))
    want_dq = np.zeros(q.shape)
    want_ds = np.zeros(2)
    n = [_np(t).astype(np.float64) for t in (q, k, v, dout)]
    for b in range(len(cu_q) - 1):
        q0, q1, k0, k1 = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        heads = [x.transpose(1, 0, 2)[None] for x in (n[0][q0:q1], n[1][k0:k1], n[2][k0:k1],
                                                    n[3][q0:q1])]
        g = fm.attention_reference_backward(heads[3], *heads[:3], sinks=opts["sinks"],
                                            dlse=_np(dlse)[None, :, q0:q1], **rest)
        want_dq[q0:q1] = g[0][0].transpose(1, 0, 2)
        want_ds += g[-1]
    np.testing.assert_allclose(_np(dq), want_dq, atol=2e-5)
    np.testing.assert_allclose(_np(dsink), want_ds, rtol=1e-4, atol=2e-5)


def _packed(total_q=8, total_k=8, H=2, Hkv=2, D=16, dtype=torch.float16):
    return (torch.zeros(total_q, H, D, dtype=dtype, device=DEVICE),
            torch.zeros(total_k, Hkv, D, dtype=dtype, device=DEVICE),
            torch.zeros(total_k, Hkv, D, dtype=dtype, device=DEVICE))


CU = [0, 3, 8]
BAD = [  # (id, tensors, cu_q, cu_k, options, error, message)
    ("rank", lambda: (_packed()[0][None], *_packed()[1:]), CU, CU, {}, ValueError,
     r"q: expected a 3-D packed tensor \(total_q, H, D\)"),
    ("not-a-tensor", lambda: (np.zeros((8, 2, 16)), *_packed()[1:]), CU, CU, {}, TypeError,
     r"q: expected a torch.Tensor"),
    ("heads", lambda: _packed(H=3), CU, CU, {}, ValueError, r"k: H_kv=2 does not divide H"),
    ("cu-start", _packed, [1, 3, 8], CU, {}, ValueError, r"cu_seqlens_q: must start at 0"),
    ("cu-end", _packed, CU, [0, 3, 7], {}, ValueError,
     r"cu_seqlens_k: ends at 7 but the packed tensor has 8"),
    ("cu-decreasing", _packed, [0, 5, 3, 8], [0, 1, 2, 8], {}, ValueError,
     r"cu_seqlens_q: must not decrease"),
    ("cu-batch", _packed, CU, [0, 8], {}, ValueError, r"cu_seqlens_q has 2 sequences"),
    ("cu-float", _packed, [0.0, 3.0, 8.0], CU, {}, TypeError, r"cu_seqlens_q: expected integers"),
    ("max-seqlen", _packed, CU, CU, {"max_seqlen_q": 4}, ValueError,
     r"max_seqlen for cu_seqlens_q is 4, but a sequence has 5"),
    ("alibi", _packed, CU, CU, {"alibi_slopes": np.ones(3)}, ValueError, r"alibi_slopes"),
    ("sinks", _packed, CU, CU, {"sinks": np.ones(3)}, ValueError, r"sinks"),
    ("causal", _packed, CU, CU, {"causal": "yes"}, ValueError, r"causal:"),
]


@pytest.mark.parametrize(("tensors", "cu_q", "cu_k", "opts", "error", "message"),
                         [pytest.param(*b[1:], id=b[0]) for b in BAD])
def test_bad_input_names_the_argument(tensors, cu_q, cu_k, opts, error, message):
    with pytest.raises(error, match=message):
        flash_attention_varlen(*tensors(), cu_q, cu_k, **opts)
