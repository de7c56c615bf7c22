"""flashmath.triton.flash_attention: the Triton kernels against the float64 oracle.

Without a GPU the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set here
before flashmath.triton is imported) on tiny shapes and pinned tiles; with one, the same
cases run compiled on CUDA, and the ``gpu`` tests add full-size, autotuned shapes.

Accuracy: flashmath.testing's rule (max error against fm.attention_reference /
attention_reference_backward in float64 at most 2x the naive same-dtype error forward, 3x
for gradients, with its documented floor), its NaN policy and its zero fully-masked rows.
"""

from __future__ import annotations

import importlib
import math
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated (imported)
pytest.importorskip("triton", reason="triton is not installed (pip install 'flashmath[gpu]')")

import flashmath as fm  # noqa: E402
from flashmath.conformance.judge import OUT_LIMIT  # noqa: E402
from flashmath.testing import attention_battery, compare_attention, declare, run_case  # noqa: E402
from flashmath.triton import flash_attention, kernels, op  # noqa: E402
from tests.attention_fuzz import torch_style_forward_error  # noqa: E402

if not CUDA and not kernels.INTERPRETED:  # another module imported the kernels first
    importlib.reload(kernels)

DEVICE = "cuda" if CUDA else "cpu"
needs_gpu = pytest.mark.skipif(not CUDA, reason="no CUDA device")

#: flash_attention as flashmath.testing sees it: a torch impl with what it supports.
TRITON = declare(
    flash_attention, backend="torch", device=DEVICE, name="flashmath.triton",
    supports={"causal", "causal_top_left", "window", "kv_lengths", "softcap", "scale", "gqa",
              "dv", "alibi_slopes", "sinks"},
    dtypes=("float16", "bfloat16", "float32"),
)


# ---------------------------------------------------------------------------------------
# The grid: several tiles per row and column (boundary, whole and skipped tiles), lengths
# the tiles do not divide, every option alone and combined. The conformance battery below
# adds the single-tile adversarial cases (odd head dims, huge logits, NaN, ...).
# ---------------------------------------------------------------------------------------

#   id                     B  H Hkv  Sq  Sk   D  Dv  options
CASES = [
    ("plain",              1, 2, 2, 48, 48, 16, 16, {}),
    ("sq<sk",              1, 2, 2, 24, 56, 16, 16, {}),
    ("causal-br-sq<sk",    1, 2, 2, 24, 56, 16, 16, {"causal": True}),
    ("causal-br-sq>sk",    1, 2, 2, 56, 24, 16, 16, {"causal": True}),  # 32 rows see nothing
    ("causal-tl-sq<sk",    1, 2, 2, 24, 56, 16, 16, {"causal": "top_left"}),  # 32 keys unseen
    ("causal-tl-sq>sk",    1, 2, 2, 56, 24, 16, 16, {"causal": "top_left"}),
    ("window",             1, 2, 2, 40, 40, 16, 16, {"window": (7, 3)}),
    ("window-causal",      1, 2, 2, 40, 33, 16, 16, {"causal": True, "window": (9, None)}),
    ("window-left-open",   1, 2, 2, 33, 40, 16, 16, {"window": (None, 2)}),
    ("gqa",                1, 4, 2, 40, 40, 16, 16, {"causal": True}),
    ("kv-lengths",         2, 2, 1, 40, 40, 16, 16, {"kv_lengths": [29, 0]}),  # batch 1 empty
    ("kv-lengths-causal",  2, 2, 2, 24, 48, 16, 16, {"causal": True, "kv_lengths": [48, 13]}),
    ("softcap",            1, 2, 2, 40, 40, 16, 16, {"softcap": 3.0, "scale": 0.9}),
    ("head-dims",          1, 2, 2, 33, 40, 24, 40, {}),  # D padded to 32, Dv != D
    ("d64",                1, 1, 1, 40, 40, 64, 64, {"causal": True}),
    ("tiles-divide",       1, 2, 2, 64, 64, 16, 16, {}),  # no boundary run compiled
    ("tiles-divide-causal", 1, 2, 2, 64, 64, 16, 16, {"causal": True}),
    ("all",                2, 2, 1, 40, 56, 16, 16, {"causal": True, "window": (20, None),
                                                    "kv_lengths": [50, 31], "softcap": 4.0}),
    ("alibi",              1, 2, 2, 40, 40, 16, 16, {"alibi_slopes": np.array([0.5, 0.125])}),
    ("alibi-all",          2, 4, 2, 24, 48, 16, 16, {"causal": True, "softcap": 4.0,
                                                    "kv_lengths": [48, 13],
                                                    "alibi_slopes": np.array(
                                                        [[0.5, 0.25, 0.125, 0.0625],
                                                         [1.0, 0.3, 0.0, 2.0]])}),
    ("sinks",              2, 4, 2, 24, 40, 16, 16, {"causal": True, "kv_lengths": [40, 9],
                                                    "sinks": np.array([0.5, -1.0, 3.0,
                                                                       -np.inf])}),
]
WIDE = {"plain", "causal-br-sq>sk", "gqa", "kv-lengths-causal", "softcap", "all", "alibi-all",
        "sinks"}
