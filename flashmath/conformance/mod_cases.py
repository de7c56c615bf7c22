"""Battery cases for programmable attention: each library mod, alone and with causal, GQA
and lengths, as :class:`~flashmath.conformance.run.Case` objects.

A kernel runs them when it declares ``supports={"mask_mod", "score_mod"}`` (plus the other
options a case needs). The options carry the mods themselves (callables of
:mod:`flashmath.attention.modlib`), passed to the kernel as ``mask_mod=`` / ``score_mod=``
keywords, and to the oracle the same way. Inputs are made as the main battery makes them:
standard normal q, k, v, dout in float64 from a generator seeded by the case's name, then
cast to the case's dtype.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np

from flashmath import dtypes as dt
from flashmath.attention import modlib
from flashmath.conformance import BATTERY_DTYPES, Case

__all__ = ["MOD_OPTIONS", "mod_cases"]

#: The option names the cases add to ATTENTION_OPTIONS (what a kernel declares).
MOD_OPTIONS = frozenset({"mask_mod", "score_mod"})

_IDS = np.repeat([0, 1, 2, 3], [3, 6, 2, 5])  # 16 tokens in 4 packed documents


@dataclass(frozen=True)
class _ModSpec:
    name: str
    note: str
    options: Callable[[], dict[str, Any]]
    requires: frozenset[str]
    shape: tuple[int, int, int, int, int, int] = (2, 2, 2, 16, 16, 16)  # B, H, H_kv, Sq, Sk, D


def _m(name: str, note: str, options: Callable[[], dict[str, Any]], requires: Iterable[str],
       *, B: int = 2, H: int = 2, Hkv: int | None = None, Sq: int = 16, Sk: int = 16,
       D: int = 16) -> _ModSpec:
    return _ModSpec(name, note, options, frozenset(requires), (B, H, Hkv or H, Sq, Sk, D))


_T5 = np.random.default_rng(zlib.crc32(b"mods/t5 table")).standard_normal((2, 32))
_REL = np.random.default_rng(zlib.crc32(b"mods/relative table")).standard_normal((4, 9))

MOD_SPECS: tuple[_ModSpec, ...] = (
    _m("mask_mod causal", "causal as a mask_mod, Sq < Sk (bottom-right)",
       lambda: {"mask_mod": modlib.causal(9, 16)}, {"mask_mod"}, Sq=9),
    _m("mask_mod causal Sq > Sk", "the first queries see nothing: zeros",
       lambda: {"mask_mod": modlib.causal(16, 7)}, {"mask_mod"}, Sk=7),
    _m("mask_mod sliding window", "window of 4 keys ending at the diagonal",
       lambda: {"mask_mod": modlib.sliding_window(16, 16, 3, 0)}, {"mask_mod"}),
    _m("mask_mod prefix-LM", "bidirectional prefix of 5, causal after",
       lambda: {"mask_mod": modlib.prefix_lm(5)}, {"mask_mod"}),
    _m("mask_mod document", "4 packed documents, with causal=True",
       lambda: {"mask_mod": modlib.document_mask(_IDS), "causal": True},
       {"mask_mod", "causal"}),
    _m("mask_mod document per batch", "per-batch document ids, kv_lengths [16, 11]",
       lambda: {"mask_mod": modlib.document_mask(np.stack([_IDS, np.sort(_IDS[::-1] % 2)])),
                "kv_lengths": np.array([16, 11])}, {"mask_mod", "kv_lengths"}),
    _m("mask_mod attention sink", "StreamingLLM: 2 sink tokens + a window of 4, GQA",
       lambda: {"mask_mod": modlib.attention_sink(16, 16, 2, 4)}, {"mask_mod", "gqa"},
       H=4, Hkv=2),
    _m("score_mod ALiBi", "ALiBi slopes as a score_mod, with causal=True",
       lambda: {"score_mod": modlib.alibi(16, 16, heads=2), "causal": True},
       {"score_mod", "causal"}),
    _m("score_mod relative bias", "a (H, 9) relative-position table, GQA",
       lambda: {"score_mod": modlib.relative_bias(_REL, 4)}, {"score_mod", "gqa"}, H=4, Hkv=2),
    _m("score_mod T5 bias", "T5 buckets (32, max distance 20) over 40 keys, q_lengths [12, 16]",
       lambda: {"score_mod": modlib.t5_bias(_T5, max_distance=20),
                "q_lengths": np.array([12, 16])}, {"score_mod", "q_lengths"}, Sk=40),
    _m("score_mod softcap", "softcap 2 as a score_mod on scores of a few units",
       lambda: {"score_mod": modlib.softcap(2.0)}, {"score_mod"}),
    _m("score_mod and mask_mod", "document mask and ALiBi together, causal",
       lambda: {"mask_mod": modlib.document_mask(_IDS), "score_mod": modlib.alibi(16, 16, heads=2),
                "causal": True}, {"mask_mod", "score_mod", "causal"}),
)


def _inputs(spec: _ModSpec, dtype: str) -> dict[str, np.ndarray]:
    B, H, Hkv, Sq, Sk, D = spec.shape
    rng = np.random.default_rng(zlib.crc32(f"mods/{spec.name}".encode()))
    arrays = {"q": 2 * rng.standard_normal((B, H, Sq, D)),  # scores of a few units
              "k": rng.standard_normal((B, Hkv, Sk, D)),
              "v": rng.standard_normal((B, Hkv, Sk, D)),
              "dout": rng.standard_normal((B, H, Sq, D))}
    out = {}
    for name, x in arrays.items():
        x = x.astype(dt.as_dtype(dtype))
        x.setflags(write=False)
        out[name] = x
    return out


@functools.cache
def _cases(dtypes: tuple[str, ...]) -> tuple[Case, ...]:
    return tuple(
        Case(name=spec.name, kind="attention", dtype=dtype,
             inputs=MappingProxyType(_inputs(spec, dtype)),
             options=MappingProxyType(spec.options()), requires=spec.requires, note=spec.note)
        for dtype in dtypes for spec in MOD_SPECS)


def mod_cases(dtypes: Iterable[str] = BATTERY_DTYPES) -> tuple[Case, ...]:
    """The programmable-attention cases in each of ``dtypes``: causal (both Sq/Sk orders),
    sliding window, prefix-LM, document masking (with causal; per-batch ids with kv_lengths),
    the attention-sink pattern with GQA as mask_mods; ALiBi (causal), a relative-position
    table (GQA), T5 buckets (q_lengths), softcap as score_mods; and a mask_mod with a
    score_mod. ``requires`` names ``mask_mod`` / ``score_mod`` and the other options used.
    Arrays are read-only; the same objects are returned on every call."""
    return _cases(tuple(dtypes))
