"""``leukodetect train-locator`` and ``locator-eval``: the learned white-cell locator, trained and measured per laboratory.

Sources are ``LAB=PATH[:FORMAT]`` as everywhere (:class:`~leukodetect.jobs.cells.LabSource`). What each
layout gives as white-cell positions:

- ``allidb1``: every white cell on the ten photographs with white-cell masks (Loddo & Putzu; trained on
  the centroid of each clump of touching cells, :func:`_points`, and scored against each cell,
  :func:`~leukodetect.detection.match.mask_cells`), the blasts only on the other ALL photographs (their ``xyc`` files;
  a normal white cell there is unannotated), nothing on the healthy ones (tested as how many cells are
  found). On the photographs without every white cell annotated, the objects the colour locator finds
  away from the annotated blasts (normal white cells, smudges) are left out of the training loss
  (:func:`unannotated_objects`, ``LocatorRecipe.ignore_radius``) instead of being taught as background,
  and the rest of the photograph is background: so the healthy photographs train too. Taught as
  background, those cells had cost the locator most of the white cells of a laboratory it never saw
  (BCCD held out: recall 0.67 -> 0.92, docs/detection.md, 2026-12-07). ALL-IDB-Patches' ``other``
  centroids are not used: they mark platelets and debris, not white cells;
- ``bccd``: the centres of the white-cell boxes on 364 fields: trains and tests;
- ``pbc``: single-cell crops of a normal white cell, centred: one white cell at the centre, trains and
  tests (platelet and erythroblast crops are left out: they are not white cells). A third laboratory of
  positions: trained beside ALL-IDB1 alone, it took the recall on BCCD, never seen, from 0.29 to 0.75
  (docs/detection.md, 2026-12-06);
- ``aria``: fields without positions: tests only, as the share of fields in which at least one white
  cell is found (every Aria field holds white cells) and the number found per field.

``locator-eval`` trains one locator per fold (k folds over the pooled photographs of the training
layouts, then each training laboratory held out in turn) and scores every test photograph once per
fold plan, beside the colour locator (:func:`~leukodetect.detection.locate.locate_cells`) on the same
photographs. A found cell matches an annotated one within half the photograph's red-cell diameter
(one to one, :func:`~leukodetect.detection.match.match_points`); where the white cells are drawn as
boxes (BCCD), the report also counts a found cell inside a box as found (one to one,
:func:`~leukodetect.detection.match.match_points_to_boxes`), the criterion issue 20 names for BCCD.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
from scipy.spatial.distance import cdist
from skimage.measure import label, regionprops
from tqdm.auto import tqdm

from leukodetect.data.duplicates import split_groups
from leukodetect.data.indexers import detect_format, find_masks, index_dataset, mask_regions
from leukodetect.data.records import Record
from leukodetect.data.split import kfold_indices
from leukodetect.detection.locate import LocateParams, locate_cells
from leukodetect.detection.match import mask_cells, match_points, match_points_to_boxes, match_to_regions
from leukodetect.errors import LeukoError
from leukodetect.evaluation.intervals import wilson_interval
from leukodetect.jobs.cells import LabSource
from leukodetect.reporting.render import Section, render_markdown
from leukodetect.runtime.images import open_rgb
from leukodetect.runtime.locator import LocatorSettings, WhiteCellLocator
from leukodetect.training.locator import (
    LocatorRecipe,
    Smear,
    Marks,
    canonical_smear,
    fit_locator,
)
from leukodetect.utils import write_json

DEFAULT_RECIPE = LocatorRecipe()
DEFAULT_SETTINGS = LocatorSettings()
#: Layouts with white-cell positions to train on.
TRAINABLE = ("allidb1", "bccd", "pbc")
#: PBC crop types that are white cells.
PBC_WHITE = {"lymphocyte", "neutrophil", "monocyte", "eosinophil", "basophil", "ig"}


def _points(record, fmt: str, regions: np.ndarray | None = None) -> tuple[tuple, str]:
    """A photograph's white-cell centres to train on and how complete they are ("all", "blasts", "none"); ``regions``,
    its mask's label image where it has one (:func:`~leukodetect.data.indexers.mask_regions`: one region per cell).

    On a masked photograph the centres are those of its clumps, touching cells taken together (connected through
    corners: 106 on the ten photographs, for 152 cells), as the shipped locator was trained. Trained on each cell's
    own centre instead, the locator was measured twice (docs/detection.md, "Touching cells in ALL-IDB1's masks": on
    the distance-transform peaks of each clump, and on the 152 cells' centroids) and found fewer cells both times:
    BCCD held out, 0.954 and 0.965 of its boxes against 0.978; ALL-IDB1's blasts in the pooled folds, 0.980 and 0.973
    against 0.985.
    """
    if fmt == "allidb1":
        if regions is not None:
            return tuple((r.centroid[1], r.centroid[0]) for r in regionprops(label(regions > 0, connectivity=2))), "all"
        if record.label == 1:
            return tuple(record.blasts or ()), "blasts"
        return (), "none"
    if fmt == "bccd":
        return tuple(record.cells or ()), "all"
    return (), "none"


def unannotated_objects(rgb: np.ndarray, points, *, near: float = 1.0) -> np.ndarray:
    """Centres (pixels of the photograph ``rgb``) of the objects the colour locator finds that lie farther than ``near``
    red-cell diameters from every annotated centre: on a photograph whose blasts alone carry positions, its normal
    white cells (and smudges), which training leaves out of the loss instead of teaching them as background."""
    found = locate_cells(rgb, LocateParams())
    xy = np.array([(c.x, c.y) for c in found.cells], dtype=np.float32).reshape(-1, 2)
    pts = np.asarray(points, dtype=np.float32).reshape(-1, 2)
    if len(xy) and len(pts):
        xy = xy[cdist(xy, pts).min(axis=1) > near * found.rbc_diameter]
    return xy


def load_smears(sources: Sequence[LabSource], rbc_px: float, *, every: int = 1, log=print, progress=False) -> tuple[list[Smear], list[str]]:
    """Every photograph of every source, measured and resampled; and a sentence per one left out.

    ``every`` keeps every n-th image of the PBC and Aria layouts, which are large. A source's declared red-cell
    diameter (``LAB=PATH@PIXELS``) scales each of its images instead of the one measured on it.
    """
    smears, skipped = [], []
    for source in sources:
        fmt = source.format if source.format != "auto" else detect_format(source.path)
        records = index_dataset(source.path, fmt)
        if fmt == "pbc":
            records = [r for r in records if (r.kind or "").lower() in PBC_WHITE][::every]
        elif fmt == "aria":
            records = records[::every]
        elif fmt not in TRAINABLE:
            raise LeukoError(f"--data {source}: the {fmt} layout gives no white-cell positions; the locator takes "
                             "allidb1, bccd and pbc (train and test) and aria (test only).")
        masks = find_masks(source.path) if fmt == "allidb1" else None
        for record in tqdm(records, desc=f"reading {source.lab}", disable=not progress, leave=False):
            regions = mask_regions(masks, record.path.stem) if fmt == "allidb1" else None
            points, annotated = _points(record, fmt, regions)
            try:
                if fmt == "pbc":  # one white cell, at the centre of the crop
                    points, annotated = None, "all"
                # ALL-IDB1's ALL photographs annotate their blasts alone, its healthy ones nothing: every other object the
                # colour locator finds there is left out of the loss, and the rest of the photograph is background.
                rgb = ignore = None
                if fmt == "allidb1" and annotated != "all":
                    rgb = np.asarray(open_rgb(record.path))  # read once, for both
                    ignore = unannotated_objects(rgb, points)
                scored = mask_cells(regions) if regions is not None else None
                marks = Marks(points=points, annotated=annotated, ignore=ignore, boxes=record.boxes, regions=regions, scored=scored)
                smear = canonical_smear(record.path, source.lab, marks, rbc_px, name=f"{source.lab}:{record.group}", layout=fmt,
                                        rgb=rgb, declared=source.rbc_diameter)
            except LeukoError as exc:
                smear = str(exc)
            if isinstance(smear, str):
                skipped.append(f"{source.lab}: {smear}")
                continue
            smears.append(smear)
        log(f"{source.lab}: {sum(s.lab == source.lab for s in smears)} photographs ({fmt}), "
            f"{sum(x.startswith(source.lab + ':') for x in skipped)} left out")
    return smears, skipped


def found_points(locator: WhiteCellLocator | None, smear: Smear, params: LocateParams | None = None) -> np.ndarray:
    """Centres found, in canonical pixels: the learned locator on the canonical image, or the colour locator on the photograph."""
    if locator is not None:
        return np.array([(x, y) for x, y, _ in locator.locate(smear.image, locator.settings.rbc_px)]).reshape(-1, 2)
    cells = locate_cells(np.asarray(open_rgb(smear.path)), params or LocateParams()).cells
    return np.array([(c.x, c.y) for c in cells]).reshape(-1, 2) * smear.factor


def score_smear(found: np.ndarray, smear: Smear, rbc_px: float) -> dict:
    """TP, FP, FN of one photograph (radius half a red cell; against :attr:`Smear.scored` where it has them), or the
    count found where positions are unknown; where the white cells are drawn as boxes (BCCD), also ``box_tp``,
    ``box_fp``, ``box_fn``: a found cell inside a box; as masks (ALL-IDB1), ``mask_tp``, ``mask_fp``, ``mask_fn`` and
    ``mask_extra`` (:func:`~leukodetect.detection.match.match_to_regions`)."""
    row = {"name": smear.name, "lab": smear.lab, "annotated": smear.annotated, "found": len(found)}
    if smear.annotated != "none":
        m = match_points(found, smear.points if smear.scored is None else smear.scored, 0.5 * rbc_px)
        row.update(tp=m.tp, fp=m.fp, fn=m.fn)
    if smear.boxes is not None:
        m = match_points_to_boxes(found, smear.boxes)
        row.update(box_tp=m.tp, box_fp=m.fp, box_fn=m.fn)
    if smear.regions is not None:
        m = match_to_regions(found, smear.regions)
        row.update(mask_tp=m["tp"], mask_fp=m["fp"], mask_fn=m["fn"], mask_extra=m["extra"])
    return row


def summarise(rows: list[dict]) -> dict:
    """Per laboratory: recall and precision with Wilson intervals where every white cell is annotated, blast
    recall where only blasts are, and the share of photographs with a cell found where none is; where white cells are
    drawn as boxes or masks, recall and precision by them too (a found cell inside one; for masks, a second cell found
    inside a region already hit is ``mask_extra``, not a false one)."""
    out = {}
    for lab in sorted({r["lab"] for r in rows}):
        mine = [r for r in rows if r["lab"] == lab]
        entry: dict = {"photographs": len(mine), "found_per_photograph": float(np.median([r["found"] for r in mine]))}
        full = [r for r in mine if r["annotated"] == "all"]
        if full:
            tp, fp, fn = (sum(r[k] for r in full) for k in ("tp", "fp", "fn"))
            entry.update(annotated_photographs=len(full), recall=_share(tp, tp + fn), precision=_share(tp, tp + fp))
        boxed = [r for r in mine if "box_tp" in r]
        if boxed:
            tp, fp, fn = (sum(r[k] for r in boxed) for k in ("box_tp", "box_fp", "box_fn"))
            entry.update(box_recall=_share(tp, tp + fn), box_precision=_share(tp, tp + fp))
        masked = [r for r in mine if "mask_tp" in r]
        if masked:
            tp, fp, fn, extra = (sum(r[k] for r in masked) for k in ("mask_tp", "mask_fp", "mask_fn", "mask_extra"))
            entry.update(mask_recall=_share(tp, tp + fn), mask_precision=_share(tp, tp + fp), mask_extra=extra)
        blasts = [r for r in mine if r["annotated"] == "blasts"]
        if blasts:
            tp, fn = (sum(r[k] for r in blasts) for k in ("tp", "fn"))
            entry["blast_recall"] = _share(tp, tp + fn)
        bare = [r for r in mine if r["annotated"] == "none"]
        if bare:
            entry["unannotated_with_a_cell"] = _share(sum(r["found"] > 0 for r in bare), len(bare))
            entry["unannotated_found_median"] = float(np.median([r["found"] for r in bare]))
        out[lab] = entry
    return out


def _share(k: int, n: int) -> dict:
    low, high = wilson_interval(k, n)
    return {"value": k / n if n else None, "k": k, "n": n, "low": low, "high": high}


def plan_folds(smears: list[Smear], folds: int, seed: int) -> list[dict]:
    """Pooled k folds over the positioned photographs, then each training laboratory held out."""
    train_idx = [i for i, s in enumerate(smears) if s.layout in TRAINABLE]
    test_only = [i for i, s in enumerate(smears) if s.layout not in TRAINABLE]
    trainable = {i for i in train_idx if smears[i].trainable}
    groups = content_groups([smears[i].path for i in train_idx])
    labs = sorted({smears[i].lab for i in train_idx})
    strata = [labs.index(smears[i].lab) for i in train_idx]  # stratified by laboratory
    plans = []
    for k, (tr, te) in enumerate(kfold_indices(strata, groups, folds=folds, seed=seed)):
        plans.append({"name": f"pooled-fold{k + 1}", "train": [train_idx[i] for i in tr if train_idx[i] in trainable],
                      "test": [train_idx[i] for i in te]})
    if len(labs) > 1:
        for lab in labs:
            plans.append({"name": f"held-out-{lab}", "train": [i for i in trainable if smears[i].lab != lab],
                          "test": [i for i in train_idx if smears[i].lab == lab] + test_only})
    return plans


def run_locator_eval(sources: Sequence[LabSource], out_dir: Path, *, folds: int = 3, recipe: LocatorRecipe = DEFAULT_RECIPE,
                     settings: LocatorSettings = DEFAULT_SETTINGS, every: int = 1, colour_baseline: bool = True,
                     log=print, progress=False) -> dict:
    """Train and score the locator fold by fold; resumable (a finished fold's rows are kept in ``out_dir``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    smears, skipped = load_smears(sources, settings.rbc_px, every=every, log=log, progress=progress)
    plans = plan_folds(smears, folds, recipe.seed)
    results = {}
    for plan in plans:
        done = out_dir / plan["name"] / "rows.json"
        if done.is_file():
            results[plan["name"]] = json.loads(done.read_text())
            log(f"{plan['name']}: already done, kept")
            continue
        t0 = time.perf_counter()
        log(f"{plan['name']}: training on {len(plan['train'])} photographs, testing {len(plan['test'])}")
        locator = fit_locator([smears[i] for i in plan["train"]], recipe, settings, log=log)
        locator.save(out_dir / plan["name"] / "locator.safetensors")
        learned = [score_smear(found_points(locator, smears[i]), smears[i], settings.rbc_px) for i in plan["test"]]
        entry = {"learned": learned, "seconds": round(time.perf_counter() - t0, 1)}
        if colour_baseline:
            entry["colour"] = [score_smear(found_points(None, smears[i]), smears[i], settings.rbc_px) for i in plan["test"]]
        write_json(done, entry)
        results[plan["name"]] = entry
    table = {}
    pooled = [p["name"] for p in plans if p["name"].startswith("pooled")]
    table["pooled"] = {m: summarise([r for n in pooled for r in results[n][m]]) for m in ("learned", "colour") if m in results[pooled[0]]}
    for plan in plans:
        if plan["name"].startswith("held-out"):
            table[plan["name"]] = {m: summarise(results[plan["name"]][m]) for m in ("learned", "colour") if m in results[plan["name"]]}
    summary = {"sources": [str(s) for s in sources], "folds": folds, "recipe": asdict(recipe), "settings": asdict(settings),
               "skipped": skipped, "table": table,
               "scale_sources": {lab: dict(Counter(s.scale_source for s in smears if s.lab == lab))
                                 for lab in sorted({s.lab for s in smears})}}
    write_json(out_dir / "locator_eval.json", summary)
    (out_dir / "report.md").write_text(report_markdown(summary), encoding="utf-8")
    return summary


def content_groups(paths: Sequence[Path]) -> list[str]:
    """A split group per photograph, by the rule every split of the project follows (data/duplicates.py).

    Photographs with identical pixels (ALL-IDB1's Im093_0 and Im108_0) and near-duplicates (BCCD's
    BloodImage_00037 and its re-capture) share a group, whatever their file names or encodings.
    """
    return split_groups([Record(path=Path(p), label=None, group=str(p)) for p in paths], near_duplicates=True)


def _cell(entry: dict | None) -> str:
    if not entry or entry.get("value") is None:
        return "-"
    return f"{entry['value']:.3f} ({entry['k']}/{entry['n']}; {entry['low']:.3f}-{entry['high']:.3f})"


def report_markdown(summary: dict) -> str:
    """One table per fold plan: per laboratory, learned and colour locator side by side."""
    header = ("locator", "lab", "photographs", "recall (all cells annotated)", "precision (same)", "blast recall",
              "unannotated: share with a cell found", "median found", "inside the boxes: recall", "precision (same)",
              "inside the masks: recall", "precision (same)")
    sections = []
    for plan, methods in summary["table"].items():
        rows = [(method, lab, e["photographs"], _cell(e.get("recall")), _cell(e.get("precision")), _cell(e.get("blast_recall")),
                 _cell(e.get("unannotated_with_a_cell")), f"{e['found_per_photograph']:g}", _cell(e.get("box_recall")),
                 _cell(e.get("box_precision")), _cell(e.get("mask_recall")), _cell(e.get("mask_precision")))
                for method, labs in methods.items() for lab, e in labs.items()]
        sections.append(Section(plan, tables=[(None, header, rows)]))
    if summary["skipped"]:
        sections.append(Section("Left out", paragraphs=[f"{len(summary['skipped'])} photographs: " + "; ".join(summary["skipped"][:10])]))
    return render_markdown("White-cell locator, per laboratory", sections)


def run_train_locator(sources: Sequence[LabSource], out: Path, *, recipe: LocatorRecipe = DEFAULT_RECIPE,
                      settings: LocatorSettings = DEFAULT_SETTINGS, log=print, progress=False) -> Path:
    """Train one locator on every positioned photograph of ``sources`` and write it to ``out``."""
    if out.exists():
        raise LeukoError(f"{out} exists; choose a new file name (nothing is overwritten).")
    smears, skipped = load_smears(sources, settings.rbc_px, log=log, progress=progress)
    train = [s for s in smears if s.layout in TRAINABLE and s.trainable]
    for line in skipped:
        log(line)
    locator = fit_locator(train, recipe, settings, log=log)
    return locator.save(out)
