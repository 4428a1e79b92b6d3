#!/usr/bin/env python
"""Cell models side by side on the cells a run held out of training, per laboratory, and on ALL-IDB1 by photograph.

Reads a run's ``split.json`` (``--parts``: test, val or both) and the cell bank it was cut from, and scores each
checkpoint on those crops as they are (the bank cut them at the models' scale): per laboratory the share of
blast cells called blast and of normal cells called normal (P(blast) against ``--threshold``, flagged cells
counted apart), and where the bank holds ALL-IDB1 photographs' cells, the normal cells of ALL patients'
photographs apart from those of healthy people's: the cells that tell whether a model reads the cell or
the photograph it sits in.

    python scripts/heldout_cells_probe.py /work/runs/bank5/final-geometry src/leukodetect/weights/resnet50_5labs.safetensors \
        /work/runs/bank5/final-geometry/best.pt
"""
import argparse
import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from leukodetect.runtime.classifier import Classifier

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("run", type=Path, help="a train run folder (split.json, config.yaml)")
parser.add_argument("checkpoints", type=Path, nargs="+")
parser.add_argument("--parts", default="test", help="comma-separated: test, val")
parser.add_argument("--threshold", type=float, default=0.5)
args = parser.parse_args()
split = json.loads((args.run / "split.json").read_text())
paths = [p for part in args.parts.split(",") for p in split[part]]
bank = next(folder for folder in Path(paths[0]).parents if (folder / "cells.csv").is_file()) / "cells.csv"  # BANK/cells/LAB/[KIND/]
rows = {}
with open(bank, newline="") as f:
    for r in csv.DictReader(f):
        rows[str((bank.parent / r["path"]).resolve())] = r
cells = [rows[str(Path(p).resolve())] for p in paths]


def subset(r) -> str:
    """A cell's group in the table: its laboratory, and on ALL-IDB1 photographs the photograph's label too."""
    if r["lab"].startswith("allidb1"):
        photo = "ALL photograph" if r["parent"].endswith("_1") else "healthy photograph"
        return f"{r['lab']} ({photo})"
    return r["lab"]


images = [np.asarray(Image.open(Path(p)).convert("RGB")) for p in paths]
print(f"{len(cells)} cells of {args.parts} in {args.run}")
for checkpoint in args.checkpoints:
    clf = Classifier.from_checkpoint(checkpoint, backend="torch")
    prob, score = clf.image_outputs(images, batch_size=32)
    flagged = np.array([clf.beyond_guard(None if score is None else float(s)) for s in (score if score is not None else [None] * len(prob))])
    table = defaultdict(lambda: defaultdict(list))
    for r, p, f in zip(cells, prob, flagged):
        table[subset(r)][int(r["label"])].append((p, f))
    print(f"\n{checkpoint}")
    for name in sorted(table):
        parts = []
        for label, word in ((1, "blast called blast"), (0, "normal called normal")):
            got = table[name].get(label)
            if not got:
                continue
            p = np.array([g[0] for g in got])
            f = np.array([g[1] for g in got])
            right = (p >= args.threshold) if label else (p < args.threshold)
            parts.append(f"{word} {right.sum()}/{len(p)} ({right.mean():.1%}; unflagged and right {(right & ~f).sum()}, flagged {f.sum()})")
        print(f"  {name}: " + "; ".join(parts))
