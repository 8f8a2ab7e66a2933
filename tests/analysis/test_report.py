"""report.write_report: Markdown with linked images, HTML with inlined images, tables from dicts or lists."""

import base64

import pytest

from repeat_lm.analysis import plots, report


def test_write_report(tmp_path):
  png = plots.save(tmp_path / "img" / "curve.png", [plots.Series([0, 1, 2], [1.0, 0.5, 0.7], "run a")],
                   title="t", xlabel="x", ylabel="y")
  paths = report.write_report(tmp_path / "out", "My <report>", [
      ("Summary", "Two runs; `best` is **0.63**.\n\n- first item\n- second <item>", [png],
       [{"run": "a", "acc": 0.63123456}, {"run": "b", "acc": float("nan"), "note": "x|y"}]),
      ("Lists", "As lists:", None, [["rate", "acc"], [0.1, 0.6], [0.3, 0.65]]),
      ("Only text", "```\ncode <block>\n```"),
  ])
  md = (tmp_path / "out" / "report.md").read_text()
  assert paths == {"markdown": str(tmp_path / "out" / "report.md"), "html": str(tmp_path / "out" / "report.html")}
  assert "# My <report>" in md and "![curve](../img/curve.png)" in md
  assert "| run | acc | note |" in md and "| a | 0.6312 |  |" in md and "| b | nan | x\\|y |" in md
  assert "| 0.1 | 0.6 |" in md
  page = (tmp_path / "out" / "report.html").read_text()
  assert "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()[:100] in page
  assert "<title>My &lt;report&gt;</title>" in page
  assert "<code>best</code>" in page and "<strong>0.63</strong>" in page
  assert "<li>second &lt;item&gt;</li>" in page and "<pre><code>code &lt;block&gt;</code></pre>" in page
  assert "<th>rate</th>" in page and "<td>0.65</td>" in page


def test_a_plot_named_as_saved_in_out_dir_is_found_there(tmp_path, monkeypatch):
  # docs/analysis.md's example passes ["plot.png"] saved in out_dir: it failed as "No such file" from elsewhere.
  out = tmp_path / "out"
  plots.save(out / "plot.png", [plots.Series([0, 1], [1.0, 0.5], "a")], title="t", xlabel="x", ylabel="y")
  monkeypatch.chdir(tmp_path)
  report.write_report(out, "T", [("H", "text", ["plot.png"])])
  assert "![plot](plot.png)" in (out / "report.md").read_text()
  with pytest.raises(FileNotFoundError, match=r"Report plot missing.png does not exist \(nor in .*out\)"):
    report.write_report(out, "T", [("H", "text", ["missing.png"])])


def test_fmt():
  assert [report.fmt(v) for v in (3, 2.0, 0.123456, 2.5e8, None, "s", True)] == [
      "3", "2", "0.1235", "2.5e+08", "", "s", "True"]


def test_headings_in_a_section_nest_under_it_and_list_items_continue_on_indented_lines():
  # The page title is <h1>, sections <h2>: a `#` heading inside a section's text is one level below them.
  html = report.markdown_to_html("# Sub\n## Subsub\n- item one\n  continued\n- two\n\nafter")
  assert html == ("<h3>Sub</h3>\n<h4>Subsub</h4>\n<ul><li>item one continued</li><li>two</li></ul>\n"
                  "<p>after</p>")


def test_a_report_written_again_replaces_the_earlier_one_whole(tmp_path):
  """The reports were rewritten in place: a kill mid-write left half of the earlier one. Replaced whole, a reader that
  had the earlier one open still reads all of it."""
  out = tmp_path / "out"
  report.write_report(out, "First", [("H", "first text")])
  before = {name: (out / name).read_text() for name in ("report.md", "report.html")}
  readers = {name: (out / name).open() for name in before}
  report.write_report(out, "Second", [("H", "second text")])
  for name, reader in readers.items():
    with reader:
      assert reader.read() == before[name]
    assert "second text" in (out / name).read_text()
