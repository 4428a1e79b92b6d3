"""locator-eval's fold plans, scoring and per-laboratory summary, on made-up photographs (no training)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image
from smear_images import WHITE, synthetic_smear

from leukodetect.jobs.locator import (
    content_groups,
    plan_folds,
    report_markdown,
    score_smear,
    summarise,
    unannotated_objects,
)
from leukodetect.training.locator import Marks, Smear, canonical_smear


def smear(tmp_path, name, lab, layout, annotated="all", content=None, points=((10.0, 10.0),)):
    path = tmp_path / f"{name}.jpg"
    path.write_bytes((content or name).encode())
    return Smear(name=f"{lab}:{name}", lab=lab, image=np.zeros((8, 8, 3), np.uint8), points=np.array(points).reshape(-1, 2),
                 factor=1.0, rbc_diameter=16.0, scale_source="measured", path=path, layout=layout, annotated=annotated)


def test_every_photograph_is_tested_once_per_pooled_plan_and_a_held_out_lab_is_never_trained_on(tmp_path):
    smears = [smear(tmp_path, f"a{i}", "allidb1", "allidb1", "blasts" if i % 2 else "all") for i in range(9)]
    smears += [smear(tmp_path, "healthy", "allidb1", "allidb1", "none", points=())]
    smears += [smear(tmp_path, f"b{i}", "bccd", "bccd") for i in range(9)]
    smears += [smear(tmp_path, f"p{i}", "pbc", "pbc") for i in range(3)]
    smears += [smear(tmp_path, f"f{i}", "aria", "aria", "none", points=()) for i in range(2)]
    plans = plan_folds(smears, 3, seed=0)
    pooled = [p for p in plans if p["name"].startswith("pooled")]
    tested = sorted(i for p in pooled for i in p["test"])
    assert tested == [i for i, s in enumerate(smears) if s.layout in ("allidb1", "bccd", "pbc")]  # each once; aria is test-only
    for p in pooled:
        assert not set(p["train"]) & set(p["test"])
        assert all(smears[i].annotated != "none" for i in p["train"])  # a photograph with nothing known teaches nothing
    held = {p["name"]: p for p in plans if p["name"].startswith("held-out")}
    assert set(held) == {"held-out-allidb1", "held-out-bccd", "held-out-pbc"}
    for lab in ("allidb1", "bccd", "pbc"):
        plan = held[f"held-out-{lab}"]
        assert all(smears[i].lab != lab for i in plan["train"])
        assert {smears[i].lab for i in plan["test"]} == {lab, "aria"}


def test_photographs_with_the_same_pixels_or_nearly_share_a_group(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    base = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
    other = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(base).save(tmp_path / "Im093_0.png")
    Image.fromarray(base).save(tmp_path / "Im108_0.bmp")  # the same pixels, other bytes
    Image.fromarray(np.clip(base.astype(int) + 2, 0, 255).astype(np.uint8)).save(tmp_path / "recapture.png")  # a near-duplicate
    Image.fromarray(other).save(tmp_path / "Im001_1.png")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    names = ["Im093_0.png", "Im108_0.bmp", "recapture.png", "Im001_1.png", "broken.jpg"]
    groups = content_groups([tmp_path / n for n in names])
    assert groups[0] == groups[1] == groups[2]
    assert len({groups[0], groups[3], groups[4]}) == 3  # a distinct photograph, and an unreadable one, stand alone


def test_scores_follow_what_each_photograph_annotates(tmp_path):
    full = smear(tmp_path, "f", "bccd", "bccd", points=((10, 10), (50, 50)))
    blasts = smear(tmp_path, "b", "allidb1", "allidb1", "blasts", points=((30, 30),))
    bare = smear(tmp_path, "n", "aria", "aria", "none", points=())
    rows = [
        score_smear(np.array([[11, 9], [90, 90]]), full, 16),  # one hit, one false, one miss
        score_smear(np.array([[30, 31], [70, 70]]), blasts, 16),  # the blast found; the other cell may be a normal one
        score_smear(np.array([[5, 5]]), bare, 16),
    ]
    table = summarise(rows)
    assert table["bccd"]["recall"]["value"] == 0.5 and table["bccd"]["precision"]["value"] == 0.5
    assert table["allidb1"]["blast_recall"]["value"] == 1.0 and "precision" not in table["allidb1"]
    assert table["aria"]["unannotated_with_a_cell"]["value"] == 1.0
    text = report_markdown({"table": {"pooled": {"learned": table}}, "skipped": []})
    assert "0.500 (1/2" in text and "| learned | aria |" in text
    assert "box_recall" not in table["bccd"]  # no boxes drawn: the centre rule alone


def test_a_cell_found_inside_a_drawn_box_counts_for_the_box_rule_though_off_its_centre(tmp_path):
    boxed = replace(smear(tmp_path, "f", "bccd", "bccd", points=((20, 20), (80, 80))),
                    boxes=np.array([(0, 0, 40, 40), (70, 70, 90, 90)], float))
    row = score_smear(np.array([[33, 33], [150, 150]]), boxed, 16)  # 18 px off the first centre: past half a red cell
    assert (row["tp"], row["fp"], row["fn"]) == (0, 2, 2)
    assert (row["box_tp"], row["box_fp"], row["box_fn"]) == (1, 1, 1)
    table = summarise([row])
    assert table["bccd"]["recall"]["value"] == 0.0 and table["bccd"]["box_recall"]["value"] == 0.5
    assert table["bccd"]["box_precision"]["value"] == 0.5
    assert "0.500 (1/2" in report_markdown({"table": {"pooled": {"learned": table}}, "skipped": []})


def test_the_unannotated_white_cells_of_a_blasts_only_photograph_are_found_and_the_annotated_one_is_not():
    rgb = synthetic_smear(seed=0)
    blast = WHITE[0][:2]  # the lone white cell is the annotated blast; the touching pair is nobody's
    found = unannotated_objects(rgb, [blast])
    assert len(found) >= 1
    assert all(np.hypot(x - blast[0], y - blast[1]) > 30 for x, y in found)
    assert all(min(np.hypot(x - wx, y - wy) for wx, wy, _ in WHITE[1:]) < 30 for x, y in found)
    assert len(unannotated_objects(rgb, [])) >= len(found) + 1  # nothing annotated: the blast is among them


def test_a_photograph_without_positions_trains_as_background_only_when_its_objects_are_known(tmp_path):
    bare = smear(tmp_path, "h1", "allidb1", "allidb1", "none", points=())
    known = Smear(**{**smear(tmp_path, "h2", "allidb1", "allidb1", "none", points=()).__dict__, "ignore": np.array([[4.0, 4.0]])})
    assert not bare.trainable and known.trainable
    smears = [smear(tmp_path, f"b{i}", "bccd", "bccd") for i in range(6)] + [smear(tmp_path, f"a{i}", "allidb1", "allidb1") for i in range(4)]
    smears += [bare, known]
    trained = {i for p in plan_folds(smears, 3, 0) for i in p["train"]}
    assert len(smears) - 1 in trained and len(smears) - 2 not in trained


def test_drawn_boxes_are_resampled_with_their_photograph(tmp_path):
    path = tmp_path / "field.png"
    Image.fromarray(synthetic_smear(seed=0)).save(path)
    boxes = [(10.0, 20.0, 50.0, 70.0)]
    smear_ = canonical_smear(path, "bccd", Marks(points=[(30.0, 45.0)], boxes=boxes), 16.0, layout="bccd")
    assert np.allclose(smear_.boxes, np.array(boxes) * smear_.factor) and np.allclose(smear_.points, [[30 * smear_.factor, 45 * smear_.factor]])
    assert canonical_smear(path, "bccd", Marks(points=[(30.0, 45.0)]), 16.0).boxes is None


def test_a_declared_red_cell_diameter_scales_a_photograph_instead_of_the_measured_one(tmp_path):
    path = tmp_path / "field.png"
    Image.fromarray(synthetic_smear(seed=0)).save(path)  # red cells 30 px wide
    measured = canonical_smear(path, "bccd", Marks(points=[(30.0, 45.0)]), 16.0)
    assert measured.scale_source != "declared" and abs(measured.rbc_diameter - 30) < 3
    declared = canonical_smear(path, "bccd", Marks(points=[(30.0, 45.0)]), 16.0, declared=60.0)
    assert declared.scale_source == "declared" and declared.rbc_diameter == 60.0 and declared.factor == 16.0 / 60.0
    assert declared.image.shape[1] == round(400 * 16.0 / 60.0) and np.allclose(declared.points, [[30 * 16 / 60, 45 * 16 / 60]])
    blank = tmp_path / "blank.png"  # no red cell to measure: left out unless its laboratory declares the scale
    Image.fromarray(np.full((64, 64, 3), 235, np.uint8)).save(blank)
    assert isinstance(canonical_smear(blank, "pbc", Marks(), 16.0), str)
    assert canonical_smear(blank, "pbc", Marks(), 16.0, declared=20.0).factor == 0.8


def test_train_locator_and_locator_eval_read_a_sources_declared_scale(tmp_path):
    from leukodetect.jobs.cells import LabSource
    from leukodetect.jobs.locator import load_smears

    for kind in ("lymphocyte", "platelet"):  # a PBC tree (platelets are not white cells: not read)
        (tmp_path / "PBC" / kind).mkdir(parents=True)
        Image.fromarray(synthetic_smear(seed=1)).save(tmp_path / "PBC" / kind / "cell.jpg")
    quiet = dict(log=lambda *_: None)
    [measured], _ = load_smears([LabSource.parse(f"pbc={tmp_path / 'PBC'}:pbc")], 16.0, **quiet)
    [declared], _ = load_smears([LabSource.parse(f"pbc={tmp_path / 'PBC'}:pbc@45")], 16.0, **quiet)
    assert measured.scale_source != "declared" and declared.scale_source == "declared" and declared.rbc_diameter == 45.0


def test_cells_found_inside_a_mask_region_count_once_and_a_second_one_in_a_merged_region_is_extra(tmp_path):
    regions = np.zeros((40, 60), np.int32)
    regions[5:20, 5:35] = 1  # two touching cells drawn as one region
    regions[25:35, 45:55] = 2  # a cell nobody found
    masked = replace(smear(tmp_path, "m", "allidb1", "allidb1", points=((12.0, 12.0), (50.0, 30.0))), regions=regions)
    found = np.array([[10.0, 12.0], [28.0, 12.0], [50.0, 5.0]])  # both touching cells, and one outside every region
    row = score_smear(found, masked, rbc_px=16.0)
    assert (row["mask_tp"], row["mask_fp"], row["mask_fn"], row["mask_extra"]) == (1, 1, 1, 1)
    entry = summarise([row])["allidb1"]
    assert entry["mask_recall"]["value"] == 0.5 and entry["mask_precision"]["value"] == 0.5 and entry["mask_extra"] == 1
    assert (row["tp"], row["fp"], row["fn"]) == (1, 2, 1)  # against the points it was trained on, one per region
    split = replace(masked, scored=np.array([[10.0, 12.0], [28.0, 12.0], [50.0, 30.0]]))  # each cell of the merged region
    assert (score_smear(found, split, rbc_px=16.0)["tp"], score_smear(found, split, rbc_px=16.0)["fn"]) == (2, 1)
    assert "mask_tp" not in score_smear(found, smear(tmp_path, "p", "allidb1", "allidb1"), rbc_px=16.0)


def test_mask_regions_are_resampled_with_their_photograph(tmp_path):
    path = tmp_path / "field.png"
    Image.fromarray(synthetic_smear(seed=0)).save(path)
    regions = np.zeros((400, 400), np.int32)
    regions[60:120, 60:120] = 1
    regions[230:290, 220:320] = 2
    smear_ = canonical_smear(path, "allidb1", Marks(points=[(90.0, 90.0)], regions=regions), 16.0, layout="allidb1")
    assert smear_.regions.shape == smear_.image.shape[:2] and set(np.unique(smear_.regions)) == {0, 1, 2}
    x, y = (90 * smear_.factor, 90 * smear_.factor)
    assert smear_.regions[int(y), int(x)] == 1


def test_touching_cells_drawn_as_one_mask_region_are_split_and_a_sliver_keeps_its_centroid():
    from skimage.measure import label

    from leukodetect.detection.match import mask_cells

    yy, xx = np.mgrid[:200, :300]
    mask = np.zeros((200, 300), bool)
    centres = ((60, 60), (105, 60), (200, 140))  # three cells of radius 25; the first two touch (45 px apart)
    for x, y in centres:
        mask |= (xx - x) ** 2 + (yy - y) ** 2 <= 25**2
    mask[190:200, 280:300] = True  # a sliver of a cell cut by the frame
    regions = label(mask)
    assert regions.max() == 3  # two touching cells, one alone, one sliver
    cells = np.array(mask_cells(regions))
    assert len(cells) == 4
    for x, y in centres:
        assert np.min(np.hypot(cells[:, 0] - x, cells[:, 1] - y)) <= 2
    assert np.min(np.hypot(cells[:, 0] - 289.5, cells[:, 1] - 194.5)) <= 1  # the sliver's centroid
    assert mask_cells(np.zeros((10, 10), int)) == []


def test_a_mask_is_scored_cell_by_cell_and_trains_on_its_clumps(tmp_path):
    from types import SimpleNamespace

    from leukodetect.data.indexers import mask_regions
    from leukodetect.jobs.locator import _points

    mask = np.zeros((60, 90), np.uint8)
    mask[10:30, 10:30] = 255  # two cells drawn apart, meeting at one corner pixel only (as ALL-IDB1's masks draw them)
    mask[30:50, 30:50] = 255
    mask[10:30, 60:80] = 255  # a cell alone
    Image.fromarray(mask).save(tmp_path / "Im001_1_WBCs.tif")
    record = SimpleNamespace(path=Path("Im001_1.jpg"), label=1, blasts=None)
    regions = mask_regions(tmp_path, record.path.stem)
    assert regions.max() == 3  # scored: one region per cell, connected through sides alone
    points, annotated = _points(record, "allidb1", regions)
    assert annotated == "all" and len(points) == 2  # trained on: the touching pair as one clump, and the cell alone
    assert any(abs(x - 29.5) < 1 and abs(y - 29.5) < 1 for x, y in points)  # the clump's centroid, between its cells
