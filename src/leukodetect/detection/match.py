"""Match detected cells to annotations: pure functions over point sets and label images.

Points are matched one to one by the Hungarian algorithm on Euclidean distances
(:func:`scipy.optimize.linear_sum_assignment`); an assigned pair farther apart than the radius is
rejected, so each annotation is found at most once and each detection counts once. Against boxes
(BCCD's), a pair is valid when the detection lies inside the box, and the same assignment is made.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist
from skimage.feature import peak_local_max
from skimage.measure import regionprops


@dataclass(frozen=True)
class Matching:
    """The outcome of matching detections to annotations.

    Attributes:
        pairs: (detection index, annotation index) of every accepted pair, sorted by detection.
        distances: the distance of each pair, in the order of ``pairs``.
        tp: accepted pairs; fp: detections left unmatched; fn: annotations left unmatched.
    """

    pairs: list[tuple[int, int]] = field(default_factory=list)
    distances: list[float] = field(default_factory=list)
    tp: int = 0
    fp: int = 0
    fn: int = 0

    @property
    def matched_detections(self) -> set[int]:
        return {d for d, _ in self.pairs}

    @property
    def matched_annotations(self) -> set[int]:
        return {a for _, a in self.pairs}


def _points(points: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    return np.asarray(points, dtype=float).reshape(-1, 2)


def match_points(detected, annotated, radius: float) -> Matching:
    """One-to-one matching of detected to annotated centroids within ``radius`` (same units).

    The assignment minimises the total distance over all pairs; pairs farther than ``radius``
    are then rejected (their detection becomes a false positive, their annotation a miss).
    """
    det, ann = _points(detected), _points(annotated)
    if len(det) == 0 or len(ann) == 0:
        return Matching(tp=0, fp=len(det), fn=len(ann))
    distance = cdist(det, ann)
    # Distances beyond the radius are made prohibitive, so the assignment never trades a valid
    # pair for an invalid one merely because the invalid one is shorter in total.
    valid = distance <= radius
    return _assigned(distance, valid, np.where(valid, distance, radius * 1e6 + distance))


def _assigned(distance: np.ndarray, valid: np.ndarray, cost: np.ndarray) -> Matching:
    """The Hungarian assignment on ``cost`` (detections by annotations), keeping only its ``valid`` pairs."""
    rows, cols = linear_sum_assignment(cost)
    keep = valid[rows, cols]
    order = np.argsort(rows[keep])
    pairs = [(int(r), int(c)) for r, c in zip(rows[keep][order], cols[keep][order])]
    tp = len(pairs)
    return Matching(pairs=pairs, distances=[float(distance[r, c]) for r, c in pairs],
                    tp=tp, fp=distance.shape[0] - tp, fn=distance.shape[1] - tp)


def match_points_to_boxes(detected, boxes) -> Matching:
    """One-to-one matching of detected centroids to annotated boxes (x0, y0, x1, y1): a detection inside a box hits it.

    Of the assignments that hit the most boxes, the one with the least total distance to the boxes' centres is
    taken, so a detection inside two overlapping boxes goes to the nearer one, and a second detection inside a
    box already hit is a false positive. ``distances`` are to the box centres.
    """
    det = _points(detected)
    box = np.asarray(boxes, dtype=float).reshape(-1, 4)
    if len(det) == 0 or len(box) == 0:
        return Matching(tp=0, fp=len(det), fn=len(box))
    inside = ((det[:, None, 0] >= box[None, :, 0]) & (det[:, None, 0] <= box[None, :, 2])
              & (det[:, None, 1] >= box[None, :, 1]) & (det[:, None, 1] <= box[None, :, 3]))
    distance = cdist(det, (box[:, :2] + box[:, 2:]) / 2)
    return _assigned(distance, inside, np.where(inside, distance, (distance.max() + 1) * 1e6 + distance))


def match_to_regions(detected, regions: np.ndarray) -> dict[str, int]:
    """Match detected centroids (x, y) to the connected components of a label image.

    A detection inside a region hits it; each region is matched at most once. A region may hold
    touching cells, so a second detection inside an already-hit region is counted as ``extra``, not
    as a false positive: splitting touching cells is right.

    Returns:
        {"tp": regions hit, "fn": regions missed, "fp": detections outside every region,
        "extra": further detections inside an already-hit region, "regions", "detections"}.
    """
    det = _points(detected)
    n_regions = int(regions.max()) if regions.size else 0
    height, width = regions.shape
    hit: set[int] = set()
    fp = extra = 0
    for x, y in det:
        col, row = int(round(x)), int(round(y))
        k = int(regions[row, col]) if 0 <= row < height and 0 <= col < width else 0
        if k == 0:
            fp += 1
        elif k in hit:
            extra += 1
        else:
            hit.add(k)
    return {"tp": len(hit), "fn": n_regions - len(hit), "fp": fp, "extra": extra, "regions": n_regions, "detections": len(det)}


def mask_cells(regions: np.ndarray) -> list[tuple[float, float]]:
    """The white-cell centres (x, y) of a mask's label image, a region holding touching cells split apart.

    ALL-IDB1's masks draw touching cells apart, meeting at corners, so that a label image connected through sides holds
    one region per cell (its ten masked photographs: 152); connected through corners too, touching cells are one region
    (106), whose centroid lies between them. Each cell is a peak of the region's distance transform: at least half a typical
    cell's radius deep and 0.6 of one from the next (the typical radius is that of the photograph's median region).
    A region without such a peak (a sliver of a cell cut by the frame) keeps its centroid.
    """
    props = regionprops(regions)
    if not props:
        return []
    radius = float(np.sqrt(np.median([r.area for r in props]) / np.pi))
    depth = ndi.distance_transform_edt(regions > 0)
    peaks = peak_local_max(depth, min_distance=max(1, int(0.6 * radius)), threshold_abs=0.5 * radius, labels=regions,
                           exclude_border=False)
    owner = regions[tuple(peaks.T)] if len(peaks) else np.zeros(0, int)
    cells = []
    for r in props:
        mine = peaks[owner == r.label]
        cells += [(float(x), float(y)) for y, x in mine] if len(mine) else [(r.centroid[1], r.centroid[0])]
    return cells


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def detection_scores(tp: int, fp: int, fn: int) -> dict[str, float | None]:
    """Recall TP/(TP+FN), precision TP/(TP+FP) and F1 2TP/(2TP+FP+FN); None where undefined."""
    return {
        "recall": _ratio(tp, tp + fn),
        "precision": _ratio(tp, tp + fp),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
    }
