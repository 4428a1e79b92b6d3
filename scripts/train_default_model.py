"""Train the default model shipped with leukodetect and write it as half-precision safetensors.

Recipe: one whose 5-fold cross-validation is recorded in docs/results.md (ResNet-50 from scratch,
batch 16, AdamW lr 1e-3, cosine, seed 0; pass the epochs, image size and label smoothing that the
cross-validation used), now trained on all 260 ALL-IDB2 images; with no validation part the last
epoch is kept.

    python scripts/train_default_model.py ../shared/datasets/ALL-IDB2/ALL_IDB2/img --work /tmp/default-model \
        --cv-metrics runs/cv-r50-e30-ls/metrics.json --epochs 30 --image-size 128 --label-smoothing 0.1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from leukodetect.config import RunConfig
from leukodetect.data.duplicates import hash_records
from leukodetect.data.indexers import index_dataset
from leukodetect.training.checkpoint import load_checkpoint, save_safetensors
from leukodetect.training.fit import train_model
from leukodetect.weights import DEFAULT_MODEL


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--work", type=Path, required=True, help="training run folder (must be new)")
    parser.add_argument("--cv-metrics", type=Path, required=True, help="metrics.json of the recipe's cross-validation")
    parser.add_argument("--out", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--checkpoint-every", type=int, default=1, help="epochs between resume points (more on a GPU)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (augmentation)")
    args = parser.parse_args()

    cfg = RunConfig()
    cfg.data.path = str(args.data)
    cfg.data.image_size = args.image_size
    cfg.train.epochs = args.epochs
    cfg.train.batch_size = 16
    cfg.train.label_smoothing = args.label_smoothing
    cfg.train.checkpoint_every = args.checkpoint_every
    cfg.data.num_workers = args.workers
    recipe = (f"{args.epochs} epochs, {args.image_size}x{args.image_size}, label smoothing {args.label_smoothing:g}, "
              "AdamW lr 1e-3 cosine, batch 16")
    records = index_dataset(args.data)
    hashes = hash_records(records)
    result = train_model(cfg, records, [], args.work, trained_on=[h for h in hashes.values() if h])
    bundle = load_checkpoint(result.best_path)
    cv = json.loads(args.cv_metrics.read_text())
    bundle["model_card"] = {
        "name": "leukodetect ResNet-50 (ALL-IDB2, from scratch)",
        "intended_use": "Research use only, not for diagnosis.",
        "data": "ALL-IDB2: 260 single-cell crops (130 blast, 130 non-blast), one lab, one stain, one camera family.",
        "training": f"ResNet-50 from scratch (no stored weights), {recipe}, "
                    "on-the-fly rotation/shift/zoom/shear/flips; trained on all 260 images, last epoch kept.",
        "evaluation": "5-fold stratified cross-validation of the same recipe, split first, duplicates grouped; "
                      "pooled out-of-fold metrics with 95% intervals (Wilson; bootstrap for F1 and AUC).",
        "metrics": {k: {kk: v[kk] for kk in ("value", "ci_low", "ci_high", "method")} for k, v in cv["metrics"].items()},
        "confusion": cv["confusion"],
        "threshold": bundle["threshold"],
        "limits": f"One lab, one stain, 260 cells; not calibrated; trained {args.epochs} epochs at {args.image_size} px "
                  "(the paper: 100 epochs at 224 px); crops must look like ALL-IDB2 crops (one centred cell, ~257 px field).",
    }
    save_safetensors(bundle, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
