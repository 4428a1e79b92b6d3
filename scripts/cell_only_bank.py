"""A copy of a cell bank with everything but the central cell painted black: does the background carry the laboratory?

Issue 19's hard part: a network trained on four laboratories calls the blasts of the fifth normal. When ALL-IDB1
is left out, the model trained on the others gives its blasts and its normal cells alike a median P(blast) of
0.000, and painting the crops' background black or white moves both to about 0.4 (docs/results.md, "Only the
cell"). So the surroundings of a cell (the slide's colour, the red cells around it, C-NMC's black) weigh in its
call. In this bank only C-NMC's cells are shown on black and only PBC's and BCCD's (all normal) on a slide full of
sharp red cells; a network can tell the class from the background there without looking at the cell.

This script writes a second bank whose crops show the central cell alone, on black, as C-NMC's are: the cell is
segmented as ``morphology_probe.segment`` does it (no learning; pixels bluer than red around the nucleus nearest
the centre, or every non-black pixel on a black crop), dilated by two pixels, and everything else is set to 0.
A crop where no cell of 200 pixels is found keeps a central disc of a third of the crop's side (one red-cell
diameter) instead, and is counted. ``cells.csv`` is copied with the same rows, so ``cross-lab`` runs on it as on
the original bank.

Usage::

    python scripts/cell_only_bank.py BANK/cells.csv OUT [--sheet N]
    python scripts/cell_only_bank.py BANK/cells.csv --score CHECKPOINT --lab LAB

The first writes ``OUT/cells.csv``, ``OUT/cells/...`` (PNG, as the original paths) and, with ``--sheet``,
``OUT/sheet.png``: N crops per laboratory and class, the original above its painted copy. The second writes nothing:
it scores one laboratory's crops of the original bank with a checkpoint, as cut and with everything but the cell
painted black and painted white (a pale slide's grey, 235), and prints sensitivity, specificity, AUC, the median
P(blast) of each class and the share the guard flags.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

_spec = importlib.util.spec_from_file_location("morphology_probe", Path(__file__).with_name("morphology_probe.py"))
morphology_probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(morphology_probe)

#: Pixels of a cell mask below which the segmentation is taken to have failed.
MIN_CELL = 200


def cell_mask(rgb: np.ndarray) -> tuple[np.ndarray, bool]:
    """(the pixels kept: the central cell widened by two pixels, or the central disc; whether the cell was found)."""
    _, cell, _ = morphology_probe.segment(rgb)
    found = int(cell.sum()) >= MIN_CELL
    if not found:
        yy, xx = np.mgrid[:rgb.shape[0], :rgb.shape[1]]
        cell = np.hypot(yy - (rgb.shape[0] - 1) / 2, xx - (rgb.shape[1] - 1) / 2) < min(rgb.shape[:2]) / 6
    return ndi.binary_dilation(cell, iterations=2), found


def painted(rgb: np.ndarray, value: int = 0) -> tuple[np.ndarray, bool]:
    """(``rgb`` with every pixel outside :func:`cell_mask` set to ``value``, whether the cell was found)."""
    keep, found = cell_mask(rgb)
    out = np.full_like(rgb, value)
    out[keep] = rgb[keep]
    return out, found


def score(bank: Path, checkpoint: Path, lab: str) -> None:
    """Print how a checkpoint calls one laboratory's bank crops as cut and with the background painted."""
    from sklearn.metrics import roc_auc_score

    from leukodetect.runtime.classifier import Classifier

    rows = [r for r in csv.DictReader(bank.open()) if r["lab"] == lab]
    if not rows:
        raise SystemExit(f"{bank} has no cell of laboratory '{lab}'.")
    clf = Classifier.from_checkpoint(checkpoint, backend="torch")
    crops = [np.asarray(Image.open(bank.parent / r["path"]).convert("RGB")) for r in rows]
    y = np.array([int(r["label"]) for r in rows])
    for name, batch in (("as cut", crops), ("black", [painted(a, 0)[0] for a in crops]), ("white", [painted(a, 235)[0] for a in crops])):
        p, s = clf.image_outputs(batch, batch_size=64)
        flagged = float(np.mean(s > clf.guard_threshold)) if s is not None else float("nan")
        auc = roc_auc_score(y, p) if len(set(y)) == 2 else float("nan")
        print(f"{lab} {name:7s} sensitivity {np.mean(p[y == 1] >= 0.5):.3f} specificity {np.mean(p[y == 0] < 0.5):.3f} "
              f"AUC {auc:.3f} median P(blast): blasts {np.median(p[y == 1]):.3f}, normal {np.median(p[y == 0]):.3f}; "
              f"flagged {flagged:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bank", type=Path, help="the original bank's cells.csv")
    parser.add_argument("out", type=Path, nargs="?", help="a new folder for the painted bank (refused if it holds a cells.csv)")
    parser.add_argument("--sheet", type=int, default=0)
    parser.add_argument("--score", type=Path, metavar="CHECKPOINT", help="score one laboratory's crops as cut and painted instead")
    parser.add_argument("--lab", help="the laboratory --score takes")
    args = parser.parse_args()
    if args.score is not None:
        if not args.lab:
            parser.error("--score needs --lab LAB: the laboratory whose crops to score.")
        score(args.bank, args.score, args.lab)
        return
    if args.out is None:
        parser.error("give OUT, a new folder for the painted bank, or --score CHECKPOINT --lab LAB.")
    if (args.out / "cells.csv").exists():
        raise SystemExit(f"{args.out / 'cells.csv'} exists: choose a new folder, or remove it to paint the bank again.")
    root = args.bank.parent
    table = list(csv.DictReader(args.bank.open()))
    missed: Counter[str] = Counter()
    sheet: dict[tuple[str, str], list[np.ndarray]] = {}
    for row in table:
        rgb = np.asarray(Image.open(root / row["path"]).convert("RGB"))
        cell, found = painted(rgb)
        missed[row["lab"]] += not found
        target = args.out / row["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(cell).save(target.with_suffix(".png"))
        tiles = sheet.setdefault((row["lab"], row["label"]), [])
        if len(tiles) < args.sheet:
            tiles.append(np.concatenate([rgb, cell], axis=0))
    with (args.out / "cells.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        for row in table:
            writer.writerow({**row, "path": str(Path(row["path"]).with_suffix(".png"))})
    if (root / "cells.json").exists():  # the bank's scale and sources, as the original says them
        shutil.copy(root / "cells.json", args.out / "cells.json")
    missed = {lab: n for lab, n in missed.items() if n}
    print(f"{len(table)} crops painted; no cell of {MIN_CELL} px found (central disc kept) by laboratory: {missed or 'none'}")
    if args.sheet:
        rows = []
        for tiles in sheet.values():
            tiles += [np.zeros_like(tiles[0])] * (args.sheet - len(tiles))
            rows.append(np.concatenate(tiles, axis=1))
        Image.fromarray(np.concatenate(rows, axis=0)).save(args.out / "sheet.png")


if __name__ == "__main__":
    main()
