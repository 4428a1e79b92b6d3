"""``leukodetect demo``: the shipped models on the bundled cells and smears, end to end; ``demo --train`` wired."""

from __future__ import annotations

import csv
import hashlib
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

import leukodetect.jobs.demo as demo_job
from leukodetect.cli import app
from leukodetect.jobs.cells import DECLARED, LabSource, build_bank, crop_hashes
from leukodetect.runtime.images import open_rgb, pixel_hash
from leukodetect.runtime.scale import CanonicalScale
from leukodetect.sample import SMEAR_TRUTH, sample_dir, sample_smear_dir, sample_smears

#: The demo's budget in the suite; it takes about 3 s of work (and 5 s of imports) on 2 idle cores.
BUDGET_S = 45


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One real run, into a folder that already holds a user's file (which must survive)."""
    out = tmp_path_factory.mktemp("demo") / "runs" / "demo"
    out.mkdir(parents=True)
    (out / "mine.txt").write_text("a user's file")
    logged: list[str] = []
    result = demo_job.run_demo(out, log=logged.append)
    return {"result": result, "requested": out, "logged": logged}


def test_demo_runs_end_to_end_within_budget_and_writes_every_output(demo):
    result = demo["result"]
    assert result["seconds"] < BUDGET_S
    out = Path(result["out_dir"])
    assert out == demo["requested"].with_name("demo-2")  # never the user's folder
    assert (demo["requested"] / "mine.txt").read_text() == "a user's file"
    assert Path(result["index"]) == out / "index.html" and (out / "index.html").is_file()
    for name in result["files"]:
        assert (out / name).exists(), name
    for smear in sample_smears():
        for suffix in ("_overlay.png", "_gallery.png"):
            with Image.open(out / "smears" / f"{smear.stem}{suffix}") as image:
                assert image.format == "PNG"
        assert json.loads((out / "smears" / f"{smear.stem}.json").read_text())["image"] == str(smear)
    assert (out / "smears" / "summary.csv").is_file()
    with open(out / "cells" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(json.loads((out / "cells" / "predictions.json").read_text())) == result["cells"]["n"]


def test_every_bundled_cell_is_classified_with_its_truth_and_the_figures_add_up(demo):
    cells = demo["result"]["cells"]
    bundled = sorted(sample_dir().rglob("*.png"))
    assert [r["file"] for r in cells["rows"]] == [p.name for p in bundled]
    for row, path in zip(cells["rows"], bundled):
        assert row["truth"] == {"all": "blast", "hem": "normal"}[path.parent.name]
        assert 0 <= row["prob_blast"] <= 1
        assert row["predicted"] == ("blast" if row["prob_blast"] >= cells["threshold"] else "normal")
        assert row["call"] in ("blast", "normal", "review") and bool(row["reason"]) == (row["call"] == "review")
    figures = cells["figures"]["all"]
    assert figures["accuracy"]["k"] == sum(r["correct"] for r in cells["rows"]) and figures["accuracy"]["n"] == len(bundled)
    assert figures["sensitivity"]["n"] == sum(r["truth"] == "blast" for r in cells["rows"])
    unseen = cells["figures"]["not_in_training"]["accuracy"]
    assert unseen["n"] == len(bundled) - cells["n_in_training"]
    assert cells["rbc_diameter"] == DECLARED["cnmc"]  # the cells are seen at C-NMC's scale, not as whole images
    if "cnmc" in (cells["labs"] or {}):  # the shipped model trained on the C-NMC subset the sample comes from
        assert cells["n_in_training"] > 0


def test_the_page_and_the_summary_show_every_cell_and_smear_and_say_what_they_cannot(demo):
    result = demo["result"]
    page = Path(result["index"]).read_text(encoding="utf-8")
    for path in sample_dir().rglob("*.png"):
        assert path.name in page
    for smear in result["smears"]:
        assert smear["image"] in page and smear["verdict"] in page and smear["outcome"] in page
    assert page.count("data:image/png;base64,") == len(result["cells"]["rows"]) + 2 * len(result["smears"])
    assert 'src="http' not in page and "<script" not in page  # self-contained
    assert "nothing here is trained" in page and "say nothing about accuracy" in page
    summary = "\n".join(result["summary"])
    for smear in sample_smears():
        assert smear.name in summary
    assert "say nothing about accuracy" in summary and "nothing trained" in summary
    assert str(Path(result["out_dir"]) / "index.html") in summary
    if result["cells"]["n_in_training"]:
        assert "inflated" in summary and "inflated" in page


def test_smears_run_through_detect_with_its_default_detector(demo):
    from leukodetect.weights import resolve_detector

    smears = demo["result"]["smears"]
    assert [s["image"] for s in smears] == sorted(SMEAR_TRUTH)
    detector = resolve_detector(None)
    for s in smears:
        assert s["detector"] == (str(detector) if detector else None)
        assert (s["outcome"] == "right") == (s["verdict"] == "healthy")
        assert s["diagnosis"] == "normal"


def test_the_demo_analyses_smears_with_the_settings_detect_uses_by_default():
    # The demo calls detect's job with the job's defaults; the command passes its own: they must agree.
    import inspect

    from leukodetect.cli import detect
    from leukodetect.detection.pipeline import analyze

    command = {name: p.default.default for name, p in inspect.signature(detect).parameters.items()}
    job = inspect.signature(analyze).parameters
    # neither sets a review band: both call around the model's threshold (review_band_of)
    assert job["review_band"].default is None and (command["review_low"], command["review_high"]) == (None, None)
    assert (job["use_gate"].default, job["use_scorer"].default) == (command["smudge_gate"], command["cell_scorer"])
    assert inspect.signature(demo_job.run_detect).parameters["backend"].default == command["backend"]


def test_crop_hashes_recognise_the_crops_a_cell_bank_writes(tmp_path):
    scale = CanonicalScale(field=3.0, size=64)
    bank = build_bank([LabSource.parse(f"cnmc={sample_dir()}")], tmp_path / "bank", scale, jpeg_quality=95, log=lambda _: None)
    written = {}
    with open(bank, newline="") as f:
        for row in csv.DictReader(f):
            with Image.open(bank.parent / row["path"]) as image:
                written[Path(row["path"]).stem] = pixel_hash(image)
    for path in sorted(sample_dir().rglob("*.png"))[::11]:
        assert written[path.stem] in crop_hashes(open_rgb(path), scale, DECLARED["cnmc"], (0, 95))


def test_bundled_smears_and_their_licence_are_there():
    folder = sample_smear_dir()
    assert [p.name for p in sample_smears()] == sorted(SMEAR_TRUTH)
    assert all(p.is_file() and p.stat().st_size < 100_000 for p in sample_smears())
    assert "MIT License" in (folder / "LICENSE").read_text()
    attribution = (folder.parent / "ATTRIBUTION.md").read_text(encoding="utf-8")
    assert "Shenggan/BCCD_Dataset" in attribution and "d272fb14cdff6e473fafeeeba32aba5f560e9e43" in attribution
    assert "bccd/LICENSE" in attribution


def test_package_data_ships_the_bundled_smears():
    # pyproject.toml's package-data patterns, as setuptools globs them from the package folder.
    import tomllib

    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    patterns = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-data"]["leukodetect"]
    package = sample_smear_dir().parents[1]
    shipped = {p for pattern in patterns for p in package.glob(pattern) if p.is_file()}
    assert {*sample_smears(), sample_smear_dir() / "LICENSE", package / "sample" / "ATTRIBUTION.md"} <= shipped


def test_bundled_smears_are_byte_identical_to_bccd(shared_datasets):
    bccd = shared_datasets / "BCCD"
    if not bccd.is_dir():
        pytest.skip(f"BCCD not found at {bccd}")
    for smear in sample_smears():
        original = bccd / "BCCD" / "JPEGImages" / smear.name
        assert hashlib.sha256(smear.read_bytes()).digest() == hashlib.sha256(original.read_bytes()).digest(), smear.name
        boxes = [o for o in ET.parse(bccd / "BCCD" / "Annotations" / f"{smear.stem}.xml").getroot().iter("object")
                 if o.findtext("name") == "WBC"]
        assert len(boxes) == SMEAR_TRUTH[smear.name]["white_cells"]
    assert (sample_smear_dir() / "LICENSE").read_bytes() == (bccd / "LICENSE").read_bytes()


# ---- the command ----

runner = CliRunner()


def test_demo_command_runs_the_shipped_models_and_prints_the_summary(monkeypatch, tmp_path):
    calls = []

    def fake_run_demo(out_dir, **kwargs):
        calls.append(out_dir)
        return {"summary": ["Demo finished in 3 s: the shipped models.", "  summary page  X/index.html"]}

    monkeypatch.setattr(demo_job, "run_demo", fake_run_demo)
    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "d")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert calls == [tmp_path / "d"]
    assert "Demo finished in 3 s: the shipped models.\n  summary page  X/index.html" in result.stdout


def test_demo_train_runs_the_training_demonstration_with_its_options(monkeypatch, tmp_path):
    calls = []

    def fake_training(out_dir, **kwargs):
        calls.append((out_dir, kwargs))
        return {"summary": ["Demo finished in 1 s."]}

    monkeypatch.setattr(demo_job, "run_training_demo", fake_training)
    result = runner.invoke(app, ["demo", "--train", "--epochs", "1", "--image-size", "32", "--out", str(tmp_path / "t")],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (out_dir, kwargs), = calls
    assert out_dir == tmp_path / "t" and (kwargs["epochs"], kwargs["image_size"]) == (1, 32)
    assert "Demo finished in 1 s." in result.stdout
    runner.invoke(app, ["demo", "--train", "--out", str(tmp_path / "u")], catch_exceptions=False)
    assert "epochs" not in calls[1][1]  # the job's defaults (20 epochs at 160) apply


def test_training_options_without_train_are_one_sentence(tmp_path):
    result = runner.invoke(app, ["demo", "--epochs", "3", "--out", str(tmp_path / "d")], catch_exceptions=False)
    assert result.exit_code == 2
    assert "--epochs and --image-size set the training demonstration: add --train." in result.output
    assert not (tmp_path / "d").exists()
