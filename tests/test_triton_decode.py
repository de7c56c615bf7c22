"""flashmath.triton.flash_decode: a contiguous or paged KV cache, appends in place, against
the float64 oracle on the contiguous cache and against flashmath.flash_decode (NumPy).

Without a GPU the kernels run in Triton's CPU interpreter (see tests/test_triton.py).
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.triton_setup import DEVICE, torch

assert DEVICE  # the interpreter is chosen above, before flashmath.triton's import

import flashmath as fm  # noqa: E402
from flashmath.conformance.judge import OUT_LIMIT  # noqa: E402
from flashmath.triton import flash_decode  # noqa: E402


def _np(t):
    return t.detach().float().cpu().numpy()


def _cache(B, H, Hkv, Sq, Sk, D, Dv, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Sq, D, generator=gen).to(DEVICE, dtype)
    k = torch.randn(B, Hkv, Sk, D, generator=gen).to(DEVICE, dtype)
    v = torch.randn(B, Hkv, Sk, Dv, generator=gen).to(DEVICE, dtype)
    return q, k, v


def _paged(k, v, page, rng, spare=3):
    """The contiguous cache (B, H_kv, Sk, D) scattered into shuffled pages, with junk (NaN)
    in pages no sequence uses and -1 in table slots past what the capacity needs."""
    B, Hkv, Sk, _ = k.shape
    per_seq = -(-Sk // page)
    n_pages = B * per_seq + spare
    order = rng.permutation(n_pages)[: B * per_seq].reshape(B, per_seq)
    kc = torch.full((n_pages, Hkv, page, k.shape[3]), float("nan"), dtype=k.dtype, device=DEVICE)
    vc = torch.full((n_pages, Hkv, page, v.shape[3]), float("nan"), dtype=v.dtype, device=DEVICE)
    for b in range(B):
        for p in range(per_seq):
            rows = slice(p * page, min((p + 1) * page, Sk))
            n = rows.stop - rows.start
            kc[order[b, p], :, :n] = k[b, :, rows]
            vc[order[b, p], :, :n] = v[b, :, rows]
    table = np.concatenate([order, np.full((B, 1), -1)], axis=1).astype(np.int32)
    return kc, vc, table


def _judge(got, q, k, v, opts):
    """out within 2x the naive same-dtype error (floor: 2 ulps) of the float64 oracle."""
    dt = fm.dtypes.as_dtype(str(q.dtype)[6:])
    arrays = [_np(t).astype(dt) for t in (q, k, v)]
    exact = fm.attention_reference(*(a.astype(np.float64) for a in arrays), **opts)
    naive = fm.attention_reference(*arrays, **opts, upcast=False)
    eps = float(torch.finfo(q.dtype).eps)
    err = np.abs(_np(got) - exact).max()
    ref = max(np.abs(np.asarray(naive, np.float64) - exact).max(), eps * np.abs(exact).max())
    assert err <= OUT_LIMIT * ref, f"out: error {err:.3g} > {OUT_LIMIT} x {ref:.3g}"
    return exact


#   id              B  H Hkv Sq  Sk  D  Dv  lengths      options
CASES = [
    ("one-query",   3, 4, 2, 1, 70, 16, 16, [70, 33, 1],  {}),
    ("causal-spec", 2, 2, 2, 4, 50, 16, 16, [50, 21],     {"causal": True}),
    ("window",      2, 2, 1, 3, 64, 24, 8,  [64, 40],     {"causal": True, "window": (9, 0)}),
    ("empty",       2, 2, 2, 2, 40, 16, 16, [0, 17],      {"causal": True}),
    ("softcap",     1, 2, 2, 1, 45, 16, 16, [45],         {"softcap": 2.5}),
    ("alibi-sinks", 2, 2, 2, 2, 48, 16, 16, [48, 10],
     {"causal": True, "alibi_slopes": np.array([0.5, 0.25]), "sinks": np.array([1.0, -2.0])}),
]


@pytest.mark.parametrize("page", [0, 16, 7], ids=["contiguous", "page16", "page7"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32],
                         ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_against_the_oracle(case, dtype, page):
    """Pages that divide the lengths and pages that do not (7), unused pages full of NaN."""
    _, B, H, Hkv, Sq, Sk, D, Dv, lengths, opts = case
    q, k, v = _cache(B, H, Hkv, Sq, Sk, D, Dv, dtype)
    for b, n in enumerate(lengths):  # padding past each length is never read
        k[b, :, n:] = float("nan")
        v[b, :, n:] = float("nan")
    if page:
        kc, vc, table = _paged(k, v, page, np.random.default_rng(1))
        got, lse = flash_decode(q, kc, vc, kv_lengths=lengths, block_table=table, **opts,
                                return_lse=True)
    else:
        got, lse = flash_decode(q, k, v, kv_lengths=lengths, **opts, return_lse=True)
    assert not torch.isnan(got).any() and not torch.isnan(lse).any()
    _judge(got, q, torch.nan_to_num(k), torch.nan_to_num(v), {**opts, "kv_lengths": lengths})
    dt = fm.dtypes.as_dtype(str(q.dtype)[6:])
    _, want = fm.attention_reference(*(_np(t).astype(dt).astype(np.float64)
                                       for t in (q, torch.nan_to_num(k), torch.nan_to_num(v))),
                                     **opts, kv_lengths=lengths, return_lse=True)
    np.testing.assert_array_equal(np.isneginf(_np(lse)), np.isneginf(want))
    fin = np.isfinite(want)
    np.testing.assert_allclose(_np(lse)[fin], want[fin], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("page", [0, 16, 5], ids=["contiguous", "page16", "page5"])
def test_appends_in_place_then_attends_like_numpy(page):
    """k_new/v_new land at each sequence's length (across page boundaries), and the result
    equals flashmath.flash_decode on the same cache and append (chunked prefill: Sq = S_new
    queries, causal)."""
    B, H, Hkv, S_new, Sk, D = 2, 4, 2, 3, 40, 16
    lengths = [21, 9]
    q, k, v = _cache(B, H, Hkv, S_new, Sk, D, D, torch.float32)
    gen = torch.Generator().manual_seed(7)
    k_new = torch.randn(B, Hkv, S_new, D, generator=gen).to(DEVICE)
    v_new = torch.randn(B, Hkv, S_new, D, generator=gen).to(DEVICE)
    if page:
        kc, vc, table = _paged(k, v, page, np.random.default_rng(2))
        kn, vn = (np.nan_to_num(_np(t)) for t in (kc, vc))
        extra = {"block_table": table}
    else:
        kc, vc = k.clone(), v.clone()
        kn, vn = _np(kc), _np(vc)
        extra = {}
    got = flash_decode(q, kc, vc, kv_lengths=lengths, k_new=k_new, v_new=v_new, causal=True,
                       **extra)
    want = fm.flash_decode(_np(q), kn, vn, kv_lengths=lengths, k_new=_np(k_new),
                           v_new=_np(v_new), causal=True, **extra)
    np.testing.assert_allclose(_np(got), want, atol=3e-6)
    np.testing.assert_array_equal(np.nan_to_num(_np(kc)), kn)  # the same cells written
    np.testing.assert_array_equal(np.nan_to_num(_np(vc)), vn)


def test_a_full_cache_and_no_lengths_attends_every_key():
    q, k, v = _cache(1, 2, 2, 1, 33, 16, 16, torch.float16)
    got = flash_decode(q, k, v)
    _judge(got, q, k, v, {})


def _qkv(B=1, H=2, Hkv=2, Sq=1, Sk=32, D=16):
    return _cache(B, H, Hkv, Sq, Sk, D, D, torch.float16)


def _pages(n=4, Hkv=2, page=16, D=16):
    return (torch.zeros(n, Hkv, page, D, dtype=torch.float16, device=DEVICE),
            torch.zeros(n, Hkv, page, D, dtype=torch.float16, device=DEVICE))


TABLE = np.array([[0, 1]], np.int32)
BAD = [  # (id, call, error, message)
    ("cache-shape", lambda: flash_decode(_qkv()[0], _qkv()[1][0], _qkv()[2]), ValueError,
     r"k_cache: expected a 4-D array"),
    ("cache-dtype", lambda: flash_decode(*_qkv()[:2], _qkv()[2].float()), TypeError,
     r"q, k_cache, v_cache must share one dtype"),
    ("lengths-range", lambda: flash_decode(*_qkv(), kv_lengths=[33]), ValueError,
     r"kv_lengths: .* \[0, 32\]"),
    ("paged-rank", lambda: flash_decode(_qkv()[0], _pages()[0][0], _pages()[1],
                                        block_table=TABLE), ValueError,
     r"k_cache: a paged cache is 4-D"),
    ("page-index", lambda: flash_decode(_qkv()[0], *_pages(), block_table=[[0, 4]],
                                        kv_lengths=[20]), ValueError,
     r"block_table\[0, 1\] = 4 is not a page index in \[0, 4\)"),
    ("table-short", lambda: flash_decode(_qkv()[0], *_pages(), block_table=TABLE,
                                         kv_lengths=[40]), ValueError,
     r"block_table: sequence 0 needs 3 pages for 40 keys"),
    ("table-shape", lambda: flash_decode(_qkv()[0], *_pages(), block_table=[0, 1]), ValueError,
     r"block_table: expected shape \(B, max_pages\)"),
    ("table-float", lambda: flash_decode(_qkv()[0], *_pages(), block_table=TABLE * 1.0),
     TypeError, r"block_table: expected integers"),
    ("append-one", lambda: flash_decode(*_qkv(), kv_lengths=[3], k_new=_qkv()[1][:, :, :1]),
     ValueError, r"k_new, v_new: give both"),
    ("append-full", lambda: flash_decode(*_qkv(), kv_lengths=[31], k_new=_qkv()[1][:, :, :2],
                                         v_new=_qkv()[2][:, :, :2]), ValueError,
     r"k_new: sequence 0 has 31 keys and 2 new ones, more than the cache holds \(32\)"),
    ("append-paged-full", lambda: flash_decode(_qkv()[0], *_pages(), block_table=TABLE,
                                               kv_lengths=[31], k_new=_qkv()[1][:, :, :2],
                                               v_new=_qkv()[2][:, :, :2]), ValueError,
     r"k_new: sequence 0 has 31 keys and 2 new ones"),
    ("append-dtype", lambda: flash_decode(*_qkv(), kv_lengths=[3],
                                          k_new=_qkv()[1][:, :, :1].float(),
                                          v_new=_qkv()[2][:, :, :1]), TypeError, r"k_new"),
    ("append-heads", lambda: flash_decode(*_qkv(), kv_lengths=[3],
                                          k_new=_qkv(Hkv=1)[1][:, :, :1],
                                          v_new=_qkv(Hkv=1)[2][:, :, :1]), ValueError,
     r"k_new, v_new: expected \(B, H_kv, S_new, D\|Dv\) with H_kv=2"),
    ("causal", lambda: flash_decode(*_qkv(), causal="bogus"), ValueError, r"causal:"),
    ("softcap", lambda: flash_decode(*_qkv(), softcap=-1.0), ValueError, r"softcap:"),
    ("sinks", lambda: flash_decode(*_qkv(), sinks=[1.0]), ValueError, r"sinks"),
]


def test_a_refused_call_leaves_the_cache_as_it_was():
    """Every argument is checked before k_new is written into the cache."""
    q, k, v = _qkv()
    before = k.clone()
    with pytest.raises(ValueError, match="block_k"):
        flash_decode(q, k, v, kv_lengths=[3], k_new=torch.ones_like(k[:, :, :1]),
                     v_new=torch.ones_like(v[:, :, :1]), block_k=24)
    assert torch.equal(k, before)


@pytest.mark.parametrize(("call", "error", "message"),
                         [pytest.param(*b[1:], id=b[0]) for b in BAD])
def test_bad_input_names_the_argument(call, error, message):
    with pytest.raises(error, match=message):
        call()
