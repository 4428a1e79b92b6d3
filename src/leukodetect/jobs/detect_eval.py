"""Evaluate whole-smear detection on ALL-IDB1: localisation, cell detection and photograph verdicts.

``run_detect_eval`` splits the photographs into folds (stratified by photograph label, whole
groups, the duplicate Im093_0 == Im108_0 kept together); for each fold it trains the crop
classifier on crops of the training photographs only (:mod:`.crops`) and runs the full pipeline on
the held-out photographs. With ``locate_only`` no classifier is trained and only localisation is
scored, on every photograph.

Definitions (all radii in red-cell diameters d measured on the photograph itself):

* blast localisation recall: annotated blasts with a located cell (any call) within 0.5 d,
  one-to-one (Hungarian assignment);
* white-cell localisation (Im001_1..Im010_1, whose masks exist): a located centroid inside a mask
  region hits it, each region counts once; recall = regions hit / regions; precision = located
  cells inside some region / located cells (a second cell inside a region already hit is ``extra``,
  not a false positive: a region may hold touching cells). Regions are connected through their
  sides (the masks draw touching cells apart, meeting at corners: 152 regions, 152 cells); and
  against each cell of the masks (:func:`~leukodetect.detection.match.mask_cells`), one to one
  within 0.5 d, as ``locator-eval`` scores them (``cell_recall``, ``cell_precision``). With the smudge gate
  (:mod:`.gate`), the cells it calls smudge are not white cells: they are left out of these
  figures, which are also reported for every located cell (``before_gate``);
* blast detection: cells called blast vs annotated blasts within 0.5 d, one-to-one; a blast call on
  anything else (smudge cells included) is a false positive; blast flagging: the same with the
  cells called blast or review (what a person reviewing the analyser's flags is shown);
* photograph level: positive = ALL; ``review`` verdicts are counted as ALL (a smear flagged for
  review goes to a person), and also reported on their own.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from leukodetect.config import RunConfig
from leukodetect.data.indexers import find_masks, index_dataset, mask_regions
from leukodetect.data.split import holdout_indices, kfold_indices
from leukodetect.detection.crops import (
    CropConfig,
    crop_records,
    located_cells,
    write_crops,
)
from leukodetect.detection.gate import fit_gate
from leukodetect.detection.locate import LocateParams
from leukodetect.detection.match import detection_scores, mask_cells, match_points, match_to_regions
from leukodetect.detection.pipeline import EDGE_MARGIN, VerdictRule, analyze
from leukodetect.detection.scorer import (
    CellScorer,
    blast_labels,
    fit_scorer,
    white_density,
)
from leukodetect.errors import BadImageError, LeukoError
from leukodetect.evaluation.intervals import proportion
from leukodetect.jobs.cells import LabSource
from leukodetect.jobs.locator import load_smears
from leukodetect.runtime.checkpoint import (
    DetectorSettings,
    load_checkpoint,
    save_checkpoint,
)
from leukodetect.runtime.classifier import Classifier
from leukodetect.runtime.images import open_rgb
from leukodetect.runtime.locator import LocatorSettings, WhiteCellLocator
from leukodetect.training.fit import train_model
from leukodetect.training.locator import LocatorRecipe, fit_locator
from leukodetect.utils import (
    atomic_write_text,
    environment_facts,
    write_csv,
    write_json,
)



@dataclass(kw_only=True)
class DetectEvalConfig:
    """Settings of ``leukodetect detect-eval`` and ``train-detector``.

    The defaults are the shipped detector's recipe (``weights/DETECTOR_CARD.md``), so that
    ``detect-eval`` with no options evaluates the detector ``detect`` uses. Training crops are cut at
    the crop classifier's input size (``crop.size`` follows ``image_size``), as ``detect`` cuts them.
    """

    folds: int = 5
    seed: int = 0
    arch: str = "googlenet"
    epochs: int = 30
    image_size: int = 96
    batch_size: int = 32
    lr: float = 1e-3
    # Share of the training photographs held out to choose the crop classifier's epoch; 0: none, every
    # training photograph's crops train and the last epoch is kept.
    val_fraction: float = 0.0
    label_smoothing: float = 0.0
    radius: float = 0.5
    review_band: tuple[float, float] = (0.3, 0.7)
    min_blasts: int = 1
    # A blast-like cell centred this near the frame (red-cell diameters) is called review (pipeline.EDGE_MARGIN).
    edge_margin: float = EDGE_MARGIN
    locate_only: bool = False
    smudge_gate: bool = True
    gate_keep: float = 0.99
    cell_scorer: bool = True
    # The scorer also weighs the photograph's white-cell density (scorer.CONTEXT). Off by default: it buys
    # specificity with sensitivity (ALL photographs with few white cells), see docs/detection.md.
    photo_context: bool = False
    crop: CropConfig = field(default_factory=lambda: CropConfig(crop_factor=2.0))
    locate: LocateParams = field(default_factory=LocateParams)
    # How the held-out photographs' white cells are found: "colour" (the thresholds of ``locate``), or
    # "learned": a locator (:mod:`leukodetect.runtime.locator`) trained in each fold on that fold's training
    # photographs, and on ``locator_data``'s (LAB=PATH, e.g. BCCD), never on its held-out ones.
    locator: str = "colour"
    locator_data: tuple[str, ...] = ()
    locator_iterations: int = 2000

    def __post_init__(self):
        # Crops are written at the size the classifier reads them: a larger input then sees more of the cell,
        # not an upsampled copy, and training sees what ``detect`` will show it.
        self.crop = replace(self.crop, size=self.image_size)
        self.locator_data = tuple(self.locator_data or ())
        if self.locator not in ("colour", "learned"):
            raise LeukoError(f"--locator {self.locator!r}: choose learned or colour.")
        if self.locator_data and self.locator != "learned":
            raise LeukoError("--locator-data trains the learned locator of each fold: add --locator learned, or drop --locator-data.")
        if self.locator == "learned" and self.locate_only:
            raise LeukoError("--locate-only with --locator learned is what 'leukodetect locator-eval' measures, fold by fold: use it.")


def photo_row(record, result: dict, masks: Path | None, radius: float) -> dict:
    """Per-photograph scores from one pipeline result (see the module docstring)."""
    d = result["rbc_diameter"]
    cells = result["cells"]
    xy = [(c["x"], c["y"]) for c in cells]
    blasts = list(record.blasts or ())
    loc = match_points(xy, blasts, radius * d)
    called = [(c["x"], c["y"]) for c in cells if c["call"] == "blast"]
    det = match_points(called, blasts, radius * d)
    # As an analyser is used, a person sees the review cells too: blast or review calls are "flagged".
    flag = match_points([(c["x"], c["y"]) for c in cells if c["call"] in ("blast", "review")], blasts, radius * d)
    row = {
        "photo": record.path.stem, "label": record.label, "group": record.group, "width": result["width"],
        "rbc_diameter": d, "n_cells": result["n_cells"], "n_annotated_blasts": len(blasts),
        "blast_loc_tp": loc.tp, "blast_det_tp": det.tp, "blast_det_fp": det.fp, "blast_det_fn": det.fn,
        "blast_flag_tp": flag.tp, "blast_flag_fp": flag.fp, "blast_flag_fn": flag.fn,
        "n_blast": result["n_blast"], "n_review": result["n_review"], "verdict": result["verdict"],
        "seconds": result["timing"]["total_s"] + result.get("read_s", 0.0),
    }
    row["cells"] = cell_rows(cells, loc, record.others, radius * d)
    row["n_smudge"] = result.get("n_smudge", 0)
    regions = mask_regions(masks, record.path.stem)
    if regions is not None:
        each = mask_cells(regions)
        row["mask"] = mask_scores([(c["x"], c["y"]) for c in cells if c["call"] != "smudge"], regions, each, radius * d)
        row["mask_before_gate"] = mask_scores(xy, regions, each, radius * d)
    return row


def mask_scores(found, regions: np.ndarray, cells, radius: float) -> dict[str, int]:
    """A masked photograph's found cells scored both ways: inside the mask's regions (:func:`match_to_regions`: each
    region once, a second cell in it ``extra``) and against each of its cells (``cells``, from :func:`mask_cells`, which
    splits a region holding touching cells), one to one within ``radius`` (``cell_tp``, ``cell_fp``, ``cell_fn``, ``cells``), as
    ``locator-eval`` scores the learned locator."""
    each = match_points(found, cells, radius)
    return match_to_regions(found, regions) | {"cell_tp": each.tp, "cell_fp": each.fp, "cell_fn": each.fn, "cells": len(cells)}


def cell_rows(cells: list[dict], blast_matching, others, radius: float) -> list[dict]:
    """One record per located cell: where it is, what the pipeline said, and what it was annotated as.

    ``annotated`` is ``blast`` when the cell is paired with an annotated blast (the one-to-one
    matching of the localisation recall), else ``other`` when it lies within ``radius`` of an
    annotated other object (one-to-one among the remaining cells), ``none`` when neither, and
    ``unknown`` where the photograph has no "other" annotations (so "none" cannot be told).
    """
    blast_of = dict(blast_matching.pairs)
    rest = [i for i in range(len(cells)) if i not in blast_of]
    other_hits: set[int] = set()
    if others:
        other = match_points([(cells[i]["x"], cells[i]["y"]) for i in rest], list(others), radius)
        other_hits = {rest[j] for j, _ in other.pairs}
    out = []
    for i, c in enumerate(cells):
        annotated = "blast" if i in blast_of else "other" if i in other_hits else "none" if others is not None else "unknown"
        out.append({"x": c["x"], "y": c["y"], "prob_blast": c.get("prob_blast"), "p_white_cell": c.get("p_white_cell"),
                    "call": c["call"], "annotated": annotated} | ({"prob_crop": c["prob_crop"]} if "prob_crop" in c else {}))
    return out


def _white_cells(masked: list[dict]) -> dict:
    inside = sum(m["tp"] + m["extra"] for m in masked)
    tp, fp, fn = (sum(m[f"cell_{k}"] for m in masked) for k in ("tp", "fp", "fn"))
    return {
        "photographs": len(masked),
        "recall": proportion(sum(m["tp"] for m in masked), sum(m["regions"] for m in masked)),
        "precision": proportion(inside, sum(m["detections"] for m in masked)),
        "extra_in_merged_regions": sum(m["extra"] for m in masked),
        "cells": sum(m["cells"] for m in masked),
        "cell_recall": proportion(tp, tp + fn),
        "cell_precision": proportion(tp, tp + fp),
    }


def _blast_counts(rows: list[dict], prefix: str) -> dict:
    tp, fp, fn = (sum(r[f"{prefix}_{k}"] for r in rows) for k in ("tp", "fp", "fn"))
    return {"tp": tp, "fp": fp, "fn": fn, **detection_scores(tp, fp, fn), "recall_ci": proportion(tp, tp + fn), "precision_ci": proportion(tp, tp + fp)}


def aggregate(rows: list[dict], *, classified: bool) -> dict:
    """Pool per-photograph rows into the metrics of ``metrics.json``."""
    n_blasts = sum(r["n_annotated_blasts"] for r in rows)
    seconds = np.array([r["seconds"] for r in rows])
    out = {
        "photographs": len(rows),
        "blast_localisation_recall": proportion(sum(r["blast_loc_tp"] for r in rows), n_blasts),
        "seconds_per_photograph": {"median": float(np.median(seconds)), "mean": float(seconds.mean()), "max": float(seconds.max())},
    }
    masked = [r["mask"] for r in rows if "mask" in r]
    if masked:
        out["white_cell_localisation"] = _white_cells(masked)
        if any(r.get("n_smudge") for r in rows):
            out["white_cell_localisation"]["before_gate"] = _white_cells([r["mask_before_gate"] for r in rows if "mask" in r])
    out["smudge_calls"] = sum(r.get("n_smudge", 0) for r in rows)
    if classified:
        out["blast_detection"] = _blast_counts(rows, "blast_det")
        if all("blast_flag_tp" in r for r in rows):  # rows of folds finished before this figure existed lack it
            out["blast_flagging"] = _blast_counts(rows, "blast_flag")
        pos = [r for r in rows if r["label"] == 1]
        neg = [r for r in rows if r["label"] == 0]
        flagged = lambda r: r["verdict"] in ("ALL", "review")  # noqa: E731
        out["photograph"] = {
            "review_counted_as": "ALL",
            "accuracy": proportion(sum(flagged(r) == (r["label"] == 1) for r in rows), len(rows)),
            "sensitivity": proportion(sum(flagged(r) for r in pos), len(pos)),
            "specificity": proportion(sum(not flagged(r) for r in neg), len(neg)),
            "verdicts": {v: {"ALL_photographs": sum(r["verdict"] == v for r in pos), "healthy_photographs": sum(r["verdict"] == v for r in neg)}
                         for v in ("ALL", "review", "healthy")},
        }
        # As an analyser is used: the photographs it decides on its own, and how many it leaves to a person.
        decided = [r for r in rows if r["verdict"] != "review"]
        out["photograph"]["decided_accuracy"] = proportion(sum((r["verdict"] == "ALL") == (r["label"] == 1) for r in decided), len(decided))
        out["photograph"]["review_share"] = proportion(len(rows) - len(decided), len(rows))
    return out


def _train_fold(cfg: DetectEvalConfig, manifest: Path, train_photos: list, fold_dir: Path, progress: bool, log):
    """Train the crop classifier on the training photographs' crops; return its best checkpoint's path."""

    labels = np.array([r.label for r in train_photos])
    groups = np.array([r.group for r in train_photos])
    tr, va = holdout_indices(labels, groups, fraction=cfg.val_fraction, seed=cfg.seed)
    run = RunConfig()
    run.data.path, run.data.format, run.data.image_size = str(manifest), "manifest", cfg.image_size
    run.data.val_fraction = cfg.val_fraction  # so the checkpoint's stored config says how the epoch was chosen
    run.model.arch = cfg.arch
    run.train.epochs, run.train.batch_size, run.train.lr, run.train.seed = cfg.epochs, cfg.batch_size, cfg.lr, cfg.seed
    run.train.label_smoothing = cfg.label_smoothing
    run.validate()
    stems = lambda idx: {train_photos[i].path.stem for i in idx}  # noqa: E731
    train_crops, val_crops = crop_records(manifest, stems(tr)), crop_records(manifest, stems(va))
    log(f"  training on {len(train_crops)} crops of {len(tr)} photographs, validating on {len(val_crops)} crops of {len(va)}.")
    # An interrupted fold continues from its last finished epoch when the command is run again.
    resume = (fold_dir / "model" / "last.pt").exists()
    result = train_model(run, train_crops, val_crops, fold_dir / "model", resume=resume, progress=progress, log=log)
    bundle = load_checkpoint(result.best_path)
    # The scale travels with the checkpoint: detection crops at the scale it was trained on.
    settings = DetectorSettings(crop_factor=cfg.crop.crop_factor, crop_size=cfg.crop.size, locate=asdict(cfg.locate))
    features, gate_y, photos, xy = located_cells(manifest.parent, {r.path.stem for r in train_photos})
    gate = None
    if cfg.smudge_gate:
        try:
            gate = fit_gate(features, gate_y, photos, keep=cfg.gate_keep, seed=cfg.seed)
        except LeukoError as exc:
            log(f"  no smudge gate: {exc}")
        else:
            settings = replace(settings, gate=gate.to_dict())
            log(f"  smudge gate trained on {int((gate_y >= 0).sum())} located cells of {len(train_photos)} photographs.")
    if cfg.cell_scorer:
        scorer = fit_cell_scorer(manifest.parent, train_photos, features, photos, xy, gate, cfg.radius, log, context=cfg.photo_context)
        if scorer is not None:
            settings = replace(settings, scorer=scorer.to_dict())
    bundle["detection"] = settings.to_dict()
    save_checkpoint(bundle, result.best_path)
    return result.best_path


def fit_cell_scorer(crops_dir: Path, train_photos: list, features, photos, xy, gate, radius: float, log,
                    *, context: bool = False) -> CellScorer | None:
    """Fit the cell scorer on the training photographs' located cells (those the gate keeps); None where it cannot be.

    With ``context`` it also weighs each photograph's white-cell density, counted as ``analyze`` counts it.
    """
    diameters = json.loads((crops_dir / "crops.json").read_text())["photos"]
    labels = np.zeros(len(xy), dtype=int)
    keep = gate.is_cell(features) if gate is not None else np.ones(len(labels), bool)
    density = np.zeros(len(xy))
    for record in train_photos:
        stem = record.path.stem
        rows = np.flatnonzero(photos == stem)
        if len(rows) and stem in diameters:
            d = diameters[stem]["rbc_diameter"]
            labels[rows] = blast_labels(xy[rows], record.blasts or (), radius * d)
            if context:
                with Image.open(record.path) as image:  # the header only: the size
                    density[rows] = white_density(int(keep[rows].sum()), *image.size, d)
    try:
        scorer = fit_scorer(features[keep], labels[keep], density[keep] if context else None)
    except LeukoError as exc:
        log(f"  no cell scorer: {exc}")
        return None
    log(f"  cell scorer trained on {int(keep.sum())} located cells ({int(labels[keep].sum())} blasts) of {len(train_photos)} photographs.")
    return scorer


def fold_locator(cfg: DetectEvalConfig, smears: list, train_photos: list, fold_dir: Path, log) -> WhiteCellLocator:
    """The learned locator of one fold, trained on its training photographs and the extra sources' (kept in the fold folder)."""
    path = fold_dir / "locator.safetensors"
    if path.is_file():
        return WhiteCellLocator.load(path)
    stems = {r.path.stem for r in train_photos}
    train = [s for s in smears if s.trainable and (s.layout != "allidb1" or s.path.stem in stems)]
    log(f"  locator trained on {sum(s.layout == 'allidb1' for s in train)} ALL-IDB1 photographs (blast positions, or background) "
        f"and {sum(s.layout != 'allidb1' for s in train)} of the other sources.")
    locator = fit_locator(train, LocatorRecipe(iterations=cfg.locator_iterations, seed=cfg.seed), LocatorSettings(), log=log)
    locator.save(path)
    return locator


