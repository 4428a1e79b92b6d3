"""Train the default model shipped with leukodetect and write it as half-precision safetensors.

Recipe: one whose 5-fold cross-validation is recorded in docs/results.md (ResNet-50 from scratch,
batch 16, AdamW lr 1e-3, cosine, seed 0; pass the epochs, image size and label smoothing that the
cross-validation used), now trained on all 260 ALL-IDB2 images; with no validation part the last
epoch is kept.

    python scripts/train_default_model.py ../shared/datasets/ALL-IDB2/ALL_IDB2/img --work /tmp/default-model \
        --cv-metrics runs/cv-r50-e30-ls/metrics.json --epochs 30 --image-size 128 --label-smoothing 0.1

``--update-card`` rewrites only the model card of the existing ``--out`` file (new cross-validation
figures for the same recipe); its weights and everything else stay as they are, bit for bit.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from leukodetect.config import RunConfig, load_config
from leukodetect.data.duplicates import hash_records
from leukodetect.data.indexers import index_dataset
from leukodetect.runtime.checkpoint import load_checkpoint, save_safetensors
from leukodetect.training.fit import train_model
from leukodetect.weights import DEFAULT_MODEL


def last_epoch_folds(cv_metrics: Path) -> bool:
    """Whether the cross-validation's folds trained without a validation part (read from fold_0/config.yaml)."""
    fold_config = cv_metrics.parent / "fold_0" / "config.yaml"
    return fold_config.is_file() and load_config(fold_config).data.val_fraction == 0


def model_card(cv: dict, *, last_epoch: bool, epochs: int, image_size: int, label_smoothing: float, threshold: float,
               repeats: dict | None = None, cv_note: str = "") -> dict:
    """The card stored in the file: the recipe, and the cross-validated figures of that recipe."""
    recipe = (f"{epochs} epochs, {image_size}x{image_size}, label smoothing {label_smoothing:g}, "
              "AdamW lr 1e-3 cosine, batch 16")
    selection = ("each fold trained on its whole training part and kept its last epoch, as this file was trained"
                 if last_epoch else
                 "each fold chose its epoch on a held-out validation part")
    card = {
        "name": "leukodetect ResNet-50 (ALL-IDB2, from scratch)",
        "intended_use": "Research use only, not for diagnosis.",
        "data": "ALL-IDB2: 260 single-cell crops (130 blast, 130 non-blast), one lab, one stain, one camera family.",
        "training": f"ResNet-50 from scratch (no stored weights), {recipe}, "
                    "on-the-fly rotation/shift/zoom/shear/flips; trained on all 260 images, last epoch kept.",
        "evaluation": "5-fold stratified cross-validation of the same recipe, split first, duplicates grouped; "
                      f"{selection}; pooled out-of-fold metrics with 95% intervals (Wilson; bootstrap for F1 and AUC)."
                      + (f" {cv_note}" if cv_note else ""),
        "metrics": {k: {kk: v[kk] for kk in ("value", "ci_low", "ci_high", "method")} for k, v in cv["metrics"].items()},
        "confusion": cv["confusion"],
        "threshold": threshold,
        "limits": f"One lab, one stain, 260 cells; not calibrated; trained {epochs} epochs at {image_size} px "
                  "(the paper: 100 epochs at 224 px); crops must look like ALL-IDB2 crops (one centred cell, ~257 px field).",
    }
    if repeats is not None:  # scripts/seed_spread.py --json: the same recipe cross-validated with other seeds
        card["repeated_cv"] = {"runs": repeats["n_runs"],
                               **{f"{k}_{stat}": repeats["spread"][k][stat] for k in ("accuracy", "sensitivity", "specificity")
                                  for stat in ("mean", "sd", "min", "max")}}
    return card


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, nargs="?", help="ALL-IDB2 images (not needed with --update-card)")
    parser.add_argument("--work", type=Path, help="training run folder (must be new)")
    parser.add_argument("--cv-metrics", type=Path, required=True, help="metrics.json of the recipe's cross-validation")
    parser.add_argument("--repeats", type=Path, default=None, help="scripts/seed_spread.py --json of the recipe run with several seeds")
    parser.add_argument("--cv-note", default="", help="where and how the cross-validation ran, for the card")
    parser.add_argument("--update-card", action="store_true", help="only rewrite the card of the existing --out file")
    parser.add_argument("--out", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--checkpoint-every", type=int, default=1, help="epochs between resume points (more on a GPU)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (augmentation)")
    args = parser.parse_args()
    cv = json.loads(args.cv_metrics.read_text())
    repeats = json.loads(args.repeats.read_text()) if args.repeats else None

    if args.update_card:
        bundle = load_checkpoint(args.out)
        train = bundle["config"]["train"]
        bundle["model_card"] = model_card(cv, last_epoch=last_epoch_folds(args.cv_metrics), epochs=train["epochs"], image_size=bundle["image_size"],
                                          label_smoothing=train["label_smoothing"], threshold=bundle["threshold"],
                                          repeats=repeats, cv_note=args.cv_note)
        save_safetensors(bundle, args.out)  # float16 -> float32 -> float16 is exact: the weights do not change
        print(f"rewrote the model card of {args.out}")
        return
    if args.data is None or args.work is None:
        parser.error("give the data folder and --work (or --update-card)")
    cfg = RunConfig()
    cfg.data.path = str(args.data)
    cfg.data.image_size = args.image_size
    cfg.data.val_fraction = 0  # no validation part: every image trains, the last epoch is kept
    cfg.train.epochs = args.epochs
    cfg.train.batch_size = 16
    cfg.train.label_smoothing = args.label_smoothing
    cfg.train.checkpoint_every = args.checkpoint_every
    cfg.data.num_workers = args.workers
    records = index_dataset(args.data)
    hashes = hash_records(records)
    result = train_model(cfg, records, [], args.work, trained_on=[h for h in hashes.values() if h])
    bundle = load_checkpoint(result.best_path)
    bundle["model_card"] = model_card(cv, last_epoch=last_epoch_folds(args.cv_metrics), epochs=args.epochs, image_size=args.image_size, label_smoothing=args.label_smoothing,
                                      threshold=bundle["threshold"], repeats=repeats, cv_note=args.cv_note)
    save_safetensors(bundle, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
