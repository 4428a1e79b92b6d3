"""Does a hematologist's description of a blast carry to a laboratory the classifier never saw?

Issue 19's hard part: every network trained on four laboratories calls the blasts of the fifth normal
(docs/results.md, "Every laboratory held out of this bank"). Its levers so far all fed pixels to a
network. This probe tries the other road: a few measurements of the central cell of each bank crop that
a morphologist names when telling a blast from a mature cell (the nucleus's size in red-cell areas, the
nucleus-to-cell ratio, its outline, how even its chromatin is, light spots inside it that may be
nucleoli), none of them a colour, and a small classifier on them (scikit-learn), trained on four
laboratories and scored on the fifth, each in turn, with the figures of :mod:`leukodetect.evaluation.labs`.

The bank's crops are at one physical scale (``leukodetect cells``: 3 red-cell diameters at 128 px), so a
size in pixels is a size under the microscope. Segmentation (per crop, no learning):

- background: the crop's border; a dark border (C-NMC, segmented on black) makes every non-black pixel
  the cell;
- nucleus: Otsu on a darkness-in-green channel (1 - G / the crop's bright reference), the component
  nearest the centre;
- cell: pixels bluer than red (B > R, Romanowsky cytoplasm and nucleus; red cells and slide are not),
  the component holding the nucleus, holes filled.

Usage::

    python scripts/morphology_probe.py OUT BANK/cells.csv [--sheet N]

Writes ``OUT/features.csv`` (one row per cell), ``OUT/lolo.json`` (per held-out laboratory, per
classifier: :func:`leukodetect.evaluation.labs.lab_figures`), ``OUT/incv.json`` (5-fold CV by group
over all five laboratories: do the features tell blasts from normal cells where the laboratory is known?)
and, with ``--sheet``, a sheet of N crops per laboratory with the two masks drawn.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage as ndi
from skimage import filters, measure, morphology
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.class_weight import compute_sample_weight

from leukodetect.evaluation.labs import per_lab

#: Pixels per red-cell diameter in the bank's crops (3 diameters at 128 px).
PX_PER_RBC = 128 / 3
RBC_AREA = math.pi * PX_PER_RBC**2 / 4
DISK2 = morphology.disk(2).astype(bool)

FEATURES = (
    "log_nucleus_area",  # in red-cell areas
    "log_cell_area",
    "nc_ratio",  # nucleus area over cell area
    "nucleus_solidity", "nucleus_eccentricity", "nucleus_circularity",
    "nucleus_lobes",  # components of the nucleus mask after an opening (segmented nuclei)
    "chromatin_cv",  # std / mean of the nuclear channel inside the nucleus
    "chromatin_clumped",  # share of nucleus pixels one std above its mean
    "log_chromatin_sharpness",  # Laplacian variance over the squared mean, inside the nucleus
    "nucleus_pale",  # share of nucleus pixels one std below its mean (pale spots: nucleoli, open chromatin)
    "nucleus_offset",  # distance of the nucleus centre from the cell centre, in cell radii
    "nucleus_contrast",  # nuclear channel: nucleus mean over cytoplasm mean (cell minus nucleus)
)


def _nearest_component(mask: np.ndarray, centre: tuple[float, float], within: float) -> np.ndarray:
    """The connected component of ``mask`` with a pixel nearest ``centre``, if nearer than ``within``; else an empty mask."""
    labels = measure.label(mask)
    best, best_d = None, within
    for region in measure.regionprops(labels):
        coords = region.coords
        d = float(np.min(np.hypot(coords[:, 0] - centre[0], coords[:, 1] - centre[1])))
        if d < best_d:
            best, best_d = region.label, d
    return labels == best if best is not None else np.zeros_like(mask)


def segment(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(nucleus mask, cell mask, nuclear channel) of the central cell of a bank crop."""
    rgb = rgb.astype(np.float32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    grey = rgb.mean(axis=2)
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    dark_background = np.median(border) < 50
    centre = ((rgb.shape[0] - 1) / 2, (rgb.shape[1] - 1) / 2)
    if dark_background:
        foreground = ndi.binary_fill_holes(grey > 25)
        cell = _nearest_component(ndi.binary_opening(foreground, DISK2), centre, PX_PER_RBC)
        reference = np.percentile(g[cell], 95) if cell.any() else 255.0
        candidates = cell
    else:
        reference = np.percentile(g, 95)
        candidates = np.ones_like(grey, dtype=bool)
    nuclear = np.clip(1 - g / max(reference, 1.0), 0, 1)
    smooth = ndi.gaussian_filter(nuclear, 1.5)
    values = smooth[candidates]
    if values.size < 20:
        empty = np.zeros_like(grey, dtype=bool)
        return empty, empty, nuclear
    level = filters.threshold_otsu(values)
    nucleus = ndi.binary_fill_holes(ndi.binary_opening((smooth > level) & candidates, DISK2))
    nucleus = _nearest_component(nucleus, centre, 0.6 * PX_PER_RBC)
    if not dark_background:
        slide = np.percentile(grey, 95)
        bluish = ((b - r) > 0) & (grey < 0.92 * slide)
        cell = ndi.binary_fill_holes(ndi.binary_opening(bluish | nucleus, DISK2))
        near_nucleus = ndi.binary_dilation(nucleus, iterations=int(0.5 * PX_PER_RBC))  # cytoplasm reaches half a red cell
        cell = _nearest_component((cell & near_nucleus) | nucleus, centre, 0.6 * PX_PER_RBC)
        cell = ndi.binary_fill_holes(cell)
    return nucleus, cell, nuclear


def features(rgb: np.ndarray) -> np.ndarray:
    """The :data:`FEATURES` of a bank crop's central cell; NaN where no nucleus or cell of 20 pixels was found."""
    nucleus, cell, nuclear = segment(rgb)
    if nucleus.sum() < 20 or cell.sum() < 20:
        return np.full(len(FEATURES), np.nan)
    filled = ndi.binary_fill_holes(nucleus)
    region = measure.regionprops(filled.astype(np.uint8))[0]
    cell_region = measure.regionprops(cell.astype(np.uint8))[0]
    inside = nuclear[nucleus]
    lobes = measure.label(ndi.binary_opening(nucleus, morphology.disk(4).astype(bool))).max()
    lap = ndi.laplace(ndi.gaussian_filter(nuclear, 1.0))[nucleus]
    cytoplasm = cell & ~filled
    cy, cx = cell_region.centroid
    ny, nx = region.centroid
    cell_radius = math.sqrt(cell_region.area / math.pi)
    return np.array([
        math.log(region.area / RBC_AREA),
        math.log(cell_region.area / RBC_AREA),
        min(1.0, region.area / cell_region.area),
        region.solidity, region.eccentricity,
        4 * math.pi * region.area / max(region.perimeter, 1.0) ** 2,
        float(lobes),
        inside.std() / max(inside.mean(), 1e-6),
        float((inside > inside.mean() + inside.std()).mean()),
        math.log1p(float(lap.var()) / max(inside.mean(), 1e-6) ** 2),
        float((inside < inside.mean() - inside.std()).mean()),
        math.hypot(cy - ny, cx - nx) / max(cell_radius, 1.0),
        inside.mean() / max(nuclear[cytoplasm].mean(), 1e-3) if cytoplasm.sum() >= 10 else 10.0,
    ])


def classifiers():
    return {
        "logistic": make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0)),
        "boosting": HistGradientBoostingClassifier(max_iter=200, learning_rate=0.05, max_leaf_nodes=15, random_state=0),
    }