def _analyze_photos(records, classifier, cfg: DetectEvalConfig, masks, log, locator: WhiteCellLocator | None = None) -> list[dict]:
    rows = []
    for record in records:
        t0 = time.perf_counter()
        try:
            image = open_rgb(record.path)
        except BadImageError as exc:
            log(f"skipped: {exc}")
            continue
        read_s = time.perf_counter() - t0
        result = analyze(image, classifier, review_band=cfg.review_band, rule=VerdictRule(min_blasts=cfg.min_blasts), params=cfg.locate,
                         locator=locator, edge_margin=cfg.edge_margin)
        result["read_s"] = read_s
        rows.append(photo_row(record, result, masks, cfg.radius))
    return rows


def run_detect_eval(data: Path, out_dir: Path, cfg: DetectEvalConfig = DetectEvalConfig(), *, progress: bool = False,
                    command: str = "", log=print) -> dict:
    """Cross-validated evaluation of the whole-smear pipeline on ALL-IDB1; writes metrics.json and report.md."""
    out_dir = Path(out_dir)
    if (out_dir / "metrics.json").exists():
        raise LeukoError(f"{out_dir} already holds a detection evaluation; choose another --out or delete it.")
    records = index_dataset(data, "allidb1")
    masks = find_masks(data)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    if cfg.locate_only:
        for i, record in enumerate(records):
            rows += _analyze_photos([record], None, cfg, masks, log)
            if progress and (i + 1) % 10 == 0:
                log(f"  located {i + 1}/{len(records)} photographs")
    else:

        manifest, records = _crop_manifest(records, out_dir / "crops", cfg, progress, log)
        smears = []
        if cfg.locator == "learned":  # read and resampled once; each fold trains on its own part
            sources = [LabSource(lab="allidb1", path=Path(data), format="allidb1"), *map(LabSource.parse, cfg.locator_data)]
            smears, skipped = load_smears(sources, LocatorSettings().rbc_px, log=log, progress=progress)
            for line in skipped:
                log(f"  {line}")
        groups = np.array([r.group for r in records])
        labels = np.array([r.label for r in records])
        for k, (train, test) in enumerate(kfold_indices(labels, groups, folds=cfg.folds, seed=cfg.seed)):
            fold_dir = out_dir / f"fold_{k}"
            done = fold_dir / "rows.json"
            if done.exists():
                log(f"Fold {k + 1}/{cfg.folds}: already finished, reusing it.")
                rows += json.loads(done.read_text())
                continue
            log(f"Fold {k + 1}/{cfg.folds}: {len(train)} training and {len(test)} held-out photographs.")
            best = _train_fold(cfg, manifest, [records[i] for i in train], fold_dir, progress, log)
            classifier = Classifier.from_checkpoint(best, device="cpu", backend="torch")  # one fold's photographs: an export would not pay
            locator = fold_locator(cfg, smears, [records[i] for i in train], fold_dir, log) if cfg.locator == "learned" else None
            fold_rows = [{**r, "fold": k} for r in _analyze_photos([records[i] for i in test], classifier, cfg, masks, log, locator)]
            write_json(done, fold_rows)
            rows += fold_rows
    metrics = {
        "data": str(data), "command": command, "config": asdict(cfg), "environment": environment_facts(),
        "radius_in_rbc_diameters": cfg.radius, **aggregate(rows, classified=not cfg.locate_only),
    }
    write_json(out_dir / "metrics.json", metrics)
    _write_rows(out_dir / "photographs.csv", rows)
    _write_cells(out_dir / "cells.csv", rows)
    atomic_write_text(out_dir / "report.md", report_markdown(metrics))
    return metrics


