"""Write a trained cross-laboratory cell model as the shipped default: half-precision safetensors with its card.

The checkpoint must carry what ``train --data LAB=PATH ... --guard`` records (laboratories and counts, the
canonical scale, the out-of-distribution guard). The card stored in the file quotes the figures given
as JSON files (the in-laboratory test split by laboratory, and the leave-one-laboratory-out table), so
``GET /v1/model`` and ``leukodetect predict`` users can read where the model was measured and where not.

    python scripts/ship_cell_model.py runs/final/best.pt --test runs/final/test_by_lab.json \
        --cross-lab runs/xlab/cross_lab.json --note "GPU session of 2026-12-04"
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from leukodetect.config import AugmentConfig
from leukodetect.runtime.checkpoint import load_checkpoint, save_safetensors
from leukodetect.weights import DEFAULT_MODEL


def value(entry: dict | None) -> float | None:
    return None if not entry or entry.get("value") is None else round(entry["value"], 4)


def figures(by_lab: dict) -> dict:
    """Sensitivity, specificity, AUC and guard flag rate per laboratory (and per unit: cells, fields, cell types)."""
    return {lab: {unit: {"n": f.get("fields", f["cells"]), **{k: value(f.get(k)) for k in ("sensitivity", "specificity", "roc_auc")},
                         "flagged": round(f["flag_rate"], 4) if f["flag_rate"] is not None else None}
                  for unit, f in parts.items()}
            for lab, parts in by_lab.items()}


def model_card(bundle: dict, test: dict, cross_lab: dict | None, note: str, cross_lab_doc: str = "") -> dict:
    cfg = bundle["config"]
    labs = bundle["labs"]
    scale = bundle["scale"]
    guard = bundle["guard"]
    augment = ", ".join(f"{k} {v:g}" for k, v in cfg["augment"].items() if isinstance(v, float) and v)
    colourless = "; no stain, colour, blur or JPEG augmentation" if not any(cfg["augment"].get(k) for k in AugmentConfig.CAMERA) else ""
    kept = ("the last epoch kept, a validation part of every laboratory setting the guard's threshold" if cfg["train"].get("select") == "last"
            else "epoch chosen on a validation part of every laboratory")
    return {
        "name": "leukodetect ResNet-50, five laboratories, physical scale, with an out-of-distribution guard",
        "intended_use": "Research use only, not for diagnosis. Not validated on any laboratory it was not trained on: "
                        "read the leave-one-laboratory-out figures before trusting a call on new images.",
        "data": {lab: dict(counts) for lab, counts in labs.items()},
        "training": f"ResNet-50 from scratch, {cfg['train']['epochs']} epochs, batch {cfg['train']['batch_size']}, AdamW "
                    f"lr {cfg['train']['lr']:g} cosine, classes and laboratories balanced ({cfg['train']['balance']}); "
                    f"augmentation: {augment}, flips{colourless}; {kept}.",
        "scale": f"{scale['size']} px = {scale['field']:g} red-cell diameters ({scale['size'] / scale['field']:.1f} px per red cell "
                 f"of {scale['rbc_um']:g} micrometres); red cells measured in each image, or --pixel-size.",
        "guard": {k: guard[k] for k in ("threshold", "feature_threshold", "pixel_threshold", "lab_thresholds", "percentile", "fitted_on", "threshold_on", "groups")
                  if k in guard},
        "threshold": bundle["threshold"],
        "in_laboratory_test": figures(test),
        "leave_one_laboratory_out": {lab: figures({lab: parts})[lab] for lab, parts in (cross_lab or {}).get("held_out", {}).items()},
        **({"leave_one_laboratory_out_see": cross_lab_doc} if cross_lab_doc else {}),
        "note": note,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--test", type=Path, required=True, help="figures of the run's test split, by laboratory (JSON)")
    parser.add_argument("--cross-lab", type=Path, action="append", default=[],
                        help="cross_lab.json of the recipe's leave-one-laboratory-out run; repeated, the held-out "
                             "laboratories of several runs (a laboratory in two: the later file's)")
    parser.add_argument("--cross-lab-doc", default="", help="where the leave-one-laboratory-out figures are written, "
                        "when the run's cross_lab.json is not at hand")
    parser.add_argument("--note", default="", help="where and how the figures were measured")
    parser.add_argument("--out", type=Path, default=DEFAULT_MODEL)
    args = parser.parse_args()
    bundle = load_checkpoint(args.checkpoint)
    missing = [k for k in ("labs", "scale", "guard") if k not in bundle]
    if missing:
        raise SystemExit(f"{args.checkpoint} lacks {missing}: train it with --data LAB=PATH ... --guard.")
    cross = None
    for path in args.cross_lab:
        run = json.loads(path.read_text())
        cross = {"held_out": {**(cross or {}).get("held_out", {}), **run.get("held_out", {})}}
    bundle["model_card"] = model_card(bundle, json.loads(args.test.read_text()), cross, args.note, args.cross_lab_doc)
    for key in ("optimizer", "scheduler", "raw_state_dict"):
        bundle.pop(key, None)
    save_safetensors(bundle, args.out)
    again = load_checkpoint(args.out)
    if again["guard"]["threshold"] != bundle["guard"]["threshold"] or again["scale"] != bundle["scale"]:
        raise SystemExit(f"{args.out} does not read back with its guard and scale: do not ship it.")
    print(f"Wrote {args.out} ({args.out.stat().st_size / 2**20:.1f} MiB).")


if __name__ == "__main__":
    main()
