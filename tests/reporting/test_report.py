"""Markdown and HTML reports."""

import base64

import pytest

from leukodetect.errors import LeukoError
from leukodetect.evaluation.intervals import binary_report, summarize_folds
from leukodetect.evaluation.metrics import Confusion
from leukodetect.reporting import report
from leukodetect.reporting.plots import plot_confusion, save_figure

pytestmark = pytest.mark.usefixtures("close_figures")

METRICS = {
    "n": 100,
    "threshold": 0.5,
    "confusion": {"tn": 50, "fp": 5, "fn": 3, "tp": 42},
    "metrics": {
        "sensitivity": {"value": 42 / 45, "ci_low": 0.8173, "ci_high": 0.97712, "method": "wilson"},
        "specificity": {"value": 50 / 55, "ci_low": 0.8046, "ci_high": 0.9605, "method": "wilson"},
        "f1": {"value": 84 / 92, "ci_low": 0.85, "ci_high": 0.96, "method": "bootstrap"},
        "roc_auc": {"value": 0.97654, "ci_low": 0.95, "ci_high": 0.99, "method": "bootstrap"},
        "npv": {"value": None, "ci_low": None, "ci_high": None, "method": "wilson"},
    },
}
FACTS = {"command": "leukodetect evaluate run/ | tee log", "date": "2024-05-01", "machine": "cpu"}


def test_format_metric():
    assert report.format_value("sensitivity", 42 / 45) == "93.33%"
    assert report.format_value("roc_auc", 0.97654) == "0.977"
    assert report.format_value("npv", None) == "n/a"
    assert report.format_metric("sensitivity", METRICS["metrics"]["sensitivity"]) == (
        "sensitivity 93.33% (81.73% – 97.71%, wilson)"
    )


@pytest.fixture
def written(tmp_path):
    png = save_figure(plot_confusion(Confusion(50, 5, 3, 42)), tmp_path / "figures" / "cm.png")
    folds = summarize_folds([
        {"metrics": {"accuracy": {"value": 0.9}}}, {"metrics": {"accuracy": {"value": 0.8}}},
    ])
    md, html = report.write_report(
        tmp_path, title="ALL <test> run", metrics=METRICS,
        figures={"Confusion matrix": png}, facts=FACTS, fold_summary=folds,
    )
    return tmp_path, md, html, png


def test_markdown_has_facts_metrics_and_relative_figure(written):
    out_dir, md, _, _ = written
    text = md.read_text()
    assert md == out_dir / "report.md"
    assert text.startswith("# ALL <test> run\n")
    assert "| metric | value | 95% CI | method |" in text
    assert "| sensitivity | 93.33% | 81.73% – 97.71% | wilson |" in text
    assert "| specificity | 90.91% | 80.46% – 96.05% | wilson |" in text
    assert "| roc_auc | 0.977 | 0.950 – 0.990 | bootstrap |" in text
    assert "| f1 | 0.913 | 0.850 – 0.960 | bootstrap |" in text
    assert "| npv | n/a | n/a | wilson |" in text
    assert "| command | leukodetect evaluate run/ \\| tee log |" in text
    assert "| date | 2024-05-01 |" in text
    assert "| accuracy | 85.00% | 7.07% | 2 |" in text
    assert "![Confusion matrix](figures/cm.png)" in text


def test_html_is_self_contained_and_escaped(written):
    _, _, html, png = written
    text = html.read_text()
    encoded = base64.b64encode(png.read_bytes()).decode()
    assert f'src="data:image/png;base64,{encoded}"' in text
    assert "http" not in text.lower()
    assert "<title>ALL &lt;test&gt; run</title>" in text
    assert "<td>sensitivity</td><td>93.33%</td><td>81.73% – 97.71%</td><td>wilson</td>" in text
    assert "<td>machine</td><td>cpu</td>" in text
    assert "<style>" in text


def test_report_from_binary_report_without_figures(tmp_path):
    r = binary_report([0, 0, 1, 1], [0.2, 0.6, 0.7, 0.9], n_resamples=50)
    md, html = report.write_report(tmp_path, title="t", metrics=r, figures={}, facts={})
    assert "| accuracy | 75.00% |" in md.read_text()
    assert "<td>true blast</td><td>0</td><td>2</td>" in html.read_text()


def test_missing_figure_is_a_clear_error(tmp_path):
    with pytest.raises(LeukoError, match="missing.png"):
        report.write_report(tmp_path, title="t", metrics=None,
                            figures={"x": tmp_path / "missing.png"}, facts={})


def test_the_compare_report_says_how_each_folds_epoch_was_kept():
    from leukodetect.reporting.compare_report import _selection

    assert _selection({"data": {"val_fraction": 0.0}, "train": {}}) == "last epoch (no validation part)"
    assert _selection({"data": {"val_fraction": 0.1}, "train": {"select": "best"}}).startswith("lowest validation loss (0.1 ")
    assert _selection({"data": {"val_fraction": 0.1}, "train": {"select": "last"}}).startswith("last epoch (0.1 of the images")
    assert _selection({"data": {"val_fraction": 0.15}, "train": {}}).startswith("lowest validation loss")  # configs written before --select
