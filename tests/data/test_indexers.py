"""Indexers: each layout becomes sorted records with the right labels, groups and annotations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from leukodetect.data import indexers
from leukodetect.data.indexers import (
    FORMATS,
    detect_format,
    index_dataset,
    read_xyc,
    register_format,
)
from leukodetect.errors import LeukoError


def _names(records) -> list[str]:
    return [record.path.name for record in records]


@pytest.fixture
def allidb2_root(tmp_path, write_image) -> Path:
    img = tmp_path / "ALL-IDB2" / "ALL_IDB2" / "img"
    for name in ["Im002_0.tif", "Im001_1.tif", "Im003_1.tif"]:
        write_image(img / name)
    (img.parent / "readme_ALL_IDB2.txt").write_text("readme")
    return tmp_path / "ALL-IDB2"


@pytest.fixture
def allidb1_root(tmp_path, write_image) -> Path:
    root = tmp_path / "ALL-IDB1"
    for name, xyc in [("Im001_1", "10\t20\r\n30 40\r\n"), ("Im002_0", "")]:
        write_image(root / "ALL_IDB1" / "im" / f"{name}.jpg")
        (root / "ALL_IDB1" / "xyc").mkdir(parents=True, exist_ok=True)
        (root / "ALL_IDB1" / "xyc" / f"{name}.xyc").write_bytes(xyc.encode())
    others = root / "extras" / "ALL-IDB-Patches_AngeloUNIMI" / "ALL-IDB1" / "other"
    others.mkdir(parents=True)
    (others / "Im001_1.xyc").write_text("1 2\n")
    (others / "Im002_0.xyc").write_text("3 4\n5 6\n")
    return root


@pytest.fixture
def cnmc_root(tmp_path, write_image) -> Path:
    root = tmp_path / "C-NMC"
    write_image(root / "training_data" / "fold_0" / "all" / "UID_45_24_11_all.bmp")
    write_image(root / "training_data" / "fold_0" / "all" / "UID_45_2_1_all.bmp")
    write_image(root / "training_data" / "fold_0" / "hem" / "UID_H24_25_11_hem.bmp")
    prelim = root / "validation_data" / "C-NMC_test_prelim_phase_data"
    write_image(prelim / "1.bmp")
    write_image(prelim / "2.bmp")
    (prelim.parent / "labels.csv").write_text(
        "Patient_ID,new_names,labels\nUID_57_29_1_all.bmp,1.bmp,1\nUID_H30_6_2_hem.bmp,2.bmp,0\n"
    )
    (root / "readme.md").write_text("about")
    return root


def test_registry_has_the_formats_and_refuses_duplicates():
    assert {"allidb2", "allidb1", "cnmc", "folders", "manifest"} <= set(FORMATS)
    with pytest.raises(ValueError, match="already registered"):
        register_format("folders")(lambda path: [])


@pytest.mark.parametrize("where", ["", "ALL_IDB2", "ALL_IDB2/img"])
def test_allidb2_from_any_level(allidb2_root, where):
    path = allidb2_root / where
    assert detect_format(path) == "allidb2"
    records = index_dataset(path)
    assert _names(records) == ["Im001_1.tif", "Im002_0.tif", "Im003_1.tif"]
    assert [r.label for r in records] == [1, 0, 1]
    assert [r.group for r in records] == ["Im001_1", "Im002_0", "Im003_1"]


def test_allidb2_refuses_a_foreign_image_name(allidb2_root, write_image):
    write_image(allidb2_root / "ALL_IDB2" / "img" / "cell.tif")
    with pytest.raises(LeukoError, match=r"cell\.tif is not named like ALL-IDB"):
        index_dataset(allidb2_root, "allidb2")


@pytest.mark.parametrize("where", ["", "ALL_IDB1", "ALL_IDB1/im"])
def test_allidb1_from_any_level_with_centroids_and_others(allidb1_root, where):
    path = allidb1_root / where
    assert detect_format(path) == "allidb1"
    first, second = index_dataset(path)
    assert (first.path.name, first.label, first.group) == ("Im001_1.jpg", 1, "Im001_1")
    assert first.blasts == ((10.0, 20.0), (30.0, 40.0))
    assert second.label == 0 and second.blasts == ()
    assert first.others == ((1.0, 2.0),) and second.others == ((3.0, 4.0), (5.0, 6.0))


def test_allidb1_explicit_others_dir_and_missing_others(allidb1_root, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "Im002_0.xyc").write_text("7 8\n")
    first, second = indexers.index_allidb1(allidb1_root, others_dir=elsewhere)
    assert first.others is None and second.others == ((7.0, 8.0),)


def test_allidb1_missing_xyc_names_the_image(allidb1_root):
    (allidb1_root / "ALL_IDB1" / "xyc" / "Im002_0.xyc").unlink()
    with pytest.raises(LeukoError, match=r"Im002_0\.jpg has no blast annotation file"):
        index_dataset(allidb1_root)


def test_read_xyc_tolerates_whitespace_crlf_tabs_and_empty(tmp_path):
    path = tmp_path / "a.xyc"
    path.write_bytes(b"  12\t34  \r\n\r\n56   78.5\n\t\n9 10")
    assert read_xyc(path) == ((12.0, 34.0), (56.0, 78.5), (9.0, 10.0))
    path.write_bytes(b"")
    assert read_xyc(path) == ()
    path.write_bytes(b"\n \r\n")
    assert read_xyc(path) == ()


@pytest.mark.parametrize("bad", ["12", "1 2 3", "x y"])
def test_read_xyc_malformed_line_names_file_and_line(tmp_path, bad):
    path = tmp_path / "bad.xyc"
    path.write_text(f"1 2\n\n{bad}\n")
    with pytest.raises(LeukoError, match=r"bad\.xyc line 3"):
        read_xyc(path)


def test_cnmc_patients_labels_and_prelim_csv(cnmc_root):
    assert detect_format(cnmc_root) == "cnmc"
    records = index_dataset(cnmc_root)
    got = {r.path.name: (r.label, r.group) for r in records}
    assert got == {
        "UID_45_24_11_all.bmp": (1, "patient:45"),
        "UID_45_2_1_all.bmp": (1, "patient:45"),
        "UID_H24_25_11_hem.bmp": (0, "patient:H24"),
        "1.bmp": (1, "patient:57"),
        "2.bmp": (0, "patient:H30"),
    }
    assert [r.path for r in records] == sorted(r.path for r in records)


def test_cnmc_unlisted_file_is_named(cnmc_root, write_image):
    write_image(cnmc_root / "validation_data" / "C-NMC_test_prelim_phase_data" / "3.bmp")
    with pytest.raises(LeukoError, match=r"3\.bmp is neither named UID_"):
        index_dataset(cnmc_root, "cnmc")


def test_folders_case_insensitive_and_nested(tmp_path, write_image):
    write_image(tmp_path / "Blast" / "a.png")
    write_image(tmp_path / "Blast" / "sub" / "b.jpg")
    write_image(tmp_path / "HEALTHY" / "c.bmp")
    (tmp_path / "HEALTHY" / "notes.txt").write_text("not an image")
    assert detect_format(tmp_path) == "folders"
    records = index_dataset(tmp_path)
    assert [(r.path.name, r.label, r.group) for r in records] == [
        ("a.png", 1, "Blast/a"),
        ("b.jpg", 1, "Blast/sub/b"),
        ("c.bmp", 0, "HEALTHY/c"),
    ]


def test_folders_unknown_class_lists_accepted_names(tmp_path, write_image):
    write_image(tmp_path / "blast" / "a.png")
    write_image(tmp_path / "maybe" / "b.png")
    with pytest.raises(LeukoError, match=r"maybe is not a known class name.*normal"):
        index_dataset(tmp_path, "folders")


def test_broken_image_is_still_indexed(tmp_path):
    (tmp_path / "normal").mkdir()
    (tmp_path / "normal" / "empty.png").touch()
    assert _names(index_dataset(tmp_path)) == ["empty.png"]


def test_manifest_relative_absolute_names_and_groups(tmp_path, write_image):
    write_image(tmp_path / "imgs" / "a.png")
    absolute = write_image(tmp_path / "other" / "b.png")
    manifest = tmp_path / "list.csv"
    manifest.write_text(f"path,label,group\nimgs/a.png,Blast,p1\n{absolute},0,\n")
    assert detect_format(manifest) == "manifest"
    records = index_dataset(manifest)
    assert [(r.path, r.label, r.group) for r in records] == [
        (tmp_path / "imgs" / "a.png", 1, "p1"),
        (absolute, 0, str(absolute)),
    ]


def test_manifest_without_group_column(tmp_path, write_image):
    write_image(tmp_path / "a.png")
    (tmp_path / "m.csv").write_text("path,label\na.png,1\n")
    assert [(r.label, r.group) for r in index_dataset(tmp_path / "m.csv")] == [(1, "a.png")]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ("a.png,\n", r"m\.csv line 3 has label ''"),
        ("a.png,maybe\n", r"m\.csv line 3 has label 'maybe'"),
        ("gone.png,1\n", r"m\.csv line 3 names .*gone\.png, which does not exist"),
    ],
)
def test_manifest_errors_name_csv_and_line(tmp_path, write_image, rows, message):
    write_image(tmp_path / "a.png")
    (tmp_path / "m.csv").write_text("path,label\na.png,1\n" + rows)
    with pytest.raises(LeukoError, match=message):
        index_dataset(tmp_path / "m.csv", "manifest")


def test_manifest_wrong_header(tmp_path):
    (tmp_path / "m.csv").write_text("file,class\na.png,1\n")
    with pytest.raises(LeukoError, match=r"m\.csv has header"):
        index_dataset(tmp_path / "m.csv")


def test_missing_path_unknown_format_and_unknown_layout(tmp_path, write_image):
    with pytest.raises(LeukoError, match="does not exist"):
        index_dataset(tmp_path / "nowhere")
    with pytest.raises(LeukoError, match=r"Unknown data-set format 'yolo'.*allidb1"):
        index_dataset(tmp_path, "yolo")
    write_image(tmp_path / "random" / "a.png")
    with pytest.raises(LeukoError, match=r"tried manifest, allidb1, allidb2, cnmc, bccd, aria, pbc, folders.*--format"):
        detect_format(tmp_path)


def test_pbc_cell_types_are_all_normal_with_their_type(tmp_path, write_image):
    root = tmp_path / "PBC_dataset_normal_DIB"
    for kind in ("lymphocyte", "neutrophil"):
        for i in range(2):
            write_image(root / kind / f"{kind[:2]}_{i}.jpg", seed=i)
    (root / "notes").mkdir()
    records = index_dataset(tmp_path)  # detected as pbc from the cell-type folders
    assert [(r.label, r.kind) for r in records] == [(0, "lymphocyte")] * 2 + [(0, "neutrophil")] * 2
    assert len({r.group for r in records}) == 4 and all(r.group.startswith("pbc:") for r in records)


def test_aria_fields_take_their_folder_label(tmp_path, write_image):
    for kind, n in (("Benign", 2), ("Early", 1), ("Pro", 1)):
        for i in range(n):
            write_image(tmp_path / "Original" / kind / f"WBC-{kind}-{i:03d}.jpg", seed=i)
    records = index_dataset(tmp_path / "Original", "aria")
    assert [(r.kind, r.label) for r in records] == [("Benign", 0), ("Benign", 0), ("Early", 1), ("Pro", 1)]


def test_bccd_fields_carry_their_white_cell_centres(tmp_path, write_image):
    root = tmp_path / "BCCD"
    write_image(root / "JPEGImages" / "BloodImage_00000.jpg", size=(64, 48))
    (root / "Annotations").mkdir(parents=True)
    (root / "Annotations" / "BloodImage_00000.xml").write_text(
        "<annotation><object><name>WBC</name><bndbox><xmin>10</xmin><ymin>20</ymin><xmax>30</xmax><ymax>40</ymax></bndbox></object>"
        "<object><name>RBC</name><bndbox><xmin>0</xmin><ymin>0</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object></annotation>")
    (record,) = index_dataset(tmp_path)
    assert record.label == 0 and record.cells == ((20.0, 30.0),) and record.boxes == ((10.0, 20.0, 30.0, 40.0),)
    (root / "Annotations" / "BloodImage_00000.xml").write_text("<annotation><object><name>WBC</name><bndbox><xmin>x</xmin>")
    with pytest.raises(LeukoError, match="BloodImage_00000.xml"):
        index_dataset(root, "bccd")


def test_manifest_reads_lab_kind_and_parent(tmp_path, write_image):
    write_image(tmp_path / "a.png")
    (tmp_path / "cells.csv").write_text("path,label,group,lab,kind,parent\na.png,1,g1,aria,Pro,WBC-Pro-001\n")
    (record,) = index_dataset(tmp_path / "cells.csv")
    assert (record.lab, record.kind, record.parent, record.group) == ("aria", "Pro", "WBC-Pro-001", "g1")


def test_near_duplicate_fields_share_a_group(tmp_path, write_image):
    from PIL import Image

    from leukodetect.data.duplicates import split_groups

    base = write_image(tmp_path / "Benign" / "a.jpg", size=(64, 64), seed=1)
    shifted = np.asarray(Image.open(base)).copy()
    shifted[:2] = 0  # a slightly different capture of the same field
    Image.fromarray(shifted).save(tmp_path / "Benign" / "b.jpg")
    write_image(tmp_path / "Benign" / "c.jpg", size=(64, 64), seed=2)
    write_image(tmp_path / "Pro" / "d.jpg", size=(64, 64), seed=3)
    records = index_dataset(tmp_path, "aria")
    groups = {r.path.name: g for r, g in zip(records, split_groups(records, near_duplicates=True))}
    assert groups["a.jpg"] == groups["b.jpg"] == "aria:a" and len(set(groups.values())) == 3
