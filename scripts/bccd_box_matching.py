"""A white-cell locator on BCCD's fields, its found cells matched to BCCD's white-cell boxes two ways.

    python scripts/bccd_box_matching.py LOCATOR [LOCATOR ...]

For each locator (a file from ``leukodetect train-locator``; to hold BCCD out, train it without BCCD: ``--data
allidb1=... --data pbc=...``) and each of BCCD's fields, the found cells are matched one to one to the annotated
white cells (:mod:`leukodetect.detection.match`):

* centre: within half a red-cell diameter of a box's centre (what ``locator-eval`` and ``smear-eval`` report);
* box: inside the box, as issue 20 names BCCD's criterion ("BCCD boxes").

Each at the field's own measured red-cell diameter (fields without one are left out) and at one diameter for all
fields, the median of the measured ones (what a declared pixel size would give). Prints recall and precision with
95% Wilson intervals. Needs ../shared/datasets/BCCD; not a test.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from leukodetect.data.indexers import index_dataset
from leukodetect.detection.match import match_points, match_points_to_boxes
from leukodetect.evaluation.intervals import wilson_interval
from leukodetect.runtime.images import open_rgb
from leukodetect.runtime.locator import WhiteCellLocator
from leukodetect.runtime.scale import estimate_smear_diameter

BCCD = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "BCCD"


def main(paths: list[str]) -> int:
    if not paths:
        print(__doc__)
        return 2
    if not (BCCD / "BCCD" / "Annotations").is_dir():
        print(f"BCCD is not at {BCCD}: this script needs its fields and white-cell boxes.")
        return 1
    fields = []
    for record in index_dataset(BCCD, "bccd"):
        rgb = np.asarray(open_rgb(record.path))
        fields.append((rgb, record.boxes, record.cells, estimate_smear_diameter(rgb).diameter))
    measured = [d for *_, d in fields if d is not None]
    declared = float(np.median(measured))
    print(f"{len(fields)} fields, {len(measured)} with a measured red-cell diameter (median {declared:.1f} px)")
    for path in paths:
        locator = WhiteCellLocator.load(Path(path))
        counts = {(scale, rule): [0, 0, 0] for scale in ("measured", "declared") for rule in ("centre", "box")}
        for rgb, boxes, centres, diameter in fields:
            for scale, d in (("measured", diameter), ("declared", declared)):
                if d is None:
                    continue
                found = np.array([(x, y) for x, y, _ in locator.locate(rgb, d)], float).reshape(-1, 2)
                for rule, m in (("centre", match_points(found, centres, 0.5 * d)), ("box", match_points_to_boxes(found, boxes))):
                    counts[(scale, rule)] = [a + b for a, b in zip(counts[(scale, rule)], (m.tp, m.fp, m.fn))]
        print(path)
        for (scale, rule), (tp, fp, fn) in counts.items():
            lo, hi = wilson_interval(tp, tp + fn)
            print(f"  {scale:8s} {rule:6s} recall {tp / (tp + fn):.3f} ({tp}/{tp + fn}; {lo:.3f}-{hi:.3f})  "
                  f"precision {tp / max(1, tp + fp):.3f} ({tp}/{tp + fp})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
