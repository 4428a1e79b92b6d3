"""Refit the out-of-distribution guard of a trained cell model on the split it was trained on, without retraining it.

For when the guard's statistics change (on 2026-12-06 three channel correlations joined the pixel
statistics) and the run folder of the model is gone. The split is made again from the checkpoint's own
config on the cell bank it was trained on, and checked against what the checkpoint recorded (laboratories
and counts of its training and validation parts, the number of images its guard was fitted and
thresholded on): if they differ, nothing is written. Then the guard is fitted on the training part, its
threshold set on the validation part (as ``train --guard`` does), and the untouched test part scored;
its figures by laboratory go to ``--test`` for ``ship_cell_model.py``.

    python scripts/refit_guard.py src/leukodetect/weights/resnet50_5labs.safetensors --bank runs/bank3/cells.csv \
        --out runs/guard2/model.pt --test runs/guard2/test_by_lab.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from leukodetect.config import RunConfig
from leukodetect.jobs.cells import labs_of
from leukodetect.jobs.guard import add_guard
from leukodetect.jobs.train import predict_rows, prepare, split_parts
from leukodetect.runtime.checkpoint import load_checkpoint, save_checkpoint
from leukodetect.runtime.classifier import Classifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--bank", type=Path, required=True, help="the cells.csv of the bank the model was trained on")
    parser.add_argument("--out", type=Path, required=True, help="the checkpoint to write, with the new guard (must not exist)")
    parser.add_argument("--test", type=Path, required=True, help="where to write the test part's figures by laboratory (JSON)")
    args = parser.parse_args()
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    if args.out.exists():
        raise SystemExit(f"{args.out} exists: choose another --out.")
    bundle = load_checkpoint(args.checkpoint)
    cfg = RunConfig.from_dict(bundle["config"])
    cfg.data.path, cfg.data.split_file = str(args.bank), None
    with tempfile.TemporaryDirectory() as tmp:
        prep = prepare(cfg, Path(tmp), log=log)
    train, val, test = split_parts(cfg, prep)
    fit, held = [prep.records[i] for i in train], [prep.records[i] for i in val]
    old = bundle["guard"]
    seen = (labs_of([*fit, *held]), len(fit), len(held))
    if seen != (bundle["labs"], old["fitted_on"], old["threshold_on"]):
        raise SystemExit(f"The split made again does not match the one {args.checkpoint} records ({seen} against "
                         f"{(bundle['labs'], old['fitted_on'], old['threshold_on'])}): wrong bank or config; nothing written.")
    log(f"Split made again and matched: {len(fit)} train, {len(held)} validation, {len(test)} test cells.")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(bundle, args.out)
    stored = add_guard(args.out, fit, held, percentile=old["percentile"], device="cpu", log=log)
    clf = Classifier.from_checkpoint(args.out, backend="torch", precision="fp32")
    _, _, labs = predict_rows(clf, prep, test)
    args.test.write_text(json.dumps(labs["labs"], indent=2))
    flagged = {lab: parts["cells"]["flag_rate"] for lab, parts in labs["labs"].items()}
    log(f"Guard: features {old['feature_threshold']:.1f} -> {stored['feature_threshold']:.1f}, pixels {old['pixel_threshold']:.1f} -> "
        f"{stored['pixel_threshold']:.1f}; test part flagged per laboratory: {flagged}. Wrote {args.out} and {args.test}.")


if __name__ == "__main__":
    main()
