"""Each smear analysed at its measured scale and, where the laboratory declares one, at the declared scale: cells found,
cells the guard flags (and whether an annotated cell lies under them), verdicts; and the guard on the cell bank's own
points of each smear at both scales and at the declared one zoomed 0.8-1.2 times.

    python scripts/smear_scale_probe.py OUT_DIR BANK/cells.csv aria=$D/ALL-Aria-subset@14.65 bccd=$D/BCCD@91.38 \
        allidb1=$D/ALL-IDB1/ALL_IDB1 [--all] [--times 1.1 1.2]

With the shipped locator and cell model. A smear's cells found by the bank are those ``leukodetect cells`` cut from it
(the bank's ``x``, ``y``); without ``--all`` only the smears the cell model never trained on are analysed (the
smear-eval ``--unseen-from`` rule). A located cell is "annotated" when an annotated point (ALL-IDB1's blasts and other
points, BCCD's box centres) lies within 0.75 red-cell diameters of it. ``OUT_DIR/fields.jsonl`` is written as it goes and read back on a rerun (resumable);
the summary is printed and written to ``OUT_DIR/summary.json``. Recorded in docs/detection.md ("Where the guard's flags
in smears come from").
"""
import argparse
import collections
import csv
import json
from pathlib import Path

import numpy as np
from scipy.spatial.distance import cdist

from leukodetect.detection.pipeline import analyze
from leukodetect.jobs.cells import LabSource
from leukodetect.jobs.smear_eval import smear_records, trained_on_smear, trained_smears
from leukodetect.runtime.classifier import Classifier
from leukodetect.runtime.images import open_rgb
from leukodetect.runtime.locator import WhiteCellLocator
from leukodetect.runtime.scale import canonical_crop
from leukodetect.weights import resolve_detector, resolve_locator

ZOOMS = (0.8, 0.9, 1.0, 1.1, 1.2)


