"""plots.save: what a PNG shows."""

import math

from matplotlib import image

from repeat_lm.analysis import plots


def _coloured_pixels(path) -> int:
  rgb = image.imread(path)[..., :3]
  return int(((rgb.max(-1) - rgb.min(-1)) > 0.3).sum())  # tab10 colours; the axes, grid and text are grey


def test_a_series_with_one_point_is_drawn(tmp_path):
  # A run evaluated once (or with one finite evaluation) as a line: it drew nothing, only its legend entry.
  for name, y in (("one", [0.6]), ("one_finite", [0.6, math.nan])):
    png = plots.save(tmp_path / f"{name}.png", [plots.Series([1.0, 2.0][:len(y)], y, None, "tab:blue", "--")])
    assert _coloured_pixels(png) > 20, name
