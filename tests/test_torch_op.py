"""flashmath.torch.flash_attention: the torch op over the NumPy kernels.

Specification: gradients exact to float64 (gradcheck) under every option; the accuracy rule
(flashmath.testing) in every dtype; agreement with torch SDPA autograd on the options both
take, in float32, judged against float64; bit-for-bit the NumPy kernels (no float32 round
trip); torch.compile runs it as one opaque op and matches eager; the routing of CUDA
tensors to the Triton op; clear refusals.
"""

from __future__ import annotations

import numpy as np
import pytest

import flashmath as fm
from flashmath.testing import assert_attention_close, declare

torch = pytest.importorskip("torch")
from flashmath.torch import flash_attention, route  # noqa: E402

F = torch.nn.functional

#: name -> (options builder (B, H, Sq, Sk) -> kwargs of tensors, H_kv, Dv)
OPTIONS = {
    "plain": (lambda b, h, sq, sk: {}, 4, 6),
    "causal": (lambda b, h, sq, sk: {"causal": True}, 4, 6),
    "top_left": (lambda b, h, sq, sk: {"causal": "top_left"}, 4, 6),
    "window": (lambda b, h, sq, sk: {"window": (3, 1)}, 4, 6),
    "sliding": (lambda b, h, sq, sk: {"causal": True, "window": (4, 0)}, 2, 6),
    "mask": (lambda b, h, sq, sk: {"mask": torch.rand(b, 1, sq, sk) < 0.7}, 4, 6),
    "bias": (lambda b, h, sq, sk: {"bias": torch.randn(1, h, sq, sk, dtype=torch.float64)}, 4, 6),
    "kv_lengths": (lambda b, h, sq, sk: {"kv_lengths": [sk - 3, 0]}, 4, 6),
    "q_lengths": (lambda b, h, sq, sk: {"q_lengths": torch.tensor([sq - 2, 1]),
                                        "causal": True}, 4, 6),
    "softcap": (lambda b, h, sq, sk: {"softcap": 1.5, "scale": 0.7}, 4, 6),
    "gqa": (lambda b, h, sq, sk: {"causal": "top_left"}, 1, 4),
    "dv": (lambda b, h, sq, sk: {"window": (None, 2)}, 2, 3),
}


