"""Markdown and self-contained HTML reports of an evaluation run.

Both files carry the same content: the facts needed to reproduce the run (command, machine, date,
versions, data), the metrics with confidence intervals, optional cross-validation summary, and the
figures. The HTML embeds its PNGs as base64 data URIs and uses no external resources, so it can be
mailed or archived as one file.
"""

from __future__ import annotations

import base64
import html
import os
import tempfile
from pathlib import Path

from leukodetect.errors import LeukoError

#: Metrics that are proportions, shown as percentages; other scores (F1, AUC) as decimals.
PERCENT_METRICS = frozenset(
    {"accuracy", "sensitivity", "specificity", "precision", "npv", "fpr", "fnr"}
)

_CSS = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem;
       color: #222; }
table { border-collapse: collapse; margin: 1rem 0; }
th, td { border: 1px solid #ccc; padding: 0.3rem 0.7rem; text-align: left; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1.5rem 0; }
figure img { max-width: 100%; }
figcaption { color: #555; font-size: 0.9rem; }
"""


def format_value(name: str, value) -> str:
    """A metric value as text: percent with 2 decimals for proportions, 3 decimals otherwise."""
    if value is None or value != value:  # None or nan
        return "n/a"
    return f"{100 * value:.2f}%" if name in PERCENT_METRICS else f"{value:.3f}"


def _cells(name: str, entry: dict) -> tuple[str, str, str, str]:
    low, high = entry.get("ci_low"), entry.get("ci_high")
    ci = "n/a" if low is None or high is None else (
        f"{format_value(name, low)} – {format_value(name, high)}"
    )
    return name, format_value(name, entry.get("value")), ci, entry.get("method", "")


def format_metric(name: str, entry: dict) -> str:
    """One metric entry of a binary_report as a line, e.g. ``sensitivity 93.33% (81.73% – 97.71%, wilson)``."""
    _, value, ci, method = _cells(name, entry)
    return f"{name} {value} ({ci}, {method})"


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _tables(metrics: dict | None, facts: dict, fold_summary: dict | None):
    """Report content as (heading, header, rows) tables, shared by both renderers."""
    tables = [("Facts", ("fact", "value"), [(str(k), str(v)) for k, v in facts.items()])]
    if metrics:
        conf_level = round(100 * metrics.get("confidence", 0.95))
        rows = [_cells(n, e) for n, e in metrics["metrics"].items()]
        tables.append(("Metrics", ("metric", "value", f"{conf_level}% CI", "method"), rows))
        c = metrics["confusion"]
        tables.append((
            "Confusion matrix (rows true, columns predicted)",
            ("", "predicted normal", "predicted blast"),
            [("true normal", str(c["tn"]), str(c["fp"])), ("true blast", str(c["fn"]), str(c["tp"]))],
        ))
    if fold_summary:
        rows = [
            (n, format_value(n, s.get("mean")), format_value(n, s.get("sd")), str(s.get("n_folds")))
            for n, s in fold_summary.items()
        ]
        tables.append(("Cross-validation folds", ("metric", "mean", "sd", "folds"), rows))
    return tables


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _markdown(title, tables, figures) -> str:
    lines = [f"# {title}", ""]
    for heading, header, rows in tables:
        lines += [f"## {heading}", "", "| " + " | ".join(header) + " |",
                  "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
        lines.append("")
    if figures:
        lines += ["## Figures", ""]
        for caption, rel in figures:
            lines += [f"![{_md_cell(caption)}]({rel.as_posix()})", "", f"*{caption}*", ""]
    return "\n".join(lines)


def _html(title, tables, figures, out_dir: Path) -> str:
    e = html.escape
    parts = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f"<title>{e(title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
        f"<h1>{e(title)}</h1>",
    ]
    for heading, header, rows in tables:
        parts += [f"<h2>{e(heading)}</h2>", "<table>",
                  "<tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"]
        parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows]
        parts.append("</table>")
    if figures:
        parts.append("<h2>Figures</h2>")
        for caption, rel in figures:
            data = base64.b64encode((out_dir / rel).read_bytes()).decode("ascii")
            parts.append(
                f'<figure><img alt="{e(caption)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{e(caption)}</figcaption></figure>"
            )
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)


def _relative_figures(out_dir: Path, figures: dict) -> list[tuple[str, Path]]:
    out = []
    for caption, path in figures.items():
        path = Path(path)
        # A relative path may be relative to the report folder or to the working directory.
        full = path if path.is_absolute() or not (out_dir / path).is_file() else out_dir / path
        if not full.is_file():
            raise LeukoError(f"Figure file {full} does not exist; save the figure before writing the report.")
        try:
            rel = full.resolve().relative_to(out_dir.resolve())
        except ValueError:
            raise LeukoError(
                f"Figure file {full} is outside the report folder {out_dir}; save figures inside it."
            ) from None
        out.append((str(caption), rel))
    return out


def write_report(
    out_dir: Path,
    *,
    title: str,
    metrics: dict | None,
    figures: dict[str, Path],
    facts: dict[str, str],
    fold_summary: dict | None = None,
) -> tuple[Path, Path]:
    """Write ``report.md`` and a self-contained ``report.html`` into ``out_dir``.

    Args:
        metrics: a :func:`~leukodetect.evaluation.intervals.binary_report` dict, or None.
        figures: caption -> PNG path inside ``out_dir`` (absolute or relative to it).
        facts: what makes the run reproducible (command, machine, date, versions, data).
        fold_summary: a :func:`~leukodetect.evaluation.intervals.summarize_folds` dict, or None.

    Returns:
        (path of report.md, path of report.html).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figs = _relative_figures(out_dir, figures)
    tables = _tables(metrics, facts, fold_summary)
    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    _write_atomic(md_path, _markdown(title, tables, figs))
    _write_atomic(html_path, _html(title, tables, figs, out_dir))
    return md_path, html_path
