"""Metric functions against confusion matrices counted by hand."""

import math

import numpy as np
import pytest
from sklearn.metrics import roc_curve

from leukodetect.evaluation import metrics as m

# 55 normal cells (50 right, 5 called blast), 45 blasts (42 found, 3 missed).
C = m.Confusion(tn=50, fp=5, fn=3, tp=42)


def test_confusion_counts_and_matrix_order():
    c = m.confusion([0, 0, 0, 1, 1, 1, 1], [0, 1, 1, 0, 1, 1, 1])
    assert c == m.Confusion(tn=1, fp=2, fn=1, tp=3)
    assert (c.n, c.positives, c.negatives) == (7, 4, 3)
    assert c.as_matrix().tolist() == [[1, 2], [1, 3]]


def test_confusion_with_one_class_present_still_2x2():
    assert m.confusion([1, 1], [1, 0]) == m.Confusion(tn=0, fp=0, fn=1, tp=1)


@pytest.mark.parametrize(
    "fn, expected",
    [
        (m.accuracy, 92 / 100),
        (m.sensitivity, 42 / 45),
        (m.specificity, 50 / 55),
        (m.precision, 42 / 47),
        (m.npv, 50 / 53),
        (m.f1, 2 * 42 / (2 * 42 + 5 + 3)),
        (m.fpr, 5 / 55),
        (m.fnr, 3 / 45),
    ],
)
def test_metric_values(fn, expected):
    assert fn(C) == pytest.approx(expected)


def test_accuracy_is_exactly_092():
    assert m.accuracy(C) == pytest.approx(0.92)


def test_specificity_is_not_precision():
    # Few normals, many blasts: specificity = 2/4 = 0.5 but precision = 90/92.
    c = m.Confusion(tn=2, fp=2, fn=10, tp=90)
    assert m.specificity(c) == pytest.approx(0.5)
    assert m.precision(c) == pytest.approx(90 / 92)
    assert m.specificity(c) != pytest.approx(m.precision(c))


def test_complements():
    assert m.fpr(C) == pytest.approx(1 - m.specificity(C))
    assert m.fnr(C) == pytest.approx(1 - m.sensitivity(C))


def test_nan_when_undefined():
    no_positives = m.Confusion(tn=4, fp=1, fn=0, tp=0)
    assert math.isnan(m.sensitivity(no_positives))
    assert math.isnan(m.fnr(no_positives))
    assert m.precision(no_positives) == 0.0  # one cell called blast, wrongly
    assert math.isnan(m.precision(m.Confusion(tn=4, fp=0, fn=1, tp=0)))  # none called blast
    assert math.isnan(m.f1(m.Confusion(tn=3, fp=0, fn=0, tp=0)))
    assert m.specificity(no_positives) == pytest.approx(0.8)
    empty = m.Confusion(0, 0, 0, 0)
    assert all(math.isnan(fn(empty)) for fn, _ in m.PROPORTIONS.values())


def test_proportions_counts_match_functions():
    assert list(m.PROPORTIONS) == [
        "accuracy", "sensitivity", "specificity", "precision", "npv", "fpr", "fnr",
    ]
    assert m.PROPORTIONS["specificity"][1](C) == (50, 55)
    assert m.PROPORTIONS["precision"][1](C) == (42, 47)
    for fn, counts in m.PROPORTIONS.values():
        k, n = counts(C)
        assert fn(C) == pytest.approx(k / n)


def test_roc_auc_by_hand_and_single_class():
    y = [0, 0, 1, 1]
    s = [0.1, 0.4, 0.35, 0.8]
    # positive 0.35 beats 0.1 only; positive 0.8 beats both -> 3 of 4 pairs.
    assert m.roc_auc(y, s) == pytest.approx(0.75)
    assert math.isnan(m.roc_auc([1, 1, 1], [0.2, 0.5, 0.9]))


def test_roc_curves_per_class():
    y = np.array([0, 0, 1, 1, 0, 1])
    p = np.array([0.1, 0.4, 0.35, 0.8, 0.7, 0.9])
    curves = m.roc_curves(y, p)
    assert list(curves) == ["normal", "blast"]
    f, t, _, auc = curves["blast"]
    f_ref, t_ref, _ = roc_curve(y, p)
    np.testing.assert_allclose(f, f_ref)
    np.testing.assert_allclose(t, t_ref)
    assert auc == pytest.approx(m.roc_auc(y, p))
    # With the score for class 0 being 1 - p, both classes rank the same pairs: equal AUC.
    assert curves["normal"][3] == pytest.approx(auc)
    f0, t0, _ = roc_curve(1 - y, 1 - p)
    np.testing.assert_allclose(curves["normal"][0], f0)
    np.testing.assert_allclose(curves["normal"][1], t0)
