"""Binary classification metrics as pure functions of a confusion matrix.

Label 1 is the positive class ("blast", i.e. ALL) and label 0 is "normal". Every metric below is a
function of a :class:`Confusion` alone, so it can be checked against a matrix counted by hand.

Specificity and precision are different things (the paper we reproduce mixes them up):
specificity = TN / (TN + FP) is about the *normal* cells, precision = TP / (TP + FP) is about the
cells *called* blast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve

from leukodetect.runtime.checkpoint import CLASS_NAMES


@dataclass(frozen=True)
class Confusion:
    """Counts of a binary confusion matrix (positive = label 1 = blast)."""

    tn: int
    fp: int
    fn: int
    tp: int

    @property
    def n(self) -> int:
        """Total number of items."""
        return self.tn + self.fp + self.fn + self.tp

    @property
    def positives(self) -> int:
        """Items whose true label is positive: TP + FN."""
        return self.tp + self.fn

    @property
    def negatives(self) -> int:
        """Items whose true label is negative: TN + FP."""
        return self.tn + self.fp

    def as_matrix(self) -> np.ndarray:
        """The 2x2 matrix [[tn, fp], [fn, tp]]: rows true label, columns predicted (sklearn order)."""
        return np.array([[self.tn, self.fp], [self.fn, self.tp]], dtype=int)


def confusion(y_true, y_pred) -> Confusion:
    """Count a binary confusion matrix from 0/1 labels and 0/1 predictions."""
    (tn, fp), (fn, tp) = confusion_matrix(np.asarray(y_true), np.asarray(y_pred), labels=[0, 1])
    return Confusion(tn=int(tn), fp=int(fp), fn=int(fn), tp=int(tp))


def _ratio(k: int, n: int) -> float:
    return k / n if n else math.nan


def accuracy(c: Confusion) -> float:
    """(TP + TN) / N: fraction of items classified correctly."""
    return _ratio(c.tp + c.tn, c.n)


def sensitivity(c: Confusion) -> float:
    """TP / (TP + FN): recall, true positive rate; fraction of blasts that are found."""
    return _ratio(c.tp, c.positives)


def specificity(c: Confusion) -> float:
    """TN / (TN + FP): true negative rate; fraction of normal cells called normal."""
    return _ratio(c.tn, c.negatives)


def precision(c: Confusion) -> float:
    """TP / (TP + FP): positive predictive value; fraction of cells called blast that are blasts."""
    return _ratio(c.tp, c.tp + c.fp)


def npv(c: Confusion) -> float:
    """TN / (TN + FN): negative predictive value; fraction of cells called normal that are normal."""
    return _ratio(c.tn, c.tn + c.fn)


def f1(c: Confusion) -> float:
    """2 TP / (2 TP + FP + FN): harmonic mean of precision and sensitivity."""
    return _ratio(2 * c.tp, 2 * c.tp + c.fp + c.fn)


def fpr(c: Confusion) -> float:
    """FP / (FP + TN): false positive rate, 1 - specificity."""
    return _ratio(c.fp, c.negatives)


def fnr(c: Confusion) -> float:
    """FN / (FN + TP): false negative rate, 1 - sensitivity."""
    return _ratio(c.fn, c.positives)


#: Metrics that are proportions k / n, with a function giving (k, n) so that binomial (Wilson)
#: intervals can be computed. F1 is not a proportion of counted items and is left out.
PROPORTIONS: dict[str, tuple[Callable[[Confusion], float], Callable[[Confusion], tuple[int, int]]]] = {
    "accuracy": (accuracy, lambda c: (c.tp + c.tn, c.n)),
    "sensitivity": (sensitivity, lambda c: (c.tp, c.positives)),
    "specificity": (specificity, lambda c: (c.tn, c.negatives)),
    "precision": (precision, lambda c: (c.tp, c.tp + c.fp)),
    "npv": (npv, lambda c: (c.tn, c.tn + c.fn)),
    "fpr": (fpr, lambda c: (c.fp, c.negatives)),
    "fnr": (fnr, lambda c: (c.fn, c.positives)),
}


def roc_auc(y_true, scores) -> float:
    """Area under the ROC curve of scores for label 1; nan when only one class is present."""
    y_true = np.asarray(y_true)
    if np.unique(y_true).size < 2:
        return math.nan
    return float(roc_auc_score(y_true, np.asarray(scores)))


def roc_curves(y_true, scores) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, float]]:
    """ROC curve per class, as the paper reports them.

    Args:
        y_true: 0/1 labels.
        scores: probability of label 1 (blast).

    Returns:
        {"normal": (fpr, tpr, thresholds, auc), "blast": (...)}; the "normal" curve treats label 0
        as positive with score 1 - p.
    """
    y = np.asarray(y_true).astype(int)
    p = np.asarray(scores, dtype=float)
    out = {}
    for name, labels, s in ((CLASS_NAMES[0], 1 - y, 1.0 - p), (CLASS_NAMES[1], y, p)):
        f, t, thr = roc_curve(labels, s)
        out[name] = (f, t, thr, roc_auc(labels, s))
    return out
