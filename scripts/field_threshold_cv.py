"""Aria's field calls in a finished cross-validation, with the blast threshold chosen inside each fold.

Written 2026-12-06 and run then only on ALL-IDB2's cross-validation (no Aria fields; at 0.5 it gives back the run's own 97.3%),
to check the folds are made again right; its Aria figures (the five-laboratory CV, 2026-12-06 evening) are in docs/detection.md.

A field is ALL when its most blast-like cell reaches the threshold. ``cv`` reports fields at 0.5; here each
fold's threshold is chosen on that fold's own validation part (images its model never trained on, whose
labels the fold's test part never sees), then applied to the fold's test part; every laboratory's test
figures are given at that threshold too, so what a threshold buys on one laboratory and costs on the others
is on one page. Two ways of choosing are reported:

- ``balanced``: one threshold for every laboratory, the one with the best mean over the validation part's
  laboratories of (sensitivity + specificity) / 2 (fields for Aria, cells elsewhere; a one-class
  laboratory counts its one figure);
- ``aria``: the best accuracy on the validation part's Aria fields alone (a laboratory calibrating the
  model on a few labelled fields of its own, as ``leukodetect calibrate`` does for cells).

    python scripts/field_threshold_cv.py runs/cv5labs-geom --bank runs/bank3/cells.csv --out runs/cv5labs-geom/field_threshold.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from leukodetect.config import load_config
from leukodetect.evaluation.intervals import wilson_interval
from leukodetect.evaluation.labs import cell_rows, field_rows
from leukodetect.jobs.train import start_cv
from leukodetect.runtime.classifier import Classifier

CANDIDATES = np.round(np.arange(0.05, 1.0, 0.01), 2)


def units(records, probs) -> dict[str, list[tuple[int, float]]]:
    """(label, P(blast)) per laboratory: Aria's fields (the project's field rule, ``field_rows``), every other laboratory's cells."""
    rows = cell_rows(records, probs)
    out: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in [r for r in rows if r["lab"] != "aria"] + field_rows([r for r in rows if r["lab"] == "aria"]):
        out[r["lab"]].append((r["label"], r["prob"]))
    return dict(out)


def rates(pairs, t: float) -> dict:
    y = np.array([a for a, _ in pairs], dtype=int)
    p = np.array([b for _, b in pairs], dtype=float)
    called = p >= t
    out = {"n": len(y), "right": int((called == y.astype(bool)).sum())}
    for name, label, hit in (("sensitivity", 1, called), ("specificity", 0, ~called)):
        n = int((y == label).sum())
        if n:
            k = int(hit[y == label].sum())
            out[name] = {"k": k, "n": n, "value": k / n}
    return out


def balanced(by_lab: dict, t: float) -> float:
    scores = []
    for pairs in by_lab.values():
        r = rates(pairs, t)
        parts = [r[k]["value"] for k in ("sensitivity", "specificity") if k in r]
        scores.append(sum(parts) / len(parts))
    return float(np.mean(scores))


def choose(score) -> float:
    """The middle of the candidates with the best score (ties are broad plateaus on small validation parts)."""
    values = np.array([score(t) for t in CANDIDATES])
    best = CANDIDATES[np.isclose(values, values.max())]
    return float(best[len(best) // 2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cv_dir", type=Path)
    parser.add_argument("--bank", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    plan = json.loads((args.cv_dir / "cv_plan.json").read_text())
    cfg = load_config(args.cv_dir / "fold_0" / "config.yaml")
    cfg.data.path = str(args.bank)
    with tempfile.TemporaryDirectory() as tmp:  # cv's own plan: its folds and each fold's validation part
        run = start_cv(cfg, Path(tmp), folds=plan["folds"], resume=False, log=log)
    if [[str(r.path) for r in job.test] for job in run.todo] != plan["test"]:
        raise SystemExit(f"The folds made again differ from {args.cv_dir}/cv_plan.json: wrong bank or config.")
    where = {str(r.path): r for r in run.prep.records}
    result: dict = {"cv_dir": str(args.cv_dir), "candidates": [float(CANDIDATES[0]), float(CANDIDATES[-1]), 0.01], "folds": []}
    pooled: dict = defaultdict(lambda: defaultdict(list))
    for k, job in enumerate(run.todo):
        clf = Classifier.from_checkpoint(args.cv_dir / f"fold_{k}" / "best.pt", backend="torch", precision="fp32")
        val_units = units(job.val, [p.prob_blast for p in clf.predict_paths([r.path for r in job.val], rbc_diameter=run.prep.declared_rbc)])
        found = json.loads((args.cv_dir / f"fold_{k}" / "predictions.json").read_text())
        test_units = units([where[p] for p in found["test"]], found["prob_blast"])
        chosen = {"0.5": 0.5, "balanced": choose(lambda t: balanced(val_units, t)),
                  **({"aria": choose(lambda t: rates(val_units["aria"], t)["right"])} if "aria" in val_units else {})}
        log(f"fold {k}: validation {sum(len(v) for v in val_units.values())} units ({len(val_units.get('aria', []))} Aria fields); thresholds {chosen}")
        result["folds"].append({"fold": k, "validation_units": {lab: len(v) for lab, v in val_units.items()}, "thresholds": chosen})
        for rule, t in chosen.items():
            for lab, pairs in test_units.items():
                pooled[rule][lab].append(rates(pairs, t))
    result["pooled"] = {}
    for rule, labs in pooled.items():
        rows = {}
        for lab, per_fold in labs.items():
            row = {"n": sum(r["n"] for r in per_fold), "right": sum(r["right"] for r in per_fold)}
            row["accuracy"] = row["right"] / row["n"]
            row["accuracy_ci"] = list(wilson_interval(row["right"], row["n"]))
            for name in ("sensitivity", "specificity"):
                parts = [r[name] for r in per_fold if name in r]
                if parts:
                    kk, nn = sum(p["k"] for p in parts), sum(p["n"] for p in parts)
                    row[name] = {"k": kk, "n": nn, "value": kk / nn, "ci": list(wilson_interval(kk, nn))}
            rows[lab] = row
        result["pooled"][rule] = rows
    args.out.write_text(json.dumps(result, indent=2))
    for rule, rows in result["pooled"].items():
        print(rule, {lab: f"acc {r['accuracy']:.3f} " + " ".join(f"{n[:4]} {r[n]['value']:.3f}" for n in ("sensitivity", "specificity") if n in r)
                     for lab, r in sorted(rows.items())})


if __name__ == "__main__":
    main()