GRID = [pytest.param(c, torch.float16, id=f"{c[0]}-float16") for c in CASES] + [
    pytest.param(c, dt, id=f"{c[0]}-{str(dt)[6:]}")
    for dt in (torch.bfloat16, torch.float32) for c in CASES if c[0] in WIDE]
TILES = [(16, 32), (32, 16), (16, 16)]  # (BLOCK_M, BLOCK_N); none divides every length


def make_inputs(case, dtype, seed=0):
    _, B, H, H_kv, Sq, Sk, D, Dv, _opts = case
    gen = torch.Generator().manual_seed(seed)
    shapes = [(B, H, Sq, D), (B, H_kv, Sk, D), (B, H_kv, Sk, Dv), (B, H, Sq, Dv)]
    q, k, v, dout = (torch.randn(s, generator=gen).to(DEVICE, dtype) for s in shapes)
    return q, k, v, dout


def run_triton(q, k, v, dout, opts, tiles=(32, 32)):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    with op.fixed_blocks(*tiles):
        out, lse = flash_attention(q, k, v, **opts, return_lse=True)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    return out, lse, grads


def numpy_of(t):
    """A tensor as a NumPy array of the same dtype (bfloat16 via ml_dtypes)."""
    return t.detach().float().cpu().numpy().astype(fm.dtypes.as_dtype(str(t.dtype)[6:]))


def oracle_lse(q, k, v, opts, upcast=True):
    _, lse = fm.attention_reference(*(numpy_of(t) for t in (q, k, v)), **opts, upcast=upcast,
                                    return_lse=True)
    return lse


@pytest.mark.parametrize(("case", "dtype"), GRID)
def test_accuracy_rule_against_float64(case, dtype):
    opts = case[-1]
    q, k, v, dout = make_inputs(case, dtype)
    with op.fixed_blocks(*TILES[CASES.index(case) % len(TILES)]):
        result = compare_attention(TRITON, q, k, v, grads=True, dout=dout, name=case[0], **opts)
    assert result.passed, result.message


@pytest.mark.parametrize(("case", "dtype"), [p for p in GRID if p.id.endswith("float16")][:8])
def test_lse_matches_the_oracle(case, dtype):
    """lse is float32 for every input dtype: within 2x the naive float32 error, -inf exactly
    where the oracle's is (rows with nothing to attend to)."""
    opts = case[-1]
    q, k, v, _ = make_inputs(case, dtype)
    with op.fixed_blocks(16, 32):
        _, lse = flash_attention(q, k, v, **opts, return_lse=True)
    q32, k32, v32 = (t.float() for t in (q, k, v))  # the same values, in float32
    exact, naive = oracle_lse(q32, k32, v32, opts), oracle_lse(q32, k32, v32, opts, False)
    got = numpy_of(lse).astype(np.float64)
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(exact))
    finite = np.isfinite(exact)
    err = np.abs(got[finite] - exact[finite]).max()
    base = max(np.abs(naive[finite] - exact[finite]).max(),
               np.finfo(np.float32).eps * np.abs(exact[finite]).max())
    assert err <= 2 * base, f"lse: error {err:.3g} > 2 x {base:.3g}"


@pytest.mark.parametrize("case", [c for c in attention_battery(("float16", "bfloat16"))],
                         ids=lambda c: c.id)
def test_conformance_battery_with_gradients(case):
    if not CUDA and case.inputs["k"].shape[2] > 1024:
        pytest.skip("4096-key rows take the CPU interpreter ~10 s; run on a GPU")
    with op.fixed_blocks(16, 32):
        result = run_case(TRITON, case, grads=True)
    if result.verdict == "SKIP":
        pytest.skip(result.message)  # boolean mask, bias, q_lengths: not in this op
    assert result.passed, result.message