def _crop_manifest(records: list, crops_dir: Path, cfg: DetectEvalConfig, progress: bool, log) -> tuple[Path, list]:
    """The crops of ``records`` (written once into ``crops_dir``) and the records carrying their split group."""
    manifest = crops_dir / "manifest.csv"
    if not manifest.exists():
        write_crops(records, crops_dir, cfg.crop, params=cfg.locate, progress=progress, log=log)
    groups_of = json.loads((crops_dir / "crops.json").read_text())["groups"]
    return manifest, [replace(r, group=groups_of[r.path.stem]) for r in records if r.path.stem in groups_of]


def run_train_detector(data: Path, out_dir: Path, cfg: DetectEvalConfig = DetectEvalConfig(), *, progress: bool = False,
                       command: str = "", log=print) -> Path:
    """Train the crop classifier of ``detect`` on every annotated photograph of ``data`` (ALL-IDB1 layout).

    The recipe is the one ``detect-eval`` cross-validates with the same ``cfg``: its figures are this
    model's expected performance. A share of the photographs (``cfg.val_fraction``, whole groups) is
    held out for choosing the epoch (none with 0: the last epoch is kept). Returns the path of the checkpoint (``OUT/model/best.pt``), which
    carries the crop scale under ``"detection"``; ``leukodetect detect --checkpoint`` takes it.
    """
    out_dir = Path(out_dir)
    if (out_dir / "train_detector.json").exists():
        raise LeukoError(f"{out_dir} already holds a trained detector; choose another --out.")
    records = index_dataset(data, "allidb1")
    manifest, records = _crop_manifest(records, out_dir / "crops", cfg, progress, log)
    log(f"Training the detection crop classifier ({cfg.arch}) on {len(records)} photographs.")
    best = _train_fold(cfg, manifest, records, out_dir, progress, log)
    write_json(out_dir / "train_detector.json", {"data": str(data), "command": command, "config": asdict(cfg),
                                                 "photographs": len(records), "environment": environment_facts()})
    return best


