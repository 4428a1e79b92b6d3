"""The detect job's folder runs: every image's failure is its own error row, and the run goes on."""

from __future__ import annotations

import pytest
from PIL import Image

import leukodetect.jobs.detect as detect_job
from leukodetect.errors import LeukoError


def test_an_analysis_crash_is_that_image_s_error_row_and_the_summary_is_written(smear_png, tmp_path, monkeypatch):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        (folder / name).write_bytes(smear_png.read_bytes())
    real = detect_job.analyze

    def crashes_on_b(image, classifier, **kwargs):
        crashes_on_b.calls += 1
        if crashes_on_b.calls == 2:  # b.png: an unexpected failure inside the analysis, as cv2 raised for thin images
            raise RuntimeError("OpenCV(4.10) resize.cpp:4152: error:\n(-215:Assertion failed) !dsize.empty()")
        return real(image, classifier, **kwargs)

    crashes_on_b.calls = 0
    monkeypatch.setattr(detect_job, "analyze", crashes_on_b)
    logged: list[str] = []
    out = tmp_path / "out"
    rows = detect_job.detect_paths(sorted(folder.iterdir()), None, out, log=logged.append)
    assert [("error" in row) for row in rows] == [False, True, False]
    error = rows[1]["error"]
    assert error.startswith(f"Image {folder / 'b.png'} could not be analysed (RuntimeError: OpenCV")
    assert "\n" not in error and error.endswith("report this message if it is.")
    assert logged == [f"skipped: {error}"]
    assert len((out / "summary.csv").read_text().splitlines()) == 4
    assert not (out / "b.json").exists() and (out / "c.json").is_file()


def test_a_wrong_setting_still_stops_the_run(smear_png, tmp_path):
    Image.open(smear_png).save(tmp_path / "a.png")
    with pytest.raises(LeukoError, match="Review band"):
        detect_job.detect_paths([tmp_path / "a.png"], None, tmp_path / "out", review_band=(0.8, 0.2))


@pytest.mark.parametrize("declared", [False, True])
def test_a_batch_whose_measured_scales_disagree_is_told_to_give_the_pixel_size(smear_png, tmp_path, monkeypatch, declared):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(12):
        (folder / f"f{i:02d}.png").write_bytes(smear_png.read_bytes())
    real = detect_job.analyze
    readings = iter([15.0] * 9 + [30.0, 35.0, 6.0])  # three of twelve read two times off: more than a tenth of the batch

    def misread(image, classifier, **kwargs):
        result = real(image, classifier, **kwargs)
        return {**result, "rbc_diameter": next(readings), "scale": "declared" if declared else "measured"}

    monkeypatch.setattr(detect_job, "analyze", misread)
    logged: list[str] = []
    rows = detect_job.detect_paths(sorted(folder.iterdir()), None, tmp_path / "out", log=logged.append)
    assert len(rows) == 12 and not any("error" in row for row in rows)
    notes = [line for line in logged if "pixel size" in line]
    if declared:  # a declared scale is the camera's, not a reading
        assert notes == []
    else:
        assert notes == ["The red-cell diameters measured on 3 of these 12 photographs lie more than 1.25 times above or below their "
                         "median (15 px; the rbc_diameter column of summary.csv): if they come from one microscope and camera, those "
                         "readings are wrong and misplace every cell on them; give the camera's pixel size with --pixel-size."]


def test_batch_scale_analyses_every_photograph_at_the_median_reading(smear_png, tmp_path, monkeypatch):
    from leukodetect.runtime.locator import WhiteCellLocator
    from leukodetect.runtime.scale import ScaleEstimate
    from leukodetect.weights import resolve_locator

    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(11):
        (folder / f"f{i:02d}.png").write_bytes(smear_png.read_bytes())
    isolated = [30, 31, 29, 30, 30, 32, 28, 30, 30, 31]
    readings = iter([ScaleEstimate(float(d), "measured") for d in isolated] + [ScaleEstimate(90.0, "packed")])
    monkeypatch.setattr(detect_job, "estimate_smear_diameter", lambda rgb: next(readings))  # the first pass's readings
    locator = WhiteCellLocator.load(resolve_locator(None))
    logged: list[str] = []
    paths = sorted(folder.iterdir())
    rows = detect_job.detect_paths(paths, None, tmp_path / "out", locator=locator, batch_scale=True, log=logged.append)
    assert [(r["rbc_diameter"], r["scale"]) for r in rows] == [(30.0, "batch")] * 11  # the 90 px misreading moves nothing
    assert logged[0] == ("--batch-scale: every photograph is analysed at a red-cell diameter of 30 px, the median of the 10 "
                         "readings of isolated red cells among 11 photographs.")
    (folder / "broken.png").write_bytes(b"not a png")  # a bad file: skipped by the first pass, its own error row after
    readings = iter([ScaleEstimate(float(d), "measured") for d in isolated] + [ScaleEstimate(90.0, "packed")])
    rows = detect_job.detect_paths(sorted(folder.iterdir()), None, tmp_path / "o1", locator=locator, batch_scale=True, log=logged.append)
    assert [r.get("scale") for r in rows] == [None] + ["batch"] * 11 and "error" in rows[0]  # broken.png sorts first
    with pytest.raises(LeukoError, match="give one of them"):
        detect_job.detect_paths(paths, None, tmp_path / "o2", locator=locator, batch_scale=True, rbc_diameter=30.0)
    with pytest.raises(LeukoError, match="learned locator"):
        detect_job.detect_paths(paths, None, tmp_path / "o3", batch_scale=True)
