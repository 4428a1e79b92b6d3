"""Plots: the data and labels behind each figure, not its pixels."""

import numpy as np
import pytest
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score, roc_curve

from leukodetect.evaluation.metrics import Confusion
from leukodetect.reporting import plots

pytestmark = pytest.mark.usefixtures("close_figures")

Y = np.array([0, 0, 1, 1, 0, 1, 0, 1])
P = np.array([0.1, 0.4, 0.35, 0.8, 0.7, 0.9, 0.2, 0.6])


def _line(ax, prefix):
    (line,) = [ln for ln in ax.get_lines() if ln.get_label().startswith(prefix)]
    return line


def test_plot_roc_lines_match_sklearn():
    fig = plots.plot_roc(Y, P)
    ax = fig.axes[0]
    for name, labels, scores in (("blast", Y, P), ("normal", 1 - Y, 1 - P)):
        fpr, tpr, _ = roc_curve(labels, scores)
        line = _line(ax, name)
        np.testing.assert_allclose(line.get_xdata(), fpr)
        np.testing.assert_allclose(line.get_ydata(), tpr)
        assert f"AUC = {roc_auc_score(labels, scores):.2f}" in line.get_label()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(t.startswith("blast") and "AUC" in t for t in legend)
    assert any(t.startswith("normal") and "AUC" in t for t in legend)
    chance = _line(ax, "Chance")
    np.testing.assert_allclose(chance.get_xdata(), [0, 1])
    np.testing.assert_allclose(chance.get_ydata(), [0, 1])
    assert ax.get_title() == "ROC curve"
    assert "False positive rate" in ax.get_xlabel()
    assert "True positive rate" in ax.get_ylabel()


def test_plot_roc_draws_on_given_ax():
    fig = Figure()
    ax = fig.add_subplot()
    assert plots.plot_roc(Y, P, ax=ax) is fig


def test_plot_confusion_shows_counts_and_names():
    fig = plots.plot_confusion(Confusion(tn=50, fp=5, fn=3, tp=42))
    ax = fig.axes[0]
    assert sorted(t.get_text() for t in ax.texts) == sorted(["50", "5", "3", "42"])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["normal", "blast"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["normal", "blast"]
    assert ax.get_xlabel() == "Predicted label" and ax.get_ylabel() == "True label"
    np.testing.assert_array_equal(ax.images[0].get_array(), [[50, 5], [3, 42]])


HISTORY = [
    {"epoch": 1, "train_loss": 0.9, "train_acc": 0.6, "val_loss": 0.8, "val_acc": 0.65},
    {"epoch": 2, "train_loss": 0.5, "train_acc": 0.8, "val_loss": None, "val_acc": None},
    {"epoch": 3, "train_loss": 0.3, "train_acc": 0.9, "val_loss": 0.4, "val_acc": 0.85},
]


def test_plot_history_two_panels_with_line_data():
    fig = plots.plot_history(HISTORY)
    assert len(fig.axes) == 2
    acc, loss = fig.axes
    assert (acc.get_ylabel(), loss.get_ylabel()) == ("accuracy", "loss")
    assert acc.get_xlabel() == loss.get_xlabel() == "epoch"
    data = {
        (ax.get_ylabel(), ln.get_label()): (list(ln.get_xdata()), list(ln.get_ydata()))
        for ax in fig.axes for ln in ax.get_lines()
    }
    assert data == {
        ("accuracy", "train"): ([1, 2, 3], [0.6, 0.8, 0.9]),
        ("accuracy", "validation"): ([1, 3], [0.65, 0.85]),
        ("loss", "train"): ([1, 2, 3], [0.9, 0.5, 0.3]),
        ("loss", "validation"): ([1, 3], [0.8, 0.4]),
    }
    assert [t.get_text() for t in acc.get_legend().get_texts()] == ["train", "validation"]


def test_plot_history_without_validation():
    fig = plots.plot_history([{"epoch": 1, "train_loss": 1.0, "train_acc": 0.5}])
    assert [ln.get_label() for ax in fig.axes for ln in ax.get_lines()] == ["train", "train"]


def test_save_figure_writes_png_atomically(tmp_path):
    fig = plots.plot_confusion(Confusion(1, 2, 3, 4))
    out = plots.save_figure(fig, tmp_path / "sub" / "cm.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["cm.png"]  # no temporary file left
