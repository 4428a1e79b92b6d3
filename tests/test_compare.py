"""``leukodetect compare`` end to end on the tiny models: report, table, inflation, resume, refusal."""

import json
import re

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from leukodetect.cli import app
from leukodetect.evaluation.compare import gallery_selection, model_cost
from leukodetect.evaluation.intervals import METRIC_NAMES
from leukodetect.models import list_models, register_model
from leukodetect.models.registry import ModelSpec
from leukodetect.reporting.compare_report import QUOTED, table2_rows

runner = CliRunner()
ARCHS = ("tiny_wide", "tiny")  # the first gets the Grad-CAM gallery; it is the weaker one, so it errs


class TinyWide(nn.Module):
    """A second tiny architecture (one wider block), so a comparison has two models to compare."""

    def __init__(self, num_classes: int = 2) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 12, 3, stride=2, padding=1), nn.ReLU(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


if "tiny_wide" not in list_models():
    register_model(ModelSpec("tiny_wide", lambda n, pretrained: TinyWide(n), "fc", "features", "wider tiny CNN (tests only)"))


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def compare_args(data, out, config, *extra):
    return ("compare", "--data", data, "--out", out, "--archs", ",".join(ARCHS), "--protocol", "both", "--folds", 2,
            "--epochs", 1, "--image-size", 24, "--batch-size", 8, "--lr", 0.01, "--config", config, *extra)


@pytest.fixture(scope="module")
def compared(tiny_tree, tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    config = root / "paper.yaml"
    config.write_text("data:\n  paper_total: 40\n")
    out = root / "table2"
    result = invoke(*compare_args(tiny_tree, out, config))
    assert result.exit_code == 0, result.output
    return {"out": out, "config": config, "data": tiny_tree, "summary": json.loads((out / "comparison.json").read_text())}


def test_report_files_and_figures_exist(compared):
    out = compared["out"]
    for name in ("report.html", "report.md", "compare.json", "comparison.json"):
        assert (out / name).is_file(), name
    figures = {p.name for p in (out / "figures").glob("*.png")}
    for protocol in ("clean", "paper"):
        for stem in ("roc", "training_curves", "confusion", "reliability"):
            assert f"{stem}_{protocol}.png" in figures
        assert f"gradcam_{protocol}_correct.png" in figures
    assert {"metrics_bars.png", "inflation.png"} <= figures


def test_table_holds_every_run_with_the_run_metrics(compared):
    out, summary = compared["out"], compared["summary"]
    assert {(r["protocol"], r["arch"]) for r in summary["runs"]} == {(p, a) for p in ("clean", "paper") for a in ARCHS}
    report = (out / "report.md").read_text()
    for run in summary["runs"]:
        metrics = json.loads((out / run["protocol"] / run["arch"] / "metrics.json").read_text())
        assert run["pooled"] == metrics["metrics"] and run["fold_mean_sd"] == metrics["folds"]
        assert run["held_out_images_sharing_a_source_with_training"] == metrics["held_out_images_sharing_a_source_with_training"]
        history = [json.loads((out / run["protocol"] / run["arch"] / f"fold_{k}" / "history.json").read_text()) for k in range(2)]
        assert run["cost"]["training_seconds"] == pytest.approx(sum(r["seconds"] for h in history for r in h))
        assert run["cost"]["inference_ms_per_image"] > 0 and run["cost"]["params"] > 0
    for protocol in ("clean", "paper"):
        pooled, folds = table2_rows(summary["runs"], protocol)
        for row in pooled + folds:  # every cell of the report's Table 2 is in report.md
            assert "| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" in report
    assert summary["same_folds"] == {"clean": True, "paper": True}
    # the paper protocol expanded once and shared the images
    assert (out / "paper" / ARCHS[1] / "paper-expanded").is_symlink()


def test_inflation_is_paper_minus_clean(compared):
    summary = compared["summary"]
    by = {(r["protocol"], r["arch"]): r["pooled"] for r in summary["runs"]}
    for arch in ARCHS:
        row = summary["inflation_paper_minus_clean_pp"][arch]
        for name in METRIC_NAMES:
            paper, clean = by[("paper", arch)][name]["value"], by[("clean", arch)][name]["value"]
            if paper is None or clean is None:
                assert row[name] is None
            else:
                assert row[name] == pytest.approx(100 * (paper - clean))
        assert row["held_out_images_sharing_a_source_with_training"]["paper"] > 0


def test_gradcam_gallery_shows_every_misclassified_cell(compared):
    out, summary = compared["out"], compared["summary"]
    import csv

    for protocol in ("clean", "paper"):
        with (out / protocol / ARCHS[0] / "predictions.csv").open() as fh:
            wrong = {r["path"] for r in csv.DictReader(fh) if r["predicted"] != r["label"]}
        gallery = summary["gradcam"][protocol]
        assert {i["path"] for i in gallery["misclassified"]} == wrong
        assert all(i["overlay"] and i["error"] is None for kind in gallery.values() for i in kind)


def test_html_is_self_contained_and_labels_quoted_figures(compared):
    page = (compared["out"] / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "<link" not in page and "<script" not in page
    assert page.count('src="data:image/png;base64,') >= 10
    assert QUOTED in page and "99.61% (quoted from the paper, not reproduced)" in page
    assert "not recorded here" in page  # the other architectures' quoted figures are not invented


def test_rerun_resumes_without_retraining(compared):
    out = compared["out"]
    best = sorted(out.glob("*/*/fold_*/best.pt"))
    assert len(best) == 8
    before = {p: p.stat().st_mtime_ns for p in best}
    result = invoke(*compare_args(compared["data"], out, compared["config"]))
    assert result.exit_code == 0, result.output
    assert result.output.count("already finished") == 4
    assert {p: p.stat().st_mtime_ns for p in best} == before
    assert len(json.loads((out / "compare.json").read_text())["commands"]) == 2

    # An interrupted run (fold 1 not scored, no pooled metrics) continues from its finished fold.
    run = out / "clean" / ARCHS[1]
    (run / "metrics.json").unlink()
    (run / "fold_1" / "predictions.json").unlink()
    result = invoke(*compare_args(compared["data"], out, compared["config"]))
    assert result.exit_code == 0, result.output
    assert "Fold 0: already finished" in result.output and (run / "metrics.json").is_file()
    assert {p: p.stat().st_mtime_ns for p in best} == before


def test_other_settings_in_the_same_folder_are_refused(compared):
    out = compared["out"]
    stored = (out / "compare.json").read_text()
    result = invoke(*compare_args(compared["data"], out, compared["config"], "--seed", 7))
    assert result.exit_code == 2
    assert "different settings" in result.output and "seed" in result.output
    assert (out / "compare.json").read_text() == stored


def test_unknown_architecture_is_one_sentence(tmp_path, tiny_tree):
    result = invoke("compare", "--data", tiny_tree, "--out", tmp_path / "x", "--archs", "tiny,nope")
    assert result.exit_code == 2 and "Unknown architecture 'nope'" in result.output
    assert not (tmp_path / "x").exists()


def test_flops_count_a_multiply_add_as_two():
    # TinyNet at 24x24: conv 3->8 (3x3, stride 2) gives 12x12x8, conv 8->16 gives 6x6x16, fc 16->2;
    # batch norm, ReLU and pooling are not counted by FlopCounterMode.
    macs = 12 * 12 * 8 * 3 * 9 + 6 * 6 * 16 * 8 * 9 + 16 * 2
    cost = model_cost("tiny", 24)
    assert cost["gflops"] * 1e9 == pytest.approx(2 * macs)
    assert cost["params"] == 3 * 8 * 9 + 2 * 8 + 8 * 16 * 9 + 2 * 16 + 16 * 2 + 2


def test_gallery_selection_takes_confident_correct_cells_and_every_mistake():
    rows = [
        {"path": "b1", "label": 1, "prob_blast": 0.95, "predicted": 1},
        {"path": "b2", "label": 1, "prob_blast": 0.70, "predicted": 1},
        {"path": "b3", "label": 1, "prob_blast": 0.20, "predicted": 0},
        {"path": "n1", "label": 0, "prob_blast": 0.01, "predicted": 0},
        {"path": "n2", "label": 0, "prob_blast": 0.40, "predicted": 0},
        {"path": "n3", "label": 0, "prob_blast": 0.90, "predicted": 1},
        {"path": "n4", "label": 0, "prob_blast": 0.60, "predicted": 1},
    ]
    picked = gallery_selection(rows, n_correct=1)
    assert [r["path"] for r in picked["correct"]] == ["b1", "n1"]
    assert [r["path"] for r in picked["misclassified"]] == ["n3", "b3", "n4"]
