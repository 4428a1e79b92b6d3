#!/usr/bin/env python
"""Every cell the shipped smear pipeline finds on one laboratory's smears, with the cell model's features.

Runs ``detect``'s pipeline (the learned locator, then the cell model) on each smear of a source and keeps,
per located cell: its position, the smear, P(blast), the guard's score and call, the cell model's
penultimate-layer features (what a damaged-cell gate on those features would read), and what the layout
says about it:

* ALL-IDB1: ``gate`` 1 within 0.75 red-cell diameters of an annotated cell (a blast or an "other" point),
  0 farther than one diameter from every one (unannotated: mostly smudged or broken cells and cells cut
  by the frame), -1 in between; ``blast`` 1 within 0.5 diameters of an annotated blast;
* BCCD: ``gate`` 1 within 0.5 diameters of a white-cell box's centre, else 0;
* Aria and PBC: no positions (PBC: the image's centre holds one intact white cell: ``gate`` 1 within
  0.5 diameters of it, else 0).

Resumable: one ``.npz`` per laboratory in OUT, skipped when present.

    python scripts/damage_gate_cells.py /work/runs/damage allidb1=../shared/datasets/ALL-IDB1/ALL_IDB1:allidb1 \
        bccd=../shared/datasets/BCCD:bccd aria=../shared/datasets/ALL-Aria-subset:aria pbc=../shared/datasets/PBC-normal-subset:pbc --every pbc=4
"""
import argparse
import time
from pathlib import Path

import numpy as np
from scipy.spatial.distance import cdist

from leukodetect.data.indexers import detect_format, index_dataset
from leukodetect.detection.crops import crop_around
from leukodetect.detection.gate import gate_labels
from leukodetect.detection.pipeline import analyze
from leukodetect.jobs.cells import LabSource
from leukodetect.runtime.classifier import Classifier
from leukodetect.runtime.images import open_rgb
from leukodetect.runtime.locator import WhiteCellLocator
from leukodetect.weights import DEFAULT_LOCATOR, DEFAULT_MODEL

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("out", type=Path)
parser.add_argument("sources", nargs="+", help="LAB=PATH:FORMAT")
parser.add_argument("--every", action="append", default=[], help="LAB=N: every Nth smear of that laboratory")
parser.add_argument("--checkpoint", type=Path, default=DEFAULT_MODEL)
parser.add_argument("--locator", type=Path, default=DEFAULT_LOCATOR)
args = parser.parse_args()
every = {k: int(v) for k, v in (e.split("=") for e in args.every)}
args.out.mkdir(parents=True, exist_ok=True)
clf = Classifier.from_checkpoint(args.checkpoint)
loc = WhiteCellLocator.load(args.locator)
size = clf.preset.image_size


def near(points, ref, radius: float) -> np.ndarray:
    p, r = np.asarray(points, float).reshape(-1, 2), np.asarray(ref, float).reshape(-1, 2)
    if len(p) == 0:
        return np.zeros(0, bool)
    if len(r) == 0:
        return np.zeros(len(p), bool)
    return cdist(p, r).min(axis=1) <= radius


for spec in args.sources:
    source = LabSource.parse(spec)
    target = args.out / f"{source.lab}.npz"
    if target.exists():
        print(f"{target} exists: skipped")
        continue
    fmt = source.format if source.format != "auto" else detect_format(source.path)
    records = [r for r in index_dataset(source.path, fmt)][:: every.get(source.lab, 1)]
    rows: dict[str, list] = {k: [] for k in ("smear", "x", "y", "d", "prob", "ood", "unlike", "gate", "blast", "edge", "label", "kind")}
    feats, verdicts, t0 = [], [], time.time()
    for i, record in enumerate(records):
        rgb = np.asarray(open_rgb(record.path))
        result = analyze(rgb, clf, locator=loc)
        verdicts.append(result["verdict"])
        cells = result["cells"]
        if not cells:
            continue
        d = result["rbc_diameter"]
        xy = np.array([(c["x"], c["y"]) for c in cells], float)
        crops = [crop_around(rgb, x, y, result["crop_side"], size) for x, y in xy]
        feats.append(clf.image_features(crops, batch_size=32))
        if fmt == "allidb1":
            gate = gate_labels(xy, record.blasts or (), record.others or (), d)
            blast = near(xy, record.blasts or (), 0.5 * d).astype(int)
        elif fmt == "bccd":
            gate = near(xy, record.cells or (), 0.5 * d).astype(int)
            blast = np.zeros(len(xy), int)
        elif fmt == "pbc":
            h, w = rgb.shape[:2]
            gate = near(xy, [(w / 2, h / 2)], 0.5 * d).astype(int)
            blast = np.zeros(len(xy), int)
        else:
            gate = np.full(len(xy), -1)
            blast = np.full(len(xy), -1)
        h, w = rgb.shape[:2]
        edge = np.minimum.reduce([xy[:, 0], xy[:, 1], w - xy[:, 0], h - xy[:, 1]]) / d
        for j, c in enumerate(cells):
            rows["smear"].append(i)
            rows["x"].append(c["x"])
            rows["y"].append(c["y"])
            rows["d"].append(d)
            rows["prob"].append(c["prob_blast"])
            rows["ood"].append(c.get("ood_score", np.nan))
            rows["unlike"].append(bool(c.get("unlike_training", False)))
            rows["gate"].append(int(gate[j]))
            rows["blast"].append(int(blast[j]))
            rows["edge"].append(float(edge[j]))
            rows["label"].append(-1 if record.label is None else int(record.label))
            rows["kind"].append(record.kind or "")
        if i % 50 == 0:
            print(f"{source.lab}: {i + 1}/{len(records)} smears, {len(rows['x'])} cells, {time.time() - t0:.0f} s", flush=True)
    np.savez_compressed(
        target, features=np.concatenate(feats) if feats else np.zeros((0, 0)),
        **{k: np.asarray(v) for k, v in rows.items()},
        smears=np.asarray([str(r.path) for r in records]), smear_label=np.asarray([-1 if r.label is None else r.label for r in records]),
        verdict=np.asarray(verdicts), groups=np.asarray([r.group for r in records]),
    )
    print(f"{source.lab}: {len(records)} smears, {len(rows['x'])} cells in {time.time() - t0:.0f} s -> {target}")