def _write_rows(path: Path, rows: list[dict]) -> None:
    flat = [{k: v for k, v in r.items() if not k.startswith("mask") and k != "cells"}
            | {f"{m}_{k}": v for m in ("mask", "mask_before_gate") for k, v in r.get(m, {}).items()} for r in rows]
    write_csv(path, flat)  # columns: every key, in the order first seen


def _write_cells(path: Path, rows: list[dict]) -> None:
    """Every located cell of every held-out photograph (:func:`cell_rows`), for analyses beyond the report."""
    write_csv(path, [{"photo": r["photo"], "label": r["label"], "fold": r.get("fold"), **c} for r in rows for c in r.get("cells", ())])


def _fmt(entry: dict | None) -> str:
    if not entry or entry.get("value") is None:
        return "n/a"
    return f"{entry['value']:.3f} ({entry['k']}/{entry['n']}; 95% CI {entry['ci_low']:.3f}-{entry['ci_high']:.3f})"


def _locator_text(cfg: dict) -> str:
    """How the evaluated photographs' white cells were found, for the report."""
    if cfg.get("locator") != "learned":
        return "the colour locator"
    extra = f" and {', '.join(cfg['locator_data'])}" if cfg.get("locator_data") else ""
    return f"a learned locator trained in each fold on its training photographs{extra} ({cfg['locator_iterations']} steps)"