def weights(labs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each (laboratory, class) the same total weight, so no laboratory's look stands in for its class."""
    return compute_sample_weight("balanced", [f"{lab}:{y}" for lab, y in zip(labs, labels, strict=True)])


def fit(model, x: np.ndarray, labels: np.ndarray, labs: np.ndarray, train: np.ndarray):
    """Fit ``model`` on the rows where ``train`` holds, each (laboratory, class) weighted alike (:func:`weights`)."""
    key = f"{model.steps[-1][0]}__sample_weight" if hasattr(model, "steps") else "sample_weight"
    return model.fit(x[train], labels[train], **{key: weights(labs[train], labels[train])})


def standardise_per_lab(x: np.ndarray, labs: np.ndarray) -> np.ndarray:
    """Each laboratory's features centred on its median and scaled by its interquartile range (no labels used)."""
    out = np.empty_like(x)
    for lab in set(labs):
        sel = labs == lab
        low, mid, high = np.percentile(x[sel], [25, 50, 75], axis=0)
        out[sel] = (x[sel] - mid) / np.maximum(high - low, 1e-6)
    return out


def rows_of(table, probs):
    return [{"lab": t["lab"], "kind": t["kind"] or None, "parent": t["parent"] or None, "label": int(t["label"]),
             "prob": float(p), "flagged": False} for t, p in zip(table, probs, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("bank", type=Path)
    parser.add_argument("--sheet", type=int, default=0)
    parser.add_argument("--per-lab", action="store_true",
                        help="standardise each feature within each laboratory (its median and interquartile range over all its "
                             "cells, labels unseen): sizes and textures relative to the laboratory's own cells")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    root = args.bank.parent
    table = list(csv.DictReader(args.bank.open()))
    cache = args.out / "features.csv"
    if cache.exists():
        matrix = np.array([[float(v) for v in row[-len(FEATURES):]] for row in list(csv.reader(cache.open()))[1:]])
    else:
        matrix = np.stack([features(np.asarray(Image.open(root / t["path"]).convert("RGB"))) for t in table])
        with cache.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", *FEATURES])
            for t, row in zip(table, matrix, strict=True):
                writer.writerow([t["path"], *(repr(float(v)) for v in row)])
    if args.sheet:
        draw_sheet(args.out / "sheet.png", root, table, args.sheet)
    ok = ~np.isnan(matrix).any(axis=1)
    labs = np.array([t["lab"] for t in table])
    labels = np.array([int(t["label"]) for t in table])
    groups = np.array([t["group"] for t in table])
    print(f"features measured on {ok.sum()} of {len(table)} cells; unmeasured by lab:",
          {lab: int((~ok & (labs == lab)).sum()) for lab in sorted(set(labs))})
    x = np.nan_to_num(matrix, nan=0.0)
    if args.per_lab:
        x = standardise_per_lab(x, labs)
    suffix = "-perlab" if args.per_lab else ""
    for lab in sorted(set(labs)):
        for y in (1, 0):
            sel = ok & (labs == lab) & (labels == y)
            if sel.any():
                med = np.median(matrix[sel], axis=0)
                print(f"  {lab:8s} {'blast ' if y else 'normal'} n={sel.sum():5d} " + " ".join(
                    f"{name[:10]}={v:.2f}" for name, v in zip(FEATURES, med, strict=True)))
    results = {}
    for held in sorted(set(labs)):
        test = labs == held
        results[held] = {}
        for name, model in classifiers().items():
            fit(model, x, labels, labs, (labs != held) & ok)
            probs = model.predict_proba(x[test])[:, 1]
            probs[~ok[test]] = 0.5
            figures = per_lab(rows_of([t for t, s in zip(table, test, strict=True) if s], probs))[held]
            results[held][name] = figures
            print(f"held out {held:8s} {name:9s} " + summary(figures))
    (args.out / f"lolo{suffix}.json").write_text(json.dumps(results, indent=1))
    incv = {}
    for name, model in classifiers().items():
        probs = np.full(len(table), 0.5)
        for train, test in StratifiedGroupKFold(5, shuffle=True, random_state=0).split(x, labels, groups):
            fit(model, x, labels, labs, np.isin(np.arange(len(x)), train) & ok)
            probs[test] = model.predict_proba(x[test])[:, 1]
        probs[~ok] = 0.5
        incv[name] = per_lab(rows_of(table, probs))
        for lab, figures in incv[name].items():
            print(f"5-fold CV {lab:8s} {name:9s} " + summary(figures))
    (args.out / f"incv{suffix}.json").write_text(json.dumps(incv, indent=1))


def summary(figures: dict) -> str:
    parts = []
    for unit in ("cells", "fields", "lymphocytes"):
        if unit not in figures:
            continue
        f = figures[unit]
        bits = [f"{k[:4]} {f[k]['value']:.3f}" for k in ("sensitivity", "specificity", "roc_auc") if k in f and f[k]["value"] is not None]
        parts.append(f"{unit}: " + ", ".join(bits))
    return "; ".join(parts)


def draw_sheet(path: Path, root: Path, table, per_lab_count: int) -> None:
    rng = np.random.default_rng(0)
    tiles = []
    for lab in sorted({t["lab"] for t in table}):
        for y in ("1", "0"):
            chosen = [t for t in table if t["lab"] == lab and t["label"] == y]
            if not chosen:
                continue
            row = []
            for i in rng.choice(len(chosen), min(per_lab_count, len(chosen)), replace=False):
                rgb = np.asarray(Image.open(root / chosen[i]["path"]).convert("RGB")).copy()
                nucleus, cell, _ = segment(rgb)
                rgb[ndi.binary_dilation(cell) & ~cell] = (0, 255, 0)
                rgb[ndi.binary_dilation(nucleus) & ~nucleus] = (255, 255, 0)
                row.append(rgb)
            row += [np.full_like(row[0], 255)] * (per_lab_count - len(row))
            tiles.append(np.concatenate(row, axis=1))
    Image.fromarray(np.concatenate(tiles, axis=0)).save(path)


if __name__ == "__main__":
    main()