@pytest.mark.parametrize("case", [c for c in attention_battery(("float32",))],
                         ids=lambda c: c.id)
def test_conformance_battery_float32_forward(case):
    """float32 forward meets the rule on the whole battery, against the naive baseline or,
    where the dot's own rounding decides, against the PyTorch-style one (DESIGN: both are
    the textbook formula). The kernels form float32 scores as any float32 dot does; on the
    large-score cases (|s| ~ 1000) the max output error then depends on the summation
    order, and one machine's BLAS put the naive NumPy formula 4x below torch's on the same
    16 x 16 problem ('large logits': 1.6e-6 naive, 6.4e-6 torch, 8.2e-6 here). float32
    gradients meet the rule on the grid above; on the battery one case ('odd head dim',
    dv) reaches 3.3x the naive error: the backward's recomputed scores round differently
    from the forward's. float16/bfloat16 have room to spare."""
    if not CUDA and case.inputs["k"].shape[2] > 1024:
        pytest.skip("4096-key rows take the CPU interpreter ~10 s; run on a GPU")
    with op.fixed_blocks(16, 32):
        result = run_case(TRITON, case)
    if result.verdict == "SKIP":
        pytest.skip(result.message)
    if not result.passed and result.nan_policy_ok:
        torch_style = torch_style_forward_error(case)
        assert result.max_error <= OUT_LIMIT * max(torch_style, result.floor), (
            f"{result.message}; the PyTorch-style baseline's error is {torch_style:.3g}")
        return
    assert result.passed, result.message


def test_fully_masked_rows_are_zero_with_lse_minus_inf_and_zero_grads():
    # causal bottom-right with Sq > Sk: rows 0..15 see no key; batch 1 has no keys at all
    opts = {"causal": True, "kv_lengths": [24, 0]}
    case = ("masked", 2, 2, 1, 40, 24, 16, 16, opts)
    q, k, v, dout = make_inputs(case, torch.float16)
    out, lse, (dq, dk, dv) = run_triton(q, k, v, dout, opts, (16, 16))
    empty = torch.from_numpy(np.isneginf(oracle_lse(q, k, v, opts))).to(DEVICE)  # (B, H, Sq)
    assert empty[0, :, :16].all() and not empty[0, :, 16:].any() and empty[1].all()
    assert (out[empty] == 0).all() and (dq[empty] == 0).all()
    assert (lse[empty] == -math.inf).all() and torch.isfinite(lse[~empty]).all()
    assert (dk[1] == 0).all() and (dv[1] == 0).all()
    for x in (out, lse, dq, dk, dv):
        assert not torch.isnan(x).any()


def test_padding_past_kv_lengths_is_never_read():
    """Keys at or past kv_lengths may hold anything (a KV cache's unwritten slots): NaN
    there changes nothing, and their dK, dV are exactly 0."""
    opts = {"causal": True, "kv_lengths": [37, 20]}
    case = ("padding", 2, 2, 1, 24, 48, 16, 16, opts)
    q, k, v, dout = make_inputs(case, torch.float16)
    clean = run_triton(q, k, v, dout, opts, (16, 16))
    for b, n in enumerate(opts["kv_lengths"]):
        k[b, :, n:] = float("nan")
        v[b, :, n:] = float("nan")
    out, lse, (dq, dk, dv) = run_triton(q, k, v, dout, opts, (16, 16))
    for got, want in zip((out, lse, dq), clean[:2] + clean[2][:1], strict=True):
        assert torch.equal(got, want)
    assert (dk[0, :, 37:] == 0).all() and (dv[1, :, 20:] == 0).all()
    assert torch.equal(dk[0, :, :37], clean[2][1][0, :, :37])


def test_keys_no_query_sees_get_exactly_zero_gradients():
    # top-left causal, Sq < Sk: keys 24.. are seen by nobody (with or without a window)
    for opts in ({"causal": "top_left"}, {"causal": "top_left", "window": (2, 0)}):
        case = ("unseen", 1, 2, 2, 24, 56, 16, 16, opts)
        q, k, v, dout = make_inputs(case, torch.float16)
        _, _, (_, dk, dv) = run_triton(q, k, v, dout, opts, (16, 16))
        assert (dk[:, :, 24:] == 0).all() and (dv[:, :, 24:] == 0).all()
        assert (dk[:, :, :24] != 0).any()


