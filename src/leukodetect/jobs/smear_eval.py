"""``leukodetect smear-eval``: the smear pipeline as it is (no training) scored on labelled smears, per laboratory.

``detect-eval`` trains a crop classifier per fold on ALL-IDB1 and ``locator-eval`` scores white-cell
positions; this job answers a laboratory's question about the models it has: given a cell model and
a locator, how often is a smear's verdict right in each laboratory?

Labels come from the layout: ALL-IDB1 photographs (``_1`` ALL, ``_0`` healthy), Aria fields (Benign
healthy; Early, Pre and Pro ALL), BCCD fields (healthy: smears of normal blood).

Definitions, per laboratory:

* a verdict is **right** when it is ``ALL`` on an ALL smear or ``healthy`` on a healthy one;
  ``review`` and ``cannot_assess`` are never right, so accuracy is over every smear;
* **sensitivity** and **specificity** count ``review`` as positive (a flagged smear goes to a person,
  as in ``detect-eval``) and leave ``cannot_assess`` smears out; their share is reported apart;
* **ROC AUC** ranks the smears with at least one classified cell by their most blast-like cell.

``unseen_from`` (a cell bank's ``cells.csv``) keeps only the smears that the cell model never saw:
none of the bank's cells cut from them, nor from any near-duplicate of them, is among the model's
``trained_on`` pixel hashes (the bank's crops as written, and as JPEG of the qualities the bank
may have been written in). A smear the bank holds no cell of is unseen by construction, except
ALL-IDB1's photographs when the bank holds ALL-IDB2: its cells were cut from them by ALL-IDB2's
authors, so this check cannot tell; they are all scored and the run says so. A bank that cut its cells
from ALL-IDB1's photographs itself (and holds no ALL-IDB2 crop) names them, and they are checked as the others.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from leukodetect.data.duplicates import split_groups
from leukodetect.data.indexers import detect_format, index_dataset
from leukodetect.data.records import Record
from leukodetect.detection.match import detection_scores, match_points, match_points_to_boxes
from leukodetect.detection.pipeline import CANNOT_ASSESS, EDGE_MARGIN, analyze, check_declared_scale
from leukodetect.errors import BadImageError, LeukoError
from leukodetect.evaluation.intervals import proportion
from leukodetect.evaluation.metrics import roc_auc
from leukodetect.jobs.cells import BANK_JPEG_QUALITIES, LabSource, bank_hashes, is_bank
from leukodetect.jobs.detect import analysis_failed, batch_scale_of, disagreement_sentence
from leukodetect.runtime.images import open_rgb
from leukodetect.runtime.scale import RBC_UM, scale_agreement
from leukodetect.utils import atomic_write_text, write_csv, write_json

#: Layouts whose images are whole smears with a label per smear.
SMEAR_LAYOUTS = ("allidb1", "aria", "bccd")
VERDICTS = ("ALL", "review", "healthy", CANNOT_ASSESS)
ROW_FIELDS = ("lab", "image", "label", "verdict", "right", "n_cells", "n_blast", "n_review", "max_prob", "scale", "rbc_diameter", "reason",
              "cell_tp", "cell_fp", "cell_fn", "box_tp", "box_fp", "box_fn", "blast_tp", "blast_fp", "blast_fn")


def smear_records(source: LabSource, *, grouped: bool = True) -> tuple[str, list[Record]]:
    """The labelled smears of one source; with ``grouped``, near-duplicate and identical smears merged into one group each
    (every image is read for it: only the "never trained on" check needs the groups)."""
    fmt = source.format if source.format != "auto" else detect_format(source.path)
    if fmt not in SMEAR_LAYOUTS:
        raise LeukoError(f"{source}: smear-eval scores whole smears with a label each ({', '.join(SMEAR_LAYOUTS)} layouts); "
                         f"{fmt} holds single cells: score those with 'leukodetect evaluate'.")
    records = [r for r in index_dataset(source.path, fmt) if r.label is not None]
    if not records:
        raise LeukoError(f"{source}: no labelled smears found; point to the data set's folder.")
    if not grouped:
        return fmt, records
    groups = split_groups(records, near_duplicates=fmt == "aria")
    return fmt, [replace(r, group=f"{source.lab}:{g}") for r, g in zip(records, groups)]


def trained_smears(bank_csv: Path, trained_on: Iterable[str], *, qualities: Sequence[int] = BANK_JPEG_QUALITIES) -> tuple[set[str], set[str]]:
    """The parents (``lab:stem``) and groups (``lab:group``) of a cell bank's crops that a model trained on.

    A bank written as PNG and used as JPEG (or the other way) still matches: each crop is hashed as
    it is and as JPEG of each of ``qualities``.
    """
    bank_csv = Path(bank_csv)
    if not is_bank(bank_csv):
        raise LeukoError(f"{bank_csv} is not a cell bank's cells.csv (with its cells.json beside it): pass the one 'leukodetect cells' wrote.")
    trained = set(trained_on)
    crops = index_dataset(bank_csv, "manifest")
    seen = [r for r, hashes in zip(crops, bank_hashes(crops, qualities).values()) if hashes & trained]
    return {r.parent for r in seen}, {r.group for r in seen}


def trained_on_smear(lab: str, record: Record, parents: set[str], groups: set[str]) -> bool:
    """Whether the cell model trained on a cell of this smear, or of a near-duplicate of it (``parents`` and ``groups`` from
    :func:`trained_smears`)."""
    return f"{lab}:{record.path.stem}" in parents or record.group in groups


def smear_row(lab: str, record: Record, result: dict, *, fmt: str = "", radius: float = 0.5) -> dict:
    """One smear's line: its label, verdict, whether it is right, and its most blast-like cell.

    Where the layout gives positions, the found cells are matched one to one within ``radius`` red-cell
    diameters: to the annotated white cells (BCCD's box centres: ``cell_tp`` and the rest; a found cell
    inside a box, where the layout draws boxes: ``box_tp`` and the rest), and, on ALL-IDB1, the cells
    called blast to the annotated blasts (``blast_tp``...; none are annotated on a healthy photograph, so
    a blast call there is a false one).
    """
    cells = [c for c in result["cells"] if c["call"] != "smudge"]
    probs = [c["prob_blast"] for c in cells if c.get("prob_blast") is not None]
    verdict = result["verdict"]
    right = verdict == ("ALL" if record.label == 1 else "healthy")
    row = {"lab": lab, "image": str(record.path), "label": int(record.label), "verdict": verdict, "right": right,
           "n_cells": result["n_cells"], "n_blast": result["n_blast"], "n_review": result["n_review"],
           "max_prob": max(probs) if probs else None, "scale": result["scale"], "rbc_diameter": result.get("rbc_diameter"),
           "reason": result.get("reason") or ""}
    within = radius * (result["rbc_diameter"] or 0.0)
    found = [(c["x"], c["y"]) for c in cells]
    if record.cells is not None:
        m = match_points(found, list(record.cells), within)
        row.update(cell_tp=m.tp, cell_fp=m.fp, cell_fn=m.fn)
    if record.boxes is not None:
        m = match_points_to_boxes(found, record.boxes)
        row.update(box_tp=m.tp, box_fp=m.fp, box_fn=m.fn)
    if fmt == "allidb1":
        m = match_points([(c["x"], c["y"]) for c in cells if c["call"] == "blast"], list(record.blasts or ()), within)
        row.update(blast_tp=m.tp, blast_fp=m.fp, blast_fn=m.fn)
    return row


def smear_metrics(rows: Sequence[dict]) -> dict:
    """Accuracy, sensitivity, specificity (95% Wilson intervals), AUC and verdict counts of one laboratory's rows."""
    assessed = [r for r in rows if r["verdict"] != CANNOT_ASSESS]
    positives = [r for r in assessed if r["label"] == 1]
    negatives = [r for r in assessed if r["label"] == 0]
    scored = [r for r in rows if r["max_prob"] is not None]
    labels = {r["label"] for r in scored}
    return {
        "smears": len(rows),
        "all": sum(r["label"] == 1 for r in rows), "healthy": sum(r["label"] == 0 for r in rows),
        "verdicts": {label: dict(Counter(r["verdict"] for r in rows if r["label"] == value))
                     for label, value in (("ALL", 1), ("healthy", 0))},
        "accuracy": proportion(sum(r["right"] for r in rows), len(rows)),
        "cannot_assess": proportion(len(rows) - len(assessed), len(rows)),
        "sensitivity": proportion(sum(r["verdict"] in ("ALL", "review") for r in positives), len(positives)),
        "specificity": proportion(sum(r["verdict"] == "healthy" for r in negatives), len(negatives)),
        "auc": roc_auc(np.array([r["label"] for r in scored]), np.array([r["max_prob"] for r in scored])) if len(labels) == 2 else None,
        "median_cells": float(np.median([r["n_cells"] for r in rows])) if rows else None,
        "scale_agreement": scale_agreement((r.get("rbc_diameter"), r.get("scale")) for r in rows),
        **_matched(rows, "cell", "white_cells"), **_matched(rows, "box", "white_cells_in_boxes"),
        **_matched(rows, "blast", "blast_detection"),
    }


