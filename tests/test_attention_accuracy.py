"""The accuracy rule (DESIGN.md) in float32, float16 and bfloat16.

flashmath's max error against the float64 oracle is at most 2x (output) and 3x
(gradients) the naive same-dtype reference's; how often it is at or below 1x is recorded
(``record_property``, visible with ``pytest --junitxml``) and held to a floor.
test_float32_rule_random checks the rule on every one of 300 seeded random float32 cases.
"""

from __future__ import annotations

import numpy as np
import pytest

import flashmath as fm
from flashmath.attention import schedule
from flashmath.conformance import accuracy_rule
from tests.attention_cases import options, qkv

CASES = [  # (B, H, H_kv, Sq, Sk, D, option set, input scale, block_q, block_k)
    (1, 2, 2, 64, 64, 16, "plain", 1.0, None, None),
    (1, 2, 2, 64, 64, 16, "plain", 3.0, 16, 16),
    (1, 2, 1, 40, 96, 33, "causal", 2.0, 16, 32),
    (2, 2, 2, 96, 40, 8, "top_left", 2.0, 32, 16),
    (1, 4, 2, 70, 70, 24, "sliding", 2.0, 16, 16),
    (1, 2, 2, 50, 80, 16, "alibi", 2.0, None, None),
    (1, 2, 2, 50, 80, 16, "softcap_bias_causal", 3.0, 16, 32),
    (2, 2, 2, 48, 64, 16, "lengths_causal", 2.0, 16, 16),
    (1, 2, 2, 1, 128, 64, "plain", 2.0, None, None),
    (1, 2, 2, 128, 1, 64, "plain", 2.0, None, None),
    (1, 2, 2, 33, 57, 111, "everything", 1.0, 8, 16),
    (1, 1, 1, 128, 256, 128, "mask", 1.5, 32, 64),
]

#: Floors for how often flashmath's error is at or below 1x the naive one, over every
#: (case, quantity) pair. float16/bfloat16: the naive formula rounds at every step,
#: flashmath once at the end, so it is nearly always below (measured: every pair, worst
#: 1.0x). float32: both compute in float32 and the ratio scatters around 1 (measured:
#: 79% of pairs at or below 1x, worst 1.19x, median 0.95).
FLOOR_AT_OR_BELOW_1X = {"float32": 0.6, "float16": 0.9, "bfloat16": 0.9}
QUANTITIES = ("out", "dq", "dk", "dv")


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_accuracy_rule(dtype, record_property):
    records = []
    for i, (b, h, h_kv, sq, sk, d, name, amp, bq, bk) in enumerate(CASES):
        rng = np.random.default_rng([i, sq, sk])
        q, k, v = qkv(rng, b, h, sq, sk, d, h_kv=h_kv)
        dout = rng.standard_normal((b, h, sq, d))
        rec = accuracy_rule(amp * q, amp * k, v, dtype=dtype, dout=dout, block_q=bq,
                            block_k=bk, **options(name, rng, b, h, sq, sk))
        assert rec["passes"], (name, rec)
        records.append(rec)
    below = {x: float(np.mean([r[f"{x}_ratio"] <= 1 for r in records])) for x in QUANTITIES}
    worst = {x: max(r[f"{x}_ratio"] for r in records) for x in QUANTITIES}
    rate = float(np.mean(list(below.values())))
    record_property(f"{dtype}_at_or_below_1x", below)
    record_property(f"{dtype}_worst_ratio", worst)
    assert rate >= FLOOR_AT_OR_BELOW_1X[dtype], (below, worst)



