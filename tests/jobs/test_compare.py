"""``leukodetect compare`` end to end on the tiny models: report, table, inflation, resume, refusal."""

import html
import json
import re

import numpy as np
import pytest
import yaml
from torch import nn
from typer.testing import CliRunner

from leukodetect.cli import app
from leukodetect.evaluation.intervals import METRIC_NAMES
from leukodetect.jobs.compare import gallery_selection, model_cost
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


# --- compare --cross-data: another lab's images, without and with stain normalisation --------------


@pytest.fixture(scope="module")
def crossed(tiny_tree, other_lab, tmp_path_factory):
    """A finished one-architecture comparison, then the same command with --cross-data added."""
    out = tmp_path_factory.mktemp("cross") / "table2"
    args = ("compare", "--data", tiny_tree, "--out", out, "--archs", "tiny", "--protocol", "clean", "--folds", 2,
            "--epochs", 1, "--image-size", 24, "--batch-size", 8, "--lr", 0.01)
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    best = {p: p.stat().st_mtime_ns for p in out.glob("clean/tiny/fold_*/best.pt")}
    result = invoke(*args, "--cross-data", other_lab)
    assert result.exit_code == 0, result.output
    return {"out": out, "args": (*args, "--cross-data", other_lab), "data": tiny_tree, "cross_data": other_lab,
            "best_before": best, "output": result.output, "summary": json.loads((out / "comparison.json").read_text())}


def test_adding_cross_data_does_not_retrain(crossed):
    out = crossed["out"]
    assert {p: p.stat().st_mtime_ns for p in out.glob("clean/tiny/fold_*/best.pt")} == crossed["best_before"]
    assert "already finished" in crossed["output"]
    assert "Cross-dataset check on" in crossed["output"]  # the command's own table


def test_cross_metrics_are_those_of_the_fold_averaged_probability(crossed):
    import csv

    from leukodetect.data.indexers import index_dataset
    from leukodetect.data.stain import MacenkoStain, pick_evenly
    from leukodetect.evaluation.intervals import binary_report
    from leukodetect.runtime.classifier import Classifier

    cross = crossed["summary"]["cross_dataset"]
    stain = cross["stain_normalization"]
    assert cross["n"] == 9 and cross["unreadable"] == [] and cross["threshold"] == 0.5
    assert (stain["normalised"], stain["failed"]) == (8, 1) and stain["failed_images"][0].endswith("UID_H9_1_1_hem.png")
    # default reference: 8 images evenly spaced over the training data
    assert stain["default_reference"] and stain["reference"] == [str(p) for p in pick_evenly(sorted(r.path for r in index_dataset(crossed["data"])), 8)]
    [run] = cross["runs"]
    assert (run["protocol"], run["arch"], run["folds"]) == ("clean", "tiny", 2)

    records = index_dataset(crossed["cross_data"])
    paths, y = [r.path for r in records], np.array([r.label for r in records])
    with open(run["predictions"]) as fh:
        stored = {r["path"]: r for r in csv.DictReader(fh)}
    assert set(stored) == {str(p) for p in paths}
    normaliser = MacenkoStain.from_paths(stain["reference"])
    folds = [Classifier.from_checkpoint(crossed["out"] / "clean" / "tiny" / f"fold_{k}" / "best.pt") for k in range(2)]
    probs = {}
    for variant, with_stain in (("none", None), ("macenko", normaliser)):
        # each fold model predicts through the ordinary path; the check averages them
        probs[variant] = np.mean([[p.prob_blast for p in clf.predict_paths(paths, stain=with_stain)] for clf in folds], axis=0)
        assert [float(stored[str(p)][f"prob_blast_{variant}"]) for p in paths] == pytest.approx(probs[variant].tolist(), abs=1e-5)
        expected = binary_report(y, probs[variant], threshold=0.5)
        assert run[variant]["confusion"] == expected["confusion"]
        for name, entry in expected["metrics"].items():
            assert run[variant]["metrics"][name]["value"] == pytest.approx(entry["value"], abs=1e-6) if entry["value"] is not None \
                else run[variant]["metrics"][name]["value"] is None
    assert np.abs(probs["none"] - probs["macenko"]).max() > 1e-4  # normalisation changed what the models saw

    # Control: the run's own out-of-fold predictions, unnormalised (= Table 2) and normalised
    run_dir = crossed["out"] / "clean" / "tiny"
    assert run["training_data"]["none"]["metrics"] == json.loads((run_dir / "metrics.json").read_text())["metrics"]
    with (run_dir / "predictions.csv").open() as fh:
        held_out = list(csv.DictReader(fh))
    y_oof, p_oof = [], []
    for k, clf in enumerate(folds):
        mine = [r for r in held_out if int(r["fold"]) == k]
        y_oof += [int(r["label"]) for r in mine]
        p_oof += [p.prob_blast for p in clf.predict_paths([r["path"] for r in mine], stain=normaliser)]
    expected = binary_report(np.array(y_oof), np.array(p_oof), threshold=0.5)
    control = run["training_data"]["macenko"]
    assert control["n"] == len(held_out) == 29 and control["confusion"] == expected["confusion"]
    assert control["metrics"]["roc_auc"]["value"] == pytest.approx(expected["metrics"]["roc_auc"]["value"], abs=1e-6)
    assert control["stain_failed"] == 0 and control["unreadable"] == 0


