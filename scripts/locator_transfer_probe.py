#!/usr/bin/env python
"""BCCD held out (trained on ALL-IDB1 alone): does stronger stain or scale augmentation transfer better? One run per recipe."""
import json, sys, time
from pathlib import Path
from leukodetect.jobs.cells import LabSource
from leukodetect.jobs.locator import load_smears, found_points, score_smear, summarise
from leukodetect.training.locator import LocatorRecipe, fit_locator
D = "../shared/datasets"
src = [LabSource.parse(s) for s in (f"allidb1={D}/ALL-IDB1/ALL_IDB1:allidb1", f"bccd={D}/BCCD:bccd")]
smears, _ = load_smears(src, 16.0, log=print)
train = [s for s in smears if s.lab == "allidb1" and s.annotated != "none"]
test = [s for s in smears if s.lab == "bccd"]
out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/locator-transfer"); out.mkdir(parents=True, exist_ok=True)
for name, recipe in (("hed0.15-colour0.5", LocatorRecipe(hed=0.15, colour=0.5)), ("scale1.6", LocatorRecipe(scale_jitter=1.6))):
    t = out / f"{name}.json"
    if t.exists():
        continue
    loc = fit_locator(train, recipe, log=lambda m: print(time.strftime("%H:%M:%S"), m, flush=True), every=500)
    rows = [score_smear(found_points(loc, s), s, 16.0) for s in test]
    t.write_text(json.dumps(summarise(rows), indent=1))
    print(name, json.dumps(summarise(rows)["bccd"]), flush=True)
