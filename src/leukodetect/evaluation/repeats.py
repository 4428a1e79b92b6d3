"""Repeated cross-validation: how far a recipe's figures move from one seed to the next.

On 260 cells one error is 0.38 points of accuracy, and a ``cv`` run's seed fixes both the folds and
the initial weights, so two runs of one recipe can differ by several errors. Comparing recipes (or
a recipe against a target) on one run each therefore says little; these functions summarise
several runs of the same recipe made with different ``--seed``:

- each run's pooled accuracy, sensitivity and specificity, and the cells it got wrong;
- the mean, sample sd, minimum and maximum over runs (the repeated-CV estimate is the mean);
- the cells wrong in every run (candidates for a look at the labels or the images);
- the runs' stored out-of-fold P(blast) averaged per cell: every model that scores a cell was
  trained without it, so this is an honest estimate of an ensemble of one model per run.

All functions are pure: they take labels and probabilities keyed by cell, not files.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from leukodetect.errors import LeukoError
from leukodetect.evaluation import metrics as m
from leukodetect.evaluation.intervals import binary_report


def read_predictions(run_dir: Path) -> dict[str, tuple[int, float]]:
    """``{cell: (label, P(blast))}`` from a finished ``cv`` run's ``predictions.csv``."""
    path = Path(run_dir) / "predictions.csv"
    try:
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        return {Path(r["path"]).stem: (int(r["label"]), float(r["prob_blast"])) for r in rows}
    except (OSError, KeyError, ValueError) as exc:
        raise LeukoError(f"Cannot read {path} ({exc}): pass the folder of a finished 'leukodetect cv' run.") from exc


def _scores(cells: dict[str, tuple[int, float]], threshold: float) -> dict:
    names = sorted(cells)
    y = np.array([cells[n][0] for n in names])
    p = np.array([cells[n][1] for n in names])
    c = m.confusion(y, (p >= threshold).astype(int))
    wrong = [n for n, yi, pi in zip(names, y, p) if (pi >= threshold) != (yi == 1)]
    return {"accuracy": m.accuracy(c), "sensitivity": m.sensitivity(c), "specificity": m.specificity(c),
            "errors": len(wrong), "wrong": wrong}


def repeat_summary(runs: dict[str, dict[str, tuple[int, float]]], *, threshold: float = 0.5,
                   target: float | None = None) -> dict:
    """Summarise several cross-validation runs of one recipe on the same cells.

    Args:
        runs: ``{run name: {cell: (label, P(blast))}}``, each from :func:`read_predictions`.
        target: an accuracy to count the runs that reach it (e.g. 0.985).

    Returns:
        ``runs`` (per-run figures and wrong cells), ``spread`` (mean, sd, min, max of each figure),
        ``wrong_in_every_run``, ``runs_reaching_target`` and ``mean_of_runs`` (the averaged
        probabilities scored with intervals, as :func:`~.intervals.binary_report` gives them).
    """
    if len(runs) < 2:
        raise LeukoError(f"A spread needs at least two runs of the recipe, got {len(runs)}: run 'cv' again with another --seed.")
    cell_sets = {name: set(cells) for name, cells in runs.items()}
    first_name, first = next(iter(cell_sets.items()))
    for name, cells in cell_sets.items():
        if cells != first:
            raise LeukoError(f"Runs {first_name} and {name} scored different cells ({len(first ^ cells)} differ): "
                             "compare runs made on the same data.")
    names = sorted(first)
    for name, cells in runs.items():
        if any(cells[n][0] != runs[first_name][n][0] for n in names):
            raise LeukoError(f"Runs {first_name} and {name} give some cells different labels: compare runs made on the same data.")

    per_run = {name: _scores(cells, threshold) for name, cells in runs.items()}
    spread = {}
    for key in ("accuracy", "sensitivity", "specificity", "errors"):
        values = np.array([r[key] for r in per_run.values()], dtype=float)
        spread[key] = {"mean": float(values.mean()), "sd": float(values.std(ddof=1)),
                       "min": float(values.min()), "max": float(values.max())}
    wrong_sets = [set(r["wrong"]) for r in per_run.values()]
    y = np.array([runs[first_name][n][0] for n in names])
    p_mean = np.array([np.mean([cells[n][1] for cells in runs.values()]) for n in names])
    averaged = binary_report(y, p_mean, threshold=threshold)
    averaged["wrong"] = [n for n, yi, pi in zip(names, y, p_mean) if (pi >= threshold) != (yi == 1)]
    return {
        "n_runs": len(runs),
        "n_cells": len(names),
        "threshold": threshold,
        "runs": per_run,
        "spread": spread,
        "wrong_in_every_run": sorted(set.intersection(*wrong_sets)),
        "runs_reaching_target": None if target is None else {
            "target": target, "count": sum(r["accuracy"] >= target for r in per_run.values())},
        "mean_of_runs": averaged,
    }
