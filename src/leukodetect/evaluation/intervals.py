"""Confidence intervals for binary metrics, and the per-run metrics report.

Proportions (accuracy, sensitivity, ...) get Wilson score intervals, which behave well for small n
and values near 0 or 1. F1 and ROC AUC are not simple proportions, so they get a stratified
percentile bootstrap. Reports hold ``None`` where a value is undefined, so they stay strict JSON.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
from scipy.stats import binomtest, rankdata

from leukodetect.evaluation import metrics as m

METRIC_NAMES = (
    "accuracy", "sensitivity", "specificity", "precision", "npv", "f1", "fpr", "fnr", "roc_auc",
)


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for the proportion k / n; (nan, nan) when n == 0."""
    if n == 0:
        return (math.nan, math.nan)
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return (float(ci.low), float(ci.high))


def proportion(k: int, n: int) -> dict:
    """``k / n`` with its count and 95% Wilson interval: ``{"value", "k", "n", "ci_low", "ci_high"}`` (None where n is 0)."""
    low, high = wilson_interval(k, n)
    return {"value": k / n if n else None, "k": k, "n": n, "ci_low": None if n == 0 else low, "ci_high": None if n == 0 else high}


def bootstrap_interval(
    y_true,
    scores,
    statistic: Callable,
    *,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    vectorized: bool = False,
) -> tuple[float, float]:
    """Percentile interval of ``statistic`` over a stratified bootstrap.

    Positives and negatives are resampled separately (each keeps its own count), so every
    resample holds both classes whenever the data does, and AUC-like statistics stay defined.
    Resamples whose statistic is nan are ignored.

    Args:
        y_true: 0/1 labels.
        scores: one score (or prediction) per item.
        statistic: ``statistic(y_true, scores) -> float`` on one resample. With ``vectorized=True``
            it receives 2-D arrays of shape (n_resamples, n) and returns one value per row
            (much faster: no Python call per resample).
        seed: seed of the random generator, so the interval is reproducible.

    Returns:
        (low, high); (nan, nan) when every resample gave nan.
    """
    y = np.asarray(y_true).astype(int)
    s = np.asarray(scores)
    rng = np.random.default_rng(seed)
    # Draw indices within each class; columns are grouped by class, rows are resamples.
    parts = [
        rng.choice(idx, size=(n_resamples, idx.size), replace=True)
        for idx in (np.flatnonzero(y == 1), np.flatnonzero(y == 0))
        if idx.size
    ]
    if not parts:
        return (math.nan, math.nan)
    idx = np.concatenate(parts, axis=1)
    if vectorized:
        stats = np.asarray(statistic(y[idx], s[idx]), dtype=float)
    else:
        stats = np.array([statistic(y[row], s[row]) for row in idx], dtype=float)
    stats = stats[~np.isnan(stats)]
    if stats.size == 0:
        return (math.nan, math.nan)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.percentile(stats, [100.0 * alpha, 100.0 * (1.0 - alpha)])
    return (float(low), float(high))


def auc_rows(y_true: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """ROC AUC of each row (Mann-Whitney U with mid-ranks for ties, as roc_auc_score); nan
    for a row with one class only. Vectorised statistic for :func:`bootstrap_interval`."""
    y = np.atleast_2d(y_true).astype(bool)
    ranks = rankdata(np.atleast_2d(scores), axis=-1)
    n_pos = y.sum(axis=-1)
    n_neg = y.shape[-1] - n_pos
    u = (ranks * y).sum(axis=-1) - n_pos * (n_pos + 1) / 2.0
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((n_pos > 0) & (n_neg > 0), u / (n_pos * n_neg), np.nan)


def f1_rows(threshold: float) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """Vectorised F1 of each row at a decision threshold (prediction = score >= threshold)."""

    def statistic(y_true: np.ndarray, scores: np.ndarray) -> np.ndarray:
        y = np.atleast_2d(y_true).astype(bool)
        pred = np.atleast_2d(scores) >= threshold
        tp = (pred & y).sum(axis=-1)
        denom = 2 * tp + (pred & ~y).sum(axis=-1) + (~pred & y).sum(axis=-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(denom > 0, 2 * tp / denom, np.nan)

    return statistic


def _json_float(x: float) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


def _entry(value: float, low: float, high: float, method: str) -> dict:
    return {
        "value": _json_float(value),
        "ci_low": _json_float(low),
        "ci_high": _json_float(high),
        "method": method,
    }


def binary_report(
    y_true,
    prob,
    *,
    threshold: float = 0.5,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> dict:
    """Metrics with confidence intervals for one set of predictions, as a JSON-ready dict.

    Args:
        y_true: 0/1 labels (1 = blast).
        prob: predicted probability of blast; prediction is ``prob >= threshold``.

    Returns:
        {"n", "threshold", "confidence", "confusion": {"tn","fp","fn","tp"},
        "metrics": {name: {"value", "ci_low", "ci_high", "method"}}}; undefined values are None.
    """
    y = np.asarray(y_true).astype(int)
    p = np.asarray(prob, dtype=float)
    c = m.confusion(y, (p >= threshold).astype(int))
    boot = dict(n_resamples=n_resamples, confidence=confidence, seed=seed, vectorized=True)

    out: dict[str, dict] = {}
    for name, (fn, counts) in m.PROPORTIONS.items():
        out[name] = _entry(fn(c), *wilson_interval(*counts(c), confidence), "wilson")
    out["f1"] = _entry(m.f1(c), *bootstrap_interval(y, p, f1_rows(threshold), **boot), "bootstrap")
    out["roc_auc"] = _entry(m.roc_auc(y, p), *bootstrap_interval(y, p, auc_rows, **boot), "bootstrap")
    return {
        "n": c.n,
        "threshold": float(threshold),
        "confidence": float(confidence),
        "confusion": {"tn": c.tn, "fp": c.fp, "fn": c.fn, "tp": c.tp},
        "metrics": {name: out[name] for name in METRIC_NAMES},
    }


def summarize_folds(per_fold: list[dict]) -> dict:
    """Mean and sample standard deviation (ddof=1) of each metric across cross-validation folds.

    Folds where a metric is undefined (None or nan) are skipped for that metric; ``n_folds`` counts
    the folds used. Undefined results (no folds, or sd of a single fold) are None.
    """
    names = [name for fold in per_fold for name in fold["metrics"]]
    summary = {}
    for name in dict.fromkeys(names):
        values = np.array(
            [
                math.nan if (v := fold["metrics"].get(name, {}).get("value")) is None else v
                for fold in per_fold
            ],
            dtype=float,
        )
        values = values[~np.isnan(values)]
        summary[name] = {
            "mean": _json_float(values.mean()) if values.size else None,
            "sd": _json_float(values.std(ddof=1)) if values.size > 1 else None,
            "n_folds": int(values.size),
        }
    return summary
