"""Online (streaming) softmax: a running max m, normaliser l and weighted sum o that absorb
a chunk of scores, or another state, exactly.

For scores s_1..s_N and values v_1..v_N (rows of V), a state over the entries seen so far is

    m = max_j s_j            l = sum_j exp(s_j - m)            o = sum_j exp(s_j - m) v_j

and ``o / l`` is softmax(s) @ V. Two states (or a state and a new chunk) combine by moving
both to the larger max: with ``m' = max(m_a, m_b)``, ``alpha = exp(m_a - m')``,

    l' = alpha_a l_a + alpha_b l_b        o' = alpha_a o_a + alpha_b o_b

which is exact algebra, so the result does not depend on how the sequence was split or in
which order the pieces were merged (up to rounding). This is the rule under FlashAttention
(tiles of keys), split-KV decoding and ring attention (partial outputs merged by their
log-sum-exp, :func:`merge_outputs`).

Shapes: ``...`` is any batch shape (e.g. (B, H, Sq)); n the chunk length; d the value dim.

Dtypes (DESIGN.md): the state lives in an *accumulate dtype*, float32 unless asked
otherwise (float64 when the data is float64). Narrow chunks (float16, bfloat16, float8) are
read in that dtype; ``accum_dtype=`` forces another one, e.g. float16, which the lab uses to
show what goes wrong: exp(m_old - m_new) underflows, l stalls (2048 + 1 == 2048 in
float16) and overflows past 65504.

Edge cases: -inf scores contribute exactly nothing; a row with no finite score so far is
*empty* (m = -inf, l = 0, o = 0) and stays NaN-free through updates and merges; it
finalises to zeros (or NaN on request) with lse = -inf. +inf or NaN in a row makes that
row NaN; other rows are untouched.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from functools import reduce
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from flashmath.dtypes import accumulate_dtype, as_accumulate_dtype, as_dtype, as_float_array
from flashmath.rounding import cast
from flashmath.softmax.rule import rescale, row_shift

__all__ = [
    "SoftmaxState",
    "merge",
    "merge_outputs",
    "softmax_online",
    "softmax_online_chunked",
]


# --- Private helpers ---

_EmptyPolicy = Literal["zeros", "nan"]
_EMPTY_POLICIES = ("zeros", "nan")


def _common_dtype(*dtypes: np.dtype[Any]) -> np.dtype[Any]:
    """NumPy's promotion, with float32 where there is none (float16 with bfloat16)."""
    try:
        return np.dtype(np.result_type(*dtypes))
    except (TypeError, np.exceptions.DTypePromotionError):
        return np.dtype(np.float32)