def test_cross_table_is_in_both_reports(crossed):
    from leukodetect.reporting.compare_report import control_rows, cross_rows

    out, cross = crossed["out"], crossed["summary"]["cross_dataset"]
    report, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    rows = cross_rows(cross)
    assert [r[2] for r in rows] == ["none (images as they are)", "Macenko, toward the training stain"]
    control = control_rows(cross)
    assert control[0][3] == "29" and control[0][4].startswith(f"{100 * cross['runs'][0]['training_data']['none']['metrics']['accuracy']['value']:.2f}%")
    for row in rows + control:
        assert "| " + " | ".join(row) + " |" in report
        assert "".join(f"<td>{c}</td>" for c in row[:4]) in page
    for text in (report, html.unescape(page)):
        assert "Cross-dataset check: cnmc" in text
        assert "mean over the fold models (each fold's best.pt) of P(blast)" in text
        assert "Macenko could not normalise 1 of 9 images" in text and "UID_H9_1_1_hem.png" in text
        assert "Control: the training data, pooled out-of-fold" in text and "clean protocol 0 of 29" in text


def test_cross_check_is_reused_on_rerun(crossed):
    out = crossed["out"]
    cached = out / "clean" / "tiny" / "cross_dataset.json"
    stamp = cached.stat().st_mtime_ns
    result = invoke(*crossed["args"])
    assert result.exit_code == 0, result.output
    assert cached.stat().st_mtime_ns == stamp and "stain-normalising" not in result.output
    assert json.loads((out / "comparison.json").read_text())["cross_dataset"] == crossed["summary"]["cross_dataset"]


def test_bad_cross_options_are_one_sentence_before_any_training(tiny_tree, tmp_path):
    result = invoke("compare", "--data", tiny_tree, "--out", tmp_path / "a", "--archs", "tiny", "--cross-data", tmp_path / "nope")
    assert result.exit_code == 2 and "Cross data" in result.output and "does not exist" in result.output
    result = invoke("compare", "--data", tiny_tree, "--out", tmp_path / "b", "--archs", "tiny", "--stain-reference", tiny_tree)
    assert result.exit_code == 2 and "add --cross-data" in result.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_without_lr_each_architecture_trains_at_its_own_rate(tiny_tree, tmp_path):
    if "tiny_slow" not in list_models():
        register_model(ModelSpec("tiny_slow", lambda n, pretrained: TinyWide(n), "fc", "features", "tests only", scratch_lr=0.02))
    out = tmp_path / "own-rates"
    common = ("compare", "--data", tiny_tree, "--out", out, "--archs", "tiny_slow,tiny", "--protocol", "clean",
              "--folds", 2, "--epochs", 1, "--image-size", 24, "--batch-size", 8, "--label-smoothing", 0.1)
    result = invoke(*common, "--workers", 0)
    assert result.exit_code == 0, result.output
    for arch, lr in (("tiny_slow", 0.02), ("tiny", 1e-3)):
        for fold in (0, 1):
            saved = yaml.safe_load((out / "clean" / arch / f"fold_{fold}" / "config.yaml").read_text())
            assert saved["train"]["lr"] == lr and saved["train"]["label_smoothing"] == 0.1
    report = (out / "report.md").read_text()
    assert "each architecture's own: tiny_slow 0.02, tiny 0.001" in report
    assert "| weight decay, label smoothing, EMA | 0.0001, 0.1, off |" in report
    # Where and how fast it runs may change on a rerun, also against a record written before
    # --checkpoint-every was ignored; the resolved rates resume cleanly.
    record = json.loads((out / "compare.json").read_text())
    record["settings"]["config"]["train"]["checkpoint_every"] = 1
    (out / "compare.json").write_text(json.dumps(record))
    again = invoke(*common, "--workers", 1, "--checkpoint-every", 3)
    assert again.exit_code == 0 and again.output.count("already finished") == 2, again.output
    other = runner.invoke(app, [str(a) for a in (*common[:-1], 0.2)])
    assert other.exit_code != 0 and "different settings" in other.output and "label_smoothing" in other.output
