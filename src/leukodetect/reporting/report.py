"""Markdown and self-contained HTML reports of an evaluation run.

Both files carry the same content: the facts needed to reproduce the run (command, machine, date,
versions, data), the metrics with confidence intervals, optional cross-validation summary, and the
figures. The HTML embeds its PNGs as base64 data URIs and uses no external resources, so it can be
mailed or archived as one file.
"""

from __future__ import annotations

from pathlib import Path

from leukodetect.errors import LeukoError
from leukodetect.reporting.render import Section, render_html, render_markdown
from leukodetect.utils import atomic_write_text

#: Metrics that are proportions, shown as percentages; other scores (F1, AUC) as decimals.
PERCENT_METRICS = frozenset(
    {"accuracy", "sensitivity", "specificity", "precision", "npv", "fpr", "fnr"}
)


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


def _percent_ci(entry: dict | None) -> str:
    if not entry or entry.get("value") is None:
        return "-"
    return f"{100 * entry['value']:.1f}% ({100 * entry['ci_low']:.1f}-{100 * entry['ci_high']:.1f})"


def _decimal_ci(entry: dict | None) -> str:
    if not entry or entry.get("value") is None:
        return "-"
    return f"{entry['value']:.3f} ({entry['ci_low']:.3f}-{entry['ci_high']:.3f})"


#: Columns of a per-laboratory table (:func:`lab_table_rows`).
LAB_HEADER = ("laboratory", "unit", "n", "blast", "normal", "sensitivity (95% CI)", "specificity (95% CI)", "ROC AUC (95% CI)",
              "flagged by the guard")


def lab_table_rows(figures: dict[str, dict]) -> list[tuple]:
    """Rows of a per-laboratory table from :func:`leukodetect.evaluation.labs.per_lab` figures (a row per laboratory and unit)."""
    rows = []
    for lab, parts in figures.items():
        for part, f in parts.items():
            flags = f"{100 * f['flag_rate']:.1f}%" if f["flag_rate"] is not None else "-"
            rows.append((lab, part, f.get("fields", f["cells"]), f["blast"], f["normal"], _percent_ci(f.get("sensitivity")),
                         _percent_ci(f.get("specificity")), _decimal_ci(f.get("roc_auc")), flags))
    return rows


def _sections(metrics: dict | None, facts: dict, fold_summary: dict | None, figures: list[tuple[str, Path]]) -> list[Section]:
    """Report content as sections, one per table, then the figures; both files render these."""
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
    if metrics and metrics.get("labs"):
        tables.append(("Per laboratory", LAB_HEADER, lab_table_rows(metrics["labs"])))
    sections = [Section(heading, tables=[(None, header, rows)]) for heading, header, rows in tables]
    return sections + ([Section("Figures", figures=figures)] if figures else [])


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
    sections = _sections(metrics, facts, fold_summary, _relative_figures(out_dir, figures))
    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    atomic_write_text(md_path, render_markdown(title, sections))
    atomic_write_text(html_path, render_html(title, sections, out_dir))
    return md_path, html_path
