"""Figures comparing architectures: ROC curves, mean training curves, metric bars, galleries.

Compute first, then draw: each function takes its numbers (or computes them with scikit-learn),
draws on the given ``ax`` / ``axes`` (or a new figure built without pyplot's global state) and returns
the Figure, so tests can check the data and labels behind a plot.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import RocCurveDisplay

from leukodetect.reporting.report import PERCENT_METRICS


def _axes(ax, **figure_kw):
    if ax is not None:
        return ax.figure, ax
    fig = Figure(**figure_kw)
    return fig, fig.add_subplot()


def plot_roc_comparison(predictions: Mapping[str, tuple[np.ndarray, np.ndarray]], ax=None, *, title: str = "ROC curves") -> Figure:
    """One ROC curve (blast = positive) per architecture on one axes, AUC in the legend.

    Args:
        predictions: name -> (y_true 0/1, probability of blast), e.g. pooled out-of-fold predictions.
    """
    fig, ax = _axes(ax, figsize=(5.5, 5.5))
    items = list(predictions.items())
    for i, (name, (y, p)) in enumerate(items):
        y = np.asarray(y).astype(int)
        if len(set(y.tolist())) < 2:
            continue  # no ROC curve with one class
        RocCurveDisplay.from_predictions(y, np.asarray(p, dtype=float), pos_label=1, name=name, ax=ax,
                                         plot_chance_level=i == len(items) - 1)
    ax.set_xlabel("False positive rate (1 - specificity)")
    ax.set_ylabel("True positive rate (sensitivity)")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize="small")
    return fig


def mean_history(histories: Sequence[Sequence[dict]]) -> list[dict]:
    """Per epoch, the mean over folds of train/val accuracy and loss (None values skipped)."""
    keys = ("train_acc", "val_acc", "train_loss", "val_loss")
    epochs = sorted({row["epoch"] for h in histories for row in h})
    out = []
    for epoch in epochs:
        rows = [row for h in histories for row in h if row["epoch"] == epoch]
        mean = {"epoch": epoch}
        for key in keys:
            values = [row[key] for row in rows if row.get(key) is not None]
            mean[key] = float(np.mean(values)) if values else None
        out.append(mean)
    return out


def plot_mean_histories(histories: Mapping[str, Sequence[dict]], axes=None, *, title: str = "") -> Figure:
    """Accuracy and loss per epoch (mean over folds), one colour per architecture.

    Solid lines: training; dashed: validation.

    Args:
        histories: name -> rows from :func:`mean_history`.
        axes: two Axes (accuracy, loss); a new 1x2 figure when None.
    """
    if axes is None:
        fig = Figure(figsize=(11, 4.2))
        axes = fig.subplots(1, 2)
    else:
        fig = axes[0].figure
    for ax, metric, label in ((axes[0], "acc", "accuracy"), (axes[1], "loss", "loss")):
        for i, (name, rows) in enumerate(histories.items()):
            for split, style in (("train", "-"), ("val", "--")):
                pts = [(r["epoch"], r[f"{split}_{metric}"]) for r in rows if r.get(f"{split}_{metric}") is not None]
                if pts:
                    ax.plot(*zip(*pts), linestyle=style, color=f"C{i}", marker="o", markersize=3,
                            label=f"{name} ({'train' if split == 'train' else 'validation'})")
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{label} (mean over folds)")
        ax.set_title(f"{title}{': ' if title else ''}{label} per epoch")
        ax.legend(fontsize="x-small")
    return fig


def plot_metric_bars(values: Mapping[str, Mapping[str, dict]], metric: str, ax=None) -> Figure:
    """One metric across architectures: grouped bars (one colour per protocol) with 95% CI error bars.

    Args:
        values: protocol -> architecture -> {"value", "ci_low", "ci_high"} (a metrics.json entry).
        metric: the metric's name, for the title and axis (percent for proportions).
    """
    fig, ax = _axes(ax, figsize=(6, 4))
    scale = 100.0 if metric in PERCENT_METRICS else 1.0
    archs = list(dict.fromkeys(a for per in values.values() for a in per))
    width = 0.8 / max(len(values), 1)
    x = np.arange(len(archs))
    for j, (protocol, per) in enumerate(values.items()):
        v, lo, hi = [], [], []
        for arch in archs:
            e = per.get(arch, {})
            val = e.get("value")
            v.append(math.nan if val is None else scale * val)
            lo.append(0.0 if val is None or e.get("ci_low") is None else scale * (val - e["ci_low"]))
            hi.append(0.0 if val is None or e.get("ci_high") is None else scale * (e["ci_high"] - val))
        ax.bar(x + (j - (len(values) - 1) / 2) * width, v, width, yerr=[lo, hi], capsize=3, label=f"{protocol} protocol", color=f"C{j}")
    ax.set_xticks(x, archs, rotation=30, ha="right")
    ax.set_xlim(-0.5, len(archs) - 0.5)  # keep every architecture's slot, even where its value is undefined
    ax.set_ylabel(f"{metric} ({'%' if scale == 100 else '0-1'})")
    ax.set_ylim(0, 100 * 1.05 if scale == 100 else 1.05)
    ax.set_title(f"{metric}: pooled out-of-fold, 95% CI")
    ax.legend(fontsize="x-small", loc="lower right")
    return fig


def plot_metric_grid(values: Mapping[str, Mapping[str, dict]], metrics: Sequence[str]) -> Figure:
    """:func:`plot_metric_bars` for several metrics, in a grid of 3 columns."""
    rows = math.ceil(len(metrics) / 3)
    fig = Figure(figsize=(15, 4.6 * rows))
    # Fixed spacing: a layout engine measures every label and costs seconds on a loaded CPU.
    fig.subplots_adjust(left=0.05, right=0.98, top=0.96, bottom=0.08, hspace=0.55, wspace=0.22)
    axes = np.atleast_1d(fig.subplots(rows, 3)).ravel()
    for ax, metric in zip(axes, metrics):
        plot_metric_bars({p: {a: e[metric] for a, e in per.items()} for p, per in values.items()}, metric, ax=ax)
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    return fig


def plot_inflation(inflation: Mapping[str, Mapping[str, float | None]], metrics: Sequence[str], ax=None) -> Figure:
    """Paper minus clean protocol, in percentage points, per metric (bars grouped by architecture)."""
    fig, ax = _axes(ax, figsize=(10, 4.5))
    archs = list(inflation)
    width = 0.8 / max(len(archs), 1)
    x = np.arange(len(metrics))
    for i, arch in enumerate(archs):
        v = [math.nan if inflation[arch].get(m) is None else inflation[arch][m] for m in metrics]
        ax.bar(x + (i - (len(archs) - 1) / 2) * width, v, width, label=arch, color=f"C{i}")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(x, list(metrics), rotation=30, ha="right")
    ax.set_ylabel("paper - clean (percentage points)")
    ax.set_title("How much the paper's protocol (augment before splitting) changes each metric")
    ax.legend(fontsize="x-small")
    return fig


def grid_axes(n: int, *, ncols: int = 3, size: tuple[float, float] = (4.2, 4.0)) -> tuple[Figure, list]:
    """A figure with ``n`` axes in rows of ``ncols`` (spare axes hidden), for one panel per architecture."""
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows))
    fig.subplots_adjust(hspace=0.35, wspace=0.35)
    axes = list(np.atleast_1d(fig.subplots(nrows, ncols)).ravel())
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def plot_gallery(images: Sequence[np.ndarray], captions: Sequence[str], *, ncols: int = 6, title: str = "") -> Figure:
    """Images (e.g. Grad-CAM overlays) in a grid, each with its caption underneath."""
    n = max(len(images), 1)
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    height = 2.6 * nrows + 0.8  # inches; the top 0.9 hold the title and the first row's captions
    fig = Figure(figsize=(2.2 * ncols, height))
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.9 / height, hspace=0.45, wspace=0.08)
    axes = np.atleast_1d(fig.subplots(nrows, ncols)).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, image, caption in zip(axes, images, captions):
        ax.imshow(image)
        ax.set_title(caption, fontsize=7)
    if title:
        fig.suptitle(title, y=1 - 0.08 / height, va="top")
    return fig
