"""Reliability diagram: predicted blast probability against the observed fraction of blasts.

Computed first with :func:`leukodetect.evaluation.calibration.reliability_curve`, then drawn on the
given ``ax`` (or a new figure built without pyplot's global state); returns the Figure.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from leukodetect.evaluation.calibration import (
    expected_calibration_error,
    reliability_curve,
)


def plot_reliability(y_true, prob, ax=None, *, n_bins: int = 10) -> Figure:
    """Reliability diagram with the diagonal of perfect calibration and the ECE in the legend.

    Each marker is one non-empty equal-width bin, at (mean blast probability, fraction of blasts);
    marker area grows with the number of images in the bin.

    Args:
        y_true: 0/1 labels (1 = blast).
        prob: predicted probability of blast.
    """
    prob_true, prob_pred, counts = reliability_curve(y_true, prob, n_bins)
    ece = expected_calibration_error(y_true, prob, n_bins)
    if ax is None:
        fig = Figure(figsize=(5, 5))
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfectly calibrated")
    ax.plot(prob_pred, prob_true, color="C0", label=f"model (ECE = {ece:.3f})")
    ax.scatter(prob_pred, prob_true, s=20 + 180 * np.asarray(counts) / max(int(np.sum(counts)), 1), color="C0", zorder=3)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("Mean predicted probability of blast")
    ax.set_ylabel("Fraction of blasts")
    ax.set_title(f"Reliability diagram ({len(counts)} of {n_bins} bins used, n = {int(np.sum(counts))})")
    ax.legend(loc="upper left")
    return fig
