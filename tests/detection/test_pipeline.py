"""The whole-smear pipeline end to end with the tiny model: JSON, overlay, gallery, bad files."""

import json
from pathlib import Path

import numpy as np
import pytest
from smear_images import synthetic_smear
from typer.testing import CliRunner

from leukodetect.cli import app
from leukodetect.detection.pipeline import EDGE_MARGIN, REVIEW_BAND, VerdictRule, analyze, call_of, cut_by_frame, label_x, review_band_of
from leukodetect.errors import LeukoError
from leukodetect.runtime.classifier import Classifier

runner = CliRunner()


def test_verdict_rule_and_calls():
    rule = VerdictRule(min_blasts=1)
    assert rule(1, 0) == "ALL" and rule(0, 0) == "healthy" and rule(0, 2) == "review"
    assert VerdictRule(min_blasts=2)(1, 0) == "review" and VerdictRule(min_blasts=2)(1, 0) != "ALL"
    assert [call_of(p, (0.3, 0.7)) for p in (0.1, 0.3, 0.69, 0.7, None)] == ["normal", "review", "review", "blast", "cell"]


def test_analyze_counts_and_scales(crop_checkpoint):
    clf = Classifier.from_checkpoint(crop_checkpoint, device="cpu")
    result = analyze(synthetic_smear(), clf, review_band=(0.4, 0.6))
    assert result["n_cells"] == 3 and len(result["cells"]) == 3
    assert result["n_blast"] + result["n_review"] + result["n_normal"] == 3
    assert result["crop_factor"] == 3.0 and abs(result["crop_side"] - 3 * result["rbc_diameter"]) < 0.1
    assert result["verdict"] in ("ALL", "healthy", "review")
    assert all(0 <= c["prob_blast"] <= 1 for c in result["cells"])
    assert result["blast_fraction"] == result["n_blast"] / 3
    json.dumps(result)  # JSON-ready