@pytest.mark.parametrize(("B", "Sq", "Sk"), [(1, 0, 5), (1, 4, 0), (0, 4, 5)])
def test_empty_sequences(B, Sq, Sk):
    """No queries, no keys, no batch: shapes kept, out 0, lse -inf, zero gradients."""
    q, k, v, dout = make_inputs(("empty", B, 2, 2, Sq, Sk, 16, 16, {}), torch.float16)
    out, lse, grads = run_triton(q, k, v, dout, {"causal": True})
    assert out.shape == (B, 2, Sq, 16) and lse.shape == (B, 2, Sq)
    assert (out == 0).all() and (lse == -math.inf).all()
    assert all((g == 0).all() and g.shape == t.shape for g, t in zip(grads, (q, k, v),
                                                                      strict=True))


def test_the_interpreter_runs_the_kernels(monkeypatch):
    """Every launch goes through the four kernels (no torch fallback exists to hide behind)."""
    if not CUDA:
        from triton.runtime.interpreter import InterpretedFunction

        for name in ("attn_fwd", "attn_bwd_preprocess", "attn_bwd_dkdv", "attn_bwd_dq"):
            fn = getattr(kernels, name)
            fn = fn if isinstance(fn, InterpretedFunction) else fn.fn  # under triton.heuristics
            assert kernels.INTERPRETED and isinstance(fn, InterpretedFunction), name
    launched = []

    class Spy:
        def __init__(self, name, fn):
            self.name, self.fn = name, fn

        def __getitem__(self, grid):
            launched.append(self.name)
            return self.fn[grid]

    for name in ("attn_fwd", "attn_bwd_preprocess", "attn_bwd_dkdv", "attn_bwd_dq"):
        monkeypatch.setattr(kernels, name, Spy(name, getattr(kernels, name)))
    q, k, v, dout = make_inputs(CASES[0], torch.float16)
    out, _, _ = run_triton(q, k, v, dout, {})
    assert launched == ["attn_fwd", "attn_bwd_preprocess", "attn_bwd_dkdv", "attn_bwd_dq"]
    ref = fm.attention_reference(*(numpy_of(t) for t in (q, k, v)))
    np.testing.assert_allclose(numpy_of(out).astype(np.float64), ref, atol=2e-3)


def test_backward_is_deterministic():
    case = next(c for c in CASES if c[0] == "all")
    q, k, v, dout = make_inputs(case, torch.float16)
    first = run_triton(q, k, v, dout, case[-1])
    second = run_triton(q, k, v, dout, case[-1])
    for a, b in zip((first[0], *first[2]), (second[0], *second[2]), strict=True):
        assert torch.equal(a, b)