def _matched(rows: Sequence[dict], prefix: str, name: str) -> dict:
    """Recall, precision (95% Wilson) and F1 of the matched ``prefix`` counts, where the rows have them."""
    rows = [r for r in rows if f"{prefix}_tp" in r]
    if not rows:
        return {}
    tp, fp, fn = (sum(r[f"{prefix}_{k}"] for r in rows) for k in ("tp", "fp", "fn"))
    return {name: {"smears": len(rows), "tp": tp, "fp": fp, "fn": fn, "recall": proportion(tp, tp + fn), "precision": proportion(tp, tp + fp),
                   "f1": detection_scores(tp, fp, fn)["f1"]}}


def banks_allidb1_photographs(bank_csv: Path) -> bool:
    """Whether a cell bank cut its ALL-IDB cells from ALL-IDB1's photographs itself and holds no ALL-IDB2 crop: then a
    photograph whose cells the model trained on is known by name, and the others can be scored as never trained on."""
    labs = json.loads((Path(bank_csv).parent / "cells.json").read_text()).get("labs", {})
    formats = {entry.get("format") for entry in labs.values()}
    return "allidb1" in formats and "allidb2" not in formats


def run_smear_eval(sources: Sequence[LabSource], classifier, out_dir: Path, *, locator=None, unseen_from: Path | None = None,
                   trained_on: Iterable[str] = (), every: int = 1, batch_scale: bool = False, progress: bool = False, log=print,
                   **analyze_kwargs) -> dict:
    """Analyse every labelled smear of ``sources`` with ``classifier`` and ``locator``; write rows, metrics and a report.

    Unreadable smears, and smears whose analysis fails, are reported and left out (counted as
    ``unreadable``); ``every`` keeps every n-th smear of each source. A source's declared red-cell diameter
    (``LAB=PATH[:FORMAT]@PIXELS``, :class:`~leukodetect.jobs.cells.LabSource`) scales all its smears instead of
    each smear's measured one (learned locator only). With ``batch_scale``, a source without one is analysed at its
    smears' batch diameter (:func:`~leukodetect.jobs.detect.batch_scale_of`: a laboratory is one microscope and camera).
    """
    out_dir = Path(out_dir)
    if (out_dir / "metrics.json").exists():
        raise LeukoError(f"{out_dir} already holds a smear evaluation: choose another --out.")
    labs = [s.lab for s in sources]
    if len(set(labs)) != len(labs):
        raise LeukoError(f"Each laboratory may be named once, got {', '.join(labs)}.")
    for source in sources:
        check_declared_scale(source.rbc_diameter, locator)
    parents, groups = trained_smears(unseen_from, trained_on) if unseen_from is not None else (set(), set())
    photographs_banked = unseen_from is not None and banks_allidb1_photographs(unseen_from)
    rows, facts = [], {}
    for source in sources:
        fmt, records = smear_records(source, grouped=unseen_from is not None)
        records = records[::every]
        untellable = fmt == "allidb1" and not photographs_banked
        kept = records if untellable else [r for r in records if not trained_on_smear(source.lab, r, parents, groups)]
        facts[source.lab] = {"format": fmt, "in_source": len(records), "left_out_as_trained": len(records) - len(kept)}
        scale = {"rbc_diameter": source.rbc_diameter} if source.rbc_diameter else {}
        if scale:
            facts[source.lab].update(declared_rbc_diameter_px=source.rbc_diameter, declared_pixel_size_um=RBC_UM / source.rbc_diameter)
        elif batch_scale:
            scale = batch_scale_of([r.path for r in kept], locator=locator, progress=progress, log=lambda m, lab=source.lab: log(f"{lab}: {m}"))
            if scale:
                facts[source.lab]["batch_rbc_diameter_px"] = scale["rbc_diameter"]
        if unseen_from is not None and untellable:
            facts[source.lab]["unseen_check"] = "not possible: ALL-IDB2's cells are cut from these photographs by its authors"
            log(f"{source.lab}: ALL-IDB1's photographs cannot be told unseen from a cell bank: ALL-IDB2, whose cells banks hold, "
                "is cut from them, so a model trained on ALL-IDB2 has seen their cells; all are scored.")
        elif unseen_from is not None:
            log(f"{source.lab}: {len(kept)} of {len(records)} smears never trained on (cells of the others are in {unseen_from}).")
        unreadable = 0
        for record in tqdm(kept, desc=f"smears of {source.lab}", disable=not progress):
            try:
                result = analyze(np.asarray(open_rgb(record.path)), classifier, locator=locator, **scale, **analyze_kwargs)
            except BadImageError as exc:
                log(f"skipped: {exc}")
                unreadable += 1
                continue
            except LeukoError:
                raise
            except Exception as exc:  # one smear's failure is reported and the others go on, as in detect
                log(f"skipped: {analysis_failed(record.path, exc)}")
                unreadable += 1
                continue
            rows.append(smear_row(source.lab, record, result, fmt=fmt))
        facts[source.lab]["unreadable"] = unreadable
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(out_dir / "smears.csv", rows, list(ROW_FIELDS))
    metrics = {"labs": {lab: {**facts[lab], **smear_metrics([r for r in rows if r["lab"] == lab])} for lab in facts},
               "locator": "learned" if locator is not None else "colour", "unseen_from": str(unseen_from) if unseen_from else None,
               "edge_margin": analyze_kwargs.get("edge_margin", EDGE_MARGIN)}
    write_json(out_dir / "metrics.json", metrics)
    atomic_write_text(out_dir / "report.md", report_markdown(metrics))
    return metrics


