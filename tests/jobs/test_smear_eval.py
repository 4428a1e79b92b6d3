"""smear-eval: verdicts per laboratory, the metrics' definitions, and the "never trained on" filter (tiny model, synthetic smears)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from smear_images import synthetic_smear
from typer.testing import CliRunner

from leukodetect.cli import app
from leukodetect.errors import LeukoError
from leukodetect.jobs.cells import LabSource
from leukodetect.jobs.smear_eval import report_markdown, run_smear_eval, smear_metrics, trained_smears
from leukodetect.runtime.classifier import Classifier
from leukodetect.runtime.images import pixel_hash
from leukodetect.utils import write_csv


@pytest.fixture(scope="module")
def aria_tree(tmp_path_factory):
    """An Aria layout: 2 benign and 2 ALL fields (synthetic smears, turned and flipped to differ), and one near-duplicate of a benign field."""
    root = tmp_path_factory.mktemp("aria") / "Original"
    for folder, seeds in (("Benign", (0, 1)), ("Early", (2, 3))):
        (root / folder).mkdir(parents=True)
        for seed in seeds:
            field = np.rot90(synthetic_smear(seed=seed, size=300), k=seed)  # turned, so that no two fields look alike
            Image.fromarray(np.ascontiguousarray(field[::1 if seed < 2 else -1])).save(root / folder / f"WBC-{folder}-{seed:03d}.jpg", quality=95)
    noisy = np.asarray(Image.open(root / "Benign" / "WBC-Benign-000.jpg")).astype(int) + 2  # another capture of field 000
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(root / "Benign" / "WBC-Benign-009.jpg", quality=95)
    return root


def _bank(tmp_path, crops: dict[str, tuple[np.ndarray, str]]):
    """A cell bank's cells.csv with one crop per parent (parent -> (pixels, group))."""
    rows = []
    for parent, (pixels, group) in crops.items():
        path = tmp_path / "cells" / f"{parent.replace(':', '_')}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
        rows.append({"path": path.relative_to(tmp_path).as_posix(), "label": 0, "group": group, "lab": parent.split(":")[0],
                     "kind": "", "parent": parent, "x": 0, "y": 0})
    write_csv(tmp_path / "cells.csv", rows, ["path", "label", "group", "lab", "kind", "parent", "x", "y"])
    (tmp_path / "cells.json").write_text("{}")  # a bank is its cells.csv with its description beside it
    return tmp_path / "cells.csv"


def _jpeg_hash(pixels: np.ndarray, quality: int) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    return pixel_hash(Image.open(buffer))


def test_a_smear_counts_as_trained_when_its_crop_was_trained_on_as_png_or_as_jpeg(tmp_path):
    rng = np.random.default_rng(0)
    a, b, c = (rng.integers(0, 255, (16, 16, 3), dtype=np.uint8) for _ in range(3))
    bank = _bank(tmp_path, {"aria:f1": (a, "aria:aria:f1"), "aria:f2": (b, "aria:aria:f2"), "aria:f3": (c, "aria:aria:f3")})
    parents, groups = trained_smears(bank, [pixel_hash(Image.fromarray(a)), _jpeg_hash(b, 95)])
    assert parents == {"aria:f1", "aria:f2"} and groups == {"aria:aria:f1", "aria:aria:f2"}
    assert trained_smears(bank, [_jpeg_hash(b, 95)], qualities=(0,)) == (set(), set())  # a PNG-only look misses the JPEG bank
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "cells.csv").write_text("path,label\nx.png,0\n")  # a manifest, but no bank's cells.json beside it
    with pytest.raises(LeukoError, match="not a cell bank"):
        trained_smears(tmp_path / "other" / "cells.csv", [])


def _row(label, verdict, prob):
    right = verdict == ("ALL" if label else "healthy")
    return {"label": label, "verdict": verdict, "right": right, "max_prob": prob, "n_cells": 0 if prob is None else 2}


