"""Shape, stain and texture measurements of each located region, for the smudge-cell gate.

Broken (smudge) cells take up the nuclear stain like white cells and are of white-cell size, so
the locator finds them; what sets them apart is how they look: paler, more diffuse chromatin, an
irregular outline, no ring of cytoplasm. :func:`region_features` measures that on the locator's
working copy, in units of the photograph's own red-cell diameter where a size is involved, so
the numbers mean the same on both ALL-IDB1 cameras. :mod:`.gate` learns from them which located
objects are intact white cells.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

#: The columns of :func:`region_features`, in order.
FEATURE_NAMES = (
    "log_area",  # log of the area in red-cell areas
    "solidity", "eccentricity", "extent", "circularity",
    "stain_mean", "stain_std", "stain_p90",  # B - G above the photograph's stain threshold
    "dense_fraction",  # share of the region at least 30 levels above the threshold (condensed chromatin)
    "gray_mean", "gray_std", "log_laplacian_var",  # brightness and sharpness of the texture
    "red", "green", "blue",  # mean colour inside
    "ring_red", "ring_green", "ring_blue",  # mean colour of a ring around it (cytoplasm, red cells or slide)
    "touches_border",
)


def region_features(small: np.ndarray, stain: np.ndarray, labels: np.ndarray, region, level: float, diameter: float,
                    gray: np.ndarray, laplacian: np.ndarray) -> np.ndarray:
    """The :data:`FEATURE_NAMES` of one ``skimage.measure.regionprops`` region of ``labels``.

    Args:
        small: the working copy (RGB uint8) the labels were computed on.
        stain: its B - G channel; ``level`` the stain threshold.
        diameter: the red-cell diameter in working-copy pixels.
        gray, laplacian: the working copy in grey levels and its Laplacian (computed once per photograph).
    """
    rbc_area = math.pi * diameter**2 / 4
    pad = int(0.3 * diameter) + 1
    y0, x0, y1, x1 = region.bbox
    height, width = labels.shape
    wy0, wx0, wy1, wx1 = max(0, y0 - pad), max(0, x0 - pad), min(height, y1 + pad), min(width, x1 + pad)
    window = labels[wy0:wy1, wx0:wx1]
    inside = window == region.label
    side = max(3, int(0.3 * diameter) | 1)
    ring = cv2.dilate(inside.astype(np.uint8), np.ones((side, side), np.uint8)).astype(bool) & (window == 0)
    colour = small[wy0:wy1, wx0:wx1].astype(np.float32)
    values = stain[wy0:wy1, wx0:wx1][inside].astype(np.float32)
    grey = gray[wy0:wy1, wx0:wx1][inside]
    ring_colour = colour[ring].mean(axis=0) if ring.any() else colour[inside].mean(axis=0)
    return np.array([
        math.log(region.area / rbc_area),
        region.solidity, region.eccentricity, region.extent,
        4 * math.pi * region.area / max(region.perimeter, 1.0) ** 2,
        values.mean() - level, values.std(), np.percentile(values, 90) - level,
        float((values > level + 30).mean()),
        grey.mean(), grey.std(), math.log1p(float(laplacian[wy0:wy1, wx0:wx1][inside].var())),
        *colour[inside].mean(axis=0), *ring_colour,
        float(y0 == 0 or x0 == 0 or y1 == height or x1 == width),
    ], dtype=np.float32)


def texture_maps(small: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The grey-level copy and its Laplacian, the inputs :func:`region_features` shares per photograph."""
    gray = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY).astype(np.float32)
    return gray, cv2.Laplacian(gray, cv2.CV_32F)
