"""cross-lab on a tiny model and three synthetic laboratories: each held-out image is scored once, by a model that never saw its laboratory."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from leukodetect.cli import app
from leukodetect.config import RunConfig
from leukodetect.errors import LeukoError
from leukodetect.jobs.cross_lab import run_cross_lab
from leukodetect.runtime.checkpoint import load_checkpoint
from leukodetect.runtime.images import open_rgb, pixel_hash
from leukodetect.utils import write_csv

LABS = {"milan": (0, 0, 0), "delhi": (-30, 10, 20), "tehran": (20, -20, -10)}  # a stain tint per laboratory
PER_CLASS = 6


@pytest.fixture(scope="module")
def three_labs(tiny_tree, tmp_path_factory):
    """A manifest of three laboratories, 6 blasts and 6 normal cells each (the tiny tree's cells in each lab's tint), each its own group."""
    root = tmp_path_factory.mktemp("labs")
    rows = []
    for lab, tint in LABS.items():
        for label, folder in ((0, "normal"), (1, "blast")):
            for i, source in enumerate(sorted((tiny_tree / folder).glob(f"{folder}_*.png"))[:PER_CLASS]):
                pixels = np.asarray(Image.open(source).convert("RGB")).astype(int) + tint
                path = root / lab / f"{label}_{i}.png"
                path.parent.mkdir(exist_ok=True)
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)
                rows.append({"path": path.relative_to(root).as_posix(), "label": label, "group": f"{lab}:{label}_{i}", "lab": lab})
    write_csv(root / "cells.csv", rows, ["path", "label", "group", "lab"])
    return root / "cells.csv"


@pytest.fixture(scope="module")
def crossed(three_labs, tmp_path_factory):
    cfg = RunConfig()
    cfg.data.path, cfg.data.format, cfg.data.image_size, cfg.data.val_fraction = str(three_labs), "manifest", 24, 0.25
    cfg.model.arch = "tiny"
    cfg.train.epochs, cfg.train.batch_size, cfg.train.lr, cfg.train.guard = 1, 8, 0.01, True
    out = tmp_path_factory.mktemp("xlab") / "run"
    table = run_cross_lab(cfg, out, only="milan", devices="off", log=lambda *_: None)
    return out, table, cfg


def _paths_of(manifest, lab):
    return {str(p) for p in sorted((manifest.parent / lab).glob("*.png"))}


def test_each_held_out_laboratory_is_scored_once_by_a_model_that_never_saw_it(three_labs, crossed):
    out, table, _ = crossed
    assert set(table["held_out"]) == set(LABS)
    for lab in LABS:
        run = out / f"without_{lab}"
        tested = json.loads((run / "predictions.json").read_text())["test"]
        assert sorted(tested) == sorted(_paths_of(three_labs, lab))  # every cell of the lab, each once
        bundle = load_checkpoint(run / "best.pt")
        assert set(bundle["labs"]) == set(LABS) - {lab}  # the checkpoint says what it was trained on
        held_out_hashes = {pixel_hash(open_rgb(p)) for p in tested}
        assert not held_out_hashes & set(bundle["trained_on"])
        assert "guard" in bundle
        cells = table["held_out"][lab]["cells"]
        assert (cells["cells"], cells["blast"], cells["normal"]) == (2 * PER_CLASS, PER_CLASS, PER_CLASS)
        assert {"sensitivity", "specificity", "roc_auc"} <= set(cells) and 0 <= cells["flag_rate"] <= 1


def test_the_single_laboratory_model_is_scored_on_every_other_laboratory(three_labs, crossed):
    out, table, _ = crossed
    assert table["only"]["trained_on"] == "milan" and set(table["only"]["labs"]) == {"delhi", "tehran"}
    tested = json.loads((out / "only_milan" / "predictions.json").read_text())["test"]
    assert sorted(tested) == sorted(_paths_of(three_labs, "delhi") | _paths_of(three_labs, "tehran"))
    assert set(load_checkpoint(out / "only_milan" / "best.pt")["labs"]) == {"milan"}
    report = (out / "report.md").read_text()
    assert "Held-out laboratories" in report and "| tehran | cells | 12 |" in report


def test_a_rerun_needs_resume_and_then_trains_nothing(crossed):
    out, table, cfg = crossed
    with pytest.raises(LeukoError, match="pass --resume"):
        run_cross_lab(cfg, out, only="milan", devices="off", log=lambda *_: None)
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/best.pt")}
    again = run_cross_lab(cfg, out, only="milan", devices="off", resume=True, log=lambda *_: None)
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/best.pt")} == before
    assert again["held_out"] == table["held_out"]


def test_compare_puts_each_architecture_s_held_out_laboratories_in_its_report(three_labs, tmp_path):
    out = tmp_path / "table2"
    args = ["compare", "--data", str(three_labs), "--out", str(out), "--archs", "tiny", "--protocol", "clean", "--folds", "2",
            "--epochs", "1", "--image-size", "24", "--batch-size", "8", "--lr", "0.01", "--val-fraction", "0.25"]
    refused = CliRunner().invoke(app, [*args, "--only", "milan"])
    assert refused.exit_code == 2 and "--only is part of the leave-one-laboratory-out check" in refused.output
    result = CliRunner().invoke(app, [*args, "--cross-lab", "--only", "milan"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "comparison.json").read_text())
    table = summary["cross_lab"]["archs"]["tiny"]
    assert set(table["held_out"]) == set(LABS) and table["only"]["trained_on"] == "milan"
    assert (out / "cross-lab" / "tiny" / "without_delhi" / "predictions.json").is_file()
    report = (out / "report.md").read_text()
    assert "## Laboratories held out" in report and "| tiny | tehran | cells | 12 |" in report
    assert "Trained on milan alone" in report
    assert "Per laboratory, pooled out-of-fold" in report and "| tiny | milan | cells | 12 |" in report  # the cross-validation's own


def test_cv_reports_each_laboratory_out_of_fold_every_cell_once(three_labs, tmp_path):
    out = tmp_path / "cv"
    result = CliRunner().invoke(app, ["cv", "--data", str(three_labs), "--out", str(out), "--arch", "tiny", "--folds", "3",
                                      "--epochs", "1", "--image-size", "24", "--batch-size", "8", "--lr", "0.01",
                                      "--val-fraction", "0.25", "--guard"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    labs = json.loads((out / "metrics.json").read_text())["labs"]
    assert set(labs) == set(LABS)
    for lab in LABS:
        cells = labs[lab]["cells"]
        assert (cells["cells"], cells["blast"], cells["normal"]) == (2 * PER_CLASS, PER_CLASS, PER_CLASS)
        assert {"sensitivity", "specificity", "roc_auc"} <= set(cells)
    calls = [c for k in range(3) for c in json.loads((out / f"fold_{k}" / "predictions.json").read_text())["call"]]
    assert sum(labs[lab]["cells"]["flagged"] for lab in LABS) == calls.count("review")  # each fold model's guard, counted once
    assert "Per laboratory" in result.output and "| tehran | cells | 12 |" in (out / "report.md").read_text()


def test_train_reports_each_laboratory_of_its_test_part(three_labs, tmp_path):
    out = tmp_path / "train"
    result = CliRunner().invoke(app, ["train", "--data", str(three_labs), "--out", str(out), "--arch", "tiny", "--epochs", "1",
                                      "--image-size", "24", "--batch-size", "8", "--lr", "0.01", "--val-fraction", "0.2"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    test = json.loads((out / "split.json").read_text())["test"]
    labs = json.loads((out / "test" / "metrics.json").read_text())["labs"]
    in_test = {lab: sum(f"/{lab}/" in p for p in test) for lab in LABS}
    assert {lab: figures["cells"]["cells"] for lab, figures in labs.items()} == {lab: n for lab, n in in_test.items() if n}
    assert all(figures["cells"]["flagged"] == 0 for figures in labs.values())  # no guard, nothing flagged
    assert "Per laboratory" in result.output


def test_a_single_unnamed_data_set_gets_no_laboratory_table(tiny_tree, tmp_path):
    out = tmp_path / "cv"
    result = CliRunner().invoke(app, ["cv", "--data", str(tiny_tree), "--out", str(out), "--arch", "tiny", "--folds", "2",
                                      "--epochs", "1", "--image-size", "24", "--batch-size", "8", "--val-fraction", "0.25"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "labs" not in json.loads((out / "metrics.json").read_text()) and "Per laboratory" not in result.output


def test_guard_refits_on_the_same_split_keeps_the_weights_and_refuses_another_bank(three_labs, tmp_path):
    run = tmp_path / "train"
    trained = CliRunner().invoke(app, ["train", "--data", str(three_labs), "--out", str(run), "--arch", "tiny", "--epochs", "1",
                                       "--image-size", "24", "--batch-size", "8", "--lr", "0.01", "--val-fraction", "0.25",
                                       "--guard"], catch_exceptions=False)
    assert trained.exit_code == 0, trained.output
    before = load_checkpoint(run / "best.pt")
    out, test = tmp_path / "refit.pt", tmp_path / "test.json"
    result = CliRunner().invoke(app, ["guard", str(run / "best.pt"), "--data", str(three_labs), "--out", str(out),
                                      "--test", str(test), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    after = load_checkpoint(out)
    assert not list(tmp_path.glob(".*"))  # the half-written file is linked into place, no hidden temporary left beside it
    assert all(torch.equal(before["state_dict"][k], after["state_dict"][k]) for k in before["state_dict"])
    assert (after["guard"]["fitted_on"], after["guard"]["threshold_on"]) == (before["guard"]["fitted_on"], before["guard"]["threshold_on"])
    # The guard's groups are a laboratory and a class (each laboratory its own tint here; a
    # laboratory's class with one training cell joins "*/CLASS").
    groups = after["guard"]["groups"]
    assert {g.split("/")[0] for g in groups} - {"*"} == set(LABS) and {g.split("/")[1] for g in groups} == {"normal", "blast"}
    assert len(groups) >= 5 and len(groups) == len(after["guard"]["class_means"]) == len(after["guard"]["pixel_class_means"])
    split = json.loads((run / "split.json").read_text())
    figures = json.loads(test.read_text())
    assert sum(parts["cells"]["cells"] for parts in figures.values()) == len(split["test"])  # the untouched test part, scored
    again = CliRunner().invoke(app, ["guard", str(run / "best.pt"), "--data", str(three_labs), "--out", str(out)])
    assert again.exit_code != 0 and "exists" in again.output  # nothing overwritten
    # Another bank (one laboratory fewer) makes another split: refused, nothing written.
    rows = [line for line in three_labs.read_text().splitlines() if not line.endswith(",tehran")]
    other = three_labs.parent / "two_labs.csv"
    other.write_text("\n".join(rows) + "\n")
    wrong = CliRunner().invoke(app, ["guard", str(run / "best.pt"), "--data", str(other), "--out", str(tmp_path / "wrong.pt")])
    assert wrong.exit_code != 0 and "does not match" in wrong.output and not (tmp_path / "wrong.pt").exists()
