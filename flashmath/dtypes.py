"""Dtype names, input promotion and the accumulate-dtype rule shared by every part.

flashmath works on NumPy arrays in float64, float32, float16, bfloat16 and the
float8 types of ml_dtypes. Rules (docs/conventions.md):

- Integer and bool input is promoted to float64.
- Complex, object, string and other non-float input is a TypeError naming the dtype.
- Arithmetic runs in the *accumulate dtype*: float64 for float64, float32 for
  float32 and for every narrower float; ``accum_dtype=`` overrides it (the lab
  uses this to show what narrow arithmetic does). Results return in the input dtype.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import numpy.typing as npt

__all__ = [
    "ACCUMULATE_DTYPES",
    "DTYPES",
    "FLOAT8_DTYPES",
    "NARROW_DTYPES",
    "accumulate_dtype",
    "as_accumulate_dtype",
    "as_dtype",
    "as_float_array",
    "dtype_name",
    "finfo",
    "from_torch",
    "to_torch",
]

bfloat16 = np.dtype(ml_dtypes.bfloat16)

#: Every float8 type ml_dtypes provides (names as ml_dtypes spells them).
FLOAT8_DTYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(getattr(ml_dtypes, name))
    for name in (
        "float8_e3m4",
        "float8_e4m3",
        "float8_e4m3b11fnuz",
        "float8_e4m3fn",
        "float8_e4m3fnuz",
        "float8_e5m2",
        "float8_e5m2fnuz",
        "float8_e8m0fnu",
    )
    if hasattr(ml_dtypes, name)
}

#: Name -> dtype for every floating dtype flashmath accepts.
DTYPES: dict[str, np.dtype[Any]] = {
    "float64": np.dtype(np.float64),
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": bfloat16,
    **FLOAT8_DTYPES,
}

#: The dtypes narrower than float32 (computed with float32 accumulators by default).
NARROW_DTYPES: tuple[np.dtype[Any], ...] = (
    np.dtype(np.float16),
    bfloat16,
    *FLOAT8_DTYPES.values(),
)

#: The dtypes arithmetic may run in: those that hold -inf (not the float8 "fn"/"fnu" types).
ACCUMULATE_DTYPES: tuple[np.dtype[Any], ...] = tuple(
    dt for dt in DTYPES.values() if np.isneginf(np.array(-np.inf).astype(dt)).item()
)

_ALIASES = {"fp64": "float64", "fp32": "float32", "fp16": "float16", "bf16": "bfloat16",
            "double": "float64", "single": "float32", "half": "float16"}


def as_dtype(dtype: npt.DTypeLike | str, *, name: str = "dtype") -> np.dtype[Any]:
    """Resolve a dtype or a name ("float32", "fp16", "bfloat16", "float8_e4m3fn", ...).

    Raises TypeError naming ``name`` when the dtype is not a floating type flashmath supports.
    """
    if isinstance(dtype, str):
        key = _ALIASES.get(dtype.lower(), dtype.lower())
        if key in DTYPES:
            return DTYPES[key]
        raise TypeError(f"{name}: unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"{name}: {dtype!r} is not a dtype") from exc
    if dt not in DTYPES.values():
        raise TypeError(f"{name}: dtype {dt} is not supported; expected one of {sorted(DTYPES)}")
    return dt


def dtype_name(dtype: npt.DTypeLike) -> str:
    """The canonical name of a supported dtype ("float32", "bfloat16", "float8_e4m3fn", ...)."""
    dt = np.dtype(dtype)
    for key, value in DTYPES.items():
        if value == dt:
            return key
    return str(dt)


def as_float_array(x: Any, *, name: str = "x") -> np.ndarray:
    """Return ``x`` as a NumPy array of a supported float dtype (no copy when already one).

    Integer and bool input promotes to float64. Complex, object, string, datetime and
    other dtypes raise TypeError naming ``name`` and the dtype; a ragged nested sequence
    raises ValueError naming ``name``.
    """
    try:
        arr = np.asarray(x)
    except ValueError as exc:  # a ragged list: NumPy's message does not say which argument
        raise ValueError(f"{name}: not a rectangular array of numbers ({exc})") from None
    dt = arr.dtype
    if dt in DTYPES.values():
        return arr
    if dt.kind in "biu":
        return arr.astype(np.float64)
    raise TypeError(
        f"{name}: dtype {dt} is not supported; flashmath takes float64, float32, float16, "
        f"bfloat16, float8 (ml_dtypes), or integer/bool input (promoted to float64)"
    )


def as_accumulate_dtype(dtype: npt.DTypeLike | str, *, name: str = "accum_dtype") -> np.dtype[Any]:
    """Resolve a dtype that arithmetic will run in: it must hold -inf (masked entries,
    empty rows), so the float8 types without infinities are refused with a ValueError."""
    dt = as_dtype(dtype, name=name)
    if dt not in ACCUMULATE_DTYPES:
        raise ValueError(
            f"{name}: {dtype_name(dt)} has no -inf, so it cannot hold masked entries or empty "
            f"rows; use one of {sorted(dtype_name(d) for d in ACCUMULATE_DTYPES)}"
        )
    return dt


def accumulate_dtype(
    dtype: npt.DTypeLike, accum_dtype: npt.DTypeLike | str | None = None
) -> np.dtype[Any]:
    """The dtype arithmetic runs in: ``accum_dtype`` if given (it must hold -inf, see
    :func:`as_accumulate_dtype`), else float64 for float64 input and float32 for float32
    and every narrower float."""
    if accum_dtype is not None:
        return as_accumulate_dtype(accum_dtype)
    dt = np.dtype(dtype)
    return np.dtype(np.float64) if dt == np.float64 else np.dtype(np.float32)


def finfo(dtype: npt.DTypeLike | str) -> Any:
    """``np.finfo`` that also knows bfloat16 and the float8 types (via ml_dtypes.finfo)."""
    dt = as_dtype(dtype) if isinstance(dtype, str) else np.dtype(dtype)
    if dt in (np.float64, np.float32, np.float16):
        return np.finfo(dt)
    return ml_dtypes.finfo(dt)


def from_torch(t: Any) -> np.ndarray:
    """The values of a torch tensor as a NumPy array: a view for a CPU tensor (a host copy
    otherwise), detached; bfloat16 becomes ml_dtypes.bfloat16 bit for bit. torch is
    imported only by whoever made the tensor."""
    import torch

    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(bfloat16)
    return t.numpy()


def to_torch(a: Any, dtype: Any = None, device: Any = "cpu", *, copy: bool = False) -> Any:
    """A NumPy array as a torch tensor, bit for bit: ml_dtypes.bfloat16 becomes
    torch.bfloat16 through an int16 view (no float32 round trip). On the CPU the tensor
    shares the array's memory unless a cast, a non-contiguous layout or ``copy=True``
    (for read-only arrays that torch will write to) asks for a new buffer; other devices
    get a copy. ``dtype`` (a torch dtype) casts first; None keeps the array's dtype.
    The inverse of :func:`from_torch`."""
    import torch

    a = np.asarray(a)
    if dtype is not None:
        a = a.astype(from_torch(torch.empty(0, dtype=dtype)).dtype, copy=False)
    a = np.array(a, copy=True) if copy or not a.flags.writeable else np.ascontiguousarray(a)
    if a.dtype == bfloat16:
        t = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    else:
        t = torch.from_numpy(a)
    return t if torch.device(device).type == "cpu" else t.to(device)
