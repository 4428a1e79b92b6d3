"""The one Markdown and self-contained HTML renderer of the project's reports.

A report is a title and a list of :class:`Section`: a heading, paragraphs, tables and figures; a
table cell may be a :class:`Thumbnail`. The evaluation report (:mod:`leukodetect.reporting.report`),
the comparison report (:mod:`leukodetect.reporting.compare_report`) and the demo's page
(:mod:`leukodetect.jobs.demo`) build sections and render them here, so every report shares one
layout and one escaping rule. The HTML embeds its PNGs as base64 data URIs and uses no external
resources, so it can be mailed or archived as one file.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

#: A table: (caption or None, header cells, rows of cells). Cells are turned into text with ``str``,
#: except a :class:`Thumbnail`, which shows its image.
Table = tuple[str | None, tuple, list[tuple]]

#: The default style sheet (the evaluation report's); the comparison report passes a wider one.
CSS = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem;
       color: #222; }
table { border-collapse: collapse; margin: 1rem 0; }
th, td { border: 1px solid #ccc; padding: 0.3rem 0.7rem; text-align: left; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1.5rem 0; }
figure img { max-width: 100%; }
figcaption { color: #555; font-size: 0.9rem; }
td img { display: block; max-height: 4rem; }
"""


@dataclass(frozen=True)
class Thumbnail:
    """A table cell showing a small PNG (path relative to the report folder): embedded in HTML, linked in Markdown."""

    path: Path
    alt: str = ""


@dataclass
class Section:
    """One ``##`` part of a report, rendered in this order: paragraphs, tables, figures.

    A table with a caption gets it as a bold line (Markdown) or an ``<h3>`` (HTML); without one the
    table follows the heading directly. Figures are (caption, PNG path relative to the report folder).
    """

    heading: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[tuple[str, Path]] = field(default_factory=list)


def md_cell(text) -> str:
    """``text`` made safe inside a Markdown table cell or image alt text: pipes escaped, newlines joined."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(title: str, sections: list[Section]) -> str:
    """The report as Markdown; figures are linked by their relative path, so keep them beside it."""
    lines = [f"# {title}", ""]
    for s in sections:
        lines += [f"## {s.heading}", ""]
        for p in s.paragraphs:
            lines += [p, ""]
        for caption, header, rows in s.tables:
            if caption is not None:
                lines += [f"**{caption}**", ""]
            lines += ["| " + " | ".join(md_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(_md_table_cell(c) for c in row) + " |" for row in rows]
            lines.append("")
        for caption, rel in s.figures:
            lines += [f"![{md_cell(caption)}]({Path(rel).as_posix()})", "", f"*{caption}*", ""]
    return "\n".join(lines)


def render_html(title: str, sections: list[Section], out_dir: Path, *, css: str = CSS) -> str:
    """The report as one self-contained HTML page; figures are read from ``out_dir`` and embedded.

    Args:
        out_dir: the report folder, which the figure paths are relative to.
        css: the page's style sheet (reports differ in width and font size).
    """
    e = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">', f"<title>{e(title)}</title>",
             f"<style>{css}</style>", "</head>", "<body>", f"<h1>{e(title)}</h1>"]
    for s in sections:
        parts.append(f"<h2>{e(s.heading)}</h2>")
        parts += [f"<p>{e(p)}</p>" for p in s.paragraphs]
        for caption, header, rows in s.tables:
            if caption is not None:
                parts.append(f"<h3>{e(caption)}</h3>")
            parts += ["<table>", "<tr>" + "".join(f"<th>{e(str(h))}</th>" for h in header) + "</tr>"]
            parts += ["<tr>" + "".join(_html_table_cell(c, out_dir) for c in row) + "</tr>" for row in rows]
            parts.append("</table>")
        for caption, rel in s.figures:
            parts.append(f'<figure><img alt="{e(caption)}" src="{_png_data_uri(out_dir, rel)}">'
                         f"<figcaption>{e(caption)}</figcaption></figure>")
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)


def _md_table_cell(cell) -> str:
    if isinstance(cell, Thumbnail):
        return f"![{md_cell(cell.alt)}]({Path(cell.path).as_posix()})"
    return md_cell(cell)


def _html_table_cell(cell, out_dir: Path) -> str:
    if isinstance(cell, Thumbnail):
        return f'<td><img alt="{html.escape(cell.alt)}" src="{_png_data_uri(out_dir, cell.path)}"></td>'
    return f"<td>{html.escape(str(cell))}</td>"


def _png_data_uri(out_dir: Path, rel: Path) -> str:
    """A PNG of the report folder as a data URI, so the page needs no other file."""
    return "data:image/png;base64," + base64.b64encode((Path(out_dir) / rel).read_bytes()).decode("ascii")