def _qkv(dtype, b=2, h=4, sq=7, sk=9, d=4, h_kv=4, dv=6, grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = ((b, h, sq, d), (b, h_kv, sk, d), (b, h_kv, sk, dv))
    return tuple(torch.randn(s, generator=g, dtype=dtype).requires_grad_(grad) for s in shapes)


@pytest.mark.parametrize("name", OPTIONS)
def test_gradcheck_float64(name):
    """Every option: analytic vs numerical Jacobian (gradcheck's fast mode: random
    projections), on tiles that do not divide the lengths."""
    torch.manual_seed(len(name))
    build, h_kv, dv = OPTIONS[name]
    q, k, v = _qkv(torch.float64, h_kv=h_kv, dv=dv)
    opts = build(2, 4, 7, 9)
    fn = lambda q, k, v: flash_attention(q, k, v, block_q=3, block_k=4, **opts)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


def test_gradcheck_float64_full_jacobian():
    """The whole Jacobian, once, on a small case combining GQA, causal, softcap, Dv != D."""
    q, k, v = _qkv(torch.float64, b=1, h=2, sq=4, sk=5, d=3, h_kv=1, dv=2)
    fn = lambda q, k, v: flash_attention(  # noqa: E731
        q, k, v, causal=True, softcap=1.2, block_q=2, block_k=2)
    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("name", ["causal", "mask", "softcap", "gqa", "q_lengths"])
def test_accuracy_rule(name, dtype):
    """Out and gradients meet the rule (flashmath.testing) in every dtype."""
    torch.manual_seed(len(name))
    build, h_kv, dv = OPTIONS[name]
    q, k, v = (t.detach().numpy() for t in _qkv(torch.float64, sq=20, sk=24, h_kv=h_kv, dv=dv))
    opts = {key: (val.numpy() if isinstance(val, torch.Tensor) else
                  np.array(val) if isinstance(val, list) else val)
            for key, val in build(2, 4, 20, 24).items()}
    assert_attention_close(declare(flash_attention, backend="torch"), q, k, v, grads=True,
                           dtype=dtype, **opts)


# torch SDPA's options that flashmath shares: is_causal (top-left), bool mask, float
# attn_mask (bias), enable_gqa, scale. Rows with nothing to attend to are avoided (torch
# gives NaN there).
SHARED = [
    ("plain", {}, {}),
    ("causal", {"causal": "top_left"}, {"is_causal": True}),
    ("scale", {"scale": 0.3}, {"scale": 0.3}),
    ("gqa", {"causal": "top_left"}, {"is_causal": True, "enable_gqa": True}),
    ("mask", "mask", None),
    ("bias", "bias", None),
]


@pytest.mark.parametrize(("name", "ours", "theirs"), SHARED, ids=[c[0] for c in SHARED])
def test_agrees_with_sdpa_autograd_float32(name, ours, theirs):
    """float32 out and grads: error vs float64 SDPA within 2x (3x grads) float32 SDPA's."""
    torch.manual_seed(3)
    sq, sk = 33, 40
    if ours == "mask":
        mask = torch.rand(2, 1, sq, sk) < 0.6
        mask[..., 0] = True
        ours, theirs = {"mask": mask}, {"attn_mask": mask}
    elif ours == "bias":
        bias = torch.randn(1, 4, sq, sk)
        ours, theirs = {"bias": bias}, {"attn_mask": bias}
    q64, k64, v64 = _qkv(torch.float64, sq=sq, sk=sk, d=16, h_kv=2 if name == "gqa" else 4,
                         dv=16)
    dout = torch.randn(2, 4, sq, 16, dtype=torch.float64)

    def run(fn, dtype, **kw):
        q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q64, k64, v64))
        kw = {key: val.to(dtype) if val.is_floating_point() else val
              for key, val in kw.items()} if "attn_mask" in kw or "bias" in kw else kw
        out = fn(q, k, v, **kw)
        out.backward(dout.to(dtype))
        return [t.detach().double() for t in (out, q.grad, k.grad, v.grad)]

    oracle = run(F.scaled_dot_product_attention, torch.float64, **theirs)
    base = run(F.scaled_dot_product_attention, torch.float32, **theirs)
    got = run(lambda q, k, v, **kw: flash_attention(q, k, v, block_q=16, block_k=16, **kw),
              torch.float32, **ours)
    eps = float(np.finfo(np.float32).eps)
    for what, g, b, o, limit in zip(("out", "dq", "dk", "dv"), got, base, oracle,
                                    (2, 3, 3, 3), strict=True):
        err, base_err = (g - o).abs().max().item(), (b - o).abs().max().item()
        floor = eps * o.abs().max().item()
        assert err <= limit * base_err + floor, (what, err, base_err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_bit_for_bit_the_numpy_kernels(dtype):
    """No float32 round trip on the way in or out: the op's results are the NumPy
    kernels' on from_torch views of the inputs, bit for bit, in the input dtype."""
    q, k, v = _qkv(dtype, sq=12, sk=12)
    out, lse = flash_attention(q, k, v, causal=True, return_lse=True)
    ref, ref_lse = fm.flash_attention(*(fm.dtypes.from_torch(t) for t in (q, k, v)),
                                      causal=True, return_lse=True)
    assert out.dtype == dtype and lse.dtype == (torch.float64 if dtype == torch.float64
                                                else torch.float32)
    assert np.array_equal(fm.dtypes.from_torch(out).view(np.uint8), ref.view(np.uint8))
    assert np.array_equal(fm.dtypes.from_torch(lse), ref_lse)
    dout = torch.randn(out.shape).to(dtype)
    out.backward(dout)
    grads = fm.flash_attention_backward(
        *(fm.dtypes.from_torch(t) for t in (dout, q, k, v, out, lse)), causal=True)
    for t, g in zip((q, k, v), grads, strict=True):
        assert t.grad.dtype == dtype
        assert np.array_equal(fm.dtypes.from_torch(t.grad).view(np.uint8), g.view(np.uint8))


def test_non_contiguous_inputs_as_transformers_passes_them():
    """(B, S, H, D) projections transposed to (B, H, S, D): strided views work."""
    q, k, v = (torch.randn(2, 6, 4, 8).transpose(1, 2).requires_grad_() for _ in range(3))
    assert not q.is_contiguous()
    out = flash_attention(q, k, v)
    ref = F.scaled_dot_product_attention(q, k, v)
    assert (out - ref).abs().max().item() < 1e-6


def test_empty_rows_give_zero_output_and_gradients():
    q, k, v = _qkv(torch.float32, b=2, sq=4, sk=4)
    out = flash_attention(q, k, v, kv_lengths=[0, 4])
    out.sum().backward()
    assert torch.all(out[0] == 0) and torch.all(q.grad[0] == 0) and torch.all(k.grad[0] == 0)
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile_runs_it_as_one_op(backend):
    """fullgraph=True: no graph break; forward and gradients equal eager's."""
    q, k, v = _qkv(torch.float32, sq=8, sk=10, h_kv=2)
    mask = torch.rand(2, 1, 8, 10) < 0.8

    def f(q, k, v):
        out, lse = flash_attention(q, k, v, causal=True, mask=mask, return_lse=True)
        return (out * out).sum() + lse.detach().sum()

    compiled = torch.compile(f, backend=backend, fullgraph=True)
    got, want = compiled(q, k, v), f(q, k, v)
    assert torch.equal(got, want)
    g_got = torch.autograd.grad(got, (q, k, v))
    g_want = torch.autograd.grad(want, (q, k, v))
    for a, b in zip(g_got, g_want, strict=True):
        assert torch.equal(a, b)


def test_custom_op_passes_torch_opcheck():
    """torch.library.opcheck: schema, fake implementation and autograd registration agree."""
    q, k, v = _qkv(torch.float32, sq=5, sk=6)
    op = torch.ops.flashmath.attention.default
    args = (q, k, v, "bottom_right", 2, None, None, None, torch.tensor([6, 3]), None,
            torch.tensor([0.5, -1.0, 0.0, 2.0], requires_grad=True), None, 2.0, None, None, None)
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor",
                                                "test_autograd_registration"))


