"""A laboratory calibrates the shipped cell model on its own labelled smears: two halves by content group, each
calibrated on the other's cells, with the product's commands.

    python scripts/smear_calibration_probe.py OUT BANK/cells.csv aria=$D/ALL-Aria-subset@14.65 [--targets 0.99 0.9] [--per smear] [--max-per-field 3]
    python scripts/smear_calibration_probe.py OUT BANK/cells.csv aria=$D/ALL-Aria-subset --batch-scale --per smear

The smears the shipped cell model never trained on (the smear-eval ``--unseen-from`` rule, with BANK) are split into two
halves by content group (near-duplicate fields stay together), laid out as symbolic links under ``OUT/halves``. For each
half X: ``leukodetect cells`` cuts X's cells at the declared scale (each cell takes its smear's label),
``leukodetect calibrate --target-sensitivity T --per cell|smear`` fits a temperature and threshold on them, and ``leukodetect
smear-eval`` scores the other half's smears with that checkpoint, at the measured and at the declared scale, beside the
shipped model. With ``--batch-scale`` the laboratory's pixel size is taken as unknown: each half's cells are cut at
that half's batch diameter (``detect --batch-scale``'s) and each half is scored with ``smear-eval --batch-scale``. Prints
right verdicts and verdict counts per model and scale over both halves; ``OUT/table.json``.
Recorded in docs/detection.md ("A laboratory calibrates on its own smears").
"""

import argparse
import collections
import json
import subprocess
import sys
import zlib
from pathlib import Path

from leukodetect.jobs.cells import LabSource
from leukodetect.jobs.detect import batch_scale_of
from leukodetect.jobs.smear_eval import smear_records, trained_on_smear, trained_smears
from leukodetect.runtime.checkpoint import load_checkpoint
from leukodetect.runtime.locator import WhiteCellLocator
from leukodetect.weights import resolve_detector, resolve_locator


def leukodetect(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "leukodetect", *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("bank", type=Path)
    ap.add_argument("source", help="LAB=PATH[:FORMAT]@PIXELS, the laboratory's declared red-cell diameter")
    ap.add_argument("--targets", type=float, nargs="+", default=[0.99, 0.9])
    ap.add_argument("--per", choices=("cell", "smear"), default="cell", help="calibrate's unit: blast cells or ALL smears")
    ap.add_argument("--max-per-field", type=int, default=3, help="cells cut per field for calibrating (0: every located cell)")
    ap.add_argument("--batch-scale", action="store_true", help="no declared pixel size: each half at its own batch diameter")
    args = ap.parse_args()
    source = LabSource.parse(args.source)
    if not source.rbc_diameter and not args.batch_scale:
        raise SystemExit(f"{args.source}: declare the laboratory's red-cell diameter (LAB=PATH@PIXELS), or pass --batch-scale.")
    locator = WhiteCellLocator.load(resolve_locator(None))
    parents, groups = trained_smears(args.bank, load_checkpoint(resolve_detector(None, "learned")).get("trained_on", ()))
    _, records = smear_records(source, grouped=True)
    unseen = [r for r in records if not trained_on_smear(source.lab, r, parents, groups)]
    halves = args.out / "halves"
    if not halves.exists():
        for r in unseen:
            folder = halves / ("A" if zlib.crc32(r.group.encode()) % 2 == 0 else "B") / r.path.parent.name
            folder.mkdir(parents=True, exist_ok=True)
            (folder / r.path.name).symlink_to(r.path.resolve())
    table = collections.defaultdict(lambda: {"right": 0, "smears": 0, "verdicts": collections.Counter()})
    for test, tune in (("A", "B"), ("B", "A")):
        bank = args.out / f"bank{tune}"
        cut_at = source.rbc_diameter or batch_scale_of(sorted((halves / tune).rglob("*.*")), locator=locator, log=print)["rbc_diameter"]
        if not (bank / "cells.csv").exists():
            leukodetect("cells", "--data", f"{source.lab}={halves / tune}@{cut_at}", "--out", str(bank), "--max-per-field",
                        str(args.max_per_field))
        models = {"shipped": None}
        for target in args.targets:
            checkpoint = args.out / f"calibrated_{tune}_{args.per}_{target:g}.pt"
            if not checkpoint.exists():
                leukodetect("calibrate", "--data", str(bank / "cells.csv"), "--out", str(checkpoint), "--target-sensitivity", f"{target:g}",
                            "--per", args.per)
            models[f"calibrated per {args.per}, target {target:g}"] = checkpoint
        for name, checkpoint in models.items():
            fixed = ("batch", "", ["--batch-scale"]) if args.batch_scale else ("declared", f"@{source.rbc_diameter}", [])
            for scale, suffix, extra in (("measured", "", []), fixed):
                run = args.out / f"eval_{test}_{name.replace(', ', '_').replace(' ', '')}_{scale}"
                if not (run / "metrics.json").exists():
                    leukodetect("smear-eval", "--data", f"{source.lab}={halves / test}{suffix}", "--out", str(run),
                                *(["--checkpoint", str(checkpoint)] if checkpoint else []), *extra)
                lab = json.loads((run / "metrics.json").read_text())["labs"][source.lab]
                entry = table[f"{name}, {scale} scale"]
                entry["right"] += lab["accuracy"]["k"]
                entry["smears"] += lab["smears"]
                entry["verdicts"].update({f"{truth} -> {v}": n for truth, counts in lab["verdicts"].items() for v, n in counts.items()})
                if checkpoint and scale == "measured":
                    entry.setdefault("thresholds", []).append(round(load_checkpoint(checkpoint)["threshold"], 4))
    out = {k: {**v, "verdicts": dict(sorted(v["verdicts"].items()))} for k, v in table.items()}
    (args.out / "table.json").write_text(json.dumps(out, indent=1))
    for k, v in out.items():
        print(f"{k}: {v['right']} of {v['smears']} right; {v['verdicts']}" + (f"; thresholds {v['thresholds']}" if "thresholds" in v else ""))


if __name__ == "__main__":
    main()
