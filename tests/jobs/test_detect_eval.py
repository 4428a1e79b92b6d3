"""detect-eval and train-detector end to end on a synthetic ALL-IDB1 tree with the tiny model."""

import csv
import json

import numpy as np
import pytest
from PIL import Image
from smear_images import WHITE, synthetic_smear
from typer.testing import CliRunner

from leukodetect.cli import app
from leukodetect.runtime.checkpoint import load_checkpoint
from leukodetect.weights import resolve_detector

runner = CliRunner()


@pytest.fixture(scope="module")
def smear_tree(tmp_path_factory):
    """Eight photographs: four ALL ones whose white cells are annotated blasts, four healthy ones."""
    root = tmp_path_factory.mktemp("idb1") / "ALL_IDB1"
    (root / "im").mkdir(parents=True)
    (root / "xyc").mkdir()
    for i in range(8):
        label = 1 if i < 4 else 0
        stem = f"Im{i + 1:03d}_{label}"
        Image.fromarray(synthetic_smear(seed=i)).save(root / "im" / f"{stem}.jpg", quality=95)
        lines = [f" {x:.0f}\t{y:.0f} " for x, y, _ in WHITE] if label else []
        (root / "xyc" / f"{stem}.xyc").write_text("\n".join(lines) + ("\n" if lines else ""))
    return root


