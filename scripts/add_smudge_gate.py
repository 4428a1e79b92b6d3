"""Fit the smudge-cell gate for an existing detector checkpoint and write the detector with it.

The gate (leukodetect.detection.gate) is independent of the crop classifier's weights: it learns,
from ALL-IDB1's annotations, which located objects are intact white cells, on region features
measured with the locator settings the detector itself uses. So a detector trained before the
gate existed can get one without retraining its network:

    python scripts/add_smudge_gate.py ../shared/datasets/ALL-IDB1/ALL_IDB1 \
        --detector src/leukodetect/weights/detector_allidb1.safetensors --work /tmp/gate-work \
        --out src/leukodetect/weights/detector_allidb1.safetensors

The output is written as half-precision safetensors when its name ends in .safetensors (the
weights are those of the input, so a float16 input is copied exactly), else as a .pt checkpoint.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np

from leukodetect.data.indexers import index_dataset
from leukodetect.detection.crops import CropConfig, located_cells, write_crops
from leukodetect.detection.gate import fit_gate
from leukodetect.detection.pipeline import locate_params_of
from leukodetect.runtime.checkpoint import (
    DetectorSettings,
    load_checkpoint,
    save_checkpoint,
    save_safetensors,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="ALL-IDB1 folder (im/, xyc/, with the 'other' annotations beside it)")
    parser.add_argument("--detector", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True, help="new folder for the located cells and crops")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--keep", type=float, default=0.99, help="share of the annotated cells the gate keeps")
    args = parser.parse_args()

    bundle = load_checkpoint(args.detector)
    settings = DetectorSettings.of(bundle) or DetectorSettings()
    params = locate_params_of(settings)
    records = index_dataset(args.data, "allidb1")
    crop = CropConfig(crop_factor=settings.crop_factor, size=settings.crop_size or 96)
    write_crops(records, args.work, crop, params=params, progress=True)
    features, labels, photos, _ = located_cells(args.work, {r.path.stem for r in records})
    gate = fit_gate(features, labels, photos, keep=args.keep)
    kept = gate.is_cell(features)
    print(f"Gate fitted on {int((labels >= 0).sum())} located cells of {len(set(photos.tolist()))} photographs "
          f"(threshold {gate.threshold:.4f}); in-sample it keeps {kept[labels == 1].mean():.1%} of the annotated cells "
          f"and rejects {(~kept[labels == 0]).mean():.1%} of the unannotated objects.")
    bundle["detection"] = replace(settings, gate=gate.to_dict()).to_dict()
    if args.out.suffix == ".safetensors":
        save_safetensors(bundle, args.out)
    else:
        save_checkpoint(bundle, args.out)
    stored = load_checkpoint(args.out)["detection"].get("gate")
    if stored is None or not np.isclose(stored["threshold"], gate.threshold):
        raise SystemExit(f"{args.out} was written but does not read back with its gate: do not ship it.")
    print(f"Wrote {args.out}.")


if __name__ == "__main__":
    main()
