"""Figures for reports: ROC curves, confusion matrix, training history.

Each function computes with scikit-learn first, then draws on the given ``ax`` (or a new figure
built without pyplot's global state) and returns the Figure. Nothing here calls ``plt.show``, so it
runs headless on the Agg backend.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay

from leukodetect.evaluation.metrics import Confusion
from leukodetect.runtime.checkpoint import CLASS_NAMES
from leukodetect.utils import atomic_write


def _axes(ax, **figure_kw):
    if ax is not None:
        return ax.figure, ax
    fig = Figure(**figure_kw)
    return fig, fig.add_subplot()


def plot_roc(y_true, prob, ax=None) -> Figure:
    """ROC curve of each class (the paper reports both), AUC in the legend, with the chance line.

    Args:
        y_true: 0/1 labels (1 = blast).
        prob: predicted probability of blast; the "normal" curve uses 1 - prob.
    """
    fig, ax = _axes(ax, figsize=(5, 5))
    y = np.asarray(y_true).astype(int)
    p = np.asarray(prob, dtype=float)
    # y_score passed positionally: its keyword was renamed (y_pred -> y_score) across sklearn versions.
    RocCurveDisplay.from_predictions(y, 1.0 - p, pos_label=0, name=CLASS_NAMES[0], ax=ax)
    RocCurveDisplay.from_predictions(
        y, p, pos_label=1, name=CLASS_NAMES[1], ax=ax, plot_chance_level=True
    )
    ax.set_xlabel("False positive rate (1 - specificity)")
    ax.set_ylabel("True positive rate (sensitivity)")
    ax.set_title("ROC curve")
    ax.legend(loc="lower right")
    return fig


def plot_confusion(conf: Confusion, class_names=CLASS_NAMES, ax=None) -> Figure:
    """Confusion matrix with counts; rows are true classes, columns predicted classes."""
    fig, ax = _axes(ax, figsize=(4.5, 4))
    ConfusionMatrixDisplay(conf.as_matrix(), display_labels=list(class_names)).plot(
        ax=ax, values_format="d", colorbar=False, cmap="Blues"
    )
    ax.set_title("Confusion matrix")
    return fig


def _series(history: list[dict], key: str) -> tuple[list, list]:
    rows = [(r["epoch"], r[key]) for r in history if r.get(key) is not None]
    return [e for e, _ in rows], [v for _, v in rows]


def plot_history(history: list[dict], axes=None) -> Figure:
    """Accuracy and loss per epoch for training and (when present) validation.

    Args:
        history: rows with keys epoch, train_loss, train_acc and optionally val_loss, val_acc
            (missing or None values are skipped).
        axes: two Axes (accuracy, loss); a new 1x2 figure when None.
    """
    if axes is None:
        fig = Figure(figsize=(10, 4))
        axes = fig.subplots(1, 2)
    else:
        fig = axes[0].figure
    for ax, metric, label in ((axes[0], "acc", "accuracy"), (axes[1], "loss", "loss")):
        for split, name in (("train", "train"), ("val", "validation")):
            x, y = _series(history, f"{split}_{metric}")
            if x:
                ax.plot(x, y, marker="o", label=name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.set_title(f"{label.capitalize()} per epoch")
        ax.legend()
    return fig


def save_figure(fig: Figure, path) -> Path:
    """Save ``fig`` as PNG (dpi 120, tight box) atomically, then close it.

    The PNG is written to a temporary file in the same folder and moved into place, so a reader
    never sees half a file.
    """
    try:
        atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    finally:
        plt.close(fig)
    return Path(path)
