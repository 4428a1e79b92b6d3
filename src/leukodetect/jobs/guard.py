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
from sklearn.model_selection import GroupKFold

from leukodetect.data.records import Record
from leukodetect.errors import BadImageError, LeukoError
from leukodetect.evaluation.ood import (fit_guard, group_laboratories, group_thresholds, guard_distances, guard_groups,
                                       out_of_fold_distances)
from leukodetect.runtime.checkpoint import load_checkpoint, save_checkpoint
from leukodetect.runtime.classifier import Classifier
from leukodetect.runtime.guard import pixel_statistics
from leukodetect.runtime.images import open_rgb

#: Share of held-out in-distribution cells the guard lets through (the rest are flagged for review).
DEFAULT_PERCENTILE = 97.5
#: Folds of the training part whose out-of-fold distances join the validation part's when edges are set (0: none).
CROSSFIT_FOLDS = 5


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
              percentile: float = DEFAULT_PERCENTILE, device: str = "auto", crossfit: int = CROSSFIT_FOLDS, log=print) -> dict:
    """Fit the guard on ``fit`` (the training images), set its threshold on ``held_out``, save it in ``checkpoint``.

    Two distances are fitted (:class:`leukodetect.runtime.guard.Guard`): of the penultimate-layer
    features and of the pixel statistics, each to the nearest mean of a laboratory, kind and class
    (:func:`~leukodetect.evaluation.ood.guard_groups`: the kind is a cell bank's PBC cell type or Aria subtype;
    before 2026-12-07 a laboratory and class, before 2026-12-06 a class). The distance to each group is
    divided by its threshold, the ``(100 + percentile) / 2``-th percentile of the distances of its own
    laboratory's held-out images to that laboratory's nearest group
    (:func:`~leukodetect.evaluation.ood.group_thresholds`), so that together the two parts flag about
    ``100 - percentile`` percent of a laboratory's new images; the stored threshold of the combined score
    is 1. A laboratory with too few held-out images (C-NMC's) gets the largest laboratory percentile, as
    every group did before 2026-12-07 (06:31 UTC): a laboratory whose cells vary widely then set the edge of
    all, and stained tissue and photographs passed through the gap. The pixel part's distances of the
    held-out images are joined by those of the training images out of fold (``crossfit`` folds by group,
    :func:`~leukodetect.evaluation.ood.out_of_fold_distances`; since 2026-12-07 13:13 UTC): the pixel statistics
    are no fit of the network's, so a training image out of fold is as new as a validation one, and a small
    laboratory's edge (BCCD's, from 37 validation cells) no longer rests on one or two images. The features'
    are not: the network was fitted on those images. ``feature_threshold`` and ``pixel_threshold`` are the
    largest of the groups' thresholds.

    Returns the stored guard description (thresholds, percentile, counts), without its arrays.
    """
    if not held_out:
        raise LeukoError(f"The guard of {checkpoint} needs held-out images of the training laboratories to set its "
                         "threshold: train with a validation part (--val-fraction above 0).")
    clf = Classifier.from_checkpoint(checkpoint, device=device, precision="fp32", backend="torch")
    fit_images, fit_kept = model_inputs(clf, fit, log=log)
    held_images, held_kept = model_inputs(clf, held_out, log=log)
    groups, group_names = guard_groups([r.lab for r in fit_kept], [r.label for r in fit_kept], clf.class_names, [r.kind for r in fit_kept])
    part = (100 + percentile) / 2
    held_labs = np.array([str(r.lab) for r in held_kept])
    owners = group_laboratories(groups, [r.lab for r in fit_kept])
    folds = crossfit_folds(fit_kept, crossfit)
    n_folds = 0 if folds is None else int(folds.max()) + 1

    def edges(fit_vectors: np.ndarray, held_vectors: np.ndarray, *, out_of_fold: bool) -> tuple:
        fitted = fit_guard(fit_vectors, groups)
        d, labs = guard_distances(held_vectors, fitted), held_labs
        if out_of_fold and folds is not None:  # the training images out of fold stand beside the validation part
            d = np.vstack([d, out_of_fold_distances(fit_vectors, groups, folds)])
            labs = np.concatenate([held_labs, [str(r.lab) for r in fit_kept]])
        return fitted, group_thresholds(d, labs, owners, part)

    # The network was fitted on the training images, so their features lie closer together than a new image's
    # would: the feature part's edges come from the validation part alone. Pixel statistics are no fit of theirs.
    feature_fit, feature_edges = edges(clf.image_features(fit_images, batch_size=32), clf.image_features(held_images, batch_size=32),
                                       out_of_fold=False)
    pixel_fit, pixel_edges = edges(view_pixel_statistics(clf, fit_images), view_pixel_statistics(clf, held_images), out_of_fold=True)
    feature_threshold, pixel_threshold = float(feature_edges.max()), float(pixel_edges.max())
    bundle = load_checkpoint(checkpoint)
    arrays = {"center": feature_fit.center, "projection": feature_fit.projection, "class_means": feature_fit.class_means,
              "pixel_center": pixel_fit.center, "pixel_projection": pixel_fit.projection, "pixel_class_means": pixel_fit.class_means,
              "feature_group_thresholds": feature_edges.astype(np.float32), "pixel_group_thresholds": pixel_edges.astype(np.float32)}
    guard = {**{k: torch.from_numpy(v) for k, v in arrays.items()},
             "threshold": 1.0, "feature_threshold": feature_threshold, "pixel_threshold": pixel_threshold,
             "lab_thresholds": {str(lab): {"features": float(feature_edges[i]), "pixels": float(pixel_edges[i])}
                                for i, lab in enumerate(owners) if lab is not None},
             "percentile": float(percentile), "fitted_on": len(fit_kept), "threshold_on": len(held_images),
             "crossfit_folds": n_folds,
             "dims": int(feature_fit.projection.shape[1]), "groups": group_names,
             "score": "the larger of two squared Mahalanobis distances to the nearest mean of a laboratory, kind and class "
                      "(shared covariance), each group's divided by its laboratory's threshold: of the penultimate-layer "
                      "features, and of the pixel statistics"}
    bundle["guard"] = guard
    save_checkpoint(bundle, checkpoint)
    log(f"Guard fitted on {len(fit_kept)} training images in {len(group_names)} groups (laboratory, kind and class); "
        f"thresholds at the {part:g}th percentile of each laboratory's held-out images' distances ({len(held_images)} images"
        f"{f'; for the pixels also the training images out of {n_folds} folds' if n_folds else ''}): "
        f"features {feature_edges.min():.1f}-{feature_threshold:.1f}, pixels {pixel_edges.min():.1f}-{pixel_threshold:.1f}.")
    return {k: v for k, v in guard.items() if not isinstance(v, torch.Tensor)}


def crossfit_folds(records: Sequence[Record], folds: int) -> np.ndarray | None:
    """A fold per training record (whole groups: photographs, patients), or None for ``folds`` below 2."""
    groups = [str(r.group) for r in records]
    if folds < 2 or len(set(groups)) < folds:
        return None
    out = np.zeros(len(records), dtype=int)
    for k, (_, inside) in enumerate(GroupKFold(n_splits=folds).split(np.zeros(len(records)), groups=groups)):
        out[inside] = k
    return out


def view_pixel_statistics(clf: Classifier, images) -> np.ndarray:
    """Pixel statistics of the images as the model is shown them (its preprocessing undone: RGB in [0, 1])."""
    mean = torch.tensor(clf.preset.mean).view(1, 3, 1, 1)
    std = torch.tensor(clf.preset.std).view(1, 3, 1, 1)
    return torch.cat([pixel_statistics(batch * std + mean) for batch in clf.preprocessed_batches(images, 64)]).numpy()
