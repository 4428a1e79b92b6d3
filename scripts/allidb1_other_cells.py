#!/usr/bin/env python
"""How often a cell model calls blast the normal white cells of ALL-IDB1 photographs, ALL patients' against healthy people's.

Reads the located cells ``damage_gate_cells.py`` wrote for ALL-IDB1 (the smear pipeline's cells with their P(blast)
and guard call) and keeps those an ALL-IDB-Patches *other* point marks (one within ``--near`` red-cell diameters)
that lie more than ``--far`` diameters from every annotated blast: white cells its annotators called not blast.
Counts, per kind of photograph, how many are called blast (P >= 0.7, not flagged by the guard); ``--unseen`` (a
folder of photographs, e.g. those a model never trained on) splits them further.

    python scripts/allidb1_other_cells.py /work/runs/damage/allidb1.npz --unseen runs/bank6/eval/idb1/ALL_IDB1/im
"""
import argparse
from pathlib import Path

import numpy as np
from scipy.spatial.distance import cdist

from leukodetect.data.indexers import index_dataset

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("cells", type=Path, help="allidb1.npz from damage_gate_cells.py")
parser.add_argument("--allidb1", type=Path, default=Path("../shared/datasets/ALL-IDB1/ALL_IDB1"))
parser.add_argument("--unseen", type=Path, help="a folder whose photographs (by name) count as never trained on")
parser.add_argument("--near", type=float, default=0.3)
parser.add_argument("--far", type=float, default=1.0)
args = parser.parse_args()
z = np.load(args.cells)
records = index_dataset(args.allidb1, "allidb1")
assert [str(r.path) for r in records] == list(z["smears"]), "the cells file was not made from this ALL-IDB1 folder"
unseen = {p.stem for p in args.unseen.iterdir()} if args.unseen else None
called = (z["prob"] >= 0.7) & ~z["unlike"].astype(bool)
table: dict[tuple[str, str], list[int]] = {}
for i, record in enumerate(records):
    mine = np.flatnonzero(z["smear"] == i)
    if not len(mine) or not record.others:
        continue
    xy, d = np.c_[z["x"][mine], z["y"][mine]], z["d"][mine][0]
    on_other = cdist(xy, np.array(record.others)).min(axis=1) < args.near * d
    far = cdist(xy, np.array(record.blasts)).min(axis=1) > args.far * d if record.blasts else np.ones(len(xy), bool)
    kept = on_other & far
    photo = "ALL patients' photographs" if record.label == 1 else "healthy people's photographs"
    part = "" if unseen is None else ("never trained on" if record.path.stem in unseen else "trained on")
    entry = table.setdefault((photo, part), [0, 0])
    entry[0] += int(kept.sum())
    entry[1] += int((kept & called[mine]).sum())
for (photo, part), (n, k) in sorted(table.items()):
    print(f"{photo}{', ' + part if part else ''}: {k} of {n} called blast")
