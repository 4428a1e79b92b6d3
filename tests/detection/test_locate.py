"""The locator on a synthetic smear with known white cells, red cells and platelets."""

import numpy as np
from smear_images import PLATELETS, RBC_D, WHITE, synthetic_smear

from leukodetect.data.records import Record
from leukodetect.detection.crops import CropConfig, crop_around, label_points
from leukodetect.detection.locate import (
    LocateParams,
    locate_cells,
    merge_oversplit,
    split_clumps,
)
from leukodetect.detection.match import match_points


def test_finds_the_three_white_cells_and_separates_the_touching_pair():
    loc = locate_cells(synthetic_smear())
    assert abs(loc.rbc_diameter - RBC_D) < 0.12 * RBC_D and loc.rbc_count >= 5
    found = [(c.x, c.y) for c in loc.cells]
    m = match_points(found, [(x, y) for x, y, _ in WHITE], radius=0.5 * RBC_D)
    assert (m.tp, m.fp, m.fn) == (3, 0, 0), found  # touching pair split, no platelet, no red cell
    for cell in loc.cells:
        x0, y0, x1, y1 = cell.box
        assert x0 <= cell.x <= x1 and y0 <= cell.y <= y1
        assert 0.3 < cell.area / (np.pi * 45**2 / 4) < 1.5


def test_scale_follows_magnification():
    small = locate_cells(synthetic_smear())
    big = np.repeat(np.repeat(synthetic_smear(), 2, axis=0), 2, axis=1)  # same smear, twice the magnification
    loc = locate_cells(big, LocateParams(work_pixels=400 * 400))  # analysed at half size
    assert abs(loc.rbc_diameter - 2 * small.rbc_diameter) < 0.1 * 2 * small.rbc_diameter
    assert len(loc.cells) == 3


def test_blank_slide_has_no_cells():
    blank = np.full((300, 300, 3), (225, 222, 205), np.uint8)
    blank = (blank + np.random.default_rng(0).normal(0, 3, blank.shape)).clip(0, 255).astype(np.uint8)
    assert locate_cells(blank).cells == []


def test_crop_is_square_and_padded_at_the_border():
    rgb = synthetic_smear()
    assert crop_around(rgb, 2, 2, 90, 32).shape == (32, 32, 3)
    assert crop_around(rgb, 200, 200, 90, 96).shape == (96, 96, 3)


def test_training_labels_drop_platelets_and_keep_unannotated_cells():
    cells = np.array([(x, y) for x, y, _ in WHITE])
    record = Record(path=None, label=1, group="g", blasts=((90.0, 90.0),), others=((250.0, 262.0), *PLATELETS))
    points = label_points(record, cells, RBC_D, CropConfig())
    kinds = sorted(kind for kind, *_ in points)
    assert kinds == ["blast", "other", "unannotated"]  # the 3 platelets have no located cell
    assert {(kind, label) for kind, label, *_ in points} == {("blast", 1), ("other", 0), ("unannotated", 0)}


def _clump(centres, d=45, size=200):
    labels = np.zeros((size, size), np.int32)
    yy, xx = np.ogrid[:size, :size]
    for x, y in centres:
        labels[(yy - y) ** 2 + (xx - x) ** 2 <= (d / 2) ** 2] = 1
    return labels


def test_a_clump_the_watershed_left_whole_is_cut_into_one_part_per_cell():
    centres = [(60.0, 100.0), (100.0, 100.0), (140.0, 100.0)]  # three cells in a row, fused into one region
    labels = _clump(centres)
    rbc_area = np.pi * 30**2 / 4
    area = (labels == 1).sum() / rbc_area  # about 6.5 red-cell areas
    params = LocateParams(clump_area=4.5, cell_area=area / 3)
    cut = split_clumps(labels, rbc_area, params)
    parts = [np.argwhere(cut == k) for k in np.unique(cut) if k]
    assert len(parts) == 3 and ((cut > 0) == (labels > 0)).all()  # same pixels, three cells
    found = [(p[:, 1].mean(), p[:, 0].mean()) for p in parts]
    assert match_points(found, centres, radius=0.5 * 30).tp == 3, found
    # A region below clump_area, or switched off, is left whole.
    assert len(np.unique(split_clumps(labels, rbc_area, LocateParams(clump_area=area + 0.5, cell_area=area / 3)))) == 2
    single = _clump([(100.0, 100.0)], d=62)  # one large cell, 2.07 red-cell diameters across (4.3 A)
    assert len(np.unique(split_clumps(single, rbc_area, LocateParams()))) == 2


def test_one_large_round_cell_is_not_cut_but_a_clump_of_the_same_area_is():
    rbc_area = np.pi * 30**2 / 4
    big = _clump([(100.0, 100.0)], d=70)  # one round cell of 5.4 red-cell areas
    assert (big > 0).sum() / rbc_area > LocateParams().clump_area
    assert len(np.unique(split_clumps(big, rbc_area, LocateParams()))) == 2  # convex: left whole
    assert len(np.unique(split_clumps(big, rbc_area, LocateParams(clump_solidity=1.0)))) == 3  # by area alone: cut
    row = _clump([(60.0, 100.0), (100.0, 100.0), (140.0, 100.0)])  # three fused cells leave waists
    assert len(np.unique(split_clumps(row, rbc_area, LocateParams(cell_area=2.2)))) == 4


def test_a_cell_cut_in_two_is_merged_but_two_touching_cells_are_not():
    rbc_area = np.pi * 30**2 / 4
    params = LocateParams(merge_area=3.9, merge_solidity=0.9)
    halves = _clump([(100.0, 100.0)], d=50)
    halves[:, 100:] *= 2  # one round cell, cut down the middle
    merged = merge_oversplit(halves, rbc_area, params)
    assert len(np.unique(merged)) == 2 and ((merged > 0) == (halves > 0)).all()
    pair = _clump([(70.0, 100.0)], d=40) + 2 * _clump([(110.0, 100.0)], d=40)  # tangent discs: a waist
    assert set(np.unique(merge_oversplit(pair, rbc_area, params))) == {0, 1, 2}
    assert len(np.unique(merge_oversplit(halves, rbc_area, LocateParams(merge_area=1.0)))) == 3  # union too large


def test_cell_centre_follows_the_stain_not_a_pale_edge():
    """A lone white cell whose dark nucleus sits to one side of its pale cytoplasm."""
    from smear_images import _disc

    img = synthetic_smear().astype(float)
    _disc(img, 90, 90, 45, (225, 222, 205))  # remove the first white cell
    _disc(img, 90, 90, 50, (185, 150, 195))  # pale cytoplasm, above the stain threshold
    _disc(img, 78, 90, 28, (80, 20, 135))  # dark nucleus 12 px left of the centre
    img = np.clip(img, 0, 255).astype(np.uint8)
    plain = locate_cells(img, LocateParams(stain_centre=False))
    weighted = locate_cells(img)
    near = lambda loc: min(loc.cells, key=lambda c: (c.x - 90) ** 2 + (c.y - 90) ** 2)  # noqa: E731
    p, w = near(plain), near(weighted)
    assert abs(p.x - 90) < 3 and abs(p.y - 90) < 3  # the region's centre
    assert 78 <= w.x < p.x - 4 and abs(w.y - 90) < 3  # pulled towards the nucleus
    assert len(plain.cells) == len(weighted.cells) == 3 and p.box == w.box
