"""Calibration: do predicted probabilities mean what they say, and where to put the threshold.

The first part is pure functions of labels, probabilities and logits:

- :func:`expected_calibration_error` and :func:`reliability_curve` compare the blast probability with
  the fraction of blasts over equal-width probability bins;
- :func:`fit_temperature` finds the temperature T that makes ``softmax(logits / T)`` best match the
  labels (Guo et al., 2017); it never changes which class ranks higher, only how confident it is;
- :func:`threshold_for_sensitivity` finds the highest threshold that still finds a target fraction
  of blasts, and says what specificity that costs; :func:`margin_threshold` moves it halfway to the
  next lower score, which splits the scores the same way and leaves room for rounding;
- :func:`per_smear` turns cells labelled by their smear into smears, each scored by its most blast-like
  cell, as the smear pipeline calls a smear, so that the threshold can be chosen on smears.

:func:`calibrate_checkpoint` wires them up: validation logits from a checkpoint, a temperature, a
threshold, written into a copy of the checkpoint that :class:`~leukodetect.runtime.classifier.Classifier`
then applies.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax
from sklearn.calibration import calibration_curve
from sklearn.metrics import roc_curve

#: Search range of the temperature: far wider than any trained network needs.
T_BOUNDS = (0.05, 20.0)


def _bin_counts(prob: np.ndarray, n_bins: int) -> np.ndarray:
    """Items per equal-width bin, with scikit-learn's edges (bin k is (k/n, (k+1)/n], the first also holds 0)."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return np.bincount(np.searchsorted(edges[1:-1], prob), minlength=n_bins)


def reliability_curve(y_true, prob, n_bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fraction of blasts against mean predicted blast probability, per non-empty equal-width bin.

    Args:
        y_true: 0/1 labels (1 = blast).
        prob: predicted probability of blast.

    Returns:
        (prob_true, prob_pred, counts): one entry per non-empty bin, in increasing probability.
        A perfectly calibrated model has prob_true == prob_pred.
    """
    y = np.asarray(y_true).astype(int)
    p = np.asarray(prob, dtype=float)
    prob_true, prob_pred = calibration_curve(y, p, n_bins=n_bins, strategy="uniform")
    counts = _bin_counts(p, n_bins)
    return prob_true, prob_pred, counts[counts > 0]


def expected_calibration_error(y_true, prob, n_bins: int = 10) -> float:
    """Bin-weighted mean of |fraction of blasts - mean blast probability| over equal-width bins.

    0 means calibrated; 0.1 means the probability is off by 10 points on average. Binary task: the
    blast probability is binned (not the top-class confidence), as in a reliability diagram.
    """
    prob_true, prob_pred, counts = reliability_curve(y_true, prob, n_bins)
    return float(np.sum(counts * np.abs(prob_true - prob_pred)) / counts.sum())


def nll(logits, y_true, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the labels under ``softmax(logits / temperature)``."""
    z = np.asarray(logits, dtype=float) / temperature
    y = np.asarray(y_true).astype(int)
    return float(-log_softmax(z, axis=1)[np.arange(len(y)), y].mean())


def fit_temperature(logits, y_true) -> float:
    """Temperature minimising the validation NLL of ``softmax(logits / T)`` (temperature scaling).

    Searches log T (bounded, :data:`T_BOUNDS`) so the optimiser treats "twice as sharp" and "twice as
    flat" alike. T > 1 softens an over-confident model; the ranking of scores, hence ROC AUC, is
    unchanged.

    Args:
        logits: (N, C) raw model outputs on validation images (never the training images, on
            which a network is over-confident).
        y_true: N class indices.
    """
    z = np.asarray(logits, dtype=float)
    y = np.asarray(y_true).astype(int)
    if z.ndim != 2 or len(z) != len(y) or len(y) == 0:
        raise ValueError(f"logits must be (N, C) with N = len(y_true) > 0, got {z.shape} and {len(y)} labels.")
    result = minimize_scalar(
        lambda log_t: nll(z, y, math.exp(log_t)),
        bounds=tuple(math.log(b) for b in T_BOUNDS),
        method="bounded",
        options={"xatol": 1e-6},
    )
    return float(math.exp(result.x))


def threshold_for_sensitivity(y_true, prob, target: float = 0.99) -> dict:
    """The highest threshold at which ``prob >= threshold`` finds at least ``target`` of the blasts.

    Highest, because among thresholds reaching the target it costs the least specificity. With few
    blasts the achieved sensitivity jumps in steps of 1 / (number of blasts), so it may exceed the
    target; on the data it was chosen on, it is an optimistic estimate.

    Returns:
        {"threshold", "sensitivity", "specificity"} at that threshold.
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target}.")
    y = np.asarray(y_true).astype(int)
    if y.min(initial=1) == y.max(initial=0) or not np.isin(y, (0, 1)).all():
        raise ValueError("threshold_for_sensitivity needs 0/1 labels with both classes present.")
    # Keep every threshold: dropping "intermediate" ones could skip the highest one reaching the target.
    fpr, tpr, thresholds = roc_curve(y, np.asarray(prob, dtype=float), drop_intermediate=False)
    i = int(np.argmax(tpr >= target - 1e-12))  # tpr is non-decreasing and ends at 1
    return {"threshold": float(thresholds[i]), "sensitivity": float(tpr[i]), "specificity": float(1.0 - fpr[i])}


def margin_threshold(prob, cut: float) -> float:
    """A threshold that splits ``prob`` as ``cut`` does, halfway between ``cut`` and the highest probability below it.

    ``cut`` is a validation blast's own probability, the highest threshold that still finds it; any rounding
    on the machine that calls (a bfloat16 PyTorch backend, another library's kernels) would drop that blast
    below it. Halfway to the next lower probability, the validation cells are called the same and that
    rounding has room.
    """
    prob = np.asarray(prob, dtype=float)
    below = prob[prob < cut]
    return float((cut + below.max()) / 2) if below.size else float(cut)


def per_smear(y_true, prob, smears) -> tuple[np.ndarray, np.ndarray]:
    """Each smear's label and its most blast-like cell's probability, smears in order of first appearance.

    The cells of a smear field carry the field's label (a cell bank cut from labelled smears); a smear is ALL when
    its most blast-like cell reaches the threshold, so a threshold chosen on these finds a share of ALL smears, not
    of cells, and the normal cells of ALL smears do not pull it down.

    Raises:
        ValueError: the lengths differ, or one smear's cells carry two labels.
    """
    y, prob, smears = np.asarray(y_true).astype(int), np.asarray(prob, dtype=float), list(smears)
    if not len(y) == len(prob) == len(smears):
        raise ValueError(f"per_smear needs a label, a probability and a smear per cell, got {len(y)}, {len(prob)} and {len(smears)}.")
    order = list(dict.fromkeys(smears))
    index = {s: i for i, s in enumerate(order)}
    best = np.full(len(order), -np.inf)
    labels = np.full(len(order), -1)
    for label, p, smear in zip(y, prob, smears):
        i = index[smear]
        if labels[i] not in (-1, label):
            raise ValueError(f"Smear {smear} has cells of both labels: its cells must carry the smear's label.")
        labels[i], best[i] = label, max(best[i], p)
    return labels, best
