"""Stratified, group-aware splits: images sharing a group never straddle a split.

Groups come from :func:`leukodetect.data.duplicates.effective_groups`, which already merges exact
duplicates into one group, so duplicates always land on the same side.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from leukodetect.errors import LeukoError


def _group_folds(labels: Sequence[int], groups: Sequence[str], folds: int, seed: int):
    labels = np.asarray(labels)
    groups = np.asarray(groups)
    n_groups = len(set(groups.tolist()))
    if folds < 2:
        raise LeukoError(f"A split needs at least 2 folds, got {folds}.")
    per_class = np.bincount(labels, minlength=2)
    if n_groups < folds or per_class.min() < folds:
        raise LeukoError(
            f"Too few images for {folds} folds ({per_class[0]} normal, {per_class[1]} blast, "
            f"{n_groups} groups): use fewer folds or more data."
        )
    cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    return list(cv.split(np.zeros(len(labels)), labels, groups))


def kfold_indices(labels, groups, *, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``folds`` (train, test) index pairs; every index is in exactly one test fold."""
    return [(np.sort(tr), np.sort(te)) for tr, te in _group_folds(labels, groups, folds, seed)]


def holdout_indices(labels, groups, *, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split off about ``fraction`` of the images (whole groups, stratified) as a held-out part (more on small data).

    ``fraction=0`` holds nothing out: every index is in the first part.
    """
    if fraction == 0:
        return np.arange(len(labels)), np.arange(0)
    if not 0 < fraction < 1:
        raise LeukoError(f"A held-out fraction must be between 0 and 1, got {fraction}.")
    # On small data the held-out part grows (down to half) rather than failing: every class
    # must have a member on both sides and a group cannot be split.
    labels, groups = np.asarray(labels), np.asarray(groups)
    room = min(np.bincount(labels, minlength=2).min(), len(set(groups.tolist())))
    folds = max(2, min(round(1 / fraction), room))
    train, held = _group_folds(labels, groups, folds, seed)[0]
    return np.sort(train), np.sort(held)


def train_val_test_indices(labels, groups, *, val_fraction: float, test_fraction: float, seed: int):
    """Three disjoint index arrays: train, validation (model selection) and test (reported).

    ``val_fraction=0`` gives an empty validation part (training then keeps its last epoch).
    """
    labels = np.asarray(labels)
    groups = np.asarray(groups)
    rest, test = holdout_indices(labels, groups, fraction=test_fraction, seed=seed)
    inner = val_fraction / (1 - test_fraction)
    tr, va = holdout_indices(labels[rest], groups[rest], fraction=inner, seed=seed + 1)
    return rest[tr], rest[va], test
