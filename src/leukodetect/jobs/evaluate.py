"""Score predictions and write the evaluation folder: metrics.json, predictions, figures, report."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from leukodetect.data.duplicates import hash_records
from leukodetect.data.indexers import index_dataset
from leukodetect.errors import LeukoError
from leukodetect.evaluation import metrics as m
from leukodetect.evaluation.intervals import binary_report
from leukodetect.evaluation.labs import cell_rows, names_labs, per_lab
from leukodetect.jobs.cells import LabSource, bank_hashes, build_bank, is_bank
from leukodetect.reporting.plots import (
    plot_confusion,
    plot_history,
    plot_roc,
    save_figure,
)
from leukodetect.reporting.report import write_report
from leukodetect.runtime.base import REVIEW
from leukodetect.runtime.classifier import Classifier
from leukodetect.utils import environment_facts, write_csv, write_json


def write_predictions_csv(path: Path, rows: Sequence[dict]) -> Path:
    """One line per image (the rows' keys are the columns); no rows write an empty file."""
    return write_csv(path, rows)


def write_evaluation(
    out_dir: Path,
    *,
    title: str,
    y_true: np.ndarray,
    prob: np.ndarray,
    threshold: float,
    rows: Sequence[dict],
    history: list[dict] | None = None,
    facts: dict[str, str] | None = None,
    extra: dict | None = None,
    fold_summary: dict | None = None,
) -> dict:
    """Compute the metrics with 95% intervals and write everything a reader needs into ``out_dir``.

    Returns the metrics dict that was written to ``metrics.json``.
    """
    out_dir = Path(out_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    y_true = np.asarray(y_true, dtype=int)
    prob = np.asarray(prob, dtype=float)
    report = binary_report(y_true, prob, threshold=threshold)
    report.update(extra or {})
    if fold_summary is not None:
        report["folds"] = fold_summary
    write_json(out_dir / "metrics.json", report)
    write_predictions_csv(out_dir / "predictions.csv", rows)

    figures: dict[str, Path] = {}
    if len(set(y_true.tolist())) == 2:
        figures["ROC curve"] = save_figure(plot_roc(y_true, prob), out_dir / "roc.png")
    conf = m.confusion(y_true, (prob >= threshold).astype(int))
    figures["Confusion matrix"] = save_figure(plot_confusion(conf), out_dir / "confusion_matrix.png")
    if history:
        figures["Training curves"] = save_figure(plot_history(history), out_dir / "training_curves.png")
    all_facts = dict(facts or {})
    all_facts.update({k: v for k, v in environment_facts().items() if k not in all_facts})
    write_report(out_dir, title=title, metrics=report, figures=figures, facts=all_facts, fold_summary=fold_summary)
    return report


def evaluate_checkpoint(
    checkpoint: Path,
    data: Path | None,
    out_dir: Path,
    *,
    sources: Sequence[LabSource] = (),
    fmt: str = "auto",
    include_training: bool = False,
    backend: str = "auto",
    command: str = "",
    progress: bool = True,
    stain=None,
    log=print,
) -> dict:
    """Evaluate a checkpoint on a labelled data set, or on several laboratories' (``sources``), with figures per laboratory.

    ``sources`` (``LAB=PATH[:FORMAT][@PIXELS]``) are cut into a cell bank in ``out_dir/cells`` at the
    model's physical scale, as ``train`` does, so smear fields (Aria, BCCD) give their located cells. A
    cell bank (``cells.csv``) as ``data`` is scored at its scale. Where the images name their
    laboratories, ``metrics.json`` and the report add each laboratory's figures
    (:func:`~leukodetect.evaluation.labs.per_lab`), with the guard's flag rate.

    Images the checkpoint was trained or validated on (recognised by pixel hash; a bank's crops also as
    the JPEG the shipped model's bank was written in) are left out unless ``include_training``: scoring
    a model on its own training images is what inflates published figures. ``backend`` is
    :class:`~leukodetect.runtime.classifier.Classifier`'s (auto: ONNX Runtime on CPU). With ``stain``
    (a :class:`~leukodetect.data.stain.MacenkoStain`), every image is stain-normalised first;
    ``metrics.json`` then says how many images it could not normalise.
    """
    clf = Classifier.from_checkpoint(checkpoint, backend=backend, log=log)
    if sources:
        if clf.scale is None:
            raise LeukoError(f"{checkpoint} has no physical scale (it was trained on one data set as it is): evaluate it with "
                             "--data PATH, without laboratory names.")
        data = build_bank(sources, Path(out_dir) / "cells", clf.scale, log=log)
    described = ", ".join(str(s) for s in sources) if sources else str(data)
    records = [r for r in index_dataset(data, "manifest" if sources else fmt) if r.label is not None]
    if not records:
        raise LeukoError(f"{described} has no labelled images: evaluation needs labels (see 'leukodetect data check').")
    bank = bool(sources) or is_bank(data)
    declared = clf.bank_diameter if bank else None
    hashes = bank_hashes(records) if bank else {path: {h} for path, h in hash_records(records).items()}
    trained_on = set(clf.bundle.get("trained_on", []))
    seen = [r for r in records if hashes[r.path] & trained_on]
    if seen and not include_training:
        log(f"Leaving out {len(seen)} of {len(records)} images the model was trained or validated on "
            "(pass --include-training to score them anyway).")
        records = [r for r in records if not hashes[r.path] & trained_on]
    if not records:
        raise LeukoError(f"Every image in {described} was used to train this model: evaluate on held-out images.")
    preds = clf.predict_paths([r.path for r in records], progress=progress, stain=stain, rbc_diameter=declared)
    bad = [p for p in preds if p.error]
    for p in bad:
        log(f"skipped: {p.error}")
    good = [(r, p) for r, p in zip(records, preds) if p.error is None]
    if not good:
        raise LeukoError(f"No image in {described} could be read: run 'leukodetect data check' on it.")
    rows = [{"path": str(r.path), "label": r.label, "prob_blast": p.prob_blast, "predicted": int(p.prob_blast >= clf.threshold)}
            | ({"lab": r.lab, "call": p.label} if r.lab else {}) for r, p in good]
    extra = {"excluded_trained_on": len(seen) if not include_training else 0, "unreadable": len(bad)}
    if names_labs([r for r, _ in good]):
        extra["labs"] = per_lab(cell_rows([r for r, _ in good], [p.prob_blast for _, p in good], [p.label == REVIEW for _, p in good]),
                                clf.threshold)
    facts = {"command": command, "checkpoint": str(checkpoint), "data": described, "architecture": clf.bundle["arch"]}
    if stain is not None:
        extra["stain_normalization"] = stain.describe()
        facts["stain normalisation"] = (f"{stain.method}, fitted on {len(stain.reference)} reference image(s); "
                                        f"{stain.failed} of {len(good)} images could not be normalised and were scored as they are")
        if stain.failed:
            log(f"Stain normalisation failed on {stain.failed} of {len(good)} images; they were scored unnormalised "
                "(see the notes in predictions.csv).")
        for r, p in zip(rows, (p for _, p in good)):
            r["notes"] = " ".join(p.notes)
    return write_evaluation(
        out_dir,
        title=f"Evaluation of {Path(checkpoint).name} on {', '.join(s.lab for s in sources) if sources else Path(data).name}",
        y_true=np.array([r.label for r, _ in good]),
        prob=np.array([p.prob_blast for _, p in good]),
        threshold=clf.threshold,
        rows=rows,
        history=clf.bundle.get("history"),
        facts=facts,
        extra=extra,
    )

