"""Shared matplotlib set-up for the lab: the Agg backend, one style, one colour per dtype.

Experiments build figures with :func:`figure` (a plain ``matplotlib.figure.Figure``,
never pyplot, so nothing global is left open) and return them in ``Result.figures``;
the runner renders each to PNG (``runner.save_figure``) inside :func:`style`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display needed, the same pixels everywhere

from matplotlib.figure import Figure

__all__ = ["DPI", "DTYPE_COLORS", "NAN_COLOR", "STYLE", "dtype_color", "figure", "style"]

#: Resolution every PNG is written at.
DPI = 110

#: rcParams applied while an experiment runs and while its figures are saved.
STYLE: dict[str, Any] = {
    "figure.facecolor": "white",
    "axes.facecolor": "white",
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "legend.fontsize": 8,
    "legend.frameon": False,
    "font.size": 10,
    "savefig.dpi": DPI,
    "svg.hashsalt": "flashmath",
}

#: NaN cells and failure markers.
NAN_COLOR = "#d62728"

#: One colour per dtype name, the same in every plot of the lab.
DTYPE_COLORS: dict[str, str] = {
    "float64": "#1f77b4",
    "float32": "#2ca02c",
    "float16": "#ff7f0e",
    "bfloat16": "#9467bd",
    "float8_e3m4": "#8c564b",
    "float8_e4m3": "#e377c2",
    "float8_e4m3b11fnuz": "#7f7f7f",
    "float8_e4m3fn": "#bcbd22",
    "float8_e4m3fnuz": "#17becf",
    "float8_e5m2": "#393b79",
    "float8_e5m2fnuz": "#637939",
    "float8_e8m0fnu": "#843c39",
}


def dtype_color(name: str) -> str:
    """The lab's colour for a dtype name (grey for names it does not know)."""
    return DTYPE_COLORS.get(name, "#555555")


@contextlib.contextmanager
def style() -> Iterator[None]:
    """Apply the lab's rcParams for the duration of the block."""
    with matplotlib.rc_context(STYLE):  # type: ignore[arg-type]
        yield


def figure(nrows: int = 1, ncols: int = 1, *, width: float = 6.4, height: float = 4.0,
           **subplot_kw: Any) -> tuple[Figure, Any]:
    """A new Figure of ``width`` x ``height`` inches with an (nrows, ncols) grid of axes.

    Returns ``(fig, axes)`` like ``plt.subplots`` (``axes`` squeezed the same way), but the
    figure is not registered with pyplot: it is freed when the last reference goes.
    """
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(nrows, ncols, **subplot_kw)
    return fig, axes
