"""The accuracy rule (DESIGN.md) in float32, float16 and bfloat16.

flashmath's max error against the float64 oracle is at most 2x (output) and 3x
(gradients) the naive same-dtype reference's; how often it is at or below 1x is recorded
(``record_property``, visible with ``pytest --junitxml``) and held to a floor.
"""

from __future__ import annotations

import numpy as np
import pytest

from flashmath.attention.accuracy import accuracy_rule
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