def test_metrics_count_review_as_positive_and_cannot_assess_apart():
    rows = [_row(1, "ALL", 0.9), _row(1, "review", 0.5), _row(1, "healthy", 0.1), _row(1, "cannot_assess", None),
            _row(0, "healthy", 0.05), _row(0, "ALL", 0.8), _row(0, "cannot_assess", None)]
    m = smear_metrics(rows)
    assert m["smears"] == 7 and (m["all"], m["healthy"]) == (4, 3)
    assert (m["accuracy"]["k"], m["accuracy"]["n"]) == (2, 7)  # ALL->ALL and healthy->healthy only
    assert (m["sensitivity"]["k"], m["sensitivity"]["n"]) == (2, 3)  # review counts as ALL; cannot_assess left out
    assert (m["specificity"]["k"], m["specificity"]["n"]) == (1, 2)
    assert (m["cannot_assess"]["k"], m["cannot_assess"]["n"]) == (2, 7)
    assert m["verdicts"]["ALL"] == {"ALL": 1, "review": 1, "healthy": 1, "cannot_assess": 1}
    # AUC over the 5 smears with a classified cell: positives 0.9, 0.5, 0.1 against negatives 0.05, 0.8
    assert m["auc"] == pytest.approx(4 / 6)
    assert smear_metrics([_row(0, "healthy", 0.1)])["auc"] is None and smear_metrics([_row(0, "healthy", 0.1)])["sensitivity"]["value"] is None


def test_a_laboratory_whose_measured_scales_disagree_is_told_to_declare_its_pixel_size():
    def row(diameter, scale="measured"):
        return {**_row(0, "healthy", 0.1), "rbc_diameter": diameter, "scale": scale}

    steady = [row(15.0 + 0.1 * i) for i in range(12)]
    misread = steady[:9] + [row(30.0), row(35.0), row(6.0)]
    assert smear_metrics(steady)["scale_agreement"]["doubtful"] is False
    m = smear_metrics(misread + [row(None, "unknown"), row(14.65, "declared")])  # neither counts
    assert m["scale_agreement"] == {"photographs": 12, "median": 15.45, "disagree": 3, "share": 0.25, "doubtful": True}
    report = report_markdown({"labs": {"aria": m, "bccd": smear_metrics(steady)}, "locator": "learned", "unseen_from": None})
    assert ("aria: The red-cell diameters measured on 3 of these 12 smears lie more than 1.25 times above or below their median "
            "(15.45 px; the rbc_diameter column of smears.csv)") in report
    assert "give the camera's pixel size with --pixel-size aria=UM." in report
    assert "bccd: The red-cell diameters" not in report


def test_every_smear_is_scored_once_and_trained_fields_and_their_near_duplicates_are_left_out(aria_tree, crop_checkpoint, tmp_path):
    clf = Classifier.from_checkpoint(crop_checkpoint, backend="torch")
    source = LabSource.parse(f"aria={aria_tree}")
    metrics = run_smear_eval([source], clf, tmp_path / "all", log=lambda *_: None)
    m = metrics["labs"]["aria"]
    assert (m["smears"], m["all"], m["healthy"]) == (5, 2, 3)
    assert sum(sum(v.values()) for v in m["verdicts"].values()) == 5
    rows = (tmp_path / "all" / "smears.csv").read_text().splitlines()
    assert len(rows) == 6 and "aria" in (tmp_path / "all" / "report.md").read_text()
    assert json.loads((tmp_path / "all" / "metrics.json").read_text())["labs"]["aria"]["smears"] == 5

    # The model "trained" on a cell of Benign-000: that field and its near-duplicate 009 are left out.
    crop = np.zeros((8, 8, 3), np.uint8)
    bank = _bank(tmp_path / "bank", {"aria:WBC-Benign-000": (crop, "aria:aria:WBC-Benign-000")})
    logged: list[str] = []
    unseen = run_smear_eval([source], clf, tmp_path / "unseen", unseen_from=bank, trained_on=[pixel_hash(Image.fromarray(crop))],
                            log=logged.append)
    u = unseen["labs"]["aria"]
    assert (u["smears"], u["left_out_as_trained"]) == (3, 2)
    assert "WBC-Benign-00" not in (tmp_path / "unseen" / "smears.csv").read_text().replace("WBC-Benign-001", "")
    assert logged == [f"aria: 3 of 5 smears never trained on (cells of the others are in {bank})."]
    with pytest.raises(LeukoError, match="already holds a smear evaluation"):
        run_smear_eval([source], clf, tmp_path / "unseen", log=lambda *_: None)


def test_single_cell_layouts_are_refused_with_what_to_use_instead(tiny_tree, crop_checkpoint, tmp_path):
    clf = Classifier.from_checkpoint(crop_checkpoint, backend="torch")
    with pytest.raises(LeukoError, match="holds single cells: score those with 'leukodetect evaluate'"):
        run_smear_eval([LabSource.parse(f"x={tiny_tree}")], clf, tmp_path / "out", log=lambda *_: None)


