"""check_dataset reports every bad file with its reason and never stops at one."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
from PIL import Image

from leukodetect.data.check import (
    GIF_REASON,
    SKIPPED_REASON,
    check_dataset,
    render_check,
)
from leukodetect.errors import LeukoError


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
    assert report["format"] == "folders" and report["labelled"] is True
    # Only the images that decode count: the empty, the text and the truncated files do not.
    assert report["n_images"] == 5 and report["counts"] == {"normal": 3, "blast": 2}
    assert report["ok"] is False
    reasons = {bad["path"]: bad["reason"] for bad in report["bad_files"]}
    assert set(reasons) == {"blast/empty.jpg", "blast/text.jpg", "normal/cut.jpg", "normal/Thumbs.db"}
    assert "empty" in reasons["blast/empty.jpg"]
    assert "not an image" in reasons["blast/text.jpg"]
    assert "truncated" in reasons["normal/cut.jpg"]
    assert reasons["normal/Thumbs.db"] == SKIPPED_REASON
    assert report["duplicate_sets"] == [["blast/a.png", "normal/a_copy.bmp"]]
    assert report["n_groups"] == 5 and report["n_effective_groups"] == 4
    assert {note["path"] for note in report["notes"]} == {"blast/gray.png", "normal/rgba.png", "normal/deep.tif"}
    assert report["modes"] == {"L": 1, "RGB": 2, "RGBA": 1, "TIFF uint16 x3": 1}
    assert report["sizes"] == {"16x12": 2, "8x8": 3}

    text = render_check(report)
    assert "5 images" in text and "4 bad file(s)" in text and "a_copy.bmp" in text


def test_check_on_a_clean_set_is_ok(tmp_path, write_image):
    write_image(tmp_path / "blast" / "a.png", seed=1)
    write_image(tmp_path / "normal" / "b.png", seed=2)
    report = check_dataset(tmp_path, "folders")
    assert report["ok"] is True and report["bad_files"] == [] and report["duplicate_sets"] == []
    assert "result: OK" in render_check(report)


def test_any_folder_is_checked_as_unlabelled_images(tmp_path, write_image):
    """A folder in no known layout is checked all the same (recursively), and the report says labels are absent."""
    write_image(tmp_path / "field_1.png", seed=1)
    write_image(tmp_path / "day2" / "field_2.jpg", seed=2)
    write_image(tmp_path / "day2" / "field_1_again.bmp", seed=1)
    (tmp_path / "day2" / "broken.png").write_text("not an image")
    Image.open(tmp_path / "field_1.png").convert("P").save(tmp_path / "day2" / "field_3.gif")
    write_image(tmp_path / ".hidden" / "x.png", seed=3)

    report = check_dataset(tmp_path)

    assert report["format"] == "unlabelled" and report["labelled"] is False
    assert report["n_images"] == 3 and report["counts"] == {"unlabelled": 3}
    assert report["duplicate_sets"] == [["day2/field_1_again.bmp", "field_1.png"]]
    reasons = {bad["path"]: bad["reason"] for bad in report["bad_files"]}
    assert set(reasons) == {"day2/broken.png", "day2/field_3.gif"} and report["ok"] is False
    assert reasons["day2/field_3.gif"] == GIF_REASON and "GIF is not a microscope format" in GIF_REASON
    text = render_check(report)
    assert "[unlabelled]: 3 images" in text and "labels: absent" in text


def test_gifs_among_labelled_images_are_reported_with_the_rule(tmp_path, write_image):
    write_image(tmp_path / "blast" / "a.png", seed=1)
    write_image(tmp_path / "normal" / "b.png", seed=2)
    Image.open(tmp_path / "blast" / "a.png").convert("P").save(tmp_path / "blast" / "c.gif")
    report = check_dataset(tmp_path)
    assert report["n_images"] == 2 and report["bad_files"] == [{"path": "blast/c.gif", "reason": GIF_REASON}]


def test_a_folder_without_any_image_is_one_sentence(tmp_path):
    (tmp_path / "readme.md").write_text("nothing here")
    with pytest.raises(LeukoError, match="holds no image files"):
        check_dataset(tmp_path)