def _pct(entry: dict) -> str:
    if entry["value"] is None:
        return "-"
    return f"{100 * entry['value']:.1f}% ({100 * entry['ci_low']:.1f}-{100 * entry['ci_high']:.1f}; {entry['k']}/{entry['n']})"


def report_markdown(metrics: dict) -> str:
    lines = [f"# Smear verdicts per laboratory ({metrics['locator']} locator)", ""]
    declared = {lab: m["declared_pixel_size_um"] for lab, m in metrics["labs"].items() if "declared_pixel_size_um" in m}
    if declared:
        lines += ["Declared pixel sizes (one red-cell diameter for every smear of the laboratory): "
                  + ", ".join(f"{lab} {size:.4g} um/px" for lab, size in declared.items()) + ".", ""]
    batch = {lab: m["batch_rbc_diameter_px"] for lab, m in metrics["labs"].items() if "batch_rbc_diameter_px" in m}
    if batch:
        lines += ["One red-cell diameter per laboratory, its smears' median reading (--batch-scale): "
                  + ", ".join(f"{lab} {d:g} px" for lab, d in batch.items()) + ".", ""]
    if metrics["unseen_from"]:
        lines += [f"Only smears the cell model never trained on (bank: {metrics['unseen_from']})."]
        lines += [f"{lab}: {m['unseen_check']}; every smear is scored." for lab, m in metrics["labs"].items() if "unseen_check" in m]
        lines += [""]
    lines += ["| laboratory | smears (ALL / healthy) | accuracy | sensitivity (review = ALL) | specificity | ROC AUC | cannot assess |"
              " ALL smears: ALL / review / healthy / cannot | healthy smears: ALL / review / healthy / cannot |",
              "|---|---|---|---|---|---|---|---|---|"]
    for lab, m in metrics["labs"].items():
        counts = ["/".join(str(m["verdicts"].get(label, {}).get(v, 0)) for v in VERDICTS) for label in ("ALL", "healthy")]
        auc = f"{m['auc']:.3f}" if m["auc"] is not None else "-"
        lines.append(f"| {lab} | {m['smears']} ({m['all']} / {m['healthy']}) | {_pct(m['accuracy'])} | {_pct(m['sensitivity'])} | "
                     f"{_pct(m['specificity'])} | {auc} | {_pct(m['cannot_assess'])} | {counts[0]} | {counts[1]} |")
    matched = [(lab, key, m[key]) for lab, m in metrics["labs"].items()
               for key in ("white_cells", "white_cells_in_boxes", "blast_detection") if key in m]
    if matched:
        lines += ["", "| laboratory | found cells against annotated ones | smears | recall | precision | F1 |", "|---|---|---|---|---|---|"]
        what = {"white_cells": "white cells (annotated positions)", "white_cells_in_boxes": "white cells (inside the annotated boxes)",
                "blast_detection": "cells called blast (annotated blasts)"}
        lines += [f"| {lab} | {what[key]} | {e['smears']} | {_pct(e['recall'])} | {_pct(e['precision'])} | "
                  f"{e['f1']:.3f} |" if e["f1"] is not None else f"| {lab} | {what[key]} | {e['smears']} | - | - | - |"
                  for lab, key, e in matched]
    doubted = [(lab, m["scale_agreement"]) for lab, m in metrics["labs"].items() if (m.get("scale_agreement") or {}).get("doubtful")]
    lines += ["", *(f"{lab}: " + disagreement_sentence(a, images="smears", table="smears.csv", option=f"--pixel-size {lab}=UM")
                    for lab, a in doubted)] if doubted else []
    lines += ["", "A verdict is right when it is ALL on an ALL smear or healthy on a healthy one (review and cannot_assess never are);",
              "sensitivity counts review as ALL; sensitivity and specificity leave cannot_assess smears out. 95% Wilson intervals.",
              "A found cell matches an annotated one within half the smear's red-cell diameter, one to one; or, where white cells",
              "are drawn as boxes (BCCD), lies inside one, one to one.",
              f"A blast-like cell centred within {metrics.get('edge_margin', 0)} red-cell diameters of the frame is cut by it and called"
              " review (0: off)."]
    return "\n".join(lines) + "\n"
