"""Grad-CAM overlays on the tiny model: heatmap shape and range, files written, never overwritten."""

import json

import numpy as np
import pytest
import torch
from model_helpers import with_scale
from PIL import Image
from typer.testing import CliRunner

from leukodetect.cli import app
from leukodetect.errors import BadImageError, LeukoError
from leukodetect.jobs.explain import explain_file, explain_many
from leukodetect.models import create_model
from leukodetect.reporting.gradcam import gradcam, overlay
from leukodetect.runtime.checkpoint import make_bundle, save_checkpoint
from leukodetect.runtime.classifier import Classifier
from leukodetect.runtime.guard import REVIEW, UNLIKE_TRAINING
from leukodetect.weights import resolve_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An untrained tiny checkpoint: Grad-CAM needs a network and gradients, not a good model."""
    torch.manual_seed(0)
    bundle = make_bundle(create_model("tiny"), arch="tiny", image_size=24, mean=[0.6] * 3, std=[0.25] * 3, config={})
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    save_checkpoint(bundle, path)
    return path


@pytest.fixture(scope="module")
def clf(checkpoint):
    # float32 also on CPUs with native bfloat16, where the default would autocast: Grad-CAM runs in float32.
    return Classifier.from_checkpoint(checkpoint, precision="fp32")


@pytest.fixture
def cell(tiny_tree, tmp_path):
    """A 30x20 (W x H) cell, so a transposed heatmap would show."""
    path = tmp_path / "cell.png"
    Image.open(tiny_tree / "blast" / "blast_01.png").resize((30, 20)).save(path)
    return path


def test_heatmap_has_the_image_size_and_unit_range(clf, cell):
    image = Image.open(cell).convert("RGB")
    with torch.no_grad():  # Grad-CAM turns gradients back on for itself
        heat = gradcam(clf, image)
    assert heat.shape == (20, 30) and heat.dtype == np.float32
    assert 0.0 <= heat.min() and heat.max() <= 1.0 and heat.max() > 0.5
    assert all(p.grad is None for p in clf.model.parameters())  # no gradients left behind
    shown = overlay(image, heat)
    assert shown.size == image.size and shown.mode == "RGB"
    assert overlay(image, np.zeros((3, 4), np.float32)).size == image.size  # other sizes are resized


def test_explain_file_writes_an_overlay_and_refuses_to_overwrite(clf, cell, tmp_path):
    target = tmp_path / "out" / "overlay.png"
    result = explain_file(clf, cell, target)
    assert result["out"] == str(target) and Image.open(target).size == (30, 20)
    assert 0.0 <= result["prob_blast"] <= 1.0 and result["label"] in ("normal", "blast")
    # Same probability as 'predict' (float32 on CPU in both).
    assert result["prob_blast"] == pytest.approx(clf.predict_paths([cell])[0].prob_blast, abs=1e-5)
    before = target.read_bytes()
    with pytest.raises(LeukoError, match="already exists"):
        explain_file(clf, cell, target)
    assert target.read_bytes() == before


def test_default_names_move_on_to_a_fresh_one(clf, cell):
    first = explain_file(clf, cell)["out"]
    second = explain_file(clf, cell)["out"]
    assert first.endswith("cell_gradcam.png") and second.endswith("cell_gradcam-2.png")


def test_bad_image_is_one_sentence_naming_it(clf, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(BadImageError, match="bad.png"):
        explain_file(clf, bad, tmp_path / "o.png")
    assert not (tmp_path / "o.png").exists()


def test_explain_many_batches_and_keeps_going(clf, tiny_tree, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"")
    paths = [tiny_tree / "blast" / "blast_02.png", bad, tiny_tree / "normal" / "normal_02.png", tiny_tree / "blast" / "blast_02.png"]
    rows = explain_many(clf, paths, tmp_path / "gallery", batch_size=2)
    assert [r["path"] for r in rows] == [str(p) for p in paths]
    assert "bad.png" in rows[1]["error"] and rows[1]["out"] is None
    outs = [r["out"] for r in rows if r["out"]]
    assert [o.rsplit("/", 1)[-1] for o in outs] == ["blast_02_gradcam.png", "normal_02_gradcam.png", "blast_02_gradcam-2.png"]
    assert rows[0]["prob_blast"] == pytest.approx(rows[3]["prob_blast"], abs=1e-6)


def test_explain_cli_round_trip(checkpoint, cell, tmp_path):
    runner = CliRunner()
    args = ["explain", str(cell), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "o.png"), "--json"]
    result = runner.invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["out"] == str(tmp_path / "o.png") and (tmp_path / "o.png").is_file()
    again = runner.invoke(app, args, catch_exceptions=False)
    assert again.exit_code == 2 and "already exists" in again.output and "Traceback" not in again.output
    wrong = runner.invoke(app, [*args[:-2], str(tmp_path / "p.png"), "--target-class", "5"], catch_exceptions=False)
    assert wrong.exit_code == 2 and "Target class 5" in wrong.output


def test_out_may_be_a_folder_or_a_file(clf, cell, tmp_path):
    """An existing folder (or a path ending in /) receives IMAGE_gradcam.png; any other path is the file itself."""
    folder = tmp_path / "overlays"
    folder.mkdir()
    assert explain_file(clf, cell, folder)["out"] == str(folder / "cell_gradcam.png")
    assert explain_file(clf, cell, folder)["out"] == str(folder / "cell_gradcam-2.png")  # never overwritten
    made = explain_file(clf, cell, f"{tmp_path / 'new'}/")["out"]
    assert made == str(tmp_path / "new" / "cell_gradcam.png") and Image.open(made).size == (30, 20)
    assert explain_file(clf, cell, tmp_path / "named")["out"] == str(tmp_path / "named")  # no suffix: still a file


def test_explain_cli_takes_a_folder_and_says_so_in_its_help(checkpoint, cell, tmp_path):
    runner = CliRunner()
    (tmp_path / "out").mkdir()
    result = runner.invoke(app, ["explain", str(cell), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out"), "--json"],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["out"] == str(tmp_path / "out" / "cell_gradcam.png")
    helped = " ".join(runner.invoke(app, ["explain", "--help"], env={"COLUMNS": "160"}).output.split())  # room for every column
    assert "A folder" in helped and "the PNG file itself" in helped


def test_explain_shows_a_scaled_model_the_window_that_predict_scores(checkpoint, cell, tmp_path):
    """The shipped model has a physical scale: explain must score and draw the window predict scores, not the whole image."""
    scaled = Classifier.from_checkpoint(with_scale(checkpoint, tmp_path), backend="torch", precision="fp32")
    result = explain_file(scaled, cell, tmp_path / "declared.png", rbc_diameter=5.0)  # a 15-pixel window of the 30x20 image
    assert Image.open(tmp_path / "declared.png").size == (24, 24) and result["notes"] == []
    (predicted,) = scaled.predict_paths([cell], rbc_diameter=5.0)
    assert result["prob_blast"] == pytest.approx(predicted.prob_blast, abs=1e-5) and result["label"] == predicted.label
    whole = explain_file(Classifier.from_checkpoint(checkpoint, backend="torch", precision="fp32"), cell, tmp_path / "whole.png")
    assert whole["prob_blast"] != pytest.approx(result["prob_blast"], abs=1e-4)  # the window is not the whole image
    unknown = explain_file(scaled, cell, tmp_path / "unknown.png")  # no red cells to measure, none declared: said so
    assert len(unknown["notes"]) == 1 and "scale unknown" in unknown["notes"][0]


def test_explain_says_review_where_predict_does(tmp_path):
    """The shipped model's guard: noise is "review" in explain as in predict, with the same score, and a PBC-like call stays a class."""
    shipped = Classifier.from_checkpoint(resolve_checkpoint(None), backend="torch", precision="fp32")
    noise = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(noise)
    result = explain_file(shipped, noise, tmp_path / "noise_cam.png")
    (predicted,) = shipped.predict_paths([noise])
    assert result["label"] == predicted.label == REVIEW and result["reason"] == UNLIKE_TRAINING
    assert result["ood_score"] == pytest.approx(predicted.ood_score, rel=1e-3) and result["ood_score"] > 1
    runner = CliRunner()
    said = runner.invoke(app, ["explain", str(noise), "--out", str(tmp_path / "cli.png")], catch_exceptions=False)
    assert said.exit_code == 0 and f"review: {UNLIKE_TRAINING}" in " ".join(said.output.split())
    # A gallery's overlays (explain_many) say it too, from the same pass as their heatmaps.
    (many,) = explain_many(shipped, [noise], tmp_path / "gallery")
    assert many["label"] == REVIEW and many["prob_blast"] == pytest.approx(result["prob_blast"], abs=1e-5)
