#!/usr/bin/env python
"""A white-cell locator's recall and precision at several heat-map peak thresholds, on one laboratory's smears.

For a locator trained without that laboratory (``train-locator`` on the others), this says whether a lower or
higher threshold than the default (0.3) would reach a held-out target, and what it costs. A probe: the shipped
threshold is not chosen on the laboratory scored here.

    python scripts/locator_threshold_sweep.py runs/heldout/locator_without_bccd.safetensors bccd=../shared/datasets/BCCD:bccd
"""
import argparse
import json
from pathlib import Path

import numpy as np

from leukodetect.jobs.cells import LabSource
from leukodetect.jobs.locator import load_smears, score_smear, summarise
from leukodetect.runtime.locator import WhiteCellLocator

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("locator", type=Path)
parser.add_argument("source", help="LAB=PATH:FORMAT, as train-locator takes it")
parser.add_argument("--thresholds", default="0.05,0.1,0.15,0.2,0.25,0.3,0.4")
parser.add_argument("--json", type=Path, help="write the summaries here")
args = parser.parse_args()
loc = WhiteCellLocator.load(args.locator)
source = LabSource.parse(args.source)
rbc_px = loc.settings.rbc_px
smears, _ = load_smears([source], rbc_px, log=print)
thresholds = [float(t) for t in args.thresholds.split(",")]
rows: dict[float, list] = {t: [] for t in thresholds}
for smear in smears:  # one heat map per smear (already at the locator's scale), its centres at every threshold
    heat, factor = loc.heatmap(smear.image, rbc_px)
    for t in thresholds:
        found = [(x, y) for x, y, _ in loc.centres(heat, factor, smear.image.shape[:2], threshold=t)]
        rows[t].append(score_smear(np.array(found).reshape(-1, 2), smear, rbc_px))
out = {t: summarise(rows[t])[source.lab] for t in thresholds}
for t, entry in out.items():
    print(f"threshold {t:g}: " + ", ".join(f"{k} {entry[k]['value']:.3f} ({entry[k]['k']}/{entry[k]['n']})"
                                           for k in ("recall", "precision", "blast_recall") if k in entry))
if args.json:
    args.json.write_text(json.dumps(out, indent=1))
