"""Cut labelled cell crops out of ALL-IDB1 photographs, to train the crop classifier for detection.

Every crop is a square of side ``crop_factor`` x the photograph's measured red-cell diameter
(:func:`.locate.locate_cells`), centred on a cell and resized to ``size`` pixels, so cells from
both ALL-IDB1 cameras appear at the same scale; detection cuts its crops the same way.

Labels, from ALL-IDB1's own annotations (never ALL-IDB2, whose crops come from these photographs):

* ``blast`` (label 1): every annotated blast centroid.
* ``other`` (label 0): an "other" centroid (ALL-IDB-Patches) with a located white cell within
  ``match_radius`` red-cell diameters. The "other" list also marks platelets; a platelet is far
  below the locator's smallest white cell (0.3 red-cell areas), has no located cell near it, and
  is left out (counted in the manifest's summary as ``platelets_dropped``).
* ``unannotated`` (label 0, optional): a located cell farther than ``unannotated_radius`` from every
  annotation. These are mostly smudge cells, which the annotations ignore but the locator finds;
  detection counts a blast call on them as a false positive, so the classifier sees them as
  negatives. A few may be intact cells the annotators skipped: label noise, kept small by the
  generous radius.

The manifest ``manifest.csv`` (path,label,group,kind,photo,x,y) loads with ``--format manifest``;
``group`` is the photograph, with exact duplicate photographs (Im093_0 == Im108_0) merged.
Beside it, ``cells.csv`` lists every located cell (photo, x, y, its :func:`.gate.gate_labels` label
and its :mod:`.features`), what the smudge gate (:mod:`.gate`) is trained on.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from scipy.spatial.distance import cdist
from tqdm.auto import tqdm

from leukodetect.data.duplicates import effective_groups
from leukodetect.data.records import Record
from leukodetect.detection.features import FEATURE_NAMES
from leukodetect.detection.gate import gate_labels
from leukodetect.detection.locate import LocateParams, locate_cells
from leukodetect.errors import BadImageError, LeukoError
from leukodetect.runtime.images import open_rgb, pixel_hash
from leukodetect.utils import write_csv, write_json

#: Crop side in red-cell diameters: a blast (up to ~2 d across) plus a ring of context.
DEFAULT_CROP_FACTOR = 3.0


@dataclass(frozen=True, kw_only=True)
class CropConfig:
    """How training crops are cut. Distances are in red-cell diameters."""

    crop_factor: float = DEFAULT_CROP_FACTOR
    size: int = 96
    match_radius: float = 0.75
    unannotated_radius: float = 1.0
    include_unannotated: bool = True


def crop_around(rgb: np.ndarray, x: float, y: float, side: float, size: int) -> np.ndarray:
    """A ``size`` x ``size`` crop of side ``side`` pixels centred on (x, y), reflect-padded at the edges."""
    half = side / 2
    x0, y0 = int(round(x - half)), int(round(y - half))
    x1, y1 = x0 + max(1, int(round(side))), y0 + max(1, int(round(side)))
    height, width = rgb.shape[:2]
    pad = (max(0, -y0), max(0, y1 - height), max(0, -x0), max(0, x1 - width))
    patch = rgb[max(0, y0):min(height, y1), max(0, x0):min(width, x1)]
    if any(pad):
        mode = cv2.BORDER_REFLECT_101 if min(patch.shape[:2]) > max(pad) else cv2.BORDER_REPLICATE
        patch = cv2.copyMakeBorder(patch, *pad, mode)
    interpolation = cv2.INTER_AREA if patch.shape[0] > size else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(patch), (size, size), interpolation=interpolation)


def label_points(record: Record, cells_xy: np.ndarray, rbc_diameter: float, cfg: CropConfig) -> list[tuple[str, int, float, float]]:
    """(kind, label, x, y) of every crop to cut from one photograph (see the module docstring)."""
    blasts = np.asarray(record.blasts or (), dtype=float).reshape(-1, 2)
    others = np.asarray(record.others or (), dtype=float).reshape(-1, 2)
    points = [("blast", 1, float(x), float(y)) for x, y in blasts]
    if len(others) and len(cells_xy):
        near = cdist(others, cells_xy).min(axis=1) <= cfg.match_radius * rbc_diameter
        points += [("other", 0, float(x), float(y)) for (x, y), keep in zip(others, near) if keep]
    if cfg.include_unannotated and len(cells_xy):
        annotated = np.concatenate([blasts, others])
        far = cdist(cells_xy, annotated).min(axis=1) > cfg.unannotated_radius * rbc_diameter if len(annotated) else np.ones(len(cells_xy), bool)
        points += [("unannotated", 0, float(x), float(y)) for (x, y), keep in zip(cells_xy, far) if keep]
    return points


def write_crops(
    records: Sequence[Record],
    out_dir: Path,
    cfg: CropConfig = CropConfig(),
    *,
    params: LocateParams = LocateParams(),
    progress: bool = False,
    log=print,
) -> Path:
    """Cut and save the crops of ALL-IDB1 ``records`` (with ``blasts``; ``others`` optional).

    Writes ``out_dir/crops/<photo>_<kind>_<i>.png``, ``out_dir/manifest.csv`` and
    ``out_dir/crops.json`` (the configuration, the per-photograph scale and the counts).
    ``out_dir`` must not hold a manifest already.

    Returns:
        The manifest path.
    """
    out_dir = Path(out_dir)
    manifest = out_dir / "manifest.csv"
    if manifest.exists():
        raise LeukoError(f"{manifest} already exists; choose another folder or delete it first.")
    if any(r.blasts is None for r in records):
        raise LeukoError("Crops need ALL-IDB1 photographs with blast annotations (xyc files); index the data as allidb1.")
    (out_dir / "crops").mkdir(parents=True, exist_ok=True)
    rows, photos, hashes, located = [], {}, {}, []
    dropped = 0
    for record in tqdm(records, desc="crops", disable=not progress):
        try:
            image = open_rgb(record.path)
        except BadImageError as exc:
            log(f"skipped: {exc}")
            hashes[record.path] = None
            continue
        rgb = np.asarray(image)
        hashes[record.path] = pixel_hash(image)
        loc = locate_cells(rgb, params)
        cells_xy = np.array([[c.x, c.y] for c in loc.cells], dtype=float).reshape(-1, 2)
        points = label_points(record, cells_xy, loc.rbc_diameter, cfg)
        # Without the "other" annotations an unannotated cell may be an intact white cell: no gate labels.
        gate = (np.full(len(cells_xy), -1) if record.others is None else
                gate_labels(cells_xy, record.blasts or (), record.others, loc.rbc_diameter, match=cfg.match_radius, far=cfg.unannotated_radius))
        located += [{"photo": record.path.stem, "x": x, "y": y, "gate_label": int(g), **dict(zip(FEATURE_NAMES, map(float, f)))}
                    for (x, y), g, f in zip(cells_xy, gate, loc.features)]
        dropped += len(record.others or ()) - sum(kind == "other" for kind, *_ in points)
        photos[record.path.stem] = {"rbc_diameter": loc.rbc_diameter, "cells": len(loc.cells), "crops": len(points)}
        side = cfg.crop_factor * loc.rbc_diameter
        for i, (kind, label, x, y) in enumerate(points):
            name = f"crops/{record.path.stem}_{kind}_{i:03d}.png"
            Image.fromarray(crop_around(rgb, x, y, side, cfg.size)).save(out_dir / name)
            rows.append({"path": name, "label": label, "photo": record.path.stem, "kind": kind, "x": round(x, 1), "y": round(y, 1), "_record": record})
    readable = [r for r in records if hashes.get(r.path) is not None]
    group_of = dict(zip((r.path.stem for r in readable), effective_groups(readable, hashes)))
    for row in rows:
        row.pop("_record")
    write_csv(out_dir / "cells.csv", located, ["photo", "x", "y", "gate_label", *FEATURE_NAMES])
    write_csv(manifest, [{**row, "group": group_of[row["photo"]]} for row in rows], ["path", "label", "group", "kind", "photo", "x", "y"])
    counts = {k: sum(r["kind"] == k for r in rows) for k in ("blast", "other", "unannotated")}
    write_json(out_dir / "crops.json", {
        "config": asdict(cfg), "locate": asdict(params), "counts": counts, "platelets_dropped": dropped,
        "groups": group_of, "photos": photos,
    })
    log(f"Wrote {len(rows)} crops ({counts['blast']} blast, {counts['other']} other, {counts['unannotated']} unannotated; "
        f"{dropped} 'other' points without a located cell, platelets, left out) and {manifest}.")
    return manifest


def crop_records(manifest: Path, photos: set[str]) -> list[Record]:
    """The manifest's crops of the given photographs (by stem), as training records."""
    with Path(manifest).open(newline="", encoding="utf-8") as handle:
        return [
            Record(path=Path(manifest).parent / row["path"], label=int(row["label"]), group=row["group"])
            for row in csv.DictReader(handle) if row["photo"] in photos
        ]


def located_cells(crops_dir: Path, photos: set[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Features, gate labels, photographs and centroids (x, y) of the located cells of ``photos`` (from ``cells.csv``)."""
    path = Path(crops_dir) / "cells.csv"
    if not path.is_file():
        raise LeukoError(f"{path} is missing (crops written by an older leukodetect): delete {Path(crops_dir)} and run again.")
    with path.open(newline="", encoding="utf-8") as handle:
        rows = [row for row in csv.DictReader(handle) if row["photo"] in photos]
    features = np.array([[float(row[name]) for name in FEATURE_NAMES] for row in rows], dtype=np.float32).reshape(-1, len(FEATURE_NAMES))
    xy = np.array([[float(row["x"]), float(row["y"])] for row in rows], dtype=float).reshape(-1, 2)
    return features, np.array([int(row["gate_label"]) for row in rows], dtype=int), np.array([row["photo"] for row in rows]), xy
