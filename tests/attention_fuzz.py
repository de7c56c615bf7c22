"""The accuracy fuzz of the tiled kernels: random small adversarial problems, judged against
two baselines (used by tests/test_attention_fuzz.py and benchmarks/fuzz_attention.py).

Each case is a random small problem (B <= 2, H <= 4 with GQA/MQA, Sq and Sk in 1..69,
D in {1, 3, 8, 16, 33, 64}, input magnitudes up to 12, causal of both alignments, sliding
windows, kv_lengths, q_lengths) in one dtype. flashmath's max error against the float64
oracle (out, dq, dk, dv) is divided by each baseline's:

``naive``  flashmath's own ``attention_reference(upcast=False)`` (every operation rounded
           to the input dtype);
``torch``  the same formula in torch ops in the input dtype: matmuls accumulate in
           float32 and round once (as fp16 hardware does), softmax is torch's.

The rule (docs/conventions.md): ratio <= 2 for out, <= 3 for the gradients. A flashmath
error at or below :data:`EXACT` epsilons of the dtype (relative to the oracle's
magnitude) counts as exact (ratio 0): rows whose softmax has one visible key have
dq = dk = 0, which a baseline can hit exactly while any other summation order leaves
1e-17. So does a result within half an ulp of the oracle in every element (correctly
rounded: no result in that dtype can be closer; on tiny problems a baseline's error can
be a lucky 0.1 ulp, and the ratio then says nothing).

float64 cases are judged against the oracle alone (relative error <= 1e-12). Some cases
carry a NaN or an infinity in one q or k entry; those check the NaN policy of the forward
(the rows whose scores it reaches are NaN, the others finite) instead of the ratios; every
other case must be finite wherever the oracle is.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import flashmath as fm
from flashmath.attention.options import resolve
from flashmath.attention.schedule import (
    FAST_MIN_BAND,
    FAST_MIN_DIM,
    FAST_MIN_KEYS,
    FAST_MIN_OUTPUTS,
    Plan,
)
from flashmath.dtypes import as_dtype, dtype_name, finfo

OUTPUTS = ("out", "dq", "dk", "dv")
FACTORS = {"out": 2.0, "dq": 3.0, "dk": 3.0, "dv": 3.0}
BASELINES = ("naive", "torch")
#: flashmath errors at or below EXACT epsilons of the dtype times max(1, max|oracle|)
#: count as exact (1e-10 relative in float32, 1e-6 in float16).
EXACT = 2.0**-10
#: float64: max error <= FLOAT64_REL * max(1, max|oracle|).
FLOAT64_REL = 1e-12
DIMS = (1, 3, 8, 16, 33, 64)


def _medium_shape(rng: np.random.Generator) -> tuple[int, int, int, int, int, int, int]:
    """(b, h, h_kv, sq, sk, d, dv) of a problem on the float32 fast path (the smallest
    sizes it takes: B H Sq Dv >= 2 FAST_MIN_OUTPUTS, Sk >= FAST_MIN_KEYS, up to 4x those,
    D, Dv >= FAST_MIN_DIM), small enough for the oracle's dense float64 scores (<= 2^23)."""
    while True:
        b = int(rng.integers(1, 3))
        h = int(rng.choice([1, 2, 4]))
        h_kv = int(rng.choice([x for x in (1, 2, 4) if h % x == 0]))
        dims = [x for x in DIMS if x >= FAST_MIN_DIM]
        d = int(rng.choice(dims))
        dv = d if rng.random() < 0.8 else int(rng.choice(dims))
        sk = int(rng.integers(FAST_MIN_KEYS, 4 * FAST_MIN_KEYS))
        need = -(-2 * FAST_MIN_OUTPUTS // (b * h * dv))  # q_lengths may halve the rows
        sq = int(rng.integers(need, 4 * need + 1))
        if b * h * sq * sk <= 2**23:
            return b, h, h_kv, sq, sk, d, dv


def random_case(rng: np.random.Generator, dtype: str, medium: bool = False) -> dict[str, Any]:
    """One random problem: q, k, v, dout (float64 values, rounded to dtype later), the
    options, the block sizes and whether a non-finite value was planted. medium: a problem
    on the float32 fast path (a shape from :func:`_medium_shape`; drawn again while a
    window or the lengths leave too few rows that see a key for the fast path)."""
    for _ in range(1000):
        case = _draw_case(rng, dtype, medium)
        if not medium or _on_fast_path(case):
            return case
    raise RuntimeError("random_case: no medium case drawn took the fast path "
                       "(is schedule.FORCE_FAST False?)")


def _on_fast_path(case: dict[str, Any]) -> bool:
    q, k, v = (np.asarray(case[x], np.float32) for x in ("q", "k", "v"))
    return Plan.build(q, k, v, block_q=case["blocks"][0], block_k=case["blocks"][1],
                      **case["options"]).fast


def _draw_case(rng: np.random.Generator, dtype: str, medium: bool) -> dict[str, Any]:
    if medium:
        b, h, h_kv, sq, sk, d, dv = _medium_shape(rng)
    else:
        b = int(rng.integers(1, 3))
        h = int(rng.choice([1, 2, 4]))
        h_kv = int(rng.choice([x for x in (1, 2, 4) if h % x == 0]))
        sq, sk = (int(x) for x in rng.integers(1, 70, 2))
        d = int(rng.choice(DIMS))
        dv = d if rng.random() < 0.8 else int(rng.choice(DIMS))
    amp_q, amp_k = (float(rng.choice([0.5, 1.0, 2.0, 4.0, 8.0, 12.0])) for _ in range(2))
    q = amp_q * rng.standard_normal((b, h, sq, d))
    k = amp_k * rng.standard_normal((b, h_kv, sk, d))
    v = float(rng.choice([1.0, 4.0])) * rng.standard_normal((b, h_kv, sk, dv))
    dout = rng.standard_normal((b, h, sq, dv))
    opts: dict[str, Any] = {}
    wide = FAST_MIN_BAND if medium else 0  # medium: windows the fast path takes
    r = rng.random()
    if r < 0.3:
        opts["causal"] = True
    elif r < 0.45:
        opts["causal"] = "top_left"
    elif r < 0.6:
        opts["causal"] = True
        opts["window"] = (int(rng.integers(0, 8)) + wide, 0)
    elif r < 0.7:
        left, right = int(rng.integers(0, 10)), int(rng.integers(0, 10))
        opts["window"] = (left + wide // 2, right + wide // 2)
    if rng.random() < 0.25:
        opts["kv_lengths"] = rng.integers(0, sk + 1, b)
        if medium:  # the fast path needs every nonzero kv_length >= FAST_MIN_BAND
            opts["kv_lengths"] = np.maximum(opts["kv_lengths"], FAST_MIN_BAND)
    if rng.random() < 0.1:
        opts["q_lengths"] = rng.integers(sq // 2 if medium else 0, sq + 1, b)
    blocks = (None, None)
    if rng.random() < 0.4:
        top = 257 if medium else 33
        blocks = (int(rng.integers(1, top)), int(rng.integers(1, top)))
    planted = False
    if rng.random() < 0.03:
        planted = True
        arr = [q, k][int(rng.integers(0, 2))]
        idx = tuple(int(rng.integers(0, n)) for n in arr.shape)
        arr[idx] = [np.nan, np.inf, -np.inf][int(rng.integers(0, 3))]
    return {"q": q, "k": k, "v": v, "dout": dout, "options": opts, "blocks": blocks,
            "dtype": dtype, "planted": planted}


def torch_baseline(q: np.ndarray, k: np.ndarray, v: np.ndarray, dout: np.ndarray,
                   **options: Any) -> tuple[np.ndarray, ...]:
    """(out, dq, dk, dv) by the textbook formula in torch ops in the inputs' dtype: matmuls
    accumulate in float32 and round once; scale, mask and softmax run in the dtype. Rows
    with nothing to attend to give 0 (and zero gradients)."""
    import torch

    _, _, _, opts = resolve(q, k, v, **options)
    dt = fm.dtypes.to_torch(np.zeros(1, q.dtype)).dtype

    def mm(a: Any, b: Any) -> Any:
        return (a.float() @ b.float()).to(dt)

    tq, tk, tv = (fm.dtypes.to_torch(x, copy=True).requires_grad_() for x in (q, k, v))
    tdo = fm.dtypes.to_torch(dout, copy=True)
    g = opts.group
    kk, vv = tk.repeat_interleave(g, dim=1), tv.repeat_interleave(g, dim=1)
    ok = torch.from_numpy(np.ascontiguousarray(opts.spec.dense()))
    s = mm(tq, kk.transpose(-1, -2)) * opts.scale
    s = s.masked_fill(~ok, float("-inf"))
    empty = ~ok.any(dim=-1, keepdim=True)
    s = torch.where(empty, torch.zeros((), dtype=dt), s)
    p = torch.softmax(s, dim=-1)
    p = torch.where(empty, torch.zeros((), dtype=dt), p)
    out = mm(p, vv)
    out.backward(tdo)
    return tuple(fm.dtypes.from_torch(x).copy()
                 for x in (out, tq.grad, tk.grad, tv.grad))  # type: ignore[union-attr]


def torch_style_forward_error(case: Any) -> float:
    """Max |out - oracle| of :func:`torch_baseline` on a battery case's forward (its
    ``inputs`` and ``options``): how far the textbook formula in torch ops lands.

    On tiny float32 problems whose scores are large (|s| ~ 1000) the max error of any
    float32 dot-then-softmax is decided by the dot's summation order: torch's and the
    naive NumPy formula's differ by 3-4x on the battery's large-score cases, depending on
    the machine's BLAS kernels. Tests use this as the second baseline there."""
    from flashmath.conformance.oracle import expected

    q, k, v, dout = (case.inputs[n] for n in ("q", "k", "v", "dout"))
    out = torch_baseline(q, k, v, dout, **case.options)[0]
    return _err(out, np.asarray(expected(case, False).oracle.out, np.float64))


def _err(x: np.ndarray, ref: np.ndarray) -> float:
    d = np.abs(np.asarray(x, np.float64) - ref)
    d = d[np.isfinite(ref)]
    return float(np.max(d, initial=0.0))


def ulp(ref: np.ndarray, dt: np.dtype[Any]) -> np.ndarray:
    """The unit in the last place of dtype dt at each (finite) value of ref, float64
    (subnormals: the smallest normal's)."""
    fi = finfo(dt)
    with np.errstate(divide="ignore"):
        return np.exp2(np.floor(np.log2(np.maximum(np.abs(ref), float(fi.tiny))))) * float(fi.eps)


def correctly_rounded(x: np.ndarray, ref: np.ndarray, dt: np.dtype[Any]) -> bool:
    """Whether every element of x is within half a unit in the last place (of dtype dt) of
    the oracle: the best any result in that dtype can be."""
    fin = np.isfinite(ref)
    d = np.abs(np.asarray(x, np.float64)[fin] - ref[fin])
    return bool((d <= 0.5 * ulp(ref[fin], dt)).all())


def _magnitude(ref: np.ndarray) -> float:
    return max(1.0, float(np.max(np.abs(ref[np.isfinite(ref)]), initial=0.0)))


def _nan_policy_ok(q: np.ndarray, k: np.ndarray, opts: Any, out: np.ndarray) -> bool:
    """The NaN policy (docs/conventions.md) on its own terms, for a non-finite value planted
    in q or k: a row whose visible scores hold +inf or NaN is NaN; a row whose q and
    visible keys are finite is finite (a -inf score is only a masked key)."""
    g = opts.group
    ok = np.broadcast_to(opts.spec.dense(), (opts.batch, opts.heads, opts.sq, opts.sk))
    q_bad = ~np.isfinite(np.asarray(q, np.float64)).all(axis=-1)
    k_bad = np.repeat(~np.isfinite(np.asarray(k, np.float64)).all(axis=-1), g, axis=1)
    row_bad = q_bad | (ok & k_bad[:, :, None, :]).any(axis=-1)  # (B, H, Sq)
    with np.errstate(all="ignore"):
        s = np.einsum("bhid,bhjd->bhij", np.asarray(q, np.float64),
                      np.repeat(np.asarray(k, np.float64), g, axis=1)) * opts.scale
    hot = (ok & (np.isnan(s) | (s == np.inf))).any(axis=-1)
    o = np.asarray(out, np.float64)
    return bool(np.isfinite(o)[~row_bad].all() and np.isnan(o)[hot].all())


def judge(case: dict[str, Any], *, use_torch: bool = True) -> dict[str, Any]:
    """Errors and ratios of one case. Returns {"nan_ok": bool, "float64_rel": float or
    None, "ratios": {baseline: {output: (judged ratio, raw ratio)}}} (ratios empty for
    float64 and for cases with a planted non-finite value); the judged ratio is 0 where
    flashmath is exact enough (:data:`EXACT`, correctly rounded)."""
    dt = as_dtype(case["dtype"])
    q, k, v, do = (np.asarray(case[x]).astype(dt) for x in ("q", "k", "v", "dout"))
    opts, (bq, bk) = case["options"], case["blocks"]
    out, lse = fm.flash_attention(q, k, v, block_q=bq, block_k=bk, return_lse=True, **opts)
    grads = fm.flash_attention_backward(do, q, k, v, out, lse, block_q=bq, block_k=bk, **opts)
    mine = dict(zip(OUTPUTS, (out, *grads), strict=True))
    ref = dict(zip(OUTPUTS, (fm.attention_reference(q, k, v, **opts),
                             *fm.attention_reference_backward(do, q, k, v, **opts)), strict=True))
    rec: dict[str, Any] = {"nan_ok": True, "float64_rel": None, "ratios": {}}
    if case["planted"]:
        rec["nan_ok"] = _nan_policy_ok(q, k, resolve(q, k, v, **opts)[3], out)
        return rec
    rec["nan_ok"] = all(  # nothing planted: finite wherever the oracle is
        np.isfinite(np.asarray(mine[x], np.float64))[np.isfinite(ref[x])].all() for x in OUTPUTS)
    if dt == np.float64:
        rec["float64_rel"] = max(_err(mine[x], ref[x]) / _magnitude(ref[x]) for x in OUTPUTS)
        return rec
    bases: dict[str, dict[str, np.ndarray]] = {"naive": dict(zip(OUTPUTS, (
        fm.attention_reference(q, k, v, upcast=False, **opts),
        *fm.attention_reference_backward(do, q, k, v, upcast=False, **opts)), strict=True))}
    if use_torch:
        bases["torch"] = dict(zip(OUTPUTS, torch_baseline(q, k, v, do, **opts), strict=True))
    exact = EXACT * float(finfo(dt).eps)
    for name, base in bases.items():
        ratios = {}
        for x in OUTPUTS:
            err, base_err = _err(mine[x], ref[x]), _err(base[x], ref[x])
            exact_enough = (err <= exact * _magnitude(ref[x])
                            or correctly_rounded(mine[x], ref[x], dt))
            raw = err / base_err if base_err > 0 else (0.0 if err == 0 else float("inf"))
            # (judged ratio, raw ratio): the judged one is 0 when flashmath is exact enough
            ratios[x] = (0.0 if exact_enough else raw, raw)
        rec["ratios"][name] = ratios
    return rec


@dataclass
class Stats:
    """Aggregated fuzz results."""

    cases: int = 0
    nan_breaks: list[int] = field(default_factory=list)
    float64_worst: float = 0.0
    float64_cases: int = 0
    #: (dtype, baseline, output) -> [(judged ratio, case index)]
    ratios: dict[tuple[str, str, str], list[tuple[float, int]]] = field(default_factory=dict)
    #: (dtype, baseline, output) -> raw ratios (err / baseline err, exact cases included)
    raw: dict[tuple[str, str, str], list[float]] = field(default_factory=dict)

    def over(self) -> dict[tuple[str, str, str], list[tuple[float, int]]]:
        return {key: [(r, i) for r, i in rs if r > FACTORS[key[2]]]
                for key, rs in self.ratios.items()}

    def table(self) -> list[dict[str, Any]]:
        rows = []
        for (dtype, base, x), rs in sorted(self.ratios.items()):
            vals = [r for r, _ in rs]
            raw = [r for r in self.raw[(dtype, base, x)] if np.isfinite(r)]
            rows.append({"dtype": dtype, "baseline": base, "output": x, "cases": len(vals),
                         "median": statistics.median(raw), "max": max(vals),
                         "raw_max": max(raw), "over": sum(r > FACTORS[x] for r in vals),
                         "exact": sum(r == 0 for r in vals)})
        return rows


def run_fuzz(n: int, seed: int, dtypes: tuple[str, ...] = ("float32", "float16", "bfloat16"),
             *, float64_every: int = 10, use_torch: bool = True, medium: bool = False) -> Stats:
    """n cases per dtype in ``dtypes`` (plus one float64 case every ``float64_every``);
    medium: the shapes of the float32 fast path (:func:`random_case`)."""
    rng = np.random.default_rng(seed)
    stats = Stats()
    todo = [dt for i in range(n) for dt in dtypes]
    todo += ["float64"] * (n // float64_every if float64_every else 0)
    for i, dt in enumerate(todo):
        case = random_case(rng, dt, medium)
        rec = judge(case, use_torch=use_torch)
        stats.cases += 1
        if not rec["nan_ok"]:
            stats.nan_breaks.append(i)
        if rec["float64_rel"] is not None:
            stats.float64_cases += 1
            stats.float64_worst = max(stats.float64_worst, rec["float64_rel"])
        for base, ratios in rec["ratios"].items():
            for x, (r, raw) in ratios.items():
                key = (dtype_name(as_dtype(dt)), base, x)
                stats.ratios.setdefault(key, []).append((r, i))
                stats.raw.setdefault(key, []).append(raw)
    return stats


def replay(seed: int, index: int, n: int,
           dtypes: tuple[str, ...] = ("float32", "float16", "bfloat16"),
           float64_every: int = 10) -> dict[str, Any]:
    """The case ``index`` of run_fuzz(n, seed, dtypes, float64_every=...), to debug it."""
    rng = np.random.default_rng(seed)
    todo = [dt for i in range(n) for dt in dtypes]
    todo += ["float64"] * (n // float64_every if float64_every else 0)
    for i, dt in enumerate(todo):
        case = random_case(rng, dt)
        if i == index:
            return case
    raise IndexError(index)
