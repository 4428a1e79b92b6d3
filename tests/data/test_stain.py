"""Macenko stain normalisation: it moves another stain toward the reference, keeps black background
black, counts (never raises on) images it cannot handle, and ``evaluate --stain-normalize`` uses it."""

import csv
import json

import numpy as np
import pytest
import torchstain
from PIL import Image
from typer.testing import CliRunner

from leukodetect.cli import app
from leukodetect.data.stain import (
    BACKGROUND_LEVEL,
    MacenkoStain,
    pick_evenly,
    reference_paths,
    stain_from_options,
)
from leukodetect.errors import LeukoError
from leukodetect.runtime.classifier import Classifier

runner = CliRunner()


@pytest.fixture
def stain(stained) -> MacenkoStain:
    return MacenkoStain.fit([stained.cell(stained.REFERENCE, seed=s) for s in range(3)], reference=["r0", "r1", "r2"])


def test_fit_recovers_the_reference_stain_vectors(stain, stained):
    fitted = stain.stain_matrix / np.linalg.norm(stain.stain_matrix, axis=0)
    truth = stained.REFERENCE / np.linalg.norm(stained.REFERENCE, axis=0)
    cosines = np.abs(fitted.T @ truth)
    # each fitted vector points (almost) along one true stain, one each
    assert sorted(cosines.argmax(axis=1).tolist()) == [0, 1]
    assert cosines.max(axis=1).min() > 0.97


def test_another_stain_moves_toward_the_reference(stain, stained):
    other = stained.cell(stained.OTHER, seed=5, black_background=True)
    target = np.asarray(stained.cell(stained.REFERENCE, seed=5, black_background=True)).astype(float)
    out = stain(other)
    nuc = stained.nucleus_mask()
    before = np.asarray(other).astype(float)[nuc].mean(0)
    after = np.asarray(out).astype(float)[nuc].mean(0)
    want = target[nuc].mean(0)
    # the nucleus takes the reference's colour: from about 50 RGB levels away to within a fifth of that
    assert np.linalg.norm(before - want) > 40
    assert np.linalg.norm(after - want) < 0.2 * np.linalg.norm(before - want)
    # the cytoplasm (ring between nucleus and cell edge) moves toward it too
    yy, xx = np.mgrid[:64, :64]
    ring = (np.hypot(yy - 32, xx - 32) > 16) & (np.hypot(yy - 32, xx - 32) < 24)
    assert np.linalg.norm(np.asarray(out).astype(float)[ring].mean(0) - target[ring].mean(0)) < \
        0.6 * np.linalg.norm(np.asarray(other).astype(float)[ring].mean(0) - target[ring].mean(0))
    assert (stain.failed, stain.normalised) == (0, 1)


def test_stains_are_paired_with_the_reference_by_direction_not_by_red_density(stain, stained):
    # As in C-NMC: the nucleus stain has less red optical density than the cytoplasm's, so torchstain's
    # H&E rule (more red = first stain) would pair the nucleus with the reference's pink stain.
    other = stained.cell(stained.CNMC_LIKE, seed=5, black_background=True)
    want = np.asarray(stained.cell(stained.REFERENCE, seed=5, black_background=True)).astype(float)[stained.nucleus_mask()].mean(0)
    ours = np.asarray(stain(other)).astype(float)[stained.nucleus_mask()].mean(0)
    assert stain.reordered == 1
    assert np.linalg.norm(ours - want) < 10
    # torchstain's own pairing paints the nucleus pink-orange, far from the reference's purple
    rgb = np.asarray(other)
    cell = rgb[rgb.max(axis=-1) > BACKGROUND_LEVEL]
    torchstain_own = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
    torchstain_own.HERef, torchstain_own.maxCRef = stain.stain_matrix, stain.max_concentrations
    plain, _, _ = torchstain_own.normalize(cell.reshape(-1, 1, 3), Io=stained.IO, beta=0.15, stains=False)
    as_torchstain = rgb.copy()
    as_torchstain[rgb.max(axis=-1) > BACKGROUND_LEVEL] = plain.reshape(-1, 3)
    assert np.linalg.norm(as_torchstain.astype(float)[stained.nucleus_mask()].mean(0) - want) > 50


def test_black_background_stays_black_and_does_not_change_the_cell(stain, stained):
    small = stained.cell(stained.OTHER, seed=7, black_background=True)
    padded = stained.cell(stained.OTHER, seed=7, black_background=True, pad=40)
    out_small, out_padded = np.asarray(stain(small)), np.asarray(stain(padded))
    background = np.asarray(padded).max(axis=-1) <= BACKGROUND_LEVEL
    assert background.mean() > 0.7
    assert (out_padded[background] == 0).all()
    # the cell is normalised the same however much black surrounds it
    assert np.array_equal(out_padded[40:-40, 40:-40], out_small)
    assert not np.array_equal(out_small, np.asarray(small))


