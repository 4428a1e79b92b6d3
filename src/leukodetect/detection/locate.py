"""Find white cells in a whole smear photograph with classical image processing.

White cells (and smudge cells) take up the purple-blue nuclear stain: in an 8-bit RGB smear their
blue channel is far above their green one, while red cells are pink (green low, blue about equal
to green) and the empty slide is pale grey-green. So ``stain = B - G`` separates them with one
Otsu threshold. Everything else is measured in units of the red-cell diameter of *this*
photograph, because the two ALL-IDB1 cameras (and any other microscope) differ in magnification:

1. Work on a downscaled copy (about 0.6 megapixels, finer when the red cells come out small) so a
   2592x1944 photograph takes well under a second or two on two cores.
2. Red-cell diameter: red cells absorb green light (haemoglobin), so ``G`` below an Otsu threshold
   computed away from the stained pixels marks red cells; of that mask's connected components,
   the round ones (solidity >= 0.93, i.e. isolated single red cells, not clumps) give a robust
   median equivalent diameter. This number, ``rbc_diameter``, is the scale.
3. White-cell mask: ``stain`` above Otsu (and at least 20 levels above its median, so a photograph
   with no white cell does not threshold noise), closed, holes filled, opened with a disc of
   0.15 scale, components smaller than ``min_area`` (0.3 red-cell areas: platelets are about 0.06)
   dropped.
4. Touching cells are separated by a watershed on a relief = depth inside the mask (distance
   transform, in d) + the smoothed stain (0..1): the darker nuclei of touching cells stand apart
   even where their outline has fused into one compact blob. Seeds are the relief's maxima at
   least ``min_separation`` (0.4 scale) apart. (Tuned on 6 ALL photographs: blast localisation
   recall 0.94 against 0.89 for a plain distance-transform watershed.)
5. Clumps: a region still as large as ``clump_area`` (4.5 red-cell areas; a region holding one
   annotated blast is 1.9 - 3.9, median 2.7) is several cells the watershed could not part (blasts
   packed edge to edge, whose nuclei are equally dark). It is cut by k-means on its pixel
   coordinates into k = round(area / ``cell_area``) parts, one per expected cell. Without this
   step 24 of the 28 annotated blasts the locator missed sat in such clumps. A region at least
   ``clump_solidity`` (0.95) convex is left whole: packed cells leave waists between them, one
   large round cell does not. The price: a large cell that is not round, and a large smudge cell,
   is still cut in two.
6. Regions between ``min_area`` and ``max_area`` (25 red-cell areas) are cells. A cell's centre is
   its region's stain-weighted centroid (``stain_centre``): the nucleus, not the middle of a pale
   edge or of an uneven clump part, so the crop is centred where an annotator clicks.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import cv2
import numpy as np
from PIL import Image
from scipy import ndimage as ndi
from skimage.feature import peak_local_max
from skimage.filters import threshold_otsu
from skimage.measure import label, regionprops
from skimage.morphology import disk
from skimage.segmentation import watershed
from sklearn.cluster import KMeans

from leukodetect.detection.features import FEATURE_NAMES, region_features, texture_maps


@dataclass(frozen=True, kw_only=True)
class LocateParams:
    """Localisation settings; sizes are in red-cell diameters (d) or red-cell areas (A = pi d^2 / 4).

    Attributes:
        work_pixels: pixels of the downscaled working copy.
        min_work_diameter: if the red cells come out smaller than this (pixels) in the working copy,
            it is redone at a finer scale (large, low-magnification inputs).
        min_stain_margin: the stain threshold is at least this far above the stain median.
        min_area: smallest white cell, in A (platelets ~0.06 A, small lymphocytes ~0.7 A).
        max_area: largest region kept, in A (a clump larger than this is debris or a smear edge).
        min_separation: smallest distance between the centres of two touching cells, in d.
        min_peak: smallest relief value of a cell seed.
        stain_weight: weight of the smoothed stain (0..1) against the depth (in d) in the relief
            the watershed floods; 0 is a plain distance-transform watershed.
        stain_sigma: Gaussian smoothing of the stain, in d.
        default_diameter: red-cell diameter (pixels of the input) assumed when too few round red
            cells are found to measure it.
        clump_area: regions at least this large, in A, are split into several cells (0: never).
        cell_area: the area of one cell, in A, when counting the cells of a clump.
        clump_solidity: a region at least this convex (area / convex hull area) is one large cell,
            never cut, whatever its area (1: cut by area alone).
        merge_area: two touching regions whose union is at most this large, in A, and at least
            ``merge_solidity`` solid are one cell the watershed cut in two (0: never merge).
        merge_solidity: how convex (area / convex hull area) such a union must be.
        stain_centre: place each cell's centre at its region's stain-weighted centroid (stain
            above the threshold as the weight: the nucleus pulls it), not at the region's plain
            centroid, which a pale edge or an uneven clump part pulls off the cell.
    """

    work_pixels: int = 600_000
    min_work_diameter: float = 18.0
    min_stain_margin: float = 20.0
    min_area: float = 0.3
    max_area: float = 25.0
    min_separation: float = 0.4
    min_peak: float = 0.3
    stain_weight: float = 1.0
    stain_sigma: float = 0.2
    default_diameter: float = 75.0
    clump_area: float = 4.5
    cell_area: float = 2.7
    clump_solidity: float = 0.95
    merge_area: float = 0.0
    merge_solidity: float = 0.90
    stain_centre: bool = True


#: Settings added after detectors were first shipped, with the value under which each does nothing:
#: a checkpoint that does not store one was trained and evaluated without that step.
LEGACY_VALUES = {"clump_area": 0.0, "clump_solidity": 1.0, "merge_area": 0.0, "stain_centre": False}


@dataclass(frozen=True)
class Cell:
    """One located white cell, in pixels of the full-resolution input."""

    x: float
    y: float
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (x1, y1 exclusive)
    area: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Localisation:
    """What :func:`locate_cells` found in one photograph.

    Attributes:
        cells: the white cells, sorted top to bottom, left to right.
        rbc_diameter: the measured red-cell diameter (full-resolution pixels): the scale.
        rbc_count: how many round red cells the scale was measured on (0 = default used).
        work_factor: the downscale factor of the working copy (working px per input px).
        stain_threshold: the B - G threshold used.
        features: one row of :data:`.features.FEATURE_NAMES` per cell (same order), for the smudge gate.
    """

    cells: list[Cell]
    rbc_diameter: float
    rbc_count: int
    work_factor: float
    stain_threshold: float
    features: np.ndarray = field(default_factory=lambda: np.zeros((0, len(FEATURE_NAMES)), np.float32))

    def to_dict(self) -> dict:
        return {
            "rbc_diameter": self.rbc_diameter, "rbc_count": self.rbc_count,
            "work_factor": self.work_factor, "stain_threshold": self.stain_threshold,
            "cells": [c.to_dict() for c in self.cells],
        }


def as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """An RGB image as a (H, W, 3) uint8 array (no copy for an array)."""
    array = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"Expected an 8-bit RGB image, got an array of shape {array.shape} and type {array.dtype}.")
    return array


def downscale(rgb: np.ndarray, factor: float) -> np.ndarray:
    """Area-averaged downscale by ``factor`` (<= 1)."""
    if factor >= 1:
        return rgb
    height, width = rgb.shape[:2]
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


def stain_channel(rgb: np.ndarray) -> np.ndarray:
    """B - G as int16: high on the purple-blue nuclear stain, near zero or below elsewhere."""
    return rgb[..., 2].astype(np.int16) - rgb[..., 1].astype(np.int16)


def stain_mask(stain: np.ndarray, margin: float) -> tuple[np.ndarray, float]:
    """Stained pixels: Otsu on ``stain``, raised to ``median + margin`` when Otsu falls below it."""
    level = float(max(threshold_otsu(stain), np.median(stain) + margin))
    return stain > level, level


def measure_rbc_diameter(rgb: np.ndarray, stained: np.ndarray) -> tuple[float | None, int]:
    """Median equivalent diameter (pixels of ``rgb``) of the isolated, round red cells.

    Returns (diameter, count); diameter is None when fewer than 5 round red cells are found.
    """
    green = rgb[..., 1]
    near_stain = cv2.dilate(stained.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
    if near_stain.all():
        return None, 0
    dark = (green < threshold_otsu(green[~near_stain])) & ~near_stain
    red = ndi.binary_fill_holes(dark)  # central pallor
    red = cv2.morphologyEx(red.astype(np.uint8), cv2.MORPH_OPEN, disk(2).astype(np.uint8)).astype(bool)
    diameters = [
        region.equivalent_diameter_area
        for region in regionprops(label(red))
        if region.area >= 30 and region.solidity >= 0.93
    ]
    if len(diameters) < 5:
        return None, len(diameters)
    return float(np.median(diameters)), len(diameters)


def white_cell_labels(stained: np.ndarray, diameter: float, params: LocateParams, stain: np.ndarray | None = None) -> np.ndarray:
    """Label image of white cells in the working copy; ``diameter`` is the red-cell diameter there."""
    rbc_area = math.pi * diameter**2 / 4
    mask = cv2.morphologyEx(stained.astype(np.uint8), cv2.MORPH_CLOSE, disk(max(1, round(0.08 * diameter))).astype(np.uint8))
    mask = ndi.binary_fill_holes(mask)
    mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, disk(max(1, round(0.15 * diameter))).astype(np.uint8))
    labels, _ = ndi.label(mask)
    sizes = np.bincount(labels.ravel())
    keep = sizes >= params.min_area * rbc_area
    keep[0] = False
    mask = keep[labels]
    components, n = ndi.label(mask)
    distance = ndi.distance_transform_edt(mask)
    # The relief the watershed floods: depth inside the mask (in d) plus the smoothed stain
    # (0..1 over the stained range). Touching cells can fuse into a compact blob whose distance
    # transform has a single maximum; their darker nuclei still stand apart in the stain.
    relief = distance / diameter
    if stain is not None and n:
        smooth = cv2.GaussianBlur(stain.astype(np.float32), (0, 0), max(0.5, params.stain_sigma * diameter))
        low, high = np.percentile(smooth[mask], [5, 99])
        relief = relief + params.stain_weight * np.clip((smooth - low) / max(high - low, 1e-6), 0, 1) * mask
    seeds = peak_local_max(
        relief, min_distance=max(1, round(params.min_separation * diameter)),
        threshold_abs=params.min_peak, labels=components, exclude_border=False,
    )
    seeded = set(components[tuple(seeds.T)].tolist()) if len(seeds) else set()
    unseeded = [k for k in range(1, n + 1) if k not in seeded]
    extra = ndi.maximum_position(relief, components, unseeded) if unseeded else []
    points = np.array([*map(tuple, seeds), *extra], dtype=int).reshape(-1, 2)
    markers = np.zeros(mask.shape, np.int32)
    markers[tuple(points.T)] = np.arange(1, len(points) + 1)
    cells = watershed(-relief, markers, mask=mask)
    if params.merge_area > 0:
        cells = merge_oversplit(cells, rbc_area, params)
    return split_clumps(cells, rbc_area, params) if params.clump_area > 0 else cells


def merge_oversplit(labels: np.ndarray, rbc_area: float, params: LocateParams) -> np.ndarray:
    """Merge touching regions whose union is one cell's size and nearly convex.

    The watershed seeds every relief maximum at least ``min_separation`` apart, so a large cell
    with a lobed nucleus or uneven stain can be cut in two. Two touching round cells leave a
    waist (the union of two tangent discs is 0.88 solid); a cell cut in two does not. Pairs are
    merged most solid first, a region at most once per pass, until no pair qualifies.
    """
    out = labels.copy()
    max_area = params.merge_area * rbc_area
    kernel = np.ones((3, 3), np.uint8)
    while True:
        regions = {r.label: r for r in regionprops(out)}
        candidates = []
        for lab, region in regions.items():
            if region.area >= max_area:
                continue
            y0, x0, y1, x1 = region.bbox
            y0, x0, y1, x1 = max(0, y0 - 1), max(0, x0 - 1), y1 + 1, x1 + 1
            window = out[y0:y1, x0:x1]
            grown = cv2.dilate((window == lab).astype(np.uint8), kernel).astype(bool)
            for other in np.unique(window[grown]):
                if other <= lab or other == 0 or regions[other].area + region.area > max_area:
                    continue
                b = regions[other].bbox
                wy0, wx0 = min(y0, b[0]), min(x0, b[1])
                union = np.isin(out[wy0:max(y1, b[2]), wx0:max(x1, b[3])], (lab, other))
                (props,) = regionprops(union.astype(np.uint8))
                if props.solidity >= params.merge_solidity:
                    candidates.append((props.solidity, lab, int(other)))
        merged: set[int] = set()
        for _, a, b in sorted(candidates, reverse=True):
            if a in merged or b in merged:
                continue
            out[out == b] = a
            merged.update((a, b))
        if not merged:
            return out


def split_clumps(labels: np.ndarray, rbc_area: float, params: LocateParams) -> np.ndarray:
    """Cut every region of at least ``clump_area`` red-cell areas into round(area / cell_area) parts.

    k-means on the region's pixel coordinates gives compact parts of about equal size whose
    centres spread over the clump like the cells packed in it (deterministic: fixed seed).
    """
    out = labels.copy()
    next_label = int(labels.max()) + 1
    for region in regionprops(labels):
        k = round(region.area / (params.cell_area * rbc_area))
        if region.area < params.clump_area * rbc_area or k < 2 or region.solidity >= params.clump_solidity:
            continue
        coords = region.coords
        parts = KMeans(n_clusters=k, n_init=3, random_state=0).fit_predict(coords.astype(np.float32))
        for part in range(1, k):
            where = coords[parts == part]
            out[where[:, 0], where[:, 1]] = next_label
            next_label += 1
    return out


def locate_cells(image: Image.Image | np.ndarray, params: LocateParams = LocateParams()) -> Localisation:
    """Find the white cells of a smear photograph.

    Args:
        image: the full-resolution RGB photograph (PIL image or uint8 array).
        params: thresholds, in units of the measured red-cell size.

    Returns:
        A :class:`Localisation` whose cells and scale are in full-resolution pixels.
    """
    rgb = as_array(image)
    height, width = rgb.shape[:2]
    factor = min(1.0, math.sqrt(params.work_pixels / (height * width)))
    while True:
        small = downscale(rgb, factor)
        stain = stain_channel(small)
        stained, level = stain_mask(stain, params.min_stain_margin)
        measured, count = measure_rbc_diameter(small, stained)
        diameter = measured if measured is not None else params.default_diameter * factor
        if diameter >= params.min_work_diameter or factor >= 1:
            break
        factor = min(1.0, factor * params.min_work_diameter * 1.2 / diameter)
    labels = white_cell_labels(stained, diameter, params, stain)
    rbc_area = math.pi * diameter**2 / 4
    gray, laplacian = texture_maps(small)
    found = []
    weight = np.clip(stain.astype(np.float32) - level, 0, None) if params.stain_centre else None
    for region in regionprops(labels, intensity_image=weight):
        if not params.min_area * rbc_area <= region.area <= params.max_area * rbc_area:
            continue
        y, x = region.centroid
        if weight is not None and region.image_intensity.sum() > 0:
            y, x = region.centroid_weighted
        y0, x0, y1, x1 = region.bbox
        cell = Cell(
            x=round(x / factor, 1), y=round(y / factor, 1),
            box=(int(x0 / factor), int(y0 / factor), min(width, math.ceil(x1 / factor)), min(height, math.ceil(y1 / factor))),
            area=round(region.area / factor**2, 1),
        )
        found.append((cell, region_features(small, stain, labels, region, level, diameter, gray, laplacian)))
    found.sort(key=lambda item: (item[0].y, item[0].x))
    return Localisation(
        cells=[c for c, _ in found], rbc_diameter=round(diameter / factor, 2), rbc_count=count,
        work_factor=round(factor, 5), stain_threshold=level,
        features=np.stack([f for _, f in found]) if found else np.zeros((0, len(FEATURE_NAMES)), np.float32),
    )


def locate_nuclei(image: Image.Image | np.ndarray, rbc_diameter: float, *, min_area: float = 0.7, max_area: float = 12.0,
                  min_purple: float = 30.0) -> list[tuple[float, float]]:
    """Centres of white cells in a small smear field, by how purple they are.

    A simpler locator than :func:`locate_cells`, for fields too small or too differently stained for
    it (the Aria fields: 224 pixels, red cells 12-15 pixels across, bluish red cells that the
    ``B - G`` stain of ALL-IDB takes for white cells). Romanowsky-stained nuclei and blast cytoplasm
    are purple to violet (red and blue high, green low); red cells are pink, lilac or, in some Aria
    fields, blue-grey. So ``(R + B) / 2 - G`` above Otsu's threshold (and at least ``min_purple``),
    holes filled, in components of ``min_area`` to ``max_area`` red-cell areas, are white cells.
    Checked by eye on 12 Aria fields of both classes (2026-12-04): it finds the blasts and most
    lymphocytes; touching cells stay one region, and a few dark red cells are found too.
    """
    rgb = as_array(image).astype(np.float32)
    purple = (rgb[..., 0] + rgb[..., 2]) / 2 - rgb[..., 1]
    try:
        level = max(float(threshold_otsu(purple)), min_purple)
    except ValueError:  # a constant field
        return []
    mask = ndi.binary_fill_holes(cv2.morphologyEx((purple > level).astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8)))
    rbc_area = math.pi * rbc_diameter**2 / 4
    return [
        (round(float(r.centroid[1]), 1), round(float(r.centroid[0]), 1))
        for r in regionprops(label(mask))
        if min_area * rbc_area <= r.area <= max_area * rbc_area
    ]
