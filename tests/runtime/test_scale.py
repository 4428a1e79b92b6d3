"""Physical scale: red cells measured on synthetic smears of known size, and the canonical window."""

from __future__ import annotations

import numpy as np
import pytest

from leukodetect.runtime.scale import (
    RBC_UM,
    CanonicalScale,
    canonical_crop,
    diameter_from_pixel_size,
    estimate_rbc_diameter,
    batch_diameter,
    estimate_smear_diameter,
    scale_agreement,
)

PINK, SLIDE, PURPLE = (200, 120, 125), (235, 225, 215), (110, 60, 170)  # red cells: B - G small; nuclei: B - G large


def smear(diameter: float, *, size: int = 400, white: bool = True, seed: int = 0) -> np.ndarray:
    """Red discs of one ``diameter`` on a grid (jittered), with one larger purple white cell in the middle."""
    rng = np.random.default_rng(seed)
    rgb = np.full((size, size, 3), SLIDE, np.uint8)
    yy, xx = np.mgrid[:size, :size]
    step = diameter * 1.6
    for cy in np.arange(step / 2, size, step):
        for cx in np.arange(step / 2, size, step):
            x, y = cx + rng.uniform(-0.1, 0.1) * diameter, cy + rng.uniform(-0.1, 0.1) * diameter
            rgb[(yy - y) ** 2 + (xx - x) ** 2 <= (diameter / 2) ** 2] = PINK
    if white:
        rgb[(yy - size / 2) ** 2 + (xx - size / 2) ** 2 <= (0.8 * diameter) ** 2] = PURPLE
    return rgb


@pytest.mark.parametrize("diameter", [12, 30, 75])
def test_red_cell_diameter_is_measured_at_any_magnification(diameter):
    rgb = smear(diameter, size=int(12 * diameter))
    estimate = estimate_rbc_diameter(rgb)
    assert estimate.source == "measured" and estimate.red_cells >= 3
    assert estimate.diameter == pytest.approx(diameter, rel=0.08)
    assert estimate_rbc_diameter(rgb, packed=True) == estimate  # the stain-free check agrees on a pink smear


BLUE_GREY = (160, 160, 200)  # red cells under a stain that colours them too (Aria's): B - G as high as a nucleus's


def blue_grey_smear(diameter: float, *, fragments: bool = True) -> np.ndarray:
    """Blue-grey red discs on a grid with (``fragments``) a small pink fragment in each gap: only the fragments look like
    red cells; without them, nothing does."""
    size = int(12 * diameter)
    rgb = np.full((size, size, 3), SLIDE, np.uint8)
    yy, xx = np.mgrid[:size, :size]
    rng = np.random.default_rng(0)
    step = 1.5 * diameter
    for cy in np.arange(step / 2, size, step):
        for cx in np.arange(step / 2, size, step):
            x, y = cx + rng.uniform(-0.1, 0.1) * diameter, cy + rng.uniform(-0.1, 0.1) * diameter
            rgb[(yy - y) ** 2 + (xx - x) ** 2 <= (diameter / 2) ** 2] = BLUE_GREY
            if fragments:
                rgb[(yy - y - 0.75 * diameter) ** 2 + (xx - x - 0.75 * diameter) ** 2 <= (0.15 * diameter) ** 2] = PINK
    return rgb


@pytest.mark.parametrize("diameter", [20, 45])
def test_a_smear_whose_red_cells_take_the_stain_is_measured_without_it(diameter):
    rgb = blue_grey_smear(diameter)
    fragments = estimate_rbc_diameter(rgb)  # a single-cell crop keeps the red-cell estimate: the fragments
    assert fragments.source == "measured" and fragments.diameter < 0.4 * diameter
    whole = estimate_rbc_diameter(rgb, packed=True)  # a smear is checked against its cells as a whole
    assert whole.source == "foreground" and whole.diameter == pytest.approx(diameter, rel=0.1)
    asked = estimate_rbc_diameter(rgb, packed=True, stain_free_check=False)  # a declared scale only asks: any red cells?
    assert asked.source != "foreground" and asked.diameter < 0.4 * diameter


@pytest.mark.parametrize("diameter", [15, 40])
def test_a_smear_whose_red_cells_all_take_the_stain_is_measured_without_it(diameter):
    rgb = blue_grey_smear(diameter, fragments=False)
    assert estimate_rbc_diameter(rgb, packed=True).diameter is None  # no red cell told from the stain
    whole = estimate_smear_diameter(rgb)
    assert whole.source == "foreground" and whole.diameter == pytest.approx(diameter, rel=0.15)
    pink = smear(30, size=360)  # where red cells are measured, the smear estimate is theirs
    assert estimate_smear_diameter(pink) == estimate_rbc_diameter(pink, packed=True)


def test_no_smear_has_a_smear_diameter():
    rng = np.random.default_rng(0)
    for image in (np.full((300, 400, 3), 240, np.uint8), np.full((300, 400, 3), 10, np.uint8),
                  rng.integers(0, 255, (300, 400, 3), dtype=np.uint8), rng.integers(0, 255, (40, 60, 3), dtype=np.uint8),
                  np.zeros((1, 30, 3), np.uint8)):
        assert estimate_smear_diameter(image).diameter is None


def test_no_red_cells_means_unknown_and_says_so():
    blank = np.full((200, 200, 3), 240, np.uint8)
    cell_on_black = np.zeros((200, 200, 3), np.uint8)
    cell_on_black[60:140, 60:140] = PURPLE
    for image in (blank, cell_on_black, np.zeros((1, 30, 3), np.uint8)):
        estimate = estimate_rbc_diameter(image)
        assert estimate.diameter is None and estimate.source == "unknown"
        assert "scale unknown" in estimate.note("x.png") and "--pixel-size" in estimate.note("x.png")