@pytest.mark.parametrize("image", [
    Image.new("RGB", (40, 40), (255, 255, 255)),  # empty slide: nothing stained
    Image.new("RGB", (40, 40), (0, 0, 0)),  # only background
    Image.fromarray(np.pad(np.full((5, 5, 3), (90, 40, 140), np.uint8), ((20, 20), (20, 20), (0, 0)))),  # 25 stained pixels on black
    Image.new("RGB", (40, 40), (90, 40, 140)),  # one colour: the two stain vectors coincide
], ids=["white", "black", "speck", "flat"])
def test_an_image_macenko_cannot_handle_is_kept_and_counted(stain, image):
    notes = []
    out = stain(image, notes=notes)
    assert np.array_equal(np.asarray(out), np.asarray(image))
    assert (stain.failed, stain.normalised) == (1, 0)
    assert len(notes) == 1 and "kept as it is" in notes[0]


def test_fitting_on_unusable_references_is_one_sentence(tmp_path):
    Image.new("RGB", (30, 30), (250, 250, 250)).save(tmp_path / "blank.png")
    with pytest.raises(LeukoError, match="Cannot fit a stain reference on blank.png"):
        MacenkoStain.from_reference(tmp_path / "blank.png")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(LeukoError, match="holds no image files"):
        MacenkoStain.from_reference(tmp_path / "nothing")
    with pytest.raises(LeukoError, match="needs --stain-reference"):
        stain_from_options("macenko", None)
    with pytest.raises(LeukoError, match="only used with --stain-normalize macenko"):
        stain_from_options("none", tmp_path)
    with pytest.raises(LeukoError, match="Unknown --stain-normalize 'reinhard'"):
        stain_from_options("reinhard", tmp_path)


def test_a_folder_reference_uses_images_evenly_spaced_over_its_files(tmp_path):
    for i in range(20):
        (tmp_path / f"im{i:02d}.png").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not an image")
    picked = reference_paths(tmp_path, n=5)
    assert [p.name for p in picked] == ["im00.png", "im05.png", "im10.png", "im14.png", "im19.png"]
    assert pick_evenly([1, 2, 3], 8) == [1, 2, 3]


# --- evaluate --stain-normalize on the tiny model -------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tiny_tree, tmp_path_factory):
    run = tmp_path_factory.mktemp("stain-run") / "tiny"
    result = runner.invoke(app, [str(a) for a in ("train", "--data", tiny_tree, "--out", run, "--epochs", 1, "--arch", "tiny",
                                                  "--image-size", 24, "--batch-size", 8)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return run / "best.pt"


def test_evaluate_with_stain_normalisation(checkpoint, tiny_tree, other_lab, tmp_path):
    args = ["evaluate", "--checkpoint", checkpoint, "--data", other_lab, "--json"]
    plain = runner.invoke(app, [str(a) for a in [*args, "--out", tmp_path / "plain"]], catch_exceptions=False)
    normed = runner.invoke(app, [str(a) for a in [*args, "--out", tmp_path / "macenko", "--stain-normalize", "macenko",
                                                  "--stain-reference", tiny_tree / "blast"]], catch_exceptions=False)
    assert plain.exit_code == 0 and normed.exit_code == 0, normed.output
    report = json.loads((tmp_path / "macenko" / "metrics.json").read_text())
    stain = report["stain_normalization"]
    assert report["n"] == 9 and stain["method"] == "macenko"
    assert (stain["normalised"], stain["failed"]) == (8, 1)
    assert len(stain["reference"]) == 8 and all("blast" in p for p in stain["reference"])
    assert "stain_normalization" not in json.loads((tmp_path / "plain" / "metrics.json").read_text())
    assert "1 of 9 images" in normed.output
    with (tmp_path / "macenko" / "predictions.csv").open() as fh:
        rows = {r["path"].rsplit("/", 1)[-1]: r for r in csv.DictReader(fh)}
    assert "stain normalisation skipped" in rows["UID_H9_1_1_hem.png"]["notes"]
    assert rows["UID_0_1_1_all.png"]["notes"] == ""
    # the same probabilities as predicting with the normaliser directly, and not those of the plain run
    clf = Classifier.from_checkpoint(checkpoint)
    ref = MacenkoStain.from_paths(stain["reference"])
    direct = {p.path.rsplit("/", 1)[-1]: p.prob_blast for p in clf.predict_paths([r["path"] for r in rows.values()], stain=ref)}
    assert all(float(r["prob_blast"]) == pytest.approx(direct[name], abs=1e-6) for name, r in rows.items())
    with (tmp_path / "plain" / "predictions.csv").open() as fh:
        plain_rows = {r["path"].rsplit("/", 1)[-1]: float(r["prob_blast"]) for r in csv.DictReader(fh)}
    assert plain_rows["UID_H9_1_1_hem.png"] == pytest.approx(float(rows["UID_H9_1_1_hem.png"]["prob_blast"]), abs=1e-6)
    assert any(abs(plain_rows[n] - float(rows[n]["prob_blast"])) > 1e-4 for n in rows if n != "UID_H9_1_1_hem.png")


def test_evaluate_stain_options_are_checked(checkpoint, other_lab, tmp_path):
    result = runner.invoke(app, [str(a) for a in ("evaluate", "--checkpoint", checkpoint, "--data", other_lab, "--out",
                                                  tmp_path / "x", "--stain-normalize", "macenko")], catch_exceptions=False)
    assert result.exit_code == 2 and "needs --stain-reference" in result.output
