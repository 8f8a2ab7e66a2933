"""Reports people can read: `report.md` (images linked) and a self-contained `report.html` (images inlined).

    write_report(out_dir, "Degradation", [("Summary", "text with `code` and **bold**", ["a.png"], rows)])

A section is (heading, markdown text[, png paths[, table rows]]); rows are dicts (columns = keys, in order of first
appearance) or lists whose first entry is the header. The Markdown understood: paragraphs, `- ` lists, `#`
headings, fenced code, `inline code`, **bold**.
"""

from __future__ import annotations

import base64
import html
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

from repeat_lm import files

Section = tuple  # (heading, text, pngs=None, rows=None)


def fmt(value) -> str:
  """Numbers with 4 significant digits (integers in full up to 1e6), everything else as str."""
  if isinstance(value, bool) or value is None:
    return "" if value is None else str(value)
  if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) < 1e6):
    return str(int(value))
  if isinstance(value, float):
    return "nan" if math.isnan(value) else f"{value:.4g}"
  return str(value)


def table_rows(rows: Sequence) -> tuple[list[str], list[list[str]]]:
  """(header, body) as text from dict rows or from [header, *rows] lists."""
  if not rows:
    return [], []
  if isinstance(rows[0], dict):
    header = list(dict.fromkeys(k for r in rows for k in r))
    return header, [[fmt(r.get(k)) for k in header] for r in rows]
  return [str(h) for h in rows[0]], [[fmt(v) for v in r] for r in rows[1:]]


def _md_table(rows: Sequence) -> str:
  header, body = table_rows(rows)
  if not header:
    return ""
  line = lambda cells: "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"  # noqa: E731
  return "\n".join([line(header), line(["---"] * len(header)), *(line(r) for r in body)])


def _inline(text: str) -> str:
  text = html.escape(text, quote=False)
  text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
  return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)


def markdown_to_html(text: str) -> str:
  """The small Markdown subset this module writes."""
  out, para, items, code = [], [], [], None

  def flush():
    if para:
      out.append(f"<p>{_inline(' '.join(para))}</p>")
      para.clear()
    if items:
      out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in items) + "</ul>")
      items.clear()

  for line in text.splitlines():
    if code is not None:
      if line.strip().startswith("```"):
        out.append(f"<pre><code>{html.escape(chr(10).join(code))}</code></pre>")
        code = None
      else:
        code.append(line)
    elif line.strip().startswith("```"):
      flush()
      code = []
    elif not line.strip():
      flush()
    elif line.lstrip().startswith(("- ", "* ")):
      if para:
        flush()
      items.append(line.lstrip()[2:])
    elif items and line.startswith("  "):
      items[-1] += " " + line.strip()
    elif line.startswith("#"):
      flush()
      level = min(len(line) - len(line.lstrip("#")) + 2, 6)  # the page title is h1, sections h2
      out.append(f"<h{level}>{_inline(line.lstrip('#').strip())}</h{level}>")
    else:
      if items:
        flush()
      para.append(line.strip())
  if code is not None:
    out.append(f"<pre><code>{html.escape(chr(10).join(code))}</code></pre>")
  flush()
  return "\n".join(out)


def _html_table(rows: Sequence) -> str:
  header, body = table_rows(rows)
  if not header:
    return ""
  head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
  trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
  return f"<table><thead><tr>{head}</tr></thead><tbody>{trs}</tbody></table>"


_STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.4}"
          "table{border-collapse:collapse;margin:1em 0;font-size:90%}td,th{border:1px solid #ccc;padding:3px 8px;"
          "text-align:right}th{background:#f3f3f3}img{max-width:100%;display:block;margin:1em 0}"
          "code{background:#f3f3f3;padding:0 3px}")


def _plot_path(png: Path, out_dir: Path) -> Path:
  """A plot as given (absolute, or from the current directory), else a bare name in out_dir, where plots are saved
  beside the report (a name there failed as 'No such file' from any other directory)."""
  if png.exists() or png.is_absolute() or not (out_dir / png).exists():
    if not png.exists():
      raise FileNotFoundError(f"Report plot {png} does not exist (nor in {out_dir}): save it before writing the "
                              "report, and give its path (absolute, from the current directory, or from out_dir).")
    return png
  return out_dir / png


def write_report(out_dir: str | Path, title: str, sections: Sequence[Section]) -> dict[str, str]:
  """Write report.md and report.html into out_dir; returns their paths. Plot paths: absolute, from the current
  directory, or from out_dir."""
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  md = [f"# {title}", ""]
  body = [f"<h1>{html.escape(title)}</h1>"]
  for section in sections:
    heading, text, pngs, rows = (tuple(section) + (None, None))[:4]
    md += [f"## {heading}", "", text.strip(), ""]
    body += [f"<h2>{html.escape(heading)}</h2>", markdown_to_html(text)]
    if rows:
      md += [_md_table(rows), ""]
      body.append(_html_table(rows))
    for png in pngs or []:
      png = _plot_path(Path(png), out_dir)
      rel = os.path.relpath(png.resolve(), out_dir.resolve())
      md += [f"![{png.stem}]({rel})", ""]
      data = base64.b64encode(png.read_bytes()).decode("ascii")
      body.append(f'<img alt="{html.escape(png.stem)}" src="data:image/png;base64,{data}">')
  # Replaced whole, as the bench reports are: a kill mid-write left half of the earlier report.
  files.atomic_write_bytes(out_dir / "report.md", "\n".join(md).encode())
  page = (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
          f"<style>{_STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
  files.atomic_write_bytes(out_dir / "report.html", page.encode())
  return {"markdown": str(out_dir / "report.md"), "html": str(out_dir / "report.html")}
