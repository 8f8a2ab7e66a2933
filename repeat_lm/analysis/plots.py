"""PNG plots with matplotlib's Agg canvas (no pyplot: no global backend, no display, safe in threads)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np


@dataclasses.dataclass
class Series:
  x: Sequence[float]
  y: Sequence[float]
  label: str | None = None
  color: object = None
  style: str = "-"  # matplotlib format: '-', '--', 'o', 'x', ...
  band: tuple[Sequence[float], Sequence[float]] | None = None  # (lower, upper), shaded


def colors(n: int) -> list:
  """n distinguishable colours in a fixed order (viridis for many, tab10 for few)."""
  from matplotlib import colormaps
  if n <= 10:
    return [colormaps["tab10"](i) for i in range(n)]
  return [colormaps["viridis"](v) for v in np.linspace(0.0, 0.95, n)]


_LINE_ONLY = ("-", "--", "-.", ":")  # matplotlib formats without a marker


def _drawn_points(s: Series) -> int:
  """Points of `s` with finite x and y (a NaN evaluation breaks a line)."""
  try:
    x, y = np.asarray(s.x, float), np.asarray(s.y, float)
  except (TypeError, ValueError):  # categorical values: matplotlib draws them all
    return len(s.x)
  return int(np.sum(np.isfinite(x) & np.isfinite(y))) if x.shape == y.shape else len(x)


def _isolated(s: Series) -> np.ndarray | None:
  """Mask of the finite points of `s` with no finite neighbour (NaN on both sides, e.g. an evaluation between two
  diverged ones), which a line draws nothing of; None for categorical values."""
  try:
    x, y = np.asarray(s.x, float), np.asarray(s.y, float)
  except (TypeError, ValueError):
    return None
  if x.shape != y.shape or x.ndim != 1:
    return None
  ok = np.isfinite(x) & np.isfinite(y)
  return ok & ~np.r_[False, ok[:-1]] & ~np.r_[ok[1:], False]


def save(path: str | Path, series: Sequence[Series], *, title: str = "", xlabel: str = "", ylabel: str = "",
         logx: bool = False, logy: bool = False, diagonal: bool = False, legend_title: str | None = None) -> Path:
  """One axes of lines/markers written to `path` (PNG); `diagonal` draws y = x (observed vs predicted)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(7.0, 4.5), dpi=110)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  for s in series:
    # A line through one point draws nothing: a run evaluated once (or with one finite evaluation) would be in the
    # legend only. Mark its point instead.
    style = "o" if s.style in _LINE_ONLY and _drawn_points(s) < 2 else s.style
    (line,) = ax.plot(s.x, s.y, style, label=s.label, color=s.color, markersize=6 if style in ("o", "x", "s") else 3)
    lone = _isolated(s) if style in _LINE_ONLY else None
    if lone is not None and lone.any():  # a finite point between NaNs: the line leaves it out, silently; mark it
      ax.plot(np.asarray(s.x, float)[lone], np.asarray(s.y, float)[lone], "o", color=line.get_color(), markersize=3)
    if s.band is not None:
      ax.fill_between(s.x, s.band[0], s.band[1], color=s.color, alpha=0.2, linewidth=0)
  if diagonal:
    lo, hi = ax.get_xlim()
    lo, hi = min(lo, ax.get_ylim()[0]), max(hi, ax.get_ylim()[1])
    ax.plot([lo, hi], [lo, hi], ":", color="grey", label="y = x")
  ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
  if logx:
    ax.set_xscale("log")
  if logy:
    ax.set_yscale("log")
  ax.grid(alpha=0.3)
  if any(s.label for s in series):
    ax.legend(fontsize=7, title=legend_title, title_fontsize=8, loc="best")
  fig.tight_layout()
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path)
  return path
