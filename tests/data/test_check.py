"""check_dataset reports every bad file with its reason and never stops at one."""

from __future__ import annotations

import json

import numpy as np
import tifffile

from leukodetect.data.check import SKIPPED_REASON, check_dataset, render_check


def test_check_reports_bad_files_conversions_and_duplicates(tmp_path, write_image):
    blast, normal = tmp_path / "blast", tmp_path / "normal"
    write_image(blast / "a.png", seed=1)
    write_image(normal / "a_copy.bmp", seed=1)
    write_image(blast / "gray.png", mode="L", size=(8, 8))
    write_image(normal / "rgba.png", mode="RGBA", size=(8, 8))
    tifffile.imwrite(normal / "deep.tif", np.full((8, 8, 3), 65535, dtype=np.uint16), photometric="rgb")
    (blast / "empty.jpg").touch()
    (blast / "text.jpg").write_text("hello")
    truncated = write_image(normal / "cut.jpg", size=(32, 32))
    truncated.write_bytes(truncated.read_bytes()[:300])
    (normal / "Thumbs.db").write_bytes(b"\0")
    (normal / "notes.txt").write_text("companion files are not reported")

    report = check_dataset(tmp_path)

    json.dumps(report)  # must be serialisable as is
    assert report["format"] == "folders" and report["n_images"] == 8
    assert report["counts"] == {"normal": 4, "blast": 4}
    assert report["ok"] is False
    reasons = {bad["path"]: bad["reason"] for bad in report["bad_files"]}
    assert set(reasons) == {"blast/empty.jpg", "blast/text.jpg", "normal/cut.jpg", "normal/Thumbs.db"}
    assert "empty" in reasons["blast/empty.jpg"]
    assert "not an image" in reasons["blast/text.jpg"]
    assert "truncated" in reasons["normal/cut.jpg"]
    assert reasons["normal/Thumbs.db"] == SKIPPED_REASON
    assert report["duplicate_sets"] == [["blast/a.png", "normal/a_copy.bmp"]]
    assert report["n_groups"] == 8 and report["n_effective_groups"] == 7
    assert {note["path"] for note in report["notes"]} == {"blast/gray.png", "normal/rgba.png", "normal/deep.tif"}
    assert report["modes"] == {"L": 1, "RGB": 2, "RGBA": 1, "TIFF uint16 x3": 1}
    assert report["sizes"] == {"16x12": 2, "8x8": 3}

    text = render_check(report)
    assert "8 images" in text and "4 bad file(s)" in text and "a_copy.bmp" in text


def test_check_on_a_clean_set_is_ok(tmp_path, write_image):
    write_image(tmp_path / "blast" / "a.png", seed=1)
    write_image(tmp_path / "normal" / "b.png", seed=2)
    report = check_dataset(tmp_path, "folders")
    assert report["ok"] is True and report["bad_files"] == [] and report["duplicate_sets"] == []
    assert "result: OK" in render_check(report)
