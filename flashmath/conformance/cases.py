"""The conformance cases: :class:`Case`, the option names, and the softmax and attention
batteries as data.

Owns what a case is (named inputs in one dtype, the options an impl is called with and the
options it must support to run it) and the two adversarial batteries, built the same on
every machine (each case's generator is seeded by its name). The conventions the batteries
probe (layout, masking, empty rows, NaN rows) are those of docs/conventions.md.
May import: dtypes, softmax, attention.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

import numpy as np

from flashmath import dtypes as _dt
from flashmath.attention.masks import alibi_bias
from flashmath.attention.options import resolve
from flashmath.softmax.safety import overflow_threshold, underflow_threshold

__all__ = [
    "ATTENTION_KEYWORDS",
    "ATTENTION_OPTIONS",
    "BATTERY_DTYPES",
    "SEED_001",
    "SOFTMAX_OPTIONS",
    "Case",
    "Kind",
    "attention_battery",
    "attention_scale",
    "battery_dtypes",
    "case_rng",
    "softmax_battery",
]

#: The dtypes every battery case is made in.
BATTERY_DTYPES = ("float64", "float32", "float16", "bfloat16")

Kind = Literal["softmax", "attention"]

#: Softmax options an impl may support (passed only where a case uses them).
SOFTMAX_OPTIONS = frozenset({"axis", "where"})
#: Attention keyword options, as fm.attention_reference names them.
ATTENTION_KEYWORDS = frozenset(
    {"causal", "window", "mask", "bias", "kv_lengths", "q_lengths", "softcap", "scale",
     "alibi_slopes", "sinks", "score_mod", "mask_mod"}
)
#: Attention options: the keywords plus three capabilities that must be declared
#: (``causal_top_left``: ``causal="top_left"`` with Sq != Sk; ``gqa``: fewer kv heads than
#: query heads; ``dv``: a value head dim other than q's).
ATTENTION_OPTIONS = ATTENTION_KEYWORDS | {"causal_top_left", "gqa", "dv"}


@dataclass(frozen=True, eq=False)
class Case:
    """One named adversarial input, as data.

    name: what it is ("large positive", "causal Sq > Sk", ...); with ``dtype`` it is unique.
    kind: "softmax" or "attention".
    dtype: the inputs' dtype name ("float64", "float32", "float16", "bfloat16").
    inputs: softmax ``{"x"}``; attention ``{"q", "k", "v", "dout"}`` (dout: the upstream
      gradient used when gradients are checked), NumPy arrays in ``dtype``.
    options: the keyword options the impl is called with (``axis``/``where``; ``causal``,
      ``mask``, ``scale``, ...), NumPy arrays where they are arrays.
    requires: the option names (see ``SOFTMAX_OPTIONS``/``ATTENTION_OPTIONS``) an impl must
      support to run the case.
    note: what the case probes, in a few words.
    """

    name: str
    kind: Kind
    dtype: str
    inputs: Mapping[str, np.ndarray]
    options: Mapping[str, Any] = field(default_factory=dict)
    requires: frozenset[str] = frozenset()
    note: str = ""

    @property
    def id(self) -> str:
        """``"name[dtype]"``: a pytest id."""
        return f"{self.name}[{self.dtype}]"


def attention_scale(q: np.ndarray, k: np.ndarray, v: np.ndarray,
                    options: Mapping[str, Any]) -> float:
    """The score scale an attention call with these inputs and options uses: ``scale`` if
    given, else attention's default (1/sqrt(D)), as :func:`flashmath.attention.options.resolve`
    decides it. q, k, v: (B, H, Sq, D), (B, H_kv, Sk, D), (B, H_kv, Sk, Dv)."""
    return float(resolve(q, k, v, **options)[3].scale)


def battery_dtypes(dtypes: Iterable[str] | None) -> tuple[str, ...]:
    """``dtypes`` as canonical names (None: :data:`BATTERY_DTYPES`); a ValueError naming
    ``dtypes`` for a dtype the batteries are not made in, a TypeError for an unknown one."""
    if dtypes is None:
        return BATTERY_DTYPES
    names = tuple(_dt.dtype_name(_dt.as_dtype(d, name="dtypes")) for d in dtypes)
    unknown = [n for n in names if n not in BATTERY_DTYPES]
    if unknown:
        raise ValueError(f"dtypes: the battery is made in {list(BATTERY_DTYPES)}, not {unknown}")
    return names


def case_rng(*key: str) -> np.random.Generator:
    """A generator seeded by a case's name (the CRC-32 of the key parts joined by "/"):
    every battery, and every default ``dout`` of a one-off check, is the same on every
    machine."""
    return np.random.default_rng(zlib.crc32("/".join(key).encode()))


def _freeze(d: Mapping[str, Any]) -> Mapping[str, Any]:
    for value in d.values():
        if isinstance(value, np.ndarray):
            value.setflags(write=False)
    return MappingProxyType(dict(d))


#: The original eight softmax cases (tense-classification logits; "verb vocabulary" is
#: 600 zeros).
SEED_001 = (
    ("small magnitudes", [0.1, 0.2, 0.3, 0.4, 0.5]),
    ("mixed magnitudes", [-3.0, 0.0, 1.0, 2.0, 5.0]),
    ("large positive", [1.0, 92.0, 3.0, 0.0, 2.0]),
    ("large negative", [-100.0, -200.0, -300.0, -400.0, -500.0]),
    ("all identical", [5.0, 5.0, 5.0, 5.0, 5.0]),
    ("masked entry", [1.0, -np.inf, 3.0, 0.0, 2.0]),
    ("single element", [42.0]),
    ("verb vocabulary", [0.0] * 600),
)


def _softmax_specs(dtype: str) -> list[tuple[str, np.ndarray, dict[str, Any], str]]:
    """(name, x in float64, options, note) for one dtype."""
    inf, nan = np.inf, np.nan
    over = float(overflow_threshold(dtype))
    under = float(underflow_threshold(dtype))
    specs: list[tuple[str, np.ndarray, dict[str, Any], str]] = [
        (name, np.array(x), {}, "one of the original eight") for name, x in SEED_001
    ]
    specs += [
        ("above overflow threshold", 2 * over + np.array([0.0, -1.0, -2.0, -3.0, -8.0]), {},
         f"max = 2x overflow_threshold({dtype}) = {2 * over:.6g}: exp overflows"),
        ("below underflow threshold", 2 * under + np.array([0.0, -1.0, -2.0, -3.0, -8.0]), {},
         f"every entry < underflow_threshold({dtype}) = {under:.6g}: exp underflows to 0"),
        ("all -inf", np.full(5, -inf), {}, "nothing to attend to: zeros"),
        ("fully masked row in a batch",
         np.array([[1.0, 2.0, 3.0], [-inf, -inf, -inf], [0.0, -inf, 5.0]]), {},
         "the -inf row gives zeros, the others are untouched"),
        ("NaN in a row", np.array([[1.0, nan, 2.0], [1.0, 2.0, 3.0]]), {},
         "that row NaN, the other untouched"),
        ("+inf in a row", np.array([[1.0, inf, 2.0], [1.0, 2.0, 3.0]]), {},
         "that row NaN (inf - inf), the other untouched"),
        ("long row", 3.0 * case_rng("softmax", "long row").standard_normal(8192), {},
         "8192 entries: summation error"),
        ("batched 3-D", 5.0 * case_rng("softmax", "3-D").standard_normal((2, 3, 7)), {},
         "softmax over the last axis of a (2, 3, 7) array"),
        ("axis 0", 4.0 * case_rng("softmax", "axis 0").standard_normal((7, 3)), {"axis": 0},
         "softmax over axis 0"),
        ("where mask", np.array([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]),
         {"where": np.array([[True, False, True, True], [False, False, False, False]])},
         "where=False entries get 0; a row with nothing left gives zeros"),
    ]
    return specs


@functools.cache
def _softmax_battery(dtypes: tuple[str, ...]) -> tuple[Case, ...]:
    cases = []
    for dtype in dtypes:
        dt = _dt.as_dtype(dtype)
        for name, x, options, note in _softmax_specs(dtype):
            with np.errstate(over="ignore"):
                xd = x.astype(dt)
            cases.append(Case(name=name, kind="softmax", dtype=dtype,
                              inputs=_freeze({"x": xd}), options=_freeze(options),
                              requires=frozenset(options) & SOFTMAX_OPTIONS, note=note))
    return tuple(cases)


def softmax_battery(dtypes: Iterable[str] = BATTERY_DTYPES) -> tuple[Case, ...]:
    """The named adversarial softmax cases, in each of ``dtypes``: the original eight
    (:data:`SEED_001`), exp overflow and underflow at the dtype's own thresholds
    (overflow_threshold / underflow_threshold), all -inf and fully masked rows, NaN and
    +inf rows, a long row, N-d input, another axis and a ``where`` mask. Arrays are
    read-only; the same objects are returned on every call."""
    return _softmax_battery(tuple(dtypes))


@dataclass(frozen=True)
class _AttnSpec:
    name: str
    note: str
    # B, H, H_kv, Sq, Sk, D, Dv
    shape: tuple[int, int, int, int, int, int, int] = (1, 2, 2, 16, 16, 16, 16)
    options: Callable[[np.random.Generator], dict[str, Any]] = lambda _rng: {}
    requires: frozenset[str] = frozenset()
    # Scale q so the largest |score| becomes this multiple of a threshold of the dtype.
    logits: Literal["overflow", "underflow"] | None = None
    nan_query: bool = False


def _spec(name: str, note: str, *, B: int = 1, H: int = 2, Hkv: int | None = None,
          Sq: int = 16, Sk: int = 16, D: int = 16, Dv: int | None = None,
          options: Callable[[np.random.Generator], dict[str, Any]] | None = None,
          requires: Iterable[str] = (), **extra: Any) -> _AttnSpec:
    shape = (B, H, Hkv or H, Sq, Sk, D, Dv or D)
    return _AttnSpec(name, note, shape, options or (lambda _rng: {}), frozenset(requires),
                     **extra)


def _mask_with_dead_row(rng: np.random.Generator) -> dict[str, Any]:
    mask = rng.random((1, 1, 16, 16)) < 0.6
    mask[..., 5, :] = False  # query 5 sees nothing
    return {"mask": mask}


ATTENTION_SPECS: tuple[_AttnSpec, ...] = (
    _spec("basic", "B=2, H=2, S=16, D=16", B=2),
    _spec("Sq < Sk", "5 queries, 37 keys", Sq=5, Sk=37),
    _spec("Sq > Sk", "37 queries, 5 keys", Sq=37, Sk=5),
    _spec("single key", "Sk = 1: every probability is 1", Sk=1),
    _spec("single query", "Sq = 1 (decoding)", Sq=1, Sk=33),
    _spec("odd head dim", "D = 33", D=33),
    _spec("head dim 1", "D = 1", D=1),
    _spec("GQA", "4 query heads over 2 kv heads", H=4, Hkv=2, requires={"gqa"}),
    _spec("MQA", "4 query heads over 1 kv head", H=4, Hkv=1, requires={"gqa"}),
    _spec("value head dim", "Dv = 24 != D = 16", Dv=24, requires={"dv"}),
    _spec("causal", "causal, Sq = Sk", options=lambda _r: {"causal": True},
          requires={"causal"}),
    _spec("causal Sq > Sk", "bottom-right causal: the first 12 queries see nothing (zeros)",
          Sq=20, Sk=8, options=lambda _r: {"causal": True}, requires={"causal"}),
    _spec("causal Sq < Sk", "bottom-right causal, 8 queries over 20 keys", Sq=8, Sk=20,
          options=lambda _r: {"causal": True}, requires={"causal"}),
    _spec("causal top-left Sq < Sk", "torch's alignment: query i sees keys 0..i", Sq=8, Sk=20,
          options=lambda _r: {"causal": "top_left"}, requires={"causal_top_left"}),
    _spec("sliding window", "window (3, 1)", options=lambda _r: {"window": (3, 1)},
          requires={"window"}),
    _spec("boolean mask", "random mask, query 5 fully masked (zeros)",
          options=_mask_with_dead_row, requires={"mask"}),
    _spec("ALiBi bias", "float bias, one slope per head",
          options=lambda _r: {"bias": alibi_bias(2, 16, 16)}, requires={"bias"}),
    _spec("ALiBi slopes", "alibi_slopes per batch entry and head (flash-attention's), causal",
          B=2, Sq=12, Sk=20, options=lambda _r: {
              "alibi_slopes": np.array([[0.5, 0.0625], [2.0, 0.25]]), "causal": True},
          requires={"alibi_slopes", "causal"}),
    _spec("attention sinks", "a value-less logit per head (gpt-oss); causal Sq > Sk: the "
          "first rows see only the sink", Sq=20, Sk=12, options=lambda _r: {
              "sinks": np.array([1.0, -0.5]), "causal": True},
          requires={"sinks", "causal"}),
    _spec("padded keys", "kv_lengths = [16, 5]", B=2,
          options=lambda _r: {"kv_lengths": np.array([16, 5])}, requires={"kv_lengths"}),
    _spec("padded queries", "q_lengths = [16, 6]", B=2,
          options=lambda _r: {"q_lengths": np.array([16, 6])}, requires={"q_lengths"}),
    _spec("softcap", "softcap = 5 (s -> 5 tanh(s / 5)) on scores up to ~30",
          options=lambda _r: {"softcap": 5.0}, requires={"softcap"}, logits="overflow"),
    _spec("custom scale", "scale = 0.5 instead of 1/sqrt(D)",
          options=lambda _r: {"scale": 0.5}, requires={"scale"}),
    _spec("large logits", "max |score| = 3x the dtype's overflow threshold: exp overflows",
          logits="overflow"),
    _spec("large negative logits",
          "every score below 1.5x the dtype's underflow threshold: exp underflows to 0",
          logits="underflow"),
    _spec("long rows", "4 queries over 4096 keys: accumulation error", Sq=4, Sk=4096),
    _spec("NaN in a query", "q[0, 0, 3, 0] = NaN: that output row NaN, the rest untouched",
          nan_query=True),
)


def _attention_inputs(spec: _AttnSpec, dtype: str) -> tuple[dict[str, np.ndarray],
                                                            dict[str, Any]]:
    """q, k, v, dout and the options for one spec in one dtype (float64 before the cast)."""
    B, H, Hkv, Sq, Sk, D, Dv = spec.shape
    rng = case_rng("attention", spec.name)
    q = rng.standard_normal((B, H, Sq, D))
    k = rng.standard_normal((B, Hkv, Sk, D))
    v = rng.standard_normal((B, Hkv, Sk, Dv))
    dout = rng.standard_normal((B, H, Sq, Dv))
    options = spec.options(rng)
    scale = attention_scale(q, k, v, options)
    if spec.logits == "overflow":
        # Scale q so that max |score| = 3x the exp overflow threshold of the dtype.
        kk = np.repeat(k, H // Hkv, axis=1)
        top = np.abs(scale * q @ kk.swapaxes(-1, -2)).max()
        q = q * (3.0 * float(overflow_threshold(dtype)) / top)
    elif spec.logits == "underflow":
        # Keys all near -u, queries near c*u: every score near -c, below the underflow point.
        u = np.ones(D) / math.sqrt(D)
        c = 1.5 * abs(float(underflow_threshold(dtype))) / scale
        q = c * u + 0.5 * rng.standard_normal((B, H, Sq, D))
        k = -u + 0.05 * rng.standard_normal((B, Hkv, Sk, D))
    if spec.nan_query:
        q[0, 0, 3, 0] = np.nan
    dt = _dt.as_dtype(dtype)
    inputs = {"q": q.astype(dt), "k": k.astype(dt), "v": v.astype(dt), "dout": dout.astype(dt)}
    if "bias" in options:
        options["bias"] = options["bias"].astype(dt)
    return inputs, options


@functools.cache
def _attention_battery(dtypes: tuple[str, ...]) -> tuple[Case, ...]:
    cases = []
    for dtype in dtypes:
        for spec in ATTENTION_SPECS:
            inputs, options = _attention_inputs(spec, dtype)
            cases.append(Case(name=spec.name, kind="attention", dtype=dtype,
                              inputs=_freeze(inputs), options=_freeze(options),
                              requires=spec.requires, note=spec.note))
    return tuple(cases)


def attention_battery(dtypes: Iterable[str] = BATTERY_DTYPES) -> tuple[Case, ...]:
    """The named adversarial attention cases, in each of ``dtypes``: Sq != Sk both ways, a
    single key or query, odd head dims, GQA/MQA, Dv != D, causal in both alignments
    (including bottom-right with Sq > Sk, whose first rows see nothing), a sliding window, a
    boolean mask with a fully masked row, an ALiBi bias, padded keys and queries, softcap, a
    custom scale, scores above the dtype's exp overflow threshold and below its underflow
    threshold, 4096-key rows, and a NaN query. Each case's ``requires`` names the options it
    needs. Arrays are read-only; the same objects are returned on every call."""
    return _attention_battery(tuple(dtypes))