def summary_of(result: dict, annotated: list) -> dict:
    probs = [c["prob_blast"] for c in result["cells"] if c.get("prob_blast") is not None]
    out = {"verdict": result["verdict"], "rbc_diameter": result.get("rbc_diameter"), "scale": result.get("scale"),
           "cells": result["n_cells"], "flagged": result.get("n_unlike_training", 0), "max_prob": max(probs, default=None)}
    if annotated and result["cells"] and result.get("rbc_diameter"):
        xy = np.array([(c["x"], c["y"]) for c in result["cells"]])
        near = cdist(xy, np.asarray(annotated, float)).min(axis=1) <= 0.75 * result["rbc_diameter"]
        flagged = np.array([bool(c.get("unlike_training")) for c in result["cells"]])
        out.update(annotated=int(near.sum()), annotated_flagged=int((near & flagged).sum()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("bank", type=Path)
    ap.add_argument("sources", nargs="+", help="LAB=PATH[:FORMAT]@PIXELS: the laboratory's declared red-cell diameter")
    ap.add_argument("--all", action="store_true", help="every smear, not only those the cell model never trained on")
    ap.add_argument("--times", type=float, nargs="*", default=[],
                    help="also analyse each smear at the declared scale times each of these (a diagnosis, e.g. 1.1 1.2)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    clf = Classifier.from_checkpoint(resolve_detector(None, "learned"))
    loc = WhiteCellLocator.load(resolve_locator(None))
    parents, groups = trained_smears(args.bank, clf.bundle.get("trained_on", ()))
    points = collections.defaultdict(list)
    with args.bank.open() as fh:
        for row in csv.DictReader(fh):
            points[row["parent"]].append((float(row["x"]), float(row["y"])))
    log = args.out / "fields.jsonl"
    done = {json.loads(line)["path"] for line in log.open()} if log.exists() else set()
    with log.open("a") as fh:
        for spec in args.sources:
            source = LabSource.parse(spec)
            _, records = smear_records(source, grouped=True)
            for record in records:
                parent = f"{source.lab}:{record.path.stem}"
                seen = trained_on_smear(source.lab, record, parents, groups)
                if (seen and not args.all) or str(record.path) in done:
                    continue
                rgb = np.asarray(open_rgb(record.path))
                annotated = [tuple(p) for p in (record.blasts or ())] + [tuple(p) for p in (record.others or ())] + \
                    [tuple(p) for p in (record.cells or ())]
                measured = analyze(rgb, clf, locator=loc)
                row = {"lab": source.lab, "path": str(record.path), "label": int(record.label), "seen": seen,
                       "measured": summary_of(measured, annotated)}
                if source.rbc_diameter:
                    for times in [1.0, *args.times]:
                        view = "declared" if times == 1.0 else f"declared x{times:g}"
                        row[view] = summary_of(analyze(rgb, clf, locator=loc, rbc_diameter=source.rbc_diameter * times), annotated)
                here = points.get(parent, [])
                if here:
                    zoomed = {f"declared x{z}": source.rbc_diameter * z for z in ZOOMS} if source.rbc_diameter else {}
                    views = {"measured": measured["rbc_diameter"], **zoomed}
                    row["bank_points"] = {name: [float(s) for s in clf.image_outputs(
                        [canonical_crop(rgb, clf.scale, d, centre=pt) for pt in here])[1]] for name, d in views.items() if d}
                fh.write(json.dumps(row) + "\n")
                fh.flush()
    rows = [json.loads(line) for line in log.open()]
    summary = {}
    for lab in sorted({r["lab"] for r in rows}):
        mine = [r for r in rows if r["lab"] == lab and (args.all or not r["seen"])]
        entry = {"smears": len(mine)}
        for view in ("measured", "declared", *(f"declared x{t:g}" for t in args.times if t != 1.0)):
            if any(view not in r for r in mine):
                continue
            right = sum(r[view]["verdict"] == ("ALL" if r["label"] == 1 else "healthy") for r in mine)
            cells, flagged = sum(r[view]["cells"] for r in mine), sum(r[view]["flagged"] for r in mine)
            entry[view] = {"right": right, "cells": cells, "flagged": flagged, "flagged_share": round(flagged / max(cells, 1), 4),
                           **({"annotated": sum(r[view]["annotated"] for r in mine if "annotated" in r[view]),
                               "annotated_flagged": sum(r[view]["annotated_flagged"] for r in mine if "annotated" in r[view])}
                              if any("annotated" in r[view] for r in mine) else {}),
                           "verdicts": {f"{'ALL' if k[0] else 'healthy'} -> {k[1]}": n for k, n in
                                        sorted(collections.Counter((r["label"], r[view]["verdict"]) for r in mine).items())}}
        ratios = [r["measured"]["rbc_diameter"] / r["declared"]["rbc_diameter"] for r in mine if r["measured"]["rbc_diameter"] and "declared" in r]
        entry["measured_over_declared"] = {} if not ratios else {"within_0.8_1.25": sum(0.8 <= x <= 1.25 for x in ratios), "below": sum(x < 0.8 for x in ratios),
                                           "above": sum(x > 1.25 for x in ratios), "median": round(float(np.median(ratios)), 3) if ratios else None}
        if ratios:  # where the measured scale is off, by the source of the measurement
            off = collections.Counter((r["measured"]["scale"], 0.8 <= r["measured"]["rbc_diameter"] / r["declared"]["rbc_diameter"] <= 1.25)
                                      for r in mine if r["measured"]["rbc_diameter"] and "declared" in r)
            entry["measured_over_declared"]["by_source"] = {src: f"{off[(src, True)]} within, {off[(src, False)]} off"
                                                            for src in sorted({k[0] for k in off})}
        banked = collections.defaultdict(list)
        for r in mine:
            for name, scores in r.get("bank_points", {}).items():
                banked[name] += scores
        entry["bank_points_flagged"] = {name: f"{np.mean(np.array(s) > 1):.3f} of {len(s)}" for name, s in banked.items()}
        summary[lab] = entry
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