def test_detect_command_writes_outputs_skips_bad_files_and_never_overwrites(crop_checkpoint, smear_png, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "smear.png").write_bytes(smear_png.read_bytes())
    (folder / "broken.jpg").write_text("not an image")
    out = tmp_path / "out"
    result = runner.invoke(app, ["detect", str(folder), "--checkpoint", str(crop_checkpoint), "--locator", "colour", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "broken.jpg" in result.output and "skipped" in result.output
    for name in ("smear.json", "smear_overlay.png", "smear_gallery.png", "summary.csv"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "smear.json").read_text())
    assert saved["n_cells"] == 3 and saved["image"].endswith("smear.png")
    summary = (out / "summary.csv").read_text().splitlines()
    assert summary[0].startswith("image,verdict") and len(summary) == 3
    assert "not an image" in [line for line in summary if "broken" in line][0]

    again = runner.invoke(app, ["detect", str(folder), "--checkpoint", str(crop_checkpoint), "--out", str(out)])
    assert again.exit_code == 2 and "already exists" in again.output


def test_detect_takes_several_photographs_and_refuses_two_that_would_write_the_same_outputs(smear_png, tmp_path):
    a, b = tmp_path / "a" / "one.png", tmp_path / "b" / "two.png"
    for path in (a, b):
        path.parent.mkdir()
        path.write_bytes(smear_png.read_bytes())
    out = tmp_path / "out"
    result = runner.invoke(app, ["detect", str(a), str(b), "--locate-only", "--locator", "colour", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} >= {"one.json", "two.json", "one_overlay.png", "two_overlay.png", "summary.csv"}
    assert len((out / "summary.csv").read_text().splitlines()) == 3

    twin = tmp_path / "c" / "one.png"
    twin.parent.mkdir()
    twin.write_bytes(smear_png.read_bytes())
    clash = runner.invoke(app, ["detect", str(a), str(twin), "--locate-only", "--locator", "colour", "--out", str(tmp_path / "o2")])
    assert clash.exit_code == 2
    assert "would both write" in clash.output and "one.png" in clash.output
    assert not (tmp_path / "o2").exists()  # refused before anything was written


def test_detect_locate_only(smear_png, tmp_path):
    result = runner.invoke(app, ["detect", str(smear_png), "--locate-only", "--locator", "colour", "--out", str(tmp_path / "o"), "--json"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout.splitlines()[0])
    assert row["verdict"] == "not classified" and row["n_cells"] == 3


def test_detect_defaults_to_the_learned_locator_and_the_cell_model_that_goes_with_it(crop_checkpoint, smear_png, tmp_path, monkeypatch):
    import leukodetect.weights as weights

    # Default: the learned locator, then the shipped cell model (here the tiny one in its place) on the cells it found.
    monkeypatch.setattr(weights, "DEFAULT_MODEL", crop_checkpoint)
    result = runner.invoke(app, ["detect", str(smear_png), "--out", str(tmp_path / "a"), "--json"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout.splitlines()[0])
    assert row["locator"] == "learned" and row["verdict"] in ("ALL", "healthy", "review", "cannot_assess")
    # --locator colour: ALL-IDB1's pipeline, with the shipped ALL-IDB1 detector.
    monkeypatch.setattr(weights, "DEFAULT_DETECTOR", crop_checkpoint)
    result = runner.invoke(app, ["detect", str(smear_png), "--locator", "colour", "--out", str(tmp_path / "b"), "--json"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout.splitlines()[0])
    assert row["locator"] == "colour" and row["n_cells"] == 3 and row["verdict"] in ("ALL", "healthy", "review")
    # An installation without the cell model locates only, and says so.
    monkeypatch.setattr(weights, "DEFAULT_DETECTOR", tmp_path / "missing.safetensors")
    result = runner.invoke(app, ["detect", str(smear_png), "--locator", "colour", "--out", str(tmp_path / "c"), "--json"])
    assert result.exit_code == 0 and "locating cells only" in result.output
    assert json.loads(result.stdout.splitlines()[-1])["verdict"] == "not classified"


def test_detect_single_bad_file_fails_with_one_sentence(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"")
    result = runner.invoke(app, ["detect", str(bad), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "bad.png" in result.output and "Traceback" not in result.output


def test_detection_runs_with_the_localisation_settings_stored_with_its_classifier():
    from dataclasses import asdict

    from leukodetect.detection.locate import LocateParams
    from leukodetect.detection.pipeline import locate_params_of
    from leukodetect.runtime.checkpoint import DetectorSettings

    assert locate_params_of(None) == LocateParams()
    stored = asdict(LocateParams(min_area=0.4, clump_area=5.0))
    assert locate_params_of(DetectorSettings(locate=stored)) == LocateParams(min_area=0.4, clump_area=5.0)
    # A detector trained before clump cutting existed keeps the locator it was evaluated with.
    older = {k: v for k, v in stored.items() if k not in ("clump_area", "cell_area")}
    assert locate_params_of(DetectorSettings(locate=older)).clump_area == 0.0
    # One trained with clump cutting but before the convexity guard cuts by area alone, as evaluated.
    before_guard = {k: v for k, v in stored.items() if k not in ("clump_solidity", "merge_area", "merge_solidity")}
    params = locate_params_of(DetectorSettings(locate=before_guard))
    assert (params.clump_area, params.clump_solidity, params.merge_area) == (5.0, 1.0, 0.0)


def test_a_thin_or_1_pixel_image_is_cannot_assess_with_its_size_and_its_overlay_still_draws():
    import numpy as np

    from leukodetect.detection.pipeline import CANNOT_ASSESS, MIN_SIDE, draw_gallery, draw_overlay

    strip = np.full((1, 20000, 3), 200, np.uint8)
    for image, shown in ((strip, "20000x1"), (np.full((1, 1, 3), 200, np.uint8), "1x1")):
        result = analyze(image)
        assert result["verdict"] == CANNOT_ASSESS and result["cells"] == []
        assert f"{shown} pixels, below the {MIN_SIDE}-pixel minimum side" in result["reason"]
        assert draw_overlay(image, result).size[0] >= 1 and draw_gallery(image, result).size[0] > 0
    # The overlay of a strip is at least one pixel a side (a 0-pixel resize was a cv2 assertion), under its header band.
    empty = {"cells": [], "verdict": "healthy", "n_blast": 0, "n_review": 0, "n_cells": 0}
    wide, tall = draw_overlay(strip, empty), draw_overlay(np.full((20000, 2, 3), 200, np.uint8), empty)
    assert wide.size[0] == 2000 and wide.size[1] > 1
    assert tall.size[0] == 1 and tall.size[1] > 2000


def test_the_overlay_of_a_small_field_is_enlarged_and_its_reason_is_wrapped_above_it_in_full():
    import numpy as np

    from leukodetect.detection.pipeline import OVERLAY_MIN_SIDE, draw_overlay

    field = np.full((224, 224, 3), 180, np.uint8)
    reason = "3 of its 10 white cells are unlike the images this model was trained on: a person should look"
    result = {"cells": [{"box": [20, 20, 60, 60], "call": "review", "prob_blast": 0.01}], "verdict": "review",
              "n_blast": 0, "n_review": 3, "n_cells": 10, "reason": reason}
    overlay = np.asarray(draw_overlay(field, result))
    assert overlay.shape[1] == OVERLAY_MIN_SIDE
    picture = overlay[-OVERLAY_MIN_SIDE:]
    band = overlay[:-OVERLAY_MIN_SIDE]
    assert len(band) > 0 and (band == 255).all(axis=2).any()  # a white band above the picture
    assert (band < 128).all(axis=2).sum() > 0  # with the text in it
    # The text wraps: the long reason needs more than one line at this width, and no line runs off the right edge.
    ink_rows = np.flatnonzero((band < 128).all(axis=2).any(axis=1))
    assert ink_rows.max() - ink_rows.min() > 40
    assert not (band[:, -4:] < 128).all(axis=2).any()
    # The box is drawn at the enlarged scale, in review's colour, on the picture (not under the band).
    assert tuple(picture[round(40 * OVERLAY_MIN_SIDE / 224), round(20 * OVERLAY_MIN_SIDE / 224)]) == (255, 150, 0)


def test_detect_folder_with_thin_images_reports_each_and_goes_on(crop_checkpoint, smear_png, tmp_path):
    from PIL import Image

    folder = tmp_path / "in"
    folder.mkdir()
    Image.new("RGB", (1, 20000), "white").save(folder / "a_strip.png")  # sorted first: the rest must still run
    Image.new("RGB", (20000, 2), "white").save(folder / "b_band.png")
    (folder / "c_smear.png").write_bytes(smear_png.read_bytes())
    out = tmp_path / "out"
    result = runner.invoke(app, ["detect", str(folder), "--checkpoint", str(crop_checkpoint), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output and (out / "c_smear.json").is_file()
    rows = {line.split(",")[0].rsplit("/", 1)[-1]: line for line in (out / "summary.csv").read_text().splitlines()[1:]}
    assert "1x20000 pixels, below the 32-pixel minimum side" in rows["a_strip.png"] and ",cannot_assess," in rows["a_strip.png"]
    assert "20000x2 pixels" in rows["b_band.png"] and ",healthy," not in rows["b_band.png"]
    assert (out / "a_strip_overlay.png").is_file()
    assert "error" not in json.loads((out / "c_smear.json").read_text())


def test_no_evidence_is_cannot_assess_never_healthy(crop_checkpoint, smear_png, tmp_path):
    """Blank, black, grayscale and noise images get 'cannot_assess' with a reason; 'healthy' needs white cells seen."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    smear = np.asarray(Image.open(smear_png))
    odd = {
        "blank.png": np.full((200, 200, 3), 245, np.uint8),
        "black.png": np.zeros((200, 200, 3), np.uint8),
        "grayscale.png": np.repeat(smear.mean(axis=2, keepdims=True).astype(np.uint8), 3, axis=2),
        "noise.png": rng.integers(0, 256, (200, 200, 3), dtype=np.uint8),
    }
    folder = tmp_path / "odd"
    folder.mkdir()
    for name, pixels in odd.items():
        Image.fromarray(pixels).save(folder / name)
    result = runner.invoke(app, ["detect", str(folder), "--checkpoint", str(crop_checkpoint), "--out", str(tmp_path / "o"), "--json"])
    rows = {Path(r["image"]).name: r for r in map(json.loads, result.stdout.splitlines())}
    assert {name: rows[name]["verdict"] for name in odd} == {name: "cannot_assess" for name in odd}, result.output
    assert "no colour" in rows["grayscale.png"]["reason"] and all(rows[name]["reason"] for name in odd)
    summary = (tmp_path / "o" / "summary.csv").read_text()
    assert "cannot_assess" in summary and "reason" in summary.splitlines()[0]
    # The synthetic smear itself, with red and white cells, is assessed as before.
    assessed = analyze(Image.open(smear_png), Classifier.from_checkpoint(crop_checkpoint, backend="torch"))
    assert assessed["verdict"] != "cannot_assess" and assessed["reason"] is None


def test_a_cell_beyond_the_guard_is_review_whatever_its_probability_and_the_smear_says_why(crop_checkpoint):
    clf = Classifier.from_checkpoint(crop_checkpoint, device="cpu")
    plain = analyze(synthetic_smear(), clf)
    assert all("unlike_training" not in c for c in plain["cells"]) and plain["n_unlike_training"] == 0  # no guard, no flag

    def outputs(scores):
        def image_outputs(images, *, batch_size):
            probs = np.array([0.95] + [0.05] * (len(images) - 1))  # the first cell looks like a blast
            return probs, np.array(scores[:len(images)], dtype=float)
        return image_outputs

    clf.guard_threshold = 1.0
    clf.image_outputs = outputs([5.0, 0.2, 0.3])  # the first cell is unlike the training images
    flagged = analyze(synthetic_smear(), clf)
    first = flagged["cells"][0]
    assert first["call"] == "review" and first["unlike_training"] and first["prob_blast"] == 0.95 and first["ood_score"] == 5.0
    assert [c["call"] for c in flagged["cells"][1:]] == ["normal", "normal"]
    assert flagged["verdict"] == "review" and flagged["n_unlike_training"] == 1 and flagged["n_blast"] == 0
    assert "1 of its 3 white cells is unlike the images this model was trained on" in flagged["reason"]

    clf.image_outputs = outputs([0.5, 0.2, 0.3])  # all within the guard: the blast counts
    trusted = analyze(synthetic_smear(), clf)
    assert trusted["verdict"] == "ALL" and trusted["reason"] is None and not any(c["unlike_training"] for c in trusted["cells"])


def test_a_cell_is_cut_by_the_frame_within_the_margin_of_any_side_and_never_with_margin_0():
    assert cut_by_frame(14.0, 200.0, 400, 300, 30.0) and cut_by_frame(200.0, 290.0, 400, 300, 30.0)  # left; bottom
    assert not cut_by_frame(15.0, 200.0, 400, 300, 30.0) and not cut_by_frame(200.0, 150.0, 400, 300, 30.0)
    assert cut_by_frame(30.0, 150.0, 400, 300, 30.0, margin=1.1) and not cut_by_frame(0.0, 0.0, 400, 300, 30.0, margin=0)


def test_a_blast_like_cell_cut_by_the_frame_is_review_and_the_smear_says_why(crop_checkpoint):
    clf = Classifier.from_checkpoint(crop_checkpoint, device="cpu")
    smear = synthetic_smear()[:, 90:]  # the lone white cell's centre now lies on the left edge (x about 9 of a 30 px red cell)

    def blast_like(first: float):
        def image_outputs(images, *, batch_size):
            return np.array([first] + [0.05] * (len(images) - 1)), None
        return image_outputs

    clf.image_outputs = blast_like(0.95)
    cut = analyze(smear, clf)
    first, *rest = cut["cells"]
    assert first["x"] < EDGE_MARGIN * cut["rbc_diameter"] and first["cut_by_frame"] and not any(c["cut_by_frame"] for c in rest)
    assert first["call"] == "review" and first["prob_blast"] == 0.95  # the probability stays beside the call
    assert cut["verdict"] == "review" and cut["n_blast"] == 0 and cut["n_cells"] == 3 and cut["n_cut_blast_like"] == 1
    assert cut["reason"] == "1 blast-like cell is cut by the photograph's frame: a person should look"

    off = analyze(smear, clf, edge_margin=0)  # switched off: the cut cell counts as a blast
    assert off["cells"][0]["call"] == "blast" and off["verdict"] == "ALL" and off["reason"] is None and off["n_cut_blast_like"] == 0

    clf.image_outputs = blast_like(0.05)  # a normal-looking cut cell is called as any other
    assert analyze(smear, clf)["verdict"] == "healthy"
    with pytest.raises(LeukoError, match="Edge margin"):
        analyze(smear, clf, edge_margin=-1)


def test_a_boxs_probability_is_written_inside_the_picture_even_at_its_right_edge():
    assert label_x(100, 140, 30, 800) == 142  # right of the box
    assert label_x(760, 800, 30, 800) == 728  # a cell cut by the right edge: left of its box
    assert label_x(0, 20, 30, 40) == 0 and label_x(0, 20, 50, 40) == 0  # never outside, even in a narrow picture


def test_the_command_lines_edge_margin_is_the_pipelines():
    from leukodetect.cli import EdgeMarginOpt
    assert EdgeMarginOpt.default == EDGE_MARGIN


def test_detect_takes_a_declared_pixel_size_with_the_learned_locator_and_refuses_it_with_the_colour_one(smear_png, tmp_path):
    from smear_images import RBC_D

    from leukodetect.runtime.scale import RBC_UM

    size = RBC_UM / RBC_D  # micrometres per pixel that make a red cell RBC_D pixels
    result = runner.invoke(app, ["detect", str(smear_png), "--locate-only", "--pixel-size", str(size), "--out", str(tmp_path / "o"), "--json"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout.splitlines()[0])
    assert row["scale"] == "declared" and row["rbc_diameter"] == pytest.approx(RBC_D) and row["locator"] == "learned"
    refused = runner.invoke(app, ["detect", str(smear_png), "--locate-only", "--locator", "colour", "--pixel-size", str(size),
                                  "--out", str(tmp_path / "o2")])
    assert refused.exit_code == 2 and "learned locator" in refused.output
    assert not (tmp_path / "o2").exists()


def test_the_served_detector_keeps_the_declared_diameter_and_the_service_refuses_it_without_the_learned_locator(smear_png, crop_checkpoint):
    from PIL import Image
    from smear_images import RBC_D

    from leukodetect.detection.pipeline import load_detector
    from leukodetect.errors import LeukoError
    from leukodetect.serving.server import build_app
    from leukodetect.weights import resolve_locator

    detector = load_detector(crop_checkpoint, locator=resolve_locator(None), rbc_diameter=float(RBC_D), backend="torch")
    result = detector.analyze(Image.open(smear_png).convert("RGB"))
    assert result["scale"] == "declared" and result["rbc_diameter"] == RBC_D
    with pytest.raises(LeukoError, match="learned locator"):
        build_app(crop_checkpoint, locator=None, rbc_diameter=30.0)


class _SizedLocator:
    """A stand-in for the learned locator that finds the synthetic smear's white cells only when told a red-cell
    diameter near the smear's own (as a network trained at one scale does), and records each diameter it was told."""

    def __init__(self):
        self.settings = type("Settings", (), {"rbc_px": 16})()
        self.told: list[float] = []

    def locate(self, rgb, rbc_diameter):
        from smear_images import RBC_D, WHITE

        self.told.append(rbc_diameter)
        return [(x, y, 0.9) for x, y, _ in WHITE] if abs(rbc_diameter / RBC_D - 1) < 0.35 else []


def test_a_contradicted_scale_that_finds_no_white_cell_gets_a_second_look_at_the_stain_free_one(monkeypatch):
    from leukodetect.detection import pipeline
    from leukodetect.runtime.scale import ScaleEstimate, stain_free_diameter
    from smear_images import RBC_D

    rgb = synthetic_smear()
    stain_free = stain_free_diameter(rgb)
    assert stain_free is not None and abs(stain_free / RBC_D - 1) < 0.35  # the stand-in's own reading of the smear

    # As measured: the estimates agree, the cells are found at the first look.
    locator = _SizedLocator()
    loc, source = pipeline.locate_learned(rgb, locator)
    assert len(loc.cells) == 3 and len(locator.told) == 1

    # A packed estimate read off clumps, three times too large: nothing there, so a second look at the stain-free one.
    monkeypatch.setattr(pipeline, "estimate_smear_diameter", lambda rgb, **kw: ScaleEstimate(3.0 * RBC_D, "packed", 4))
    locator = _SizedLocator()
    loc, source = pipeline.locate_learned(rgb, locator)
    assert locator.told == [3.0 * RBC_D, stain_free]
    assert (len(loc.cells), loc.rbc_diameter, source, loc.rbc_count) == (3, stain_free, "foreground", 4)

    # A declared diameter is the laboratory's word: no second look.
    locator = _SizedLocator()
    loc, source = pipeline.locate_learned(rgb, locator, declared=3.0 * RBC_D)
    assert (locator.told, loc.cells, source) == ([3.0 * RBC_D], [], "declared")


def test_no_second_look_where_the_estimates_agree_and_none_kept_where_it_finds_nothing(monkeypatch):
    from leukodetect.detection import pipeline
    from leukodetect.runtime.scale import ScaleEstimate, stain_free_diameter

    rgb = synthetic_smear()
    stain_free = stain_free_diameter(rgb)
    # 1.4 times the stain-free estimate: within SECOND_LOOK_RATIO, so the first estimate stands with no cells.
    first = round(1.4 * stain_free, 2)
    monkeypatch.setattr(pipeline, "estimate_smear_diameter", lambda rgb, **kw: ScaleEstimate(first, "packed", 4))
    locator = _SizedLocator()
    loc, source = pipeline.locate_learned(rgb, locator)
    assert (locator.told, loc.cells, loc.rbc_diameter, source) == ([first], [], first, "packed")

    # Contradicted, but the second look finds nothing either: the first estimate stays, and the verdict says no cells.
    monkeypatch.setattr(pipeline, "estimate_smear_diameter", lambda rgb, **kw: ScaleEstimate(3.0 * stain_free, "packed", 4))
    locator = _SizedLocator()
    monkeypatch.setattr(locator, "locate", lambda rgb, d: locator.told.append(d) or [])
    loc, source = pipeline.locate_learned(rgb, locator)
    assert (len(locator.told), loc.cells, loc.rbc_diameter, source) == (2, [], 3.0 * stain_free, "packed")
    result = analyze(rgb, None, locator=locator)
    assert result["verdict"] == "cannot_assess" and "no white cells" in result["reason"]
    # The reason names the scale it looked at, and what to do if that is wrong; with a declared one it has no such hint.
    assert f"measured red-cell diameter of {3.0 * stain_free:.0f} pixels" in result["reason"] and "--pixel-size" in result["reason"]
    declared = analyze(rgb, None, locator=locator, rbc_diameter=3.0 * stain_free)
    assert declared["verdict"] == "cannot_assess" and declared["reason"] == "no white cells were found, so nothing can be said about blasts"


def test_the_stain_free_diameter_needs_cells_to_measure():
    from leukodetect.runtime.scale import stain_free_diameter

    assert stain_free_diameter(np.full((300, 300, 3), 240, np.uint8)) is None
    assert stain_free_diameter(np.zeros((10, 10, 3), np.uint8)) is None


def test_the_review_band_moves_with_a_calibrated_threshold_as_wide_in_log_odds():
    assert review_band_of(0.5) == REVIEW_BAND == (0.3, 0.7)
    lo, hi = review_band_of(0.2)
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    assert lo < 0.2 < hi < 0.7 and (logit(hi) - logit(0.2)) == pytest.approx(logit(0.2) - logit(lo), abs=1e-4)
    assert (logit(hi) - logit(lo)) == pytest.approx(logit(0.7) - logit(0.3), abs=1e-4)
    assert review_band_of(0.2, (None, 0.9)) == (lo, 0.9) and review_band_of(0.2, (0.3, 0.7)) == (0.3, 0.7)  # given sides stay


def test_the_smear_pipeline_calls_blasts_at_the_checkpoints_calibrated_threshold(crop_checkpoint):
    clf = Classifier.from_checkpoint(crop_checkpoint, device="cpu")
    clf.image_outputs = lambda images, *, batch_size: (np.array([0.75] + [0.05] * (len(images) - 1)), None)
    assert analyze(synthetic_smear(), clf)["verdict"] == "ALL"  # 0.75 >= 0.7 at the threshold 0.5
    clf.threshold = 0.9  # as calibrate writes it for a laboratory whose cells score high
    strict = analyze(synthetic_smear(), clf)
    assert strict["review_band"] == list(review_band_of(0.9)) and strict["review_band"][0] > 0.75
    assert strict["cells"][0]["call"] == "normal" and strict["verdict"] == "healthy"  # 0.75 lies below the moved band (0.79-0.95)
    assert analyze(synthetic_smear(), clf, review_band=(0.3, 0.7))["verdict"] == "ALL"  # a band given is kept
    with pytest.raises(LeukoError, match="Review band"):
        analyze(synthetic_smear(), clf, review_band=(None, 0.5))  # 0.79 (derived) above 0.5 (given): upside down
