"""Why the guard groups its training cells by laboratory, kind and class: the same model, three groupings and two thresholds, measured.

For a checkpoint trained on a cell bank (the shipped model and runs/bank3/cells.csv), the split is made
again from the checkpoint's config (as ``leukodetect guard`` does). The penultimate features and pixel
statistics of its training, validation and test cells, and of crops of non-blood pictures bundled with
scikit-image, scikit-learn and matplotlib, are computed once; then, without touching the model:

1. both guard parts fitted with a group per class (the guard before 2026-12-06, late evening), with a
   group per laboratory and class (until 2026-12-07) and with a group per laboratory, kind and class (since),
   thresholds as ``add_guard`` set them until 2026-12-07 (one, the largest laboratory's), and the last grouping
   with each group's own laboratory's threshold (:func:`~leukodetect.evaluation.ood.group_thresholds`): the share of test cells flagged, per laboratory and for PBC's cell
   types other than lymphocytes, and of the pictures flagged;
2. the pixel part alone (it reads only the image, so it needs no model trained without the laboratory)
   fitted with each laboratory left out in turn: the share of that laboratory's cells it flags. The
   combined guard takes the larger of its two parts, so it flags at least as many.

    python scripts/guard_groups_probe.py src/leukodetect/weights/resnet50_5labs.safetensors runs/bank6/bank/cells.csv
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

from leukodetect.config import RunConfig
from leukodetect.evaluation.ood import (fit_guard, group_laboratories, group_thresholds, guard_distances, guard_groups, guard_scores,
                                       lab_guard_threshold)
from leukodetect.jobs.guard import DEFAULT_PERCENTILE, model_inputs, view_pixel_statistics
from leukodetect.jobs.train import prepare, split_parts
from leukodetect.runtime.checkpoint import load_checkpoint
from leukodetect.runtime.classifier import Classifier
from probe_pictures import crops
from probe_pictures import pictures as probe_pictures

PART = (100 + DEFAULT_PERCENTILE) / 2
#: A third grouping, probed and adopted on 2026-12-07: a group per laboratory, class and the bank's ``kind`` where
#: it has one (PBC's cell types, Aria's ALL subtypes), so a rare cell type has a mean of its own.
BY_KIND = "lab, class and kind"
#: The same groups, each with its own laboratory's threshold (:func:`group_thresholds`) rather than the largest one.
PER_LAB = "... each lab's edge"
GROUPINGS = ("class", "laboratory and class", BY_KIND, PER_LAB)


def main(checkpoint: str, bank: str) -> None:
    bundle = load_checkpoint(checkpoint)
    cfg = RunConfig.from_dict(bundle["config"])
    cfg.data.path, cfg.data.split_file = bank, None
    with tempfile.TemporaryDirectory() as tmp:
        prep = prepare(cfg, Path(tmp), log=lambda *_: None)
    clf = Classifier.from_checkpoint(checkpoint, device="cpu", precision="fp32", backend="torch")
    d: dict[str, np.ndarray] = {}
    for name, idx in zip(("train", "val", "test"), split_parts(cfg, prep)):
        images, kept = model_inputs(clf, [prep.records[i] for i in idx])
        d[f"{name}_f"], d[f"{name}_p"] = clf.image_features(images, batch_size=32), view_pixel_statistics(clf, images)
        d[f"{name}_y"], d[f"{name}_lab"] = np.array([r.label for r in kept]), np.array([str(r.lab) for r in kept])
        d[f"{name}_kind"] = np.array([r.kind or "" for r in kept])
    drawn = probe_pictures()  # drawn in this order, from their own seed, apart from guard_probe.py's crops
    pictures = {"photographs": drawn["photograph"], "more photographs": drawn["photograph, more"], "stained tissue": drawn["stained tissue"]}
    rng = np.random.default_rng(1)
    for kind, sources in pictures.items():
        views = [clf.view(im)[0] for im in crops(sources, 200, rng)]
        d[f"{kind}_f"], d[f"{kind}_p"] = clf.image_features(views, batch_size=32), view_pixel_statistics(clf, views)

    def groups(by: str, mask=slice(None)) -> np.ndarray:
        y = d["train_y"][mask]
        if by == "class":
            return y
        return guard_groups(list(d["train_lab"][mask]), list(y), kinds=list(d["train_kind"][mask]) if by in (BY_KIND, PER_LAB) else None)[0]

    print(f"Guard of {checkpoint}: {len(d['train_y'])} training, {len(d['val_y'])} validation, {len(d['test_y'])} test cells.")
    print("1. Both parts, share flagged (%):")
    labs = sorted(set(d["test_lab"]))
    pbc_other = (d["test_lab"] == "pbc") & (d["test_kind"] != "lymphocyte")
    print("   groups              | test cells | " + " ".join(f"{lab:>6s}" for lab in labs) + " | PBC non-lymphocytes | " + " | ".join(pictures))
    for by in GROUPINGS:
        score = None
        for part in ("f", "p"):
            fit = fit_guard(d[f"train_{part}"], groups(by))
            if by == PER_LAB:
                scales = group_thresholds(guard_distances(d[f"val_{part}"], fit), d["val_lab"], group_laboratories(groups(by), list(d["train_lab"])), PART)
                one = {k: guard_scores(d[f"{k}_{part}"], fit, scales) for k in ("test", *pictures)}
                owners = group_laboratories(groups(by), list(d["train_lab"]))
                print(f"   ({part}: thresholds " + ", ".join(f"{lab} {scales[[o == lab for o in owners]].max():.1f}" for lab in sorted(set(map(str, owners)))) + ")")
            else:
                threshold = lab_guard_threshold(guard_scores(d[f"val_{part}"], fit), d["val_lab"], PART)
                one = {k: guard_scores(d[f"{k}_{part}"], fit) / threshold for k in ("test", *pictures)}
            score = one if score is None else {k: np.maximum(score[k], v) for k, v in one.items()}
        test = score["test"] > 1
        print(f"   {by:20s}|    {100 * test.mean():5.1f}   | " + " ".join(f"{100 * test[d['test_lab'] == lab].mean():6.1f}" for lab in labs)
              + f" | {test[pbc_other].sum()}/{pbc_other.sum()} | " + " | ".join(f"{100 * (score[k] > 1).mean():5.1f} (lowest {score[k].min():.2f})" for k in pictures))
    print("2. Pixel part alone, fitted without one laboratory: share of that laboratory's cells flagged (%):")
    cells = {k: np.concatenate([d[f"{s}_{k}"] for s in ("train", "val", "test")]) for k in ("p", "lab")}
    for by in GROUPINGS[:3]:
        row = []
        for lab in labs:
            keep, keep_val = d["train_lab"] != lab, d["val_lab"] != lab
            fit = fit_guard(d["train_p"][keep], groups(by, keep))
            threshold = lab_guard_threshold(guard_scores(d["val_p"][keep_val], fit), d["val_lab"][keep_val], PART)
            row.append(f"{lab} {100 * (guard_scores(cells['p'][cells['lab'] == lab], fit) > threshold).mean():5.1f}")
        print(f"   {by:20s}| " + " | ".join(row))


if __name__ == "__main__":
    main(*sys.argv[1:3])
