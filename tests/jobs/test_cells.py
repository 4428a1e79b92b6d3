"""The cell bank: ALL-IDB1 photographs give each annotated cell with its own label."""

import csv
import json

import numpy as np
from PIL import Image
from smear_images import PLATELETS, RBC_D, WHITE, synthetic_smear

from leukodetect.evaluation.labs import field_rows
from leukodetect.jobs.cells import LabSource, build_bank
from leukodetect.runtime.scale import CanonicalScale


def test_allidb1_photographs_give_their_blasts_and_their_other_white_cells_each_with_its_label_and_no_platelets(tmp_path):
    """An ALL photograph holds normal cells too: they enter the bank as normal, grouped with their photograph; other
    points on no white cell (platelets) do not."""
    root = tmp_path / "ALL-IDB1" / "ALL_IDB1"
    others = tmp_path / "ALL-IDB1" / "extras" / "ALL-IDB-Patches_AngeloUNIMI" / "ALL-IDB1" / "other"
    for folder in (root / "im", root / "xyc", others):
        folder.mkdir(parents=True)
    (blast_x, blast_y, _), *normal = WHITE
    platelets = "".join(f"{x:.0f}\t{y:.0f}\n" for x, y in PLATELETS)  # other points on no white cell: left out
    for i, stem in enumerate(("Im001_1", "Im002_1", "Im003_0")):
        Image.fromarray(synthetic_smear(seed=i)).save(root / "im" / f"{stem}.jpg", quality=95)
        (root / "xyc" / f"{stem}.xyc").write_text(f"{blast_x:.0f}\t{blast_y:.0f}\n" if stem.endswith("_1") else "")
        (others / f"{stem}.xyc").write_text("".join(f"{x:.0f}\t{y:.0f}\n" for x, y, _ in normal) + platelets)
    out = tmp_path / "bank"
    manifest = build_bank([LabSource.parse(f"milan={root}@{RBC_D}")], out, CanonicalScale(field=3.0, size=32), log=lambda *_: None)
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 3 + 2  # a blast and two other cells per ALL photograph, two other cells on the healthy one
    by_photo = {}
    for r in rows:
        by_photo.setdefault(r["parent"], []).append((float(r["x"]), float(r["y"]), int(r["label"])))
        assert r["group"].startswith("milan:") and (out / r["path"]).is_file()
    assert by_photo["milan:Im001_1"] == [(blast_x, blast_y, 1)] + [(round(x), round(y), 0) for x, y, _ in normal]
    assert [label for *_, label in by_photo["milan:Im003_0"]] == [0, 0]
    assert len({r["group"] for r in rows}) == 3  # one group per photograph: its cells stay on one side of a split
    summary = json.loads((out / "cells.json").read_text())["labs"]["milan"]
    assert (summary["cells"], summary["blast"], summary["normal"]) == (8, 2, 6)
    # A photograph is ALL when any of its cells is a blast, whatever the order of its cells.
    cells = [{"lab": "milan", "kind": "", "parent": r["parent"], "label": int(r["label"]), "prob": 0.5, "flagged": False}
             for r in reversed(rows)]
    assert {f["parent"]: f["label"] for f in field_rows(cells)} == {"milan:Im001_1": 1, "milan:Im002_1": 1, "milan:Im003_0": 0}


def test_each_allidb1_photograph_is_cut_at_its_own_red_cell_scale(tmp_path):
    """ALL-IDB1 has two cameras: a photograph at twice the magnification gives the same crop of the same cell."""
    root = tmp_path / "ALL_IDB1"
    for folder in (root / "im", root / "xyc"):
        folder.mkdir(parents=True)
    x, y, _ = WHITE[0]
    for seed in range(3):  # each field photographed at two magnifications
        small = Image.fromarray(synthetic_smear(seed=seed))
        for zoom in (1, 2):
            stem = f"Im{2 * seed + zoom:03d}_1"
            small.resize((small.width * zoom, small.height * zoom), Image.BICUBIC).save(root / "im" / f"{stem}.png")
            (root / "xyc" / f"{stem}.xyc").write_text(f"{x * zoom:.0f}\t{y * zoom:.0f}\n")
    out = tmp_path / "bank"
    manifest = build_bank([LabSource.parse(f"milan={root}")], out, CanonicalScale(field=3.0, size=32), log=lambda *_: None)
    with open(manifest, newline="") as f:
        crops = {r["parent"]: np.asarray(Image.open(out / r["path"]), dtype=float) for r in csv.DictReader(f)}
    for seed in range(3):
        near, far = crops[f"milan:Im{2 * seed + 1:03d}_1"], crops[f"milan:Im{2 * seed + 2:03d}_1"]
        assert np.abs(near - far).mean() < 8  # the same window of the same cell, whatever the magnification
    assert "measured on each photograph" in json.loads((out / "cells.json").read_text())["labs"]["milan"]["scale"]