def report_markdown(m: dict) -> str:
    """A short Markdown report of ``metrics.json``."""
    cfg = m["config"]
    lines = [
        "# Whole-smear detection on ALL-IDB1", "",
        f"Command: `{m['command']}`  ", f"Machine: {m['environment'].get('machine', '')}  ",
        f"Date: {m['environment'].get('date', '')}", "",
        f"Matching radius: {m['radius_in_rbc_diameters']} x the photograph's measured red-cell diameter.  ",
        f"White cells found by: {_locator_text(cfg)}.", "",
        "| metric | value |", "|---|---|",
        f"| photographs | {m['photographs']} |",
        f"| blast localisation recall | {_fmt(m['blast_localisation_recall'])} |",
    ]
    if "white_cell_localisation" in m:
        w = m["white_cell_localisation"]
        lines += [f"| white-cell localisation recall ({w['photographs']} masked photographs: a found cell inside a region) | {_fmt(w['recall'])} |",
                  f"| white-cell localisation precision | {_fmt(w['precision'])} |"]
        if "cell_recall" in w:  # metrics written before 2026-12-07 (night) have the regions' figures alone
            lines += [f"| - each of the masks' {w['cells']} cells, touching ones split apart (within the radius): recall | {_fmt(w['cell_recall'])} |",
                      f"| - the same: precision | {_fmt(w['cell_precision'])} |"]
        if "before_gate" in w:
            lines += [f"| - before the smudge gate: recall | {_fmt(w['before_gate']['recall'])} |",
                      f"| - before the smudge gate: precision | {_fmt(w['before_gate']['precision'])} |"]
    if "blast_detection" in m:
        for key, name in (("blast_detection", "blast detection"), ("blast_flagging", "blast flagging (blast or review calls)")):
            if key in m:
                b = m[key]
                f1 = f"{b['f1']:.3f} (TP {b['tp']}, FP {b['fp']}, FN {b['fn']})" if b["f1"] is not None else "n/a"
                lines += [f"| {name} recall | {_fmt(b['recall_ci'])} |", f"| {name} precision | {_fmt(b['precision_ci'])} |",
                          f"| {name} F1 | {f1} |"]
        p = m["photograph"]
        lines += [f"| photograph accuracy (review = ALL) | {_fmt(p['accuracy'])} |", f"| photograph sensitivity | {_fmt(p['sensitivity'])} |",
                  f"| photograph specificity | {_fmt(p['specificity'])} |",
                  f"| photographs left for review | {_fmt(p['review_share'])} |",
                  f"| accuracy on the photographs decided (ALL or healthy) | {_fmt(p['decided_accuracy'])} |",
                  "", f"Verdicts: {json.dumps(p['verdicts'])}", ""]
        lines += [f"Classifier: {cfg['arch']}, {cfg['epochs']} epochs, {cfg['image_size']} px crops of side "
                  f"{cfg['crop']['crop_factor']} d, {cfg['folds']} folds by photograph; review band {cfg['review_band']}; "
                  f"edge margin {cfg.get('edge_margin', 0)} red-cell diameters.",
                  ("Epoch: the last one (no validation photographs)." if cfg.get("val_fraction", 0.15) == 0 else
                   f"Epoch: lowest validation loss on {cfg.get('val_fraction', 0.15):.0%} of each fold's training photographs.")
                  + (f" Label smoothing {cfg['label_smoothing']:g}." if cfg.get("label_smoothing") else "")]
        if cfg.get("smudge_gate"):
            lines += [f"Smudge gate: keeps {cfg['gate_keep']:.0%} of the annotated training cells; {m.get('smudge_calls', 0)} located "
                      "objects called smudge (not counted as white cells or blasts)."]
        if cfg.get("cell_scorer"):
            lines += ["Cell scorer: each fold's P(blast) combines the crop classifier with a logistic regression on the located "
                      "regions' measurements" + (" and the photograph's white-cell density" if cfg.get("photo_context") else "")
                      + ", fitted on the training photographs (cells.csv keeps the crop classifier's own probability as prob_crop)."]
    s = m["seconds_per_photograph"]
    lines += ["", f"Seconds per photograph (read + locate + classify): median {s['median']:.2f}, max {s['max']:.2f}.", ""]
    return "\n".join(lines)