def test_routing_cpu_numpy_cuda_triton():
    assert route("cpu") == "numpy"
    assert route(torch.device("cuda", 0), ["causal", "window", "kv_lengths", "softcap"]) == \
        "triton"
    for option in ("mask", "bias", "q_lengths"):
        with pytest.raises(NotImplementedError, match=option):
            route("cuda", [option, "causal"])
    with pytest.raises(ValueError, match="meta"):
        route("meta")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_run_the_triton_op():  # pragma: no cover - needs a GPU
    q, k, v = (t.detach().cuda().requires_grad_() for t in _qkv(torch.float32, sq=64, sk=64))
    out = flash_attention(q, k, v, causal=True)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert out.device.type == "cuda" and (out - ref).abs().max().item() < 1e-5
    out.sum().backward()
    assert q.grad is not None and q.grad.device.type == "cuda"


def test_refusals_name_the_argument():
    q, k, v = _qkv(torch.float32)
    with pytest.raises(TypeError, match=r"q: expected a torch\.Tensor"):
        flash_attention(q.detach().numpy(), k, v)
    with pytest.raises(TypeError, match=r"q: dtype torch\.int32"):
        flash_attention(q.int(), k.int(), v.int())
    with pytest.raises(ValueError, match="causal"):
        flash_attention(q, k, v, causal="up")
    with pytest.raises(NotImplementedError, match="bias"):
        flash_attention(q, k, v, bias=torch.zeros(7, 9, requires_grad=True))
    with pytest.raises(ValueError, match="sinks"):
        flash_attention(q, k, v, sinks=torch.zeros(3))


def test_gradients_flow_through_lse_and_into_the_sinks():
    """gradcheck in float64 of out and lse together, with learnable sinks."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 5, 3, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    sinks = torch.tensor([0.5, -1.0], dtype=torch.float64, requires_grad=True)
    weights = torch.linspace(-1, 1, 5, dtype=torch.float64)

    def f(q, k, v, sinks):
        out, lse = flash_attention(q, k, v, causal=True, sinks=sinks, window=(2, 0),
                                   alibi_slopes=[0.5, 0.25], return_lse=True)
        return out.sum() + (lse * weights).sum()

    assert torch.autograd.gradcheck(f, (q, k, v, sinks))


def test_mods_through_the_torch_op_match_the_numpy_kernels():
    """score_mod / mask_mod / block_mask on CPU tensors: forward and gradients (q, k, v and
    the sinks) as the NumPy kernels and the float64 oracle give them."""
    import numpy as np

    import flashmath as fm
    from flashmath.attention import modlib

    torch.manual_seed(2)
    q, k, v = (torch.randn(1, 2, 12, 4, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    sinks = torch.tensor([0.3, -0.2], dtype=torch.float64, requires_grad=True)
    docs = np.repeat([0, 1, 2], 4)
    mods = {"mask_mod": modlib.document_mask(docs), "score_mod": modlib.alibi(12, 12, heads=2)}

    def f(q, k, v, sinks):
        out, lse = flash_attention(q, k, v, causal=True, sinks=sinks, return_lse=True, **mods)
        return out.sum() + lse.sum()

    assert torch.autograd.gradcheck(f, (q, k, v, sinks))
    out = flash_attention(q, k, v, causal=True, **mods)
    ref = fm.attention_reference(*(t.detach().numpy() for t in (q, k, v)), causal=True, **mods)
    np.testing.assert_allclose(out.detach().numpy(), ref, atol=1e-13)