def test_lse_is_differentiable():
    """d lse_i / d s_ij = P_ij: checked against float64 autograd of logsumexp."""
    case = ("lse", 1, 2, 1, 24, 40, 16, 16, {})
    q, k, v, _ = make_inputs(case, torch.float32)
    dlse = torch.randn(1, 2, 24, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    qt, kt, vt = (t.clone().requires_grad_() for t in (q, k, v))
    with op.fixed_blocks(16, 16):
        _, lse = flash_attention(qt, kt, vt, return_lse=True)
    dq, dk = torch.autograd.grad((lse * dlse).sum(), (qt, kt))
    q64, k64 = (t.double().requires_grad_() for t in (q, k))
    s = q64 @ k64.repeat_interleave(2, dim=1).transpose(-1, -2) / 4.0  # scale 1/sqrt(16)
    dq64, dk64 = torch.autograd.grad((torch.logsumexp(s, -1) * dlse.double()).sum(), (q64, k64))
    torch.testing.assert_close(dq.double(), dq64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dk.double(), dk64, atol=1e-5, rtol=1e-5)


def test_matches_torch_sdpa_top_left():
    """torch's is_causal is top-left aligned: the two agree where the options meet."""
    opts = {"causal": "top_left"}
    q, k, v, dout = make_inputs(("sdpa", 1, 2, 2, 24, 40, 16, 16, opts), torch.float32)
    out, _, (dq, dk, dv) = run_triton(q, k, v, dout, opts, (16, 32))
    qt, kt, vt = (t.clone().requires_grad_() for t in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
    ref_grads = torch.autograd.grad(ref, (qt, kt, vt), dout)
    for a, b in zip((out, dq, dk, dv), (ref, *ref_grads), strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


# ---------------------------------------------------------------------------------------
# Bad input: errors that name the argument
# ---------------------------------------------------------------------------------------


def _qkv(B=1, H=2, H_kv=2, Sq=8, Sk=8, D=16, Dv=16, dtype=torch.float16):
    return (torch.zeros(B, H, Sq, D, dtype=dtype, device=DEVICE),
            torch.zeros(B, H_kv, Sk, D, dtype=dtype, device=DEVICE),
            torch.zeros(B, H_kv, Sk, Dv, dtype=dtype, device=DEVICE))


BAD = [  # (id, args, options, error, message)
    ("rank", lambda: (_qkv()[0][0], *_qkv()[1:]), {}, ValueError, r"q: expected a 4-D"),
    ("not-a-tensor", lambda: (np.zeros((1, 2, 8, 16)), *_qkv()[1:]), {}, TypeError, r"q: .*Tensor"),
    ("float64", lambda: _qkv(dtype=torch.float64), {}, TypeError, r"q: dtype torch.float64"),
    ("mixed-dtypes", lambda: (*_qkv()[:2], _qkv()[2].float()), {}, TypeError,
     r"q, k, v must share one dtype"),
    ("batch", lambda: (_qkv(B=2)[0], *_qkv()[1:]), {}, ValueError, r"k, v: batch sizes differ"),
    ("heads", lambda: _qkv(H=3, H_kv=2), {}, ValueError, r"k: H_kv=2 does not divide H"),
    ("seq-k-v", lambda: (*_qkv()[:2], _qkv(Sk=9)[2]), {}, ValueError, r"v: shape differs"),
    ("head-dim-qk", lambda: (_qkv(D=32)[0], *_qkv()[1:]), {}, ValueError, r"k: head dims differ"),
    ("head-dim-large", lambda: _qkv(D=320, Dv=320), {}, ValueError, r"head_dim \(q, k\).*320"),
    ("causal", _qkv, {"causal": "yes"}, ValueError, r"causal:"),
    ("window-negative", _qkv, {"window": (-1, 2)}, ValueError, r"window:"),
    ("window-arity", _qkv, {"window": (3,)}, ValueError, r"window:"),
    ("kv-range", _qkv, {"kv_lengths": [9]}, ValueError, r"kv_lengths: .* \[0, 8\]"),
    ("kv-shape", _qkv, {"kv_lengths": [1, 2]}, ValueError, r"kv_lengths: expected shape"),
    ("kv-float", _qkv, {"kv_lengths": [1.5]}, TypeError, r"kv_lengths: expected integers"),
    ("kv-tensor", _qkv, {"kv_lengths": torch.tensor([-1])}, ValueError, r"kv_lengths:"),
    ("window-type", _qkv, {"window": (1.5, None)}, TypeError, r"window: left"),
    ("softcap", _qkv, {"softcap": 0.0}, ValueError, r"softcap:"),
    ("scale", _qkv, {"scale": math.nan}, ValueError, r"scale:"),
    ("causal-int", _qkv, {"causal": 2}, ValueError, r"causal:"),
    ("block-q", _qkv, {"block_q": 24}, ValueError, r"block_q: tile sizes are powers of two"),
    ("block-k-type", _qkv, {"block_k": 32.0}, TypeError, r"block_k: expected a positive int"),
]


@pytest.mark.parametrize(("args", "opts", "error", "message"),
                         [pytest.param(*b[1:], id=b[0]) for b in BAD])
def test_bad_input_names_the_argument(args, opts, error, message):
    with pytest.raises(error, match=message):
        flash_attention(*args(), **opts)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setattr(kernels, "INTERPRETED", False)
    q, k, v = (t.cpu() for t in _qkv())
    with pytest.raises(ValueError, match=r"CUDA tensors.*TRITON_INTERPRET=1"):
        flash_attention(q, k, v)


def test_tiles_are_powers_of_two():
    with pytest.raises(ValueError, match="block_q"), op.fixed_blocks(24, 32):
        pass
    with pytest.raises(ValueError, match="block_k"), op.fixed_blocks(32, 8):
        pass


def test_per_call_tiles_match_pinned_tiles_and_take_precedence():
    """block_q/block_k per call give the same answer as fixed_blocks with those sizes (and
    the backward tiles as its forward); a per-call size wins over a pinned one."""
    q, k, v, dout = make_inputs(("tiles", 1, 2, 1, 40, 72, 16, 16, {}), torch.float32)
    pinned = run_triton(q, k, v, dout, {"causal": True}, (16, 64))
    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
    with op.fixed_blocks(32, 32):  # overridden by the call's own sizes
        out, lse = flash_attention(qs, ks, vs, causal=True, block_q=16, block_k=64,
                                   return_lse=True)
    grads = torch.autograd.grad(out, (qs, ks, vs), dout)
    for a, b in zip((out, lse, *grads), (pinned[0], pinned[1], *pinned[2]), strict=True):
        assert torch.equal(a, b)
    assert op.tile_sizes(16, None) == op.Blocks(16, 32)  # the other side: the interpreter's


def test_import_without_triton_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)
    for name in [m for m in sys.modules if m == "flashmath.triton" or
                 m.startswith("flashmath.triton.")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(ImportError, match=r"pip install 'flashmath\[gpu\]'"):
        importlib.import_module("flashmath.triton")


# ---------------------------------------------------------------------------------------
# Full size, compiled and autotuned: only with a GPU
# ---------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("opts", [{}, {"causal": True},
                                  {"causal": True, "window": (256, None), "softcap": 30.0,
                                   "kv_lengths": [1500]}], ids=["full", "causal", "mixed"])
def test_full_size_on_gpu(dtype, head_dim, opts):
    """Compiled, many tiles per row and column; pinned 64x64 tiles (autotuning every case
    would take minutes of compiles: test_autotuned_on_gpu covers that path)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 4, 1024, head_dim, device="cuda", dtype=dtype, generator=gen)
    k, v = (torch.randn(1, 2, 1536, head_dim, device="cuda", dtype=dtype, generator=gen)
            for _ in range(2))
    with op.fixed_blocks(64, 64):
        result = compare_attention(TRITON, q, k, v, grads=True, name="full size", **opts)
    assert result.passed, result.message


@pytest.mark.gpu
@needs_gpu
def test_autotuned_on_gpu():
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 4, 2048, 128, device="cuda", dtype=torch.float16, generator=gen)
               for _ in range(3))
    result = compare_attention(TRITON, q, k, v, grads=True, name="autotuned", causal=True)
    assert result.passed, result.message


@pytest.mark.gpu
@needs_gpu
def test_benchmark_runs_a_row_on_gpu():
    from flashmath.triton import bench

    grid = bench.shapes(head_dims=(64,), seq_lens=(1024,), dtypes=("float16",), causal=(True,))
    (rec,) = bench.run(grid, modes=("fwd",))
    assert rec["flashmath_tflops"] > 0 and "| float16 |" in bench.format_table([rec])


# ---------------------------------------------------------------------------------------
# Autotuning and the benchmark: what can be checked without a GPU
# ---------------------------------------------------------------------------------------


def test_autotune_configs_fit_shared_memory():
    for configs in (kernels.FWD_CONFIGS, kernels.BWD_DKDV_CONFIGS, kernels.BWD_DQ_CONFIGS):
        kept64 = kernels._prune(configs, {"Sq": 4096, "Sk": 4096}, BLOCK_D=64, BLOCK_DV=64)
        kept128 = kernels._prune(configs, {"Sq": 4096, "Sk": 4096}, BLOCK_D=128, BLOCK_DV=128)
        assert kept128 and set(map(str, kept128)) <= set(map(str, kept64))
    import triton

    too_big = triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=4)
    fwd128 = kernels._prune([too_big, *kernels.FWD_CONFIGS], {}, BLOCK_D=128, BLOCK_DV=128)
    assert too_big not in fwd128  # 32 KiB of Q + 4 stages of 64 KiB K/V tiles
    assert len(fwd128) == len(kernels.FWD_CONFIGS)
    for tuned in (kernels.attn_fwd_tuned, kernels.attn_bwd_dkdv_tuned, kernels.attn_bwd_dq_tuned):
        assert {"Sq", "Sk", "HEAD_DIM", "win_right"} <= set(tuned.keys)


def test_benchmark_grid_and_flops():
    from flashmath.triton import bench

    grid = bench.shapes()
    assert len(grid) == 2 * 2 * 2 * 6  # dtypes x head dims x causal x lengths
    assert all(s.batch * s.seq == 16 * 1024 and s.heads * s.head_dim == 2048 for s in grid)
    full = bench.attention_flops(2, 16, 4096, 4096, 128, causal=False, mode="fwd")
    assert full == 4 * 2 * 16 * 4096 * 4096 * 128
    assert bench.attention_flops(2, 16, 4096, 4096, 128, causal=True, mode="fwd") == full / 2
    assert bench.attention_flops(2, 16, 4096, 4096, 128, causal=False, mode="bwd") == 2.5 * full
    assert bench.attention_flops(2, 16, 512, 4096, 128, causal=True, mode="fwd_bwd") == (
        3.5 * 4 * 2 * 16 * 512 * 4096 * 128)  # not square: not halved


def test_benchmark_records_ratios_and_unavailable_backends(monkeypatch):
    """bench.run's bookkeeping with stand-in timings (the real ones need a GPU)."""
    from flashmath.triton import bench

    times = {"flashmath": 2.0, "sdpa_flash": 3.0, "sdpa_cudnn": None}

    def fake_impl(name):
        def impl(q, k, v, causal):
            raise AssertionError("not called")
        impl.ms = times[name]
        return impl

    def fake_time(impl, shape, mode, tensors):
        if impl.ms is None:
            raise RuntimeError("No available kernel. Aborting execution.\nmore")
        return impl.ms

    monkeypatch.setattr(bench, "_impl", fake_impl)
    monkeypatch.setattr(bench, "_time_ms", fake_time)
    grid = [bench.Shape(1, 2, 32, 16, True, "float32")]  # tiny tensors on the CPU
    records = bench.run(grid, modes=("fwd", "bwd"), device="cpu")
    assert [r["mode"] for r in records] == ["fwd", "bwd"]
    fwd = records[0]
    # flashmath time / peer time, as in flashmath.measure.cpu: below 1, flashmath is faster
    assert fwd["flash_ratio_time"] == 2.0 / 3.0 and fwd["cudnn_ratio_time"] is None
    assert fwd["sdpa_cudnn_tflops"] is None and fwd["sdpa_cudnn_error"] == (
        "No available kernel. Aborting execution.")
    assert fwd["flashmath_tflops"] == pytest.approx(fwd["flops"] / 2e-3 / 1e12)
    table = bench.format_table(records)
    assert "| float32 | 16 | 32 | 1 | 2 | yes | fwd |" in table and "| - |" in table


def test_benchmark_script_without_cuda_says_skipped(capsys):
    if CUDA:
        pytest.skip("a CUDA device is present")
    from flashmath.triton import bench

    assert bench.main([]) == 0
    assert capsys.readouterr().out.strip() == "skipped: no CUDA device"


def test_lab_experiment_writes_up_gpu_records(monkeypatch):
    """The sdpa-benchmark experiment's GPU path (summary, figure, README) on stand-in records."""
    from flashmath.lab import sdpa_benchmark
    from flashmath.lab.experiment import Context
    from flashmath.triton import bench

    def fake_run(grid, progress, **_kw):
        recs = []
        for i, s in enumerate(grid):
            for mode in bench.MODES:
                recs.append({**s.__dict__, "mode": mode, "flops": 1e12,
                             "flashmath_ms": 1.0, "flashmath_tflops": 1000.0,
                             "sdpa_flash_ms": 1.0 + i, "sdpa_flash_tflops": 1000 / (1 + i),
                             "sdpa_cudnn_ms": None, "sdpa_cudnn_tflops": None,
                             "flash_ratio_time": 1.0 / (1.0 + i), "cudnn_ratio_time": None})
        return recs

    monkeypatch.setattr(sdpa_benchmark, "_skip_reason", lambda: None)
    monkeypatch.setattr(bench, "run", fake_run)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Stand-in GPU")
    result = sdpa_benchmark.run(Context(name=sdpa_benchmark.NAME, quick=True))
    assert result.summary["status"] == "measured"
    assert result.summary["fwd_worst_vs_flash_ratio_time"] == 1.0
    assert result.summary["fwd_worst_vs_cudnn_ratio_time"] is None
    assert "worst ratio forward 1.00x" in result.headline
    assert "meets the 1.0x target" in result.readme and "| float16 | 64 |" in result.readme
    assert set(result.figures) == {"tflops"}


# ---------------------------------------------------------------------------------------
# The compiled path without a GPU: Triton compiles for an sm_90 target (H100/H200) on CPU
# ---------------------------------------------------------------------------------------

_COMPILE_FOR_HOPPER = """
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.autotuner import Heuristics
from flashmath.triton import kernels as K
assert not K.INTERPRETED
TENSORS = {"Q", "K", "V", "Out", "DO", "DK", "DV", "DQ"}
STATS = {"M2", "L2", "Delta", "DLse", "Alibi", "Sinks"}
FLOATS = {"qk_scale", "cap_scale", "sm_scale"}
INTS = {"KvLen", "CuQ", "CuK", "BlockTable", "MaskData"}
STATS |= {"ScoreData"}
def build(fn, consts, dt):
    sig = {n: "constexpr" if n in consts else f"*{dt}" if n in TENSORS else "*fp32" if n in STATS
           else "*i32" if n in INTS else "*u8" if n == "Kinds" else "fp32" if n in FLOATS
           else "i32" for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig,
                    constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": 4, "num_stages": 2})
    return "wgmma" in k.asm["ptx"]
from flashmath.triton import mods as M
# every option on with padded head dims, packed sequences and mods (document mask, block
# mask, softcap score_mod; 64-row tiles: wgmma); then none, bfloat16, top-left, and the
# forward over a paged cache
for dt, dtype, d, dv, extras, block in (("fp16", tl.float16, 48, 24, True, 64),
                                        ("bf16", tl.bfloat16, 64, 64, False, 32)):
    c = dict(HEAD_DIM=d, HEAD_DIM_V=dv, BLOCK_D=64, BLOCK_DV=max(16, triton.next_power_of_2(dv)),
             ALIGN_BOTTOM=extras, HAS_KV_LEN=extras, SOFTCAP=extras, HAS_ALIBI=extras,
             PRECISION="tf32", VARLEN=extras, HAS_MASK_MOD=extras, HAS_SCORE_MOD=extras,
             HAS_BLOCK_MASK=extras, MASK_FN=M._document_fn if extras else None,
             SCORE_FN=M._softcap_fn if extras else None,
             SCORE_GRAD=M._softcap_grad if extras else None,
             DTYPE=dtype, DOT=dtype, BLOCK_M=block, BLOCK_N=block, LEAD=extras, TRAIL=True)
    for kernel in (K.attn_fwd, K.attn_bwd_dkdv, K.attn_bwd_dq):
        fn = kernel.fn if isinstance(kernel, Heuristics) else kernel  # the jit function
        kc = dict(c, HAS_SINKS=extras, PAGE=0 if extras else 16) if "PAGE" in fn.arg_names else c
        print(dt, fn.__name__, "wgmma" if build(fn, kc, dt) else "no-wgmma")
    build(K.attn_bwd_preprocess, dict(HEAD_DIM_V=dv, BLOCK_DV=c["BLOCK_DV"], HAS_DLSE=True,
                                      BLOCK_M=64), dt)
"""


@pytest.mark.slow
def test_kernels_compile_for_hopper_without_a_gpu():
    """The interpreter runs the kernels as Python; this compiles them as the GPU would (to
    sm_90 machine code with ptxas), so compiled-mode-only mistakes fail here too."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_FOR_HOPPER], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.split("\n")
    assert sum("wgmma" == line.split()[-1] for line in lines if line) == 3  # Hopper MMA


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sinks_gradient_and_lse_match_the_oracle(dtype):
    """The sinks are learnable: their gradient (through out and through lse) against the
    float64 oracle's, and lse includes them (a row with nothing else gives lse = sink)."""
    case = next(c for c in CASES if c[0] == "sinks")
    q, k, v, dout = make_inputs(case, dtype)
    opts = {key: val for key, val in case[-1].items() if key != "sinks"}
    sinks = torch.tensor([0.5, -1.0, 3.0, -4.0], dtype=torch.float32, requires_grad=True)
    dlse = torch.randn(q.shape[:3], generator=torch.Generator().manual_seed(3))
    with op.fixed_blocks(16, 16):
        out, lse = flash_attention(q, k, v, sinks=sinks, return_lse=True, **opts)
    ((out.float() * dout.float()).sum() + (lse * dlse).sum()).backward()
    np_in = [numpy_of(t) for t in (q, k, v, dout)]
    ref_out, ref_lse = fm.attention_reference(*np_in[:3], sinks=sinks.detach().numpy(),
                                              return_lse=True, **opts)
    *_, ref_ds = fm.attention_reference_backward(np_in[3], *np_in[:3],
                                                 sinks=sinks.detach().numpy(),
                                                 dlse=dlse.numpy(), **opts)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    np.testing.assert_allclose(lse.detach().cpu().numpy(), ref_lse, atol=1e-4)
    np.testing.assert_allclose(out.detach().float().cpu().numpy(), ref_out, atol=tol)
    np.testing.assert_allclose(sinks.grad.numpy(), ref_ds, rtol=1e-2, atol=tol)