def test_detect_eval_scores_every_photograph_once(smear_tree, tmp_path):
    out = tmp_path / "eval"
    args = ["detect-eval", "--data", str(smear_tree), "--folds", "2", "--epochs", "1", "--image-size", "24",
            "--arch", "tiny", "--batch-size", "8", "--seed", "1", "--out", str(out), "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["photographs"] == 8 and metrics["config"]["seed"] == 1
    # Every annotated blast (3 per ALL photograph) is counted, and the located cells sit on them.
    assert metrics["blast_localisation_recall"]["n"] == 12
    assert metrics["blast_localisation_recall"]["k"] == 12
    det = metrics["blast_detection"]
    assert det["tp"] + det["fn"] == 12
    photo = metrics["photograph"]
    assert photo["accuracy"]["n"] == 8 and photo["sensitivity"]["n"] == 4 and photo["specificity"]["n"] == 4
    rows = (out / "photographs.csv").read_text().splitlines()
    assert len(rows) == 9 and {json.loads(f.read_text())[0]["fold"] for f in out.glob("fold_*/rows.json")} == {0, 1}
    assert "blast localisation recall" in (out / "report.md").read_text()
    # Each fold trains on four photographs, six annotated blasts: too few for the cell scorer, which is said.
    assert result.output.count("no cell scorer: Too few located cells") == 2
    # Every located cell is listed with its call and what it was annotated as: the 12 blasts once each.
    with (out / "cells.csv").open(newline="") as fh:
        cells = list(csv.DictReader(fh))
    assert sum(c["annotated"] == "blast" for c in cells) == 12
    assert {c["annotated"] for c in cells} <= {"blast", "unknown"}  # no "other" annotations in this tree
    assert all(c["call"] in ("blast", "review", "normal", "smudge") and 0 <= float(c["prob_blast"]) <= 1 for c in cells)
    assert "prob_crop" not in cells[0]  # no scorer, so P(blast) is the crop classifier's own
    with (out / "photographs.csv").open(newline="") as fh:
        photos = list(csv.DictReader(fh))
    assert sum(int(r["n_cells"]) + int(r["n_smudge"]) for r in photos) == len(cells)
    # A finished evaluation is never overwritten.
    again = runner.invoke(app, args)
    assert again.exit_code != 0 and "already holds" in again.output


def test_train_detector_gives_a_checkpoint_detect_can_use(smear_tree, tmp_path):
    out = tmp_path / "det"
    result = runner.invoke(app, ["train-detector", "--data", str(smear_tree), "--epochs", "1", "--image-size", "24",
                                 "--arch", "tiny", "--batch-size", "8", "--crop-factor", "2.5", "--out", str(out),
                                 "--val-fraction", "0", "--label-smoothing", "0.1", "--photo-context"])
    assert result.exit_code == 0, result.output
    # No validation photographs: all eight photographs' crops train, and the last epoch is kept.
    assert "training on 24 crops of 8 photographs, validating on 0 crops of 0" in result.output
    trained = load_checkpoint(out / "model" / "best.pt")
    assert trained["config"]["train"]["label_smoothing"] == 0.1 and trained["history"][-1]["val_loss"] is None
    assert trained["config"]["data"]["val_fraction"] == 0  # the stored recipe says how the epoch was chosen
    checkpoint = out / "model" / "best.pt"
    assert checkpoint.is_file() and json.loads((out / "train_detector.json").read_text())["photographs"] == 8
    assert resolve_detector(checkpoint) == checkpoint
    # Every located cell is listed for the smudge gate; without "other" annotations none is labelled, so no gate.
    cells = (out / "crops" / "cells.csv").read_text().splitlines()
    assert len(cells) == 1 + 8 * 3 and all(line.split(",")[3] == "-1" for line in cells[1:])
    assert "no smudge gate: Too few located cells" in result.output
    # The cell scorer needs only the blast annotations: 12 of the 24 located cells are blasts.
    assert "cell scorer trained on 24 located cells (12 blasts) of 8 photographs" in result.output
    detection = load_checkpoint(checkpoint)["detection"]
    # Twelve region measurements and the photograph's white-cell density.
    assert len(detection["scorer"]["coef"]) == 13 and detection["scorer"]["feature_names"][-1] == "log_white_density"
    assert detection["crop_factor"] == 2.5 and json.loads((out / "crops" / "crops.json").read_text())["config"]["crop_factor"] == 2.5
    # Training crops are cut at the classifier's input size, as detect cuts them (not at a fixed size, then resized).
    assert detection["crop_size"] == 24 and {Image.open(f).size for f in (out / "crops" / "crops").glob("*.png")} == {(24, 24)}
    detected = runner.invoke(app, ["detect", str(smear_tree / "im" / "Im001_1.jpg"), "--checkpoint", str(checkpoint),
                                   "--locator", "colour", "--out", str(tmp_path / "o"), "--json"])
    assert detected.exit_code == 0, detected.output
    row = json.loads(detected.stdout.splitlines()[0])
    assert row["n_cells"] == 3 and row["verdict"] in ("ALL", "healthy", "review") and row["white_density"] < 0
    without = runner.invoke(app, ["train-detector", "--data", str(smear_tree), "--epochs", "1", "--image-size", "24", "--arch", "tiny",
                                  "--batch-size", "8", "--out", str(tmp_path / "plain")])  # the density is off by default
    assert without.exit_code == 0, without.output
    assert "log_white_density" not in load_checkpoint(tmp_path / "plain" / "model" / "best.pt")["detection"]["scorer"]["feature_names"]
    refused = runner.invoke(app, ["train-detector", "--data", str(smear_tree), "--out", str(out), "--arch", "tiny"])
    assert refused.exit_code != 0 and "already holds" in refused.output


def test_white_cell_figures_leave_smudge_calls_out_and_keep_the_located_figures():
    from leukodetect.jobs.detect_eval import aggregate

    def row(label, mask, before, smudge):
        return {"n_annotated_blasts": 1, "blast_loc_tp": 1, "seconds": 0.5, "label": label, "verdict": "ALL" if label else "healthy",
                "blast_det_tp": 1, "blast_det_fp": 0, "blast_det_fn": 0, "n_smudge": smudge, "mask": mask, "mask_before_gate": before}

    gated = {"tp": 4, "fn": 1, "fp": 0, "extra": 0, "regions": 5, "detections": 4, "cell_tp": 4, "cell_fp": 0, "cell_fn": 2, "cells": 6}
    located = {"tp": 5, "fn": 0, "fp": 3, "extra": 1, "regions": 5, "detections": 9, "cell_tp": 6, "cell_fp": 3, "cell_fn": 0, "cells": 6}
    out = aggregate([row(1, gated, located, 5), row(0, gated, gated, 0)], classified=True)
    white = out["white_cell_localisation"]
    assert white["recall"]["k"] == 8 and white["precision"]["value"] == 1.0
    assert (white["cells"], white["cell_recall"]["k"], white["cell_recall"]["n"], white["cell_precision"]["value"]) == (12, 8, 12, 1.0)
    assert (white["before_gate"]["cell_recall"]["k"], white["before_gate"]["cell_precision"]["n"]) == (10, 13)
    assert white["before_gate"]["recall"]["k"] == 9 and white["before_gate"]["precision"]["k"] == 6 + 4
    assert white["before_gate"]["precision"]["n"] == 13 and out["smudge_calls"] == 5
    # Photograph verdicts: review counts as ALL, and the decided photographs are scored on their own.
    rows = [row(1, gated, gated, 0) | {"verdict": v} for v in ("ALL", "review", "healthy")]
    rows += [row(0, gated, gated, 0) | {"verdict": v} for v in ("healthy", "review")]
    photo = aggregate(rows, classified=True)["photograph"]
    assert (photo["accuracy"]["k"], photo["sensitivity"]["k"], photo["specificity"]["k"]) == (3, 2, 1)
    assert (photo["decided_accuracy"]["k"], photo["decided_accuracy"]["n"]) == (2, 3)
    assert (photo["review_share"]["k"], photo["review_share"]["n"]) == (2, 5)


def test_cell_rows_say_what_each_located_cell_was_annotated_as():
    from leukodetect.detection.match import match_points
    from leukodetect.jobs.detect_eval import cell_rows

    cells = [{"x": x, "y": 0.0, "prob_blast": p, "p_white_cell": 0.9, "call": call}
             for x, p, call in ((0, 0.9, "blast"), (100, 0.8, "blast"), (200, 0.1, "normal"), (300, 0.5, "review"))]
    blasts = [(2.0, 0.0), (500.0, 0.0)]  # the first cell is on a blast; the second blast was not located
    others = [(101.0, 0.0), (203.0, 0.0), (3.0, 0.0)]  # the third lies on the blast cell, already taken
    loc = match_points([(c["x"], c["y"]) for c in cells], blasts, 10.0)
    got = [r["annotated"] for r in cell_rows(cells, loc, others, 10.0)]
    assert got == ["blast", "other", "other", "none"]
    assert [r["annotated"] for r in cell_rows(cells, loc, None, 10.0)] == ["blast", "unknown", "unknown", "unknown"]
    assert cell_rows(cells, loc, (), 10.0)[3]["annotated"] == "none"  # annotated, but nothing near it


def test_blast_flagging_counts_review_calls_as_shown_to_a_person():
    from pathlib import Path

    from leukodetect.data.records import Record
    from leukodetect.jobs.detect_eval import aggregate, photo_row

    record = Record(path=Path("Im001_1.jpg"), label=1, group="Im001_1", blasts=((0, 0), (100, 0), (200, 0)), others=())
    calls = (("blast", 0), ("review", 100), ("review", 300), ("normal", 200), ("smudge", 400))
    result = {"rbc_diameter": 20.0, "width": 500, "n_cells": 4, "n_blast": 1, "n_review": 2, "verdict": "ALL", "n_smudge": 1,
              "timing": {"total_s": 0.1},
              "cells": [{"x": x, "y": 0, "prob_blast": 0.5, "p_white_cell": 0.9, "call": call} for call, x in calls]}
    row = photo_row(record, result, None, 0.5)
    assert (row["blast_det_tp"], row["blast_det_fp"], row["blast_det_fn"]) == (1, 0, 2)
    assert (row["blast_flag_tp"], row["blast_flag_fp"], row["blast_flag_fn"]) == (2, 1, 1)
    assert [c["annotated"] for c in row["cells"]] == ["blast", "blast", "none", "blast", "none"]
    flagging = aggregate([row, {**row, "fold": 1}], classified=True)["blast_flagging"]
    assert (flagging["tp"], flagging["fp"], flagging["fn"]) == (4, 2, 2) and flagging["f1"] == 8 / 12
    old = {k: v for k, v in row.items() if not k.startswith("blast_flag")}  # a fold finished by an older version
    assert "blast_flagging" not in aggregate([row, old], classified=True)


@pytest.mark.parametrize("command", ["detect-eval", "train-detector"])
def test_detector_commands_default_to_the_shipped_recipe(command):
    """With no options, detect-eval evaluates (and train-detector trains) the recipe of the shipped detector."""
    import typer

    from leukodetect.jobs.detect_eval import DetectEvalConfig

    params = {p.name: p.default for p in typer.main.get_command(app).commands[command].params}
    cfg = DetectEvalConfig()
    shipped = load_checkpoint(resolve_detector(None, "colour"))  # the ALL-IDB1 detector, which detect-eval's folds reproduce
    assert (cfg.arch, cfg.epochs, cfg.image_size, cfg.val_fraction, cfg.crop.crop_factor, cfg.batch_size, cfg.lr) == (
        shipped["arch"], shipped["config"]["train"]["epochs"], shipped["image_size"], shipped["config"]["data"]["val_fraction"],
        shipped["detection"]["crop_factor"], shipped["config"]["train"]["batch_size"], shipped["config"]["train"]["lr"])
    assert cfg.crop.size == cfg.image_size
    for name in ("epochs", "image_size", "arch", "batch_size", "seed", "folds", "gate_keep", "smudge_gate", "cell_scorer",
                 "photo_context", "val_fraction", "label_smoothing", "locate_only", "locator", "locator_iterations"):
        if name in params:
            assert params[name] == getattr(cfg, name), name
    assert params["crop_factor"] == cfg.crop.crop_factor


def test_detect_eval_with_the_learned_locator_trains_one_per_fold_on_its_training_photographs_only(smear_tree, tmp_path):
    from leukodetect.runtime.locator import WhiteCellLocator

    out = tmp_path / "eval-learned"
    args = ["detect-eval", "--data", str(smear_tree), "--folds", "2", "--epochs", "1", "--image-size", "24", "--arch", "tiny",
            "--batch-size", "8", "--locator", "learned", "--locator-iterations", "20", "--out", str(out), "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["photographs"] == 8 and metrics["config"]["locator"] == "learned"
    for k in (0, 1):
        tested = {r["photo"] for r in json.loads((out / f"fold_{k}" / "rows.json").read_text())}
        locator = WhiteCellLocator.load(out / f"fold_{k}" / "locator.safetensors")
        # Trained on the fold's photographs (the ALL ones' blasts, the healthy ones as background, their other
        # objects left out of the loss), none of the held-out ones.
        assert 0 < len(tested) < 8 and locator.settings.trained_on == {"allidb1": 8 - len(tested)}
    assert "a learned locator trained in each fold on its training photographs (20 steps)" in (out / "report.md").read_text()


@pytest.mark.parametrize("extra, words", [
    (["--locator-data", "bccd=somewhere"], "--locator-data trains the learned locator of each fold"),
    (["--locator", "learned", "--locate-only"], "use it"),
    (["--locator", "magic"], "choose learned or colour"),
])
def test_detect_eval_locator_options_that_do_not_fit_are_one_sentence(smear_tree, tmp_path, extra, words):
    result = runner.invoke(app, ["detect-eval", "--data", str(smear_tree), "--out", str(tmp_path / "x"), *extra])
    assert result.exit_code != 0 and words in result.output and "Traceback" not in result.output


def test_a_masked_photograph_is_scored_by_its_regions_and_by_each_of_its_cells():
    from leukodetect.jobs.detect_eval import mask_scores
    from leukodetect.detection.match import mask_cells

    regions = np.zeros((80, 120), np.int32)
    yy, xx = np.mgrid[:80, :120]
    for cx in (30, 52):  # two touching cells drawn as one region
        regions[(yy - 40) ** 2 + (xx - cx) ** 2 <= 12 ** 2] = 1
    regions[(yy - 40) ** 2 + (xx - 100) ** 2 <= 12 ** 2] = 2  # a cell alone, nobody found
    each = mask_cells(regions)
    assert len(each) == 3
    found = [(30.0, 40.0), (52.0, 40.0), (100.0, 5.0)]  # each touching cell, and something on the background
    row = mask_scores(found, regions, each, radius=8.0)
    assert (row["tp"], row["extra"], row["fp"], row["fn"]) == (1, 1, 1, 1)  # by the regions: the merged one once
    assert (row["cell_tp"], row["cell_fp"], row["cell_fn"], row["cells"]) == (2, 1, 1, 3)  # by the cells: both found