def test_pixel_size_converts_with_a_red_cell_of_7_5_micrometres():
    assert diameter_from_pixel_size(0.1) == pytest.approx(RBC_UM / 0.1) == pytest.approx(75.0)
    with pytest.raises(ValueError):
        diameter_from_pixel_size(0)


def test_canonical_window_shows_the_same_cell_at_the_same_size_whatever_the_magnification():
    scale = CanonicalScale(field=3.0, size=64)
    views = [canonical_crop(smear(d, size=int(8 * d)), scale, d) for d in (20, 50)]
    purple = [(np.abs(v.astype(int) - PURPLE).sum(-1) < 60).sum() for v in views]
    # The white cell is 1.6 red-cell diameters wide: pi * (1.6 / 3 * 64 / 2)^2 = 915 pixels in either window.
    assert all(v.shape == (64, 64, 3) for v in views)
    assert purple[0] == pytest.approx(915, rel=0.1) and purple[1] == pytest.approx(915, rel=0.1)


def test_unknown_scale_shows_the_whole_image_and_reflects_beyond_the_border():
    scale = CanonicalScale(field=3.0, size=32)
    image = np.zeros((40, 80, 3), np.uint8)
    image[:, 40:] = 255
    whole = canonical_crop(image, scale, None)
    assert whole.shape == (32, 32, 3) and whole[16, 2].max() == 0 and whole[16, 30].min() == 255
    corner = canonical_crop(image, scale, 20.0, centre=(0.0, 0.0))  # a 60-pixel window around a corner
    assert corner.shape == (32, 32, 3) and corner.max() == 0  # reflected black, never an invented colour
    assert CanonicalScale.from_dict(scale.to_dict()) == scale and scale.to_dict()["rbc_um"] == RBC_UM


def _crop_with_fragments() -> np.ndarray:
    """A single-cell crop: a purple cell, pairs of overlapping 70-px red cells, and four round 8-px fragments."""
    rgb = np.full((360, 360, 3), SLIDE, np.uint8)
    yy, xx = np.mgrid[:360, :360]
    disc = lambda x, y, d: (yy - y) ** 2 + (xx - x) ** 2 <= (d / 2) ** 2  # noqa: E731
    for x, y in ((60, 60), (300, 60), (60, 300), (300, 300)):  # each red cell overlaps a neighbour: not isolated
        rgb[disc(x, y, 70) | disc(x + 45 * (1 if x < 180 else -1), y, 70)] = PINK
    for x, y in ((180, 30), (180, 330), (30, 180), (330, 180)):
        rgb[disc(x, y, 8)] = PINK
    rgb[disc(180, 180, 110)] = PURPLE
    return rgb


def test_fragments_far_smaller_than_the_red_cells_are_not_taken_for_red_cells():
    rgb = _crop_with_fragments()
    crop = estimate_rbc_diameter(rgb)  # a single-cell crop: unknown, not 8 px (a window ten times too small)
    assert crop.diameter is None and crop.source == "unknown" and crop.red_cells >= 3
    smear = estimate_rbc_diameter(rgb, packed=True)  # a smear field: the packed red cells measure it
    assert smear.source == "packed" and smear.diameter == pytest.approx(70, rel=0.3)


def test_a_field_packed_with_cells_keeps_its_red_cell_estimate():
    rgb = blue_grey_smear(30)
    height, width = rgb.shape[:2]
    rgb[height // 8: -height // 8, width // 8: -width // 8] = BLUE_GREY  # cells cover most of the field: a clump
    assert estimate_rbc_diameter(rgb, packed=True) == estimate_rbc_diameter(rgb)  # no stain-free estimate to check against


def test_a_batch_whose_red_cell_readings_disagree_is_doubted():
    def measured(*diameters):
        return [(d, "measured") for d in diameters]

    one_microscope = measured(15.0, 14.2, 15.9, 16.4, 14.8, 15.3, 15.0, 17.1, 13.9, 15.5, 14.6, 15.2)
    agreed = scale_agreement(one_microscope + [(None, "unknown"), (40.0, "declared")])  # neither is a reading
    assert agreed == {"photographs": 12, "median": 15.1, "disagree": 0, "share": 0.0, "doubtful": False}
    misread = scale_agreement(one_microscope[:8] + measured(30.0, 7.0) + [(22.0, "packed"), (11.0, "foreground")])
    assert misread["photographs"] == 12 and misread["disagree"] == 4 and misread["doubtful"]  # all four beyond 1.25x of 15.15
    one_off = scale_agreement(one_microscope + measured(40.0))  # 1 of 13 (7.7%): no more than a camera's odd photograph
    assert one_off["disagree"] == 1 and not one_off["doubtful"]
    assert scale_agreement(one_microscope[:9]) is None  # too few to judge


def test_a_batchs_diameter_is_the_median_of_its_isolated_red_cells_where_enough_have_them():
    isolated = [(15.0 + 0.1 * i, "measured") for i in range(10)]  # median 15.45
    misread = [(30.0, "packed"), (35.0, "foreground"), (8.0, "packed")]
    assert batch_diameter(isolated + misread) == 15.45  # the packed and stain-free readings do not move it
    assert batch_diameter(isolated[:5] + misread * 2 + [(16.0, "packed")]) == 15.35  # too few isolated: the median of all 12
    assert batch_diameter(isolated[:9] + [(14.65, "declared"), (15.0, "batch"), (None, "unknown")]) is None  # 9 readings
