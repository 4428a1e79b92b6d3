#!/usr/bin/env python
"""BCCD held out: does stronger stain or scale augmentation, or PBC's centred cells as a second training
laboratory, make the locator transfer to a laboratory it never saw? One run per recipe; finished ones are kept.

    python scripts/locator_transfer_probe.py runs/locator-transfer            # the recipes of 2026-12-04
    python scripts/locator_transfer_probe.py runs/locator-transfer --with-pbc # ALL-IDB1 + PBC (2026-12-06)

PBC's crops each hold one normal white cell at the centre (``load_smears`` reads them so, for testing); with
``--with-pbc`` they train beside ALL-IDB1's photographs. BCCD is never trained on.
"""
import argparse
import json
import time
from pathlib import Path

from leukodetect.jobs.cells import LabSource
from leukodetect.jobs.locator import found_points, load_smears, score_smear, summarise
from leukodetect.training.locator import LocatorRecipe, fit_locator

D = "../shared/datasets"
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("out", type=Path, nargs="?", default=Path("runs/locator-transfer"))
parser.add_argument("--with-pbc", action="store_true", help="train on ALL-IDB1 and PBC's centred cells")
args = parser.parse_args()
sources = [f"allidb1={D}/ALL-IDB1/ALL_IDB1:allidb1", f"bccd={D}/BCCD:bccd"] + ([f"pbc={D}/PBC-normal-subset:pbc"] if args.with_pbc else [])
smears, _ = load_smears([LabSource.parse(s) for s in sources], 16.0, log=print)
train = [s for s in smears if s.lab in ("allidb1", "pbc") and s.trainable]
test = [s for s in smears if s.lab == "bccd"]
recipes = ((("pbc-default", LocatorRecipe()), ("pbc-hed0.15-colour0.5", LocatorRecipe(hed=0.15, colour=0.5))) if args.with_pbc else
           (("hed0.15-colour0.5", LocatorRecipe(hed=0.15, colour=0.5)), ("scale1.6", LocatorRecipe(scale_jitter=1.6))))
args.out.mkdir(parents=True, exist_ok=True)
print(f"training on {len(train)} images ({sorted({s.lab for s in train})}), testing on {len(test)} BCCD fields", flush=True)
for name, recipe in recipes:
    t = args.out / f"{name}.json"
    if t.exists():
        continue
    loc = fit_locator(train, recipe, log=lambda m: print(time.strftime("%H:%M:%S"), m, flush=True), every=500)
    rows = [score_smear(found_points(loc, s), s, 16.0) for s in test]
    t.write_text(json.dumps(summarise(rows), indent=1))
    print(name, json.dumps(summarise(rows)["bccd"]), flush=True)