def test_the_command_prints_the_per_laboratory_report(aria_tree, crop_checkpoint, tmp_path):
    result = CliRunner().invoke(app, ["smear-eval", "--data", f"aria={aria_tree}", "--out", str(tmp_path / "out"),
                                      "--checkpoint", str(crop_checkpoint), "--locator", "colour", "--backend", "torch"],
                                 catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "Smear verdicts per laboratory (colour locator)" in result.output and "| aria | 5 (2 / 3) |" in result.output


def test_found_cells_are_matched_to_annotated_white_cells_and_blasts_within_half_a_red_cell():
    from pathlib import Path

    from leukodetect.data.records import Record
    from leukodetect.jobs.smear_eval import smear_row

    def cell(x, call):
        return {"x": x, "y": 50.0, "call": call, "prob_blast": 0.9 if call == "blast" else 0.1}

    result = {"verdict": "ALL", "n_cells": 3, "n_blast": 2, "n_review": 0, "scale": "measured", "rbc_diameter": 20.0,
              "cells": [cell(10.0, "blast"), cell(100.0, "blast"), cell(205.0, "normal"), cell(300.0, "smudge")]}
    bccd = Record(path=Path("f.jpg"), label=0, group="f",  # boxes centred on (12, 50), (208, 50), (400, 50)
                  boxes=((0.0, 30.0, 24.0, 70.0), (180.0, 20.0, 236.0, 80.0), (390.0, 40.0, 410.0, 60.0)))
    row = smear_row("bccd", bccd, result, fmt="bccd")
    assert (row["cell_tp"], row["cell_fp"], row["cell_fn"]) == (2, 1, 1)  # the smudge call is not a white cell
    assert (row["box_tp"], row["box_fp"], row["box_fn"]) == (2, 1, 1)
    wide = Record(path=Path("f.jpg"), label=0, group="f", boxes=((0.0, 0.0, 50.0, 100.0),))  # centred on (25, 50)
    off_centre = smear_row("bccd", wide, result, fmt="bccd")  # (10, 50) is 15 px from the centre: past half a red cell
    assert (off_centre["cell_tp"], off_centre["box_tp"]) == (0, 1)
    assert smear_metrics([off_centre])["white_cells_in_boxes"]["recall"]["k"] == 1
    assert "blast_tp" not in row and row["max_prob"] == 0.9
    idb = Record(path=Path("Im001_1.jpg"), label=1, group="p", blasts=((101.0, 52.0), (600.0, 50.0)))
    row = smear_row("allidb1", idb, result, fmt="allidb1")
    assert (row["blast_tp"], row["blast_fp"], row["blast_fn"]) == (1, 1, 1) and row["right"]
    m = smear_metrics([{**row, "max_prob": 0.9}])
    assert m["blast_detection"]["f1"] == pytest.approx(0.5) and "white_cells" not in m


def _two_photographs(tmp_path) -> Path:
    """An ALL-IDB1 folder of one ALL photograph and one healthy one, no blast annotated."""
    root = tmp_path / "ALL_IDB1"
    (root / "im").mkdir(parents=True)
    (root / "xyc").mkdir()
    for stem in ("Im001_1", "Im002_0"):
        Image.fromarray(synthetic_smear(seed=int(stem[4]))).save(root / "im" / f"{stem}.jpg", quality=95)
        (root / "xyc" / f"{stem}.xyc").write_text("")
    return root


def test_allidb1_photographs_are_all_scored_and_the_run_says_they_cannot_be_told_unseen(crop_checkpoint, tmp_path):
    root = _two_photographs(tmp_path)
    crop = np.zeros((8, 8, 3), np.uint8)
    # A bank whose ALL-IDB2 cell shares a name with an ALL-IDB1 photograph: names say nothing across the two sets.
    bank = _bank(tmp_path / "bank", {"allidb1:Im001_1": (crop, "allidb1:allidb1:Im001_1")})
    logged: list[str] = []
    clf = Classifier.from_checkpoint(crop_checkpoint, backend="torch")
    metrics = run_smear_eval([LabSource.parse(f"allidb1={root}")], clf, tmp_path / "out", unseen_from=bank, locator=None,
                             trained_on=[pixel_hash(Image.fromarray(crop))], log=logged.append)
    m = metrics["labs"]["allidb1"]
    assert m["smears"] == 2 and m["left_out_as_trained"] == 0 and m["unseen_check"].startswith("not possible")
    assert any("cannot be told unseen" in line for line in logged)
    assert "blast_detection" in m  # ALL-IDB1's blast positions are matched


def test_allidb1_photographs_whose_cells_a_bank_cut_itself_are_told_unseen_by_name(crop_checkpoint, tmp_path):
    root = _two_photographs(tmp_path)
    crop = np.zeros((8, 8, 3), np.uint8)
    bank = _bank(tmp_path / "bank", {"allidb1:Im001_1": (crop, "allidb1:Im001_1")})
    (bank.parent / "cells.json").write_text(json.dumps({"labs": {"allidb1": {"format": "allidb1"}}}))
    clf = Classifier.from_checkpoint(crop_checkpoint, backend="torch")
    metrics = run_smear_eval([LabSource.parse(f"allidb1={root}")], clf, tmp_path / "out", unseen_from=bank, locator=None,
                             trained_on=[pixel_hash(Image.fromarray(crop))], log=lambda *_: None)
    m = metrics["labs"]["allidb1"]
    assert (m["smears"], m["left_out_as_trained"]) == (1, 1) and "unseen_check" not in m
    assert [Path(r["image"]).stem for r in csv.DictReader(open(tmp_path / "out" / "smears.csv"))] == ["Im002_0"]


def test_a_smear_whose_analysis_fails_is_reported_and_the_others_go_on(aria_tree, crop_checkpoint, tmp_path, monkeypatch):
    import leukodetect.jobs.smear_eval as job

    real = job.analyze
    calls = []

    def fails_once(image, classifier, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("OpenCV(4.10) resize.cpp: error\n(-215:Assertion failed)")
        return real(image, classifier, **kwargs)

    monkeypatch.setattr(job, "analyze", fails_once)
    logged: list[str] = []
    clf = Classifier.from_checkpoint(crop_checkpoint, backend="torch")
    metrics = run_smear_eval([LabSource.parse(f"aria={aria_tree}")], clf, tmp_path / "out", log=logged.append)
    assert metrics["labs"]["aria"]["smears"] == 4 and metrics["labs"]["aria"]["unreadable"] == 1
    assert len(logged) == 1 and "could not be analysed (RuntimeError: OpenCV(4.10) resize.cpp: error (-215:Assertion failed))" in logged[0]
    with pytest.raises(LeukoError, match="named once"):
        run_smear_eval([LabSource.parse(f"aria={aria_tree}")] * 2, clf, tmp_path / "again", log=lambda *_: None)


def test_a_declared_pixel_size_scales_every_smear_of_its_laboratory_and_is_reported(aria_tree, crop_checkpoint, tmp_path):
    from smear_images import RBC_D

    from leukodetect.runtime.locator import WhiteCellLocator
    from leukodetect.runtime.scale import RBC_UM
    from leukodetect.weights import resolve_locator

    clf = Classifier.from_checkpoint(crop_checkpoint, backend="torch")
    locator = WhiteCellLocator.load(resolve_locator(None))
    metrics = run_smear_eval([LabSource.parse(f"aria={aria_tree}@{RBC_D}")], clf, tmp_path / "out", locator=locator,
                             log=lambda *_: None)
    rows = list(csv.DictReader((tmp_path / "out" / "smears.csv").open()))
    assert len(rows) == 5 and {r["scale"] for r in rows} == {"declared"}
    assert metrics["labs"]["aria"]["declared_pixel_size_um"] == pytest.approx(RBC_UM / RBC_D)
    assert "aria 0.25 um/px" in (tmp_path / "out" / "report.md").read_text()
    unknown = CliRunner().invoke(app, ["smear-eval", "--data", f"aria={aria_tree}", "--out", str(tmp_path / "o2"), "--checkpoint",
                                       str(crop_checkpoint), "--pixel-size", "bccd=0.1"])
    assert unknown.exit_code == 2 and "no --data names" in unknown.output
    with pytest.raises(LeukoError, match="learned locator"):
        run_smear_eval([LabSource.parse(f"aria={aria_tree}@40")], clf, tmp_path / "o3")
    again = CliRunner().invoke(app, ["smear-eval", "--data", f"aria={aria_tree}", "--out", str(tmp_path / "o5"), "--checkpoint",
                                     str(crop_checkpoint), "--backend", "torch", "--pixel-size", f"aria={RBC_UM / RBC_D}"])
    assert again.exit_code == 0, again.output  # --pixel-size LAB=UM is --data LAB=PATH@PIXELS in micrometres
    assert {r["scale"] for r in csv.DictReader((tmp_path / "o5" / "smears.csv").open())} == {"declared"}
    bad = CliRunner().invoke(app, ["smear-eval", "--data", f"aria={aria_tree}", "--out", str(tmp_path / "o4"), "--checkpoint",
                                   str(crop_checkpoint), "--pixel-size", "aria:0.1"])
    assert bad.exit_code == 2 and "LAB=NUMBER" in bad.output and not (tmp_path / "o4" / "metrics.json").exists()
