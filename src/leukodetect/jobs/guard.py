"""Fit a checkpoint's out-of-distribution guard and store it in the checkpoint.

The guard (:mod:`leukodetect.evaluation.ood`) is fitted on the penultimate-layer features of the
images the model was trained on, seen without augmentation, and its threshold is a percentile of the
scores of held-out images of the same laboratories (the run's validation part): images the network
never fitted, so the threshold is what a new image from those laboratories scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from leukodetect.data.records import Record
from leukodetect.errors import BadImageError, LeukoError
from leukodetect.evaluation.ood import fit_guard, guard_scores, guard_threshold
from leukodetect.runtime.checkpoint import load_checkpoint, save_checkpoint
from leukodetect.runtime.classifier import Classifier
from leukodetect.runtime.images import open_rgb

#: Share of held-out in-distribution cells the guard lets through (the rest are flagged for review).
DEFAULT_PERCENTILE = 97.5


def model_inputs(clf: Classifier, records: Sequence[Record], *, log=print) -> tuple[list, list[Record]]:
    """The model inputs of readable records (canonical crops from a cell bank are used as they are)."""
    images, kept = [], []
    for r in records:
        try:
            image = open_rgb(r.path)
        except BadImageError as exc:
            log(f"skipped: {exc}")
            continue
        images.append(image)
        kept.append(r)
    return images, kept


def add_guard(checkpoint: Path, fit: Sequence[Record], held_out: Sequence[Record], *,
              percentile: float = DEFAULT_PERCENTILE, device: str = "auto", log=print) -> dict:
    """Fit the guard on ``fit`` (the training images), set its threshold on ``held_out``, save it in ``checkpoint``.

    Returns the stored guard description (threshold, percentile, counts), without its arrays.
    """
    if not held_out:
        raise LeukoError(f"The guard of {checkpoint} needs held-out images of the training laboratories to set its "
                         "threshold: train with a validation part (--val-fraction above 0).")
    clf = Classifier.from_checkpoint(checkpoint, device=device, precision="fp32", backend="torch")
    fit_images, fit_kept = model_inputs(clf, fit, log=log)
    features = clf.image_features(fit_images, batch_size=32)
    stats = fit_guard(features, np.array([r.label for r in fit_kept]))
    held_images, _ = model_inputs(clf, held_out, log=log)
    threshold = guard_threshold(guard_scores(clf.image_features(held_images, batch_size=32), stats), percentile)
    bundle = load_checkpoint(checkpoint)
    guard = {"center": torch.from_numpy(stats.center), "projection": torch.from_numpy(stats.projection),
             "class_means": torch.from_numpy(stats.class_means), "threshold": threshold, "percentile": float(percentile),
             "fitted_on": len(fit_kept), "threshold_on": len(held_images), "dims": int(stats.projection.shape[1]),
             "score": "squared Mahalanobis distance of the penultimate-layer features to the nearer class mean (shared covariance)"}
    bundle["guard"] = guard
    save_checkpoint(bundle, checkpoint)
    described = {k: v for k, v in guard.items() if not isinstance(v, torch.Tensor)}
    log(f"Guard fitted on {len(fit_kept)} training images; threshold {threshold:.1f} = the {percentile:g}th percentile "
        f"of {len(held_images)} held-out images' scores.")
    return described
