"""The cross-laboratory recipe, run stage by stage on a cell bank: what the GPU session of 2026-12-04 ran.

Each stage calls the library function its command calls, with the options written beside it, so a
stage is the command line printed in its log. Usage (PYTHONPATH=src where leukodetect is not installed):

    python scripts/cross_lab_recipe.py --bank runs/bank3/cells.csv --out runs/xlab --stage final --epochs 30

Stages: ``final`` (train on every laboratory: the shipped model's recipe), ``final-geometry`` (the same
without stain and colour augmentation: the recipe the leave-one-out table picked on 2026-12-05), ``lolo`` (leave one
laboratory out, colour recipe), ``lolo-geometry`` (the same without stain and colour augmentation),
``allidb-cv`` (ALL-IDB2's 5-fold cross-validation of the recipe), ``allidb-cv-geometry`` (the same, colour-free).
With ``--lab allidb1`` the cross-validation stages take ALL-IDB1's annotated cells of a bank made with
``cells --data allidb1=...`` instead, folds by photograph (the bank's group).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from leukodetect.config import RunConfig
from leukodetect.jobs.cross_lab import run_cross_lab
from leukodetect.jobs.train import run_cv, run_train

#: The recipe: the paper's ResNet-50 from scratch at 128 pixels = 3 red-cell diameters, full rotation,
#: stain and camera variation, laboratories balanced, a guard.
COLOUR = {"rotation": 180.0, "colour": 0.2, "hed": 0.05, "blur": 0.3, "jpeg": 0.3}
GEOMETRY = {"rotation": 180.0, "colour": 0.0, "hed": 0.0, "blur": 0.0, "jpeg": 0.0}


def config(bank: Path, *, epochs: int, augment: dict, workers: int, batch_size: int, labs: list[str] | None = None,
           label_smoothing: float = 0.0) -> RunConfig:
    cfg = RunConfig()
    cfg.data.path, cfg.data.format, cfg.data.image_size = str(bank), "manifest", 128
    cfg.data.val_fraction, cfg.data.test_fraction, cfg.data.num_workers = 0.1, 0.1, workers
    cfg.data.labs = labs or []
    cfg.model.arch = "resnet50"
    cfg.train.epochs, cfg.train.batch_size, cfg.train.balance, cfg.train.guard = epochs, batch_size, "labs", True
    cfg.train.label_smoothing = label_smoothing
    cfg.train.checkpoint_every = epochs  # resume points cost more than the epochs they save on a GPU
    for key, value in augment.items():
        setattr(cfg.augment, key, value)
    cfg.validate()
    return cfg


def flags(augment: dict) -> str:
    return " ".join(f"--{k} {v:g}" for k, v in augment.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bank", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--stage", choices=("final", "final-geometry", "lolo", "lolo-geometry", "allidb-cv", "allidb-cv-geometry"), required=True)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--label-smoothing", type=float, default=0.0, help="The recipe has none; ALL-IDB2's own recipe used 0.1.")
    parser.add_argument("--checkpoint-every", type=int, default=None, help="Write last.pt every N epochs (default: at the end).")
    parser.add_argument("--resume", action="store_true", help="Continue an interrupted run: final and final-geometry from last.pt, allidb-cv* from its finished folds.")
    parser.add_argument("--lab", default="allidb", help="The laboratory of the allidb-cv stages: allidb (ALL-IDB2's crops) or allidb1.")
    parser.add_argument("--devices", default="off", help="e.g. cuda:0,cuda:0,cuda:0,cuda:0: four jobs at once on one GPU")
    args = parser.parse_args()
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    common = f"--epochs {args.epochs} --batch-size {args.batch_size} --image-size 128 --val-fraction 0.1 --balance labs --workers {args.workers}"
    if args.label_smoothing:
        common += f" --label-smoothing {args.label_smoothing:g}"
    recipe = {"epochs": args.epochs, "workers": args.workers, "batch_size": args.batch_size, "label_smoothing": args.label_smoothing}
    if args.stage in ("final", "final-geometry"):
        augment = COLOUR if args.stage == "final" else GEOMETRY
        cfg = config(args.bank, augment=augment, **recipe)
        cfg.train.checkpoint_every = args.checkpoint_every or args.epochs
        log(f"leukodetect train --data {args.bank} --out {args.out}/{args.stage} --guard {common} {flags(augment)} (test part 10%)")
        run_train(cfg, args.out / args.stage, resume=args.resume, progress=False,
                  command=f"train (scripts/cross_lab_recipe.py {args.stage})", log=log)
    elif args.stage in ("lolo", "lolo-geometry"):
        augment = COLOUR if args.stage == "lolo" else GEOMETRY
        cfg = config(args.bank, augment=augment, **recipe)
        log(f"leukodetect cross-lab --data {args.bank} --out {args.out}/{args.stage} {common} {flags(augment)} --devices {args.devices}")
        run_cross_lab(cfg, args.out / args.stage, only="allidb", devices=args.devices, command=f"cross-lab (scripts/cross_lab_recipe.py {args.stage})", log=log)
    else:
        augment = COLOUR if args.stage == "allidb-cv" else GEOMETRY
        cfg = config(args.bank, augment=augment, labs=[args.lab], **recipe)
        log(f"leukodetect cv --data {args.bank} --labs {args.lab} --folds 5 --out {args.out}/{args.stage} --guard {common} {flags(augment)} --devices {args.devices}")
        run_cv(cfg, args.out / args.stage, folds=5, resume=args.resume, devices=args.devices, progress=False, command=f"cv (scripts/cross_lab_recipe.py {args.stage})", log=log)
    log(f"stage {args.stage}: {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