def _absorb(m: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One step of the recurrence for scores s (..., n) against running max m (...,).

    Returns (m_new, alpha, p): the new max, the factor for the old (l, o), and the chunk's
    weights p = exp(s - m_new) (..., n), all in s's dtype. n = 0 is allowed (p is empty).
    """
    m_new = np.maximum(m, np.max(s, axis=-1, initial=-np.inf))
    return m_new, rescale(m, m_new), np.exp(s - row_shift(m_new)[..., None])


def _broadcast_batch(what: str, *shapes: tuple[int, ...]) -> tuple[int, ...]:
    try:
        return np.broadcast_shapes(*shapes)
    except ValueError:
        raise ValueError(f"{what}: batch shapes {', '.join(map(str, shapes))} do not broadcast")\
            from None


def _read_chunk(
    scores: Any, values: Any, d: int, *, s_name: str, v_name: str
) -> tuple[np.ndarray, np.ndarray]:
    """Validate a chunk: scores (..., n), values (..., n, d) or (n, d), against value dim d."""
    s = as_float_array(scores, name=s_name)
    v = as_float_array(values, name=v_name)
    if s.ndim < 1:
        raise ValueError(f"{s_name}: expected shape (..., n), got a scalar")
    if v.ndim < 2:
        raise ValueError(f"{v_name}: expected shape (..., n, d) or (n, d), got {v.shape}")
    if v.shape[-2] != s.shape[-1]:
        raise ValueError(
            f"{s_name} has n={s.shape[-1]} scores (shape {s.shape}) but {v_name} has "
            f"n={v.shape[-2]} rows (shape {v.shape})"
        )
    if v.shape[-1] != d:
        raise ValueError(f"{v_name} has d={v.shape[-1]} (shape {v.shape}) but the state has d={d}")
    return s, v


def _sizes(name: str, sizes: Any) -> tuple[int, ...]:
    """``sizes`` (a sequence of ints) as a tuple of ints; TypeError naming ``name`` otherwise
    (2.5, "3", True and None are not sizes)."""
    try:
        items = tuple(sizes)
    except TypeError:
        raise TypeError(f"{name}: expected an int or a tuple of ints, got {sizes!r}") from None
    out = []
    for n in items:
        if isinstance(n, bool):
            raise TypeError(f"{name}: a size must be an int, got {n!r}")
        try:
            out.append(operator.index(n))
        except TypeError:
            raise TypeError(f"{name}: a size must be an int, got {n!r} "
                            f"({type(n).__name__})") from None
    return tuple(out)


def _readonly(x: Any, dtype: np.dtype[Any]) -> np.ndarray:
    """x as an array of dtype, seen through a read-only view (the caller's array is untouched)."""
    view = np.asarray(x, dtype=dtype).view()
    view.flags.writeable = False
    return view


# --- The state ---


@dataclass(frozen=True, eq=False, repr=False)
class SoftmaxState:
    """The running (m, l, o) of an online softmax over the entries absorbed so far.

    m: (...,) the running max of the scores (-inf for an empty row).
    l: (...,) sum_j exp(s_j - m), the normaliser (0 for an empty row).
    o: (..., d) sum_j exp(s_j - m) v_j, the unnormalised output (0 for an empty row).

    All three share one dtype, the accumulate dtype. The state is an immutable value:
    ``update`` and ``merge`` return new states and never write into arrays (the fields are
    read-only views). Constructing one directly casts m, l, o to their common dtype and
    checks that the shapes agree; ``SoftmaxState.empty`` and ``from_normalized`` are the
    usual ways in.
    """

    m: np.ndarray
    l: np.ndarray
    o: np.ndarray

    def __post_init__(self) -> None:
        m = as_float_array(self.m, name="m")
        l = as_float_array(self.l, name="l")
        o = as_float_array(self.o, name="o")
        if o.ndim < 1 or m.shape != l.shape or o.shape[:-1] != m.shape:
            raise ValueError(
                f"SoftmaxState: expected m (...,), l (...,), o (..., d) with one batch shape, "
                f"got m {m.shape}, l {l.shape}, o {o.shape}"
            )
        dtype = _common_dtype(m.dtype, l.dtype, o.dtype)
        for name, arr in (("m", m), ("l", l), ("o", o)):
            object.__setattr__(self, name, _readonly(arr, dtype))

    # -- construction --

    @classmethod
    def empty(
        cls, batch_shape: int | tuple[int, ...], d: int, *, dtype: npt.DTypeLike | str = np.float32
    ) -> SoftmaxState:
        """The identity: m = -inf, l = 0, o = 0 for every row of ``batch_shape``.

        ``dtype`` is the accumulate dtype the state keeps: float32 by default, the right
        choice for float32 and narrower data. Updates with float64 data widen it to float64
        on their own, so the default never costs float64 inputs their precision; pass
        dtype=np.float64 to start there, or a narrow dtype (the lab) to show why not.
        """
        shape = _sizes("batch_shape", (batch_shape,) if isinstance(batch_shape, int | np.integer)
                       else batch_shape)
        (d,) = _sizes("d", (d,))
        if d < 0 or any(n < 0 for n in shape):
            raise ValueError(f"SoftmaxState.empty: negative size in batch_shape {shape}, d={d}")
        dt = as_accumulate_dtype(dtype, name="dtype")
        return cls(np.full(shape, -np.inf, dt), np.zeros(shape, dt), np.zeros((*shape, d), dt))

    @classmethod
    def from_normalized(
        cls, out: Any, lse: Any, *, dtype: npt.DTypeLike | str | None = None
    ) -> SoftmaxState:
        """The state of a normalised partial output ``out`` (..., d) with log-sum-exp ``lse``
        (...,): m = lse, l = 1, o = out; rows with lse = -inf become empty (whatever ``out``
        holds there). ``dtype`` defaults to the accumulate dtype of ``out``."""
        out_a = as_float_array(out, name="out")
        lse_a = as_float_array(lse, name="lse")
        if out_a.ndim < 1:
            raise ValueError("out: expected shape (..., d), got a scalar")
        batch = _broadcast_batch("out and lse", out_a.shape[:-1], lse_a.shape)
        acc = accumulate_dtype(_common_dtype(out_a.dtype, lse_a.dtype), dtype)
        m = np.broadcast_to(lse_a.astype(acc, copy=False), batch)
        empty = np.isneginf(m)
        o = np.where(empty[..., None], np.zeros((), acc), out_a.astype(acc, copy=False))
        return cls(m, np.where(empty, np.zeros((), acc), np.ones((), acc)), o)

    # -- views --

    @property
    def dtype(self) -> np.dtype[Any]:
        """The accumulate dtype of m, l and o."""
        return self.m.dtype

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return self.m.shape

    @property
    def d(self) -> int:
        return self.o.shape[-1]

    @property
    def lse(self) -> np.ndarray:
        """log-sum-exp of the absorbed scores, m + log(l), shape (...,): -inf for empty rows."""
        with np.errstate(invalid="ignore"):
            log_l = np.full(self.l.shape, -np.inf, self.dtype)
            np.log(self.l, out=log_l, where=self.l != 0)
            return self.m + log_l

    def __repr__(self) -> str:
        return f"SoftmaxState(batch_shape={self.batch_shape}, d={self.d}, dtype={self.dtype})"

    # -- operations --

    def update(
        self, scores: Any, values: Any, *, accum_dtype: npt.DTypeLike | str | None = None
    ) -> SoftmaxState:
        """Absorb a chunk: scores (..., n) and values (..., n, d), or (n, d) shared by every row.

        The batch shapes of the state, scores and values broadcast (an empty state of
        batch_shape () absorbs a (B, H, Sq, n) chunk). -inf scores contribute nothing; n = 0
        is allowed. The arithmetic and the new state are in the state's dtype, whatever the
        chunk's (float16 chunks into a float32 state stay float32), except that float64
        chunks widen a narrower state to float64; ``accum_dtype`` sets the dtype outright.

        Raises ValueError when n differs between scores and values, when values' d is not
        the state's d, or when the batch shapes do not broadcast.
        """
        s, v = _read_chunk(scores, values, self.d, s_name="scores", v_name="values")
        if accum_dtype is not None:
            acc = as_accumulate_dtype(accum_dtype)
        elif np.dtype(np.float64) in (s.dtype, v.dtype):
            acc = np.dtype(np.float64)
        else:
            acc = self.dtype
        return self._absorb_chunk(s, v, acc)

    def _absorb_chunk(self, s: np.ndarray, v: np.ndarray, acc: np.dtype[Any]) -> SoftmaxState:
        """update's arithmetic, on a validated chunk, in dtype acc."""
        batch = _broadcast_batch("update", self.batch_shape, s.shape[:-1],
                                 v.shape[:-2] if v.ndim > 2 else ())
        s, v = s.astype(acc, copy=False), v.astype(acc, copy=False)
        with np.errstate(invalid="ignore"):  # +inf - +inf: the row is NaN, as documented
            m, alpha, p = _absorb(self.m.astype(acc, copy=False), s)
            l = alpha * self.l.astype(acc, copy=False) + p.sum(axis=-1, dtype=acc)
            pv = p @ v if v.ndim == 2 else (p[..., None, :] @ v)[..., 0, :]  # (..., d)
            o = alpha[..., None] * self.o.astype(acc, copy=False) + pv.astype(acc, copy=False)
        return SoftmaxState(np.broadcast_to(m, batch), np.broadcast_to(l, batch),
                            np.broadcast_to(o, (*batch, self.d)))

    def merge(self, other: SoftmaxState) -> SoftmaxState:
        """``merge(self, other)``: the state of both sets of entries; see :func:`merge`."""
        return merge(self, other)

    def finalize(
        self, empty: _EmptyPolicy = "zeros", *, dtype: npt.DTypeLike | str | None = None
    ) -> np.ndarray:
        """The softmax-weighted output o / l, shape (..., d), in ``dtype`` (default: the
        state's dtype).

        ``empty`` says what rows with l == 0 (nothing absorbed, or only -inf scores) give:
        "zeros" (DESIGN.md's rule, like FlashAttention and PyTorch's safe softmax) or "nan".
        There is no "uniform": its output would be mean(V), and the state holds no V.
        """
        if empty not in _EMPTY_POLICIES:
            raise ValueError(f"empty: expected one of {_EMPTY_POLICIES}, got {empty!r}")
        fill = 0.0 if empty == "zeros" else np.nan
        out = np.full(self.o.shape, fill, self.dtype)
        nonempty = (self.l != 0)[..., None]  # NaN rows count as non-empty and stay NaN
        with np.errstate(invalid="ignore"):
            np.divide(self.o, self.l[..., None], out=out, where=nonempty)
        return out if dtype is None else cast(out, as_dtype(dtype))  # NumPy's bits, fast


def merge(a: SoftmaxState, b: SoftmaxState) -> SoftmaxState:
    """Combine two states into the state of both sets of entries.

    Associative up to rounding; commutative exactly (every step is symmetric in a and b;
    only a tie between maxima +0 and -0 may keep either sign).
    A row that is empty on one side comes back from the other side unchanged, bit for bit
    (alpha is exactly 1 there and nothing is added); two empty rows stay empty, never NaN.
    The batch shapes broadcast; d must agree. The result's dtype is the wider of the two
    (float32 for float16 with bfloat16).
    """
    if not isinstance(a, SoftmaxState) or not isinstance(b, SoftmaxState):
        raise TypeError(f"merge: expected two SoftmaxState, got {type(a).__name__} and "
                        f"{type(b).__name__}")
    if a.d != b.d:
        raise ValueError(f"merge: d differs: {a.d} (o shape {a.o.shape}) and {b.d} "
                         f"(o shape {b.o.shape})")
    _broadcast_batch("merge", a.batch_shape, b.batch_shape)
    dt = _common_dtype(a.dtype, b.dtype)
    ma, la, oa = (x.astype(dt, copy=False) for x in (a.m, a.l, a.o))
    mb, lb, ob = (x.astype(dt, copy=False) for x in (b.m, b.l, b.o))
    with np.errstate(invalid="ignore"):  # +inf - +inf: the row is NaN, as documented
        m = np.maximum(ma, mb)
        alpha_a, alpha_b = rescale(ma, m), rescale(mb, m)
        a_empty, b_empty = np.isneginf(ma), np.isneginf(mb)
        l = alpha_a * la + alpha_b * lb
        o_a, o_b = alpha_a[..., None] * oa, alpha_b[..., None] * ob
        # Adding the empty side's +0 would turn a -0.0 into +0.0: take the other side as is.
        o = np.where(b_empty[..., None], o_a, np.where(a_empty[..., None], o_b, o_a + o_b))
    return SoftmaxState(m, l, o)


def merge_outputs(
    outs: Sequence[Any], lses: Sequence[Any], *, accum_dtype: npt.DTypeLike | str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Combine already-normalised partial outputs by their log-sum-exps.

    This is what split-KV decoding and ring attention exchange: each part i attended to a
    disjoint set of keys and produced out_i (..., d) = softmax(s_i) @ V_i and
    lse_i (...,) = logsumexp(s_i). The result is the output over all keys together,

        lse = log(sum_i exp(lse_i)),    out = sum_i exp(lse_i - lse) out_i,

    the same as merging the parts' states (``SoftmaxState.from_normalized``; it is computed
    that way, folded left to right). Parts with lse_i = -inf contribute nothing (their out_i
    is ignored); rows where every part is -inf give out = 0 and lse = -inf.

    Returns (out, lse): out (..., d) in the outs' dtype, lse (...,) in the accumulate dtype
    (float32, float64 for float64 outs; ``accum_dtype`` overrides). Shapes broadcast.
    Raises ValueError when the two sequences differ in length or are empty, or when the
    parts' d or batch shapes disagree.
    """
    outs, lses = list(outs), list(lses)
    if len(outs) != len(lses):
        raise ValueError(f"merge_outputs: outs has {len(outs)} arrays but lses has {len(lses)}")
    if not outs:
        raise ValueError("merge_outputs: outs and lses are empty; need at least one part")
    out_arrs = [as_float_array(o, name=f"outs[{i}]") for i, o in enumerate(outs)]
    lse_arrs = [as_float_array(x, name=f"lses[{i}]") for i, x in enumerate(lses)]
    for i, (o, x) in enumerate(zip(out_arrs, lse_arrs, strict=True)):
        if o.ndim < 1 or o.shape[-1] != out_arrs[0].shape[-1]:
            raise ValueError(f"outs[{i}]: expected shape (..., d) with d = "
                             f"{out_arrs[0].shape[-1]} like outs[0], got {o.shape}")
        _broadcast_batch(f"outs[{i}] {o.shape} and lses[{i}] {x.shape}", o.shape[:-1], x.shape)
    out_dtype = _common_dtype(*(o.dtype for o in out_arrs))
    acc = accumulate_dtype(_common_dtype(out_dtype, *(x.dtype for x in lse_arrs)), accum_dtype)
    state = reduce(merge, (SoftmaxState.from_normalized(o, x, dtype=acc)
                           for o, x in zip(out_arrs, lse_arrs, strict=True)))
    return state.finalize(dtype=out_dtype), state.lse


# --- The seeds' functional APIs ---


def softmax_online_chunked(
    chunks: Sequence[Any],
    V_chunks: Sequence[Any],
    m_init: Any = -np.inf,
    l_init: Any = 0.0,
    O_init: Any = 0.0,
    *,
    accum_dtype: npt.DTypeLike | str | None = None,
) -> np.ndarray:
    """softmax(s) @ V over a sequence given in chunks (seed 000's signature), returning O / l.

    chunks[i]: scores (..., n_i); V_chunks[i]: values (..., n_i, d) or (n_i, d). Chunks need
    not be equal in size (n_i = 0 is allowed). m_init, l_init (...,) and O_init (..., d)
    continue from an earlier state (O_init is unnormalised, as in the state); the defaults
    start empty. Rows that end empty give zeros.

    The state is kept in the accumulate dtype (float32 for float32 and narrower input,
    float64 for float64; ``accum_dtype`` overrides it, e.g. float16 to watch it fail); the
    result is returned in the input dtype (the common dtype of the chunks and V_chunks).
    Accuracy (tested, for any split and any merge order): max |result - softmax(s) @ V|,
    the reference in float64 on the exact input values, is below 1e-12 for float64 input,
    1e-6 for float32, 1e-3 for float16 and 5e-3 for bfloat16 (seed 000's bounds), times
    max(1, max|result|). The narrow bounds are the final rounding to the input dtype; the
    float32 state itself gathers about (number of chunks) x eps(float32) of error.
    """
    chunks, V_chunks = list(chunks), list(V_chunks)
    if len(chunks) != len(V_chunks):
        raise ValueError(f"softmax_online_chunked: chunks has {len(chunks)} arrays but "
                         f"V_chunks has {len(V_chunks)}")
    s_list = [as_float_array(s, name=f"chunks[{i}]") for i, s in enumerate(chunks)]
    v_list = [as_float_array(v, name=f"V_chunks[{i}]") for i, v in enumerate(V_chunks)]
    o_init = as_float_array(O_init, name="O_init")
    if o_init.ndim >= 1:
        d = o_init.shape[-1]
    elif v_list and v_list[0].ndim >= 1:
        d = v_list[0].shape[-1]
    else:
        raise ValueError("softmax_online_chunked: no chunks and a scalar O_init: d is unknown")
    in_dtype = _common_dtype(*(a.dtype for a in (*s_list, *v_list))) if s_list else o_init.dtype
    acc = accumulate_dtype(in_dtype, accum_dtype)
    m0, l0 = as_float_array(m_init, name="m_init"), as_float_array(l_init, name="l_init")
    batch = _broadcast_batch("m_init, l_init, O_init", m0.shape, l0.shape, o_init.shape[:-1])
    state = SoftmaxState(np.broadcast_to(m0.astype(acc), batch),
                         np.broadcast_to(l0.astype(acc), batch),
                         np.broadcast_to(o_init.astype(acc), (*batch, d)))
    for i, (s, v) in enumerate(zip(s_list, v_list, strict=True)):
        s, v = _read_chunk(s, v, d, s_name=f"chunks[{i}]", v_name=f"V_chunks[{i}]")
        state = state._absorb_chunk(s, v, acc)
    return state.finalize(dtype=in_dtype)


def softmax_online(
    x: Any, block_size: int, *, axis: int = -1, accum_dtype: npt.DTypeLike | str | None = None
) -> tuple[np.ndarray, list[tuple[Any, Any]]]:
    """Softmax along ``axis`` in one streaming pass over blocks of ``block_size`` entries,
    keeping only the running max m and normaliser l (seed 002's online softmax).

    Returns (probabilities, trace): probabilities have x's shape and dtype; trace has one
    (m, l) pair per block, the state after absorbing it: Python floats for 1-D x, arrays of
    x's shape without ``axis`` (in the accumulate dtype) otherwise. The last block may be
    short. Rows of all -inf give zeros; +inf or NaN make their row NaN.

    Raises ValueError when block_size < 1 and TypeError when it is not an integer.
    """
    xa = as_float_array(x, name="x")
    if xa.ndim < 1:
        raise ValueError("x: expected at least one dimension, got a scalar")
    if isinstance(axis, bool) or not isinstance(axis, int | np.integer):
        raise TypeError(f"axis: expected one int, got {axis!r}")
    if not -xa.ndim <= axis < xa.ndim:
        raise ValueError(f"axis: {axis} is out of range for x with shape {xa.shape}")
    if isinstance(block_size, bool):
        raise TypeError(f"block_size: expected an integer, got {block_size!r}")
    try:
        block = operator.index(block_size)
    except TypeError:
        raise TypeError(f"block_size: expected an integer, got {block_size!r}") from None
    if block < 1:
        raise ValueError(f"block_size: expected an integer >= 1, got {block}")
    acc = accumulate_dtype(xa.dtype, accum_dtype)
    s = np.moveaxis(xa, axis, -1).astype(acc, copy=False)  # (..., N)
    m = np.full(s.shape[:-1], -np.inf, acc)
    l = np.zeros(s.shape[:-1], acc)
    trace: list[tuple[Any, Any]] = []
    with np.errstate(invalid="ignore"):  # +inf - +inf: the row is NaN, as documented
        for start in range(0, s.shape[-1], block):
            m, alpha, p = _absorb(m, s[..., start:start + block])
            l = (alpha * l + p.sum(axis=-1, dtype=acc)).astype(acc, copy=False)
            trace.append((float(m), float(l)) if xa.ndim == 1 else (m, l))
        p = np.exp(s - row_shift(m)[..., None])
        probs = np.zeros(s.shape, acc)
        np.divide(p, l[..., None], out=probs, where=(l != 0)[..., None])
    return cast(np.moveaxis(probs, -1, axis), xa.dtype), trace  # float16: no slow path