#: Degenerate gradients: a row whose softmax has a single visible key has exactly zero dq
#: and dk (dp - delta = do . v - do . v); the naive formula can land on exactly 0 while
#: flashmath's float64 dp - delta leaves ~1e-16 (summation order): an infinite ratio at
#: 1e-9 float32 ulps. Errors at or below this count as exact.
EXACT_AT_FLOAT32 = 1e-12
RANDOM_CASES = 300
#: Measured over the RANDOM_CASES of seed 20261121 (tests/attention_fuzz.py and
#: benchmarks/fuzz_attention.py run >= 3000 cases against both baselines). float32
#: scores are float64 with their residual and the backward forms delta and dp - delta in
#: float64 (flashmath.attention.tiled's module docs): medians out 0.14, dq 0.28, dk 0.28,
#: dv 0.58; max 0.65 / 1.5 / 1.3 / 3.9. dv = P^T dO stays a float32 GEMM like the naive
#: formula's: 1 case here over the rule (3.9x, a final rounding on a tiny problem).
MEDIAN_CEILING = {"out": 0.5, "dq": 0.6, "dk": 0.6, "dv": 0.9}
MAX_OVER_RULE = {"out": 0, "dq": 0, "dk": 0, "dv": 1}  # cases of RANDOM_CASES
WORST_RATIO = 6.0


def _random_case(rng):
    """One small float32 problem: Sq, Sk in 1..64, D in 1..128, causal or not, GQA sometimes."""
    sq, sk, d = (int(x) for x in rng.integers(1, [65, 65, 129]))
    h = int(rng.choice([1, 2, 4]))
    h_kv = int(rng.choice([x for x in (1, 2, 4) if h % x == 0]))
    amp = float(rng.choice([1.0, 2.0, 3.0]))  # larger scores: peakier softmax
    q = amp * rng.standard_normal((1, h, sq, d))
    k = amp * rng.standard_normal((1, h_kv, sk, d))
    v = rng.standard_normal((1, h_kv, sk, d))
    dout = rng.standard_normal((1, h, sq, d))
    return (q, k, v), {"dout": dout, "causal": bool(rng.integers(0, 2))}


@pytest.mark.parametrize("tiles", ["float32", "default"])
def test_float32_rule_random(record_property, monkeypatch, tiles):
    """tiles "float32": the accurate loops' float32 tiles (what float32 calls above
    schedule.SMALL_PAIRS off the fast path run); "default": these small calls as they run
    by default, in float64 tiles, where every case must hold the rule."""
    if tiles == "float32":
        monkeypatch.setattr(schedule, "SMALL_PAIRS", 0)
    max_over = MAX_OVER_RULE if tiles == "float32" else dict.fromkeys(QUANTITIES, 0)
    rng = np.random.default_rng(20261121)
    ratios: dict[str, list[float]] = {x: [] for x in QUANTITIES}
    over: dict[str, list[tuple]] = {x: [] for x in QUANTITIES}
    for i in range(RANDOM_CASES):
        (q, k, v), kw = _random_case(rng)
        rec = accuracy_rule(q, k, v, dtype="float32", **kw)
        for x in QUANTITIES:
            if rec[f"{x}_err"] <= EXACT_AT_FLOAT32:
                continue
            ratio = rec[f"{x}_ratio"]
            ratios[x].append(ratio)
            if ratio > (2.0 if x == "out" else 3.0):
                over[x].append((i, q.shape, k.shape, kw["causal"], ratio))
    medians = {x: float(np.median(r)) for x, r in ratios.items()}
    worst = {x: max(r) for x, r in ratios.items()}
    record_property("float32_random_medians", medians)
    record_property("float32_random_worst", worst)
    assert all(len(over[x]) <= max_over[x] for x in QUANTITIES), over
    assert all(worst[x] <= WORST_RATIO for x in QUANTITIES), worst
    assert all(medians[x] <= MEDIAN_CEILING[x] for x in QUANTITIES), medians


def test_regression_float32_single_query_short_cache():
    """QA reproducer: one query against 32 keys (scores ~2x larger than unit), float32.
    The online path rounded o and then o / l: 5.9x the naive error, in fm.flash_decode too."""
    rng = np.random.default_rng(63)
    q = rng.standard_normal((1, 4, 1, 16)).astype(np.float32)
    k = (2 * rng.standard_normal((1, 2, 32, 16))).astype(np.float32)
    v = rng.standard_normal((1, 2, 32, 16)).astype(np.float32)
    ref = fm.attention_reference(q, k, v)
    naive_err = np.abs(fm.attention_reference(q, k, v, upcast=False) - ref).max()
    for out in (fm.flash_attention(q, k, v), fm.flash_decode(q, k, v, cache_lengths=[32])):
        assert np.abs(out - ref).max() <= 1.0 * naive_err
