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


def test_a_band_is_shaded(tmp_path):
  # The band (e.g. a bootstrap interval) fills the area between its bounds, pale (alpha 0.2), far more pixels than
  # the line alone.
  x, y = [0.0, 1.0, 2.0], [1.0, 1.0, 1.0]
  line = plots.save(tmp_path / "line.png", [plots.Series(x, y, None, "tab:blue")])
  band = plots.save(tmp_path / "band.png", [plots.Series(x, y, None, "tab:blue", band=([0.0] * 3, [2.0] * 3))])
  bluish = lambda png: int((image.imread(png)[..., 2] - image.imread(png)[..., 0] > 0.08).sum())  # noqa: E731
  assert bluish(band) > 10 * bluish(line)


def test_a_finite_point_between_nans_is_drawn(tmp_path):
  # An evaluation between two NaN ones (a diverged evaluation that recovered) is a line segment of one point: the
  # line drew nothing there, and the point was missing from the plot without a word.
  x = [0.0, 1.0, 2.0, 3.0, 4.0]
  with_lone = plots.save(tmp_path / "lone.png", [plots.Series(x, [1.0, math.nan, 5.0, math.nan, 1.0], None,
                                                              "tab:blue")])
  without = plots.save(tmp_path / "none.png", [plots.Series(x, [1.0, math.nan, math.nan, math.nan, 1.0], None,
                                                            "tab:blue")])
  assert _coloured_pixels(with_lone) > _coloured_pixels(without) + 10
