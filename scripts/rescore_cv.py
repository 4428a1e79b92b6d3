"""Rescore a finished cross-validation run's folds without retraining: which checkpoint, which views.

Every fold folder of a ``leukodetect cv`` run keeps ``best.pt`` (lowest validation loss, what the
run scored) and ``last.pt`` (the final epoch). This script predicts each fold's held-out images
again (the ``test`` list of ``cv_plan.json``, labels from the data folder) three ways and prints
the pooled out-of-fold figures with 95% intervals:

- ``best``: best.pt, as ``cv`` scored it (a check: it must match the run's predictions);
- ``last``: last.pt, i.e. what dropping model selection would have given;
- ``best+d4``: best.pt averaged over the 8 rotations and flips of the square input (test-time
  augmentation; blood cells have no orientation);
- ``mean of N runs`` (with ``--average-with OTHER_RUN ...``): the stored out-of-fold P(blast) of
  this run and of other cv runs made on the same folds (same ``cv_plan.json``), averaged: an
  ensemble of independently trained models, each scored only on images it never saw.

A fold folder without ``last.pt`` (deleted to save disk) is rescored without that variant. With
``--stored-only`` no checkpoint is read: the stored predictions alone are pooled (``stored``), e.g.
for a run made on another machine and copied back without its ``.pt`` files; its image paths are
then matched to ``--data`` by file name.

    python scripts/rescore_cv.py runs/cv-r50-e30-ls --data ../shared/datasets/ALL-IDB2/ALL_IDB2/img
    python scripts/rescore_cv.py runs/cv-r50-e30-ls --data ../shared/datasets/ALL-IDB2/ALL_IDB2/img \
        --average-with runs/cv-r50-e30-ls-ema
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from leukodetect.data.indexers import index_dataset
from leukodetect.evaluation.intervals import binary_report
from leukodetect.runtime.classifier import Classifier
from leukodetect.runtime.images import open_rgb


def d4_views(batch: torch.Tensor) -> list[torch.Tensor]:
    """The 8 symmetries of the square: 4 rotations of the batch and of its mirror image."""
    return [torch.rot90(v, r, dims=(2, 3)) for v in (batch, torch.flip(batch, dims=(3,))) for r in range(4)]


def fold_probabilities(fold_dir: Path, paths: list[Path]) -> dict[str, np.ndarray]:
    out = {}
    for name in ("best", "last"):
        if name == "last" and not (fold_dir / "last.pt").exists():
            continue
        clf = Classifier.from_checkpoint(fold_dir / f"{name}.pt", backend="torch")
        batch = torch.stack([clf.preset(open_rgb(p)) for p in paths])
        out[name] = clf.probabilities(batch)
        if name == "best":
            out["best+d4"] = np.mean([clf.probabilities(v) for v in d4_views(batch)], axis=0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="A folder written by 'leukodetect cv'.")
    parser.add_argument("--data", type=Path, required=True, help="The data folder the run was trained on.")
    parser.add_argument("--average-with", type=Path, nargs="*", default=[], metavar="RUN",
                        help="Other cv runs on the same folds whose stored predictions join the average.")
    parser.add_argument("--stored-only", action="store_true",
                        help="Read no checkpoint: pool the stored predictions (a run copied from another machine).")
    args = parser.parse_args()

    records = index_dataset(args.data)
    label_of = {str(r.path.resolve()): r.label for r in records}
    by_name = {r.path.name: r.label for r in records}
    if len(by_name) < len(records) and args.stored_only:
        raise SystemExit(f"{args.data} holds several images of one file name: --stored-only cannot match paths by name.")
    plan = json.loads((args.run / "cv_plan.json").read_text())
    y, probs, stored = [], {}, []
    for k, test in enumerate(plan["test"]):
        paths = [Path(p) for p in test]
        y += [by_name[p.name] if args.stored_only else label_of[str(p.resolve())] for p in paths]
        if not args.stored_only:
            for name, p in fold_probabilities(args.run / f"fold_{k}", paths).items():
                probs.setdefault(name, []).extend(p.tolist())
        stored += json.loads((args.run / f"fold_{k}" / "predictions.json").read_text())["prob_blast"]
        print(f"fold {k}: {len(paths)} images {'read' if args.stored_only else 'rescored'}", flush=True)
    y = np.array(y)
    if args.stored_only:
        probs["stored"] = stored
    if args.average_with:
        runs = [stored]
        for other in args.average_with:
            if json.loads((other / "cv_plan.json").read_text())["test"] != plan["test"]:
                raise SystemExit(f"{other} was run on other folds than {args.run}: its predictions cannot be averaged with them.")
            runs.append([p for k in range(len(plan["test"]))
                         for p in json.loads((other / f"fold_{k}" / "predictions.json").read_text())["prob_blast"]])
        probs[f"mean of {len(runs)} runs"] = np.mean(runs, axis=0).tolist()
    if "best" in probs:
        print(f"best.pt against the run's own predictions: max |dP| {np.abs(np.array(probs['best']) - stored).max():.2e}")
    print(f"{'variant':<16} {'accuracy (95% CI)':<28} {'sensitivity':<12} {'specificity':<12} errors (FN, FP)  AUC")
    for name, p in probs.items():
        report = binary_report(y, np.array(p), threshold=0.5)
        m, c = report["metrics"], report["confusion"]
        acc = m["accuracy"]
        print(f"{name:<16} {acc['value']:.2%} ({acc['ci_low']:.2%} - {acc['ci_high']:.2%})  "
              f"{m['sensitivity']['value']:<12.2%} {m['specificity']['value']:<12.2%} "
              f"{c['fn'] + c['fp']} ({c['fn']}, {c['fp']})        {m['roc_auc']['value']:.3f}")


if __name__ == "__main__":
    main()
