"""Calibration: do predicted probabilities mean what they say, and where to put the threshold.

The first part is pure functions of labels, probabilities and logits:

- :func:`expected_calibration_error` and :func:`reliability_curve` compare the blast probability with
  the fraction of blasts over equal-width probability bins;
- :func:`fit_temperature` finds the temperature T that makes ``softmax(logits / T)`` best match the
  labels (Guo et al., 2017); it never changes which class ranks higher, only how confident it is;
- :func:`threshold_for_sensitivity` finds the highest threshold that still finds a target fraction
  of blasts, and says what specificity that costs.

:func:`calibrate_checkpoint` wires them up: validation logits from a checkpoint, a temperature, a
threshold, written into a copy of the checkpoint that :class:`~leukodetect.inference.Classifier`
then applies.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax
from sklearn.calibration import calibration_curve
from sklearn.metrics import roc_curve

from ..errors import LeukoError

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


# --- Wiring: a checkpoint and validation images in, a calibrated copy of the checkpoint out. ---


def select_split(records, split_file: str | Path, part: str = "val") -> list:
    """The records named in one part of a run's ``split.json`` (by resolved path)."""
    try:
        wanted = {str(Path(p).resolve()) for p in json.loads(Path(split_file).read_text())[part]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LeukoError(f"Cannot read the '{part}' part of {split_file} ({exc}): pass a split.json written by 'leukodetect train'.") from exc
    chosen = [r for r in records if str(Path(r.path).resolve()) in wanted]
    if not chosen:
        raise LeukoError(f"No image of the '{part}' part of {split_file} is in the data: pass the --data the run was trained on.")
    return chosen


def validation_logits(clf, pairs: Sequence[tuple[Path, int]], *, batch_size: int = 16, log=print) -> tuple[np.ndarray, np.ndarray]:
    """Float32 logits (N, C) and labels (N,) of the readable images; unreadable ones are logged and skipped."""
    import torch

    from ..data.io import open_rgb
    from ..errors import BadImageError
    from ..training.engine import predict_logits

    items = []
    for path, label in pairs:
        try:
            items.append((clf.preset(open_rgb(path)), label))
        except BadImageError as exc:
            log(f"skipped: {exc}")
    batches = [
        (torch.stack([x for x, _ in items[i : i + batch_size]]), torch.tensor([y for _, y in items[i : i + batch_size]]))
        for i in range(0, len(items), batch_size)
    ]
    # No autocast: temperature and threshold are fitted on float32 logits.
    # The model ``probabilities`` runs, so the chosen threshold sits on the same numbers the calls use.
    return predict_logits(getattr(clf, "inference_model", clf.model), batches, device=clf.device, amp_dtype=None,
                          channels_last=clf.channels_last)


def calibrate_checkpoint(
    checkpoint: str | Path,
    val,
    out: str | Path | None = None,
    *,
    target_sensitivity: float = 0.99,
    n_bins: int = 10,
    device: str = "auto",
    log=print,
) -> dict:
    """Fit a temperature and a decision threshold on validation images; save them in a new checkpoint.

    The temperature is fitted on raw (float32) logits, so it replaces any earlier one. The threshold
    is the highest whose validation sensitivity reaches ``target_sensitivity``, on probabilities with
    the new temperature applied, exactly as :class:`~leukodetect.inference.Classifier` will compute them.

    Args:
        checkpoint: the checkpoint to calibrate; it is never modified.
        val: labelled validation images, as records (``.path``, ``.label``) or (path, label) pairs.
            Use images the model was not trained on, e.g. the run's validation part.
        out: the new checkpoint; it must not exist. None writes ``<name>-calibrated.pt`` beside the
            original (``-calibrated-2.pt``... if taken).

    Returns:
        {"out", "temperature", "threshold", "calibration": {ece_before, ece_after,
        target_sensitivity, sensitivity, specificity, n_val, n_blast, temperature_at_bound,
        calibrated_from}}.
    """
    from ..inference import Classifier
    from ..training.checkpoint import load_checkpoint, save_checkpoint

    if not 0.0 < target_sensitivity <= 1.0:
        raise LeukoError(f"Target sensitivity {target_sensitivity} is not a fraction: pass a value in (0, 1], e.g. 0.99.")
    checkpoint = Path(checkpoint)
    target = _output_path(checkpoint, out)
    pairs = [(Path(r.path), r.label) if hasattr(r, "path") else (Path(r[0]), r[1]) for r in val]
    pairs = [(p, int(label)) for p, label in pairs if label is not None]
    bundle = load_checkpoint(checkpoint)
    clf = Classifier(bundle, device=device, precision="fp32", source=str(checkpoint), backend="torch")  # reads logits
    logits, y = validation_logits(clf, pairs, log=log)
    if len(set(y.tolist())) < 2:
        raise LeukoError(
            f"Calibration needs readable validation images of both classes (got {len(y)} images, "
            f"{int(y.sum())} blasts): pass a labelled validation set holding normal cells and blasts."
        )
    temperature = fit_temperature(logits, y)
    at_bound = not T_BOUNDS[0] * 1.01 < temperature < T_BOUNDS[1] / 1.01
    if at_bound:
        log(f"warning: the temperature ran to the edge of its search range ({temperature:.3g}): the {len(y)} "
            "validation images are separated perfectly or not at all; calibrate on more images.")
    before = _blast_prob(logits, float(bundle["temperature"]))
    after = _blast_prob(logits, temperature)
    choice = threshold_for_sensitivity(y, after, target_sensitivity)
    calibration = {
        "ece_before": expected_calibration_error(y, before, n_bins),
        "ece_after": expected_calibration_error(y, after, n_bins),
        "target_sensitivity": float(target_sensitivity),
        "sensitivity": choice["sensitivity"],
        "specificity": choice["specificity"],
        "n_val": int(len(y)),
        "n_blast": int(y.sum()),
        "temperature_at_bound": at_bound,
        "calibrated_from": str(checkpoint),
    }
    bundle.update(temperature=temperature, threshold=choice["threshold"], calibration=calibration)
    if target.exists():  # checked again: another process may have written it meanwhile
        raise LeukoError(f"{target} already exists: choose another --out; checkpoints are never overwritten.")
    save_checkpoint(bundle, target)
    return {"out": str(target), "temperature": temperature, "threshold": choice["threshold"], "calibration": calibration}


def _blast_prob(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Blast probability computed exactly as the Classifier will (float32 torch), so an image whose
    probability equals the chosen threshold is still called blast after deployment."""
    import torch

    return torch.softmax(torch.from_numpy(logits).float() / temperature, dim=1)[:, 1].numpy().astype(float)


def _output_path(checkpoint: Path, out: str | Path | None) -> Path:
    if out is None:
        candidate, n = checkpoint.with_name(f"{checkpoint.stem}-calibrated{checkpoint.suffix}"), 1
        while candidate.exists():
            n += 1
            candidate = checkpoint.with_name(f"{checkpoint.stem}-calibrated-{n}{checkpoint.suffix}")
        return candidate
    out = Path(out)
    if out.exists():
        raise LeukoError(f"{out} already exists: choose another --out; checkpoints are never overwritten.")
    return out
