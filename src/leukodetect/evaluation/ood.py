"""The out-of-distribution guard's maths: how unlike the training images an image's features are.

The score is the Mahalanobis distance of an image's penultimate-layer features to the nearest of the
group means, with one covariance shared by the groups (Lee et al., 2018, "A simple unified framework for
detecting out-of-distribution samples", with a class per group). The guard of a cell model
(:mod:`leukodetect.jobs.guard`) groups its training images by laboratory, kind and class
(:func:`guard_groups`; the kind, where a cell bank gives it, is PBC's cell type or Aria's ALL subtype):
each laboratory photographs its cells with its own stain, camera and light, so a covariance shared
around two class means pooled over laboratories is as wide as the laboratories are apart, and an image
lying between their clouds passes (stained tissue, photographs); around a mean per laboratory and class
it is as wide as one laboratory's cells of one class, and a rare cell type with a mean of its own is not
far from the mean of its laboratory's common one. The features are first
projected on their leading principal components (at most :data:`MAX_DIMS`), where the covariance can be
estimated from a few thousand cells; a Ledoit-Wolf shrinkage keeps it invertible. In the projected,
whitened space the distance is a plain Euclidean norm, so the runtime computes it with two matrix
products (:class:`leukodetect.runtime.guard.Guard`), also inside an exported ONNX graph.

The threshold is a high percentile of the scores of held-out in-distribution images (never the
training images, whose features the network has fitted): by construction about ``100 - percentile``
percent of new in-distribution images are flagged, and anything farther than almost every real cell
(noise, a blank frame, a photograph of text, another kind of image) is.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.covariance import LedoitWolf

#: Most principal components kept: enough for the cell features, few enough to estimate a covariance.
MAX_DIMS = 64
#: Fewest training images of a laboratory, kind and class to make a group of their own.
MIN_GROUP = 2


@dataclass(frozen=True)
class GuardFit:
    """What the runtime needs: ``score(f) = min_c || (f - center) @ projection - class_means[c] ||^2``."""

    center: np.ndarray  # (D,)
    projection: np.ndarray  # (D, K): principal axes, scaled so the shared covariance becomes the identity
    class_means: np.ndarray  # (C, K): the groups' means in the whitened space


def guard_groups(labs: Sequence[str | None], labels: Sequence[int],
                 class_names: Sequence[str] | None = None, kinds: Sequence[str | None] | None = None) -> tuple[np.ndarray, list[str]]:
    """The guard's groups of training images: one per laboratory, kind and class; (group index per image, group names).

    ``kinds`` is what an image is within its laboratory where a cell bank says it (PBC's cell types, Aria's
    ALL subtypes; None or empty elsewhere), so that a rare cell type has a mean of its own rather than
    sitting far from the mean of a laboratory's common one. Images without a laboratory (one data set
    used alone) are grouped by class only. A group with fewer than :data:`MIN_GROUP` images joins the
    class's images of no group of their own (named ``"*/CLASS"``), or, where those are fewer than
    :data:`MIN_GROUP` too, the class's largest group. Names are ``"LAB/CLASS"`` or ``"LAB:KIND/CLASS"``
    (``class_names[label]`` where given), in sorted order.
    """
    if kinds is not None:
        if len(kinds) != len(labs):
            raise ValueError(f"guard_groups needs a kind (or None) per laboratory, got {len(kinds)} and {len(labs)}")
        labs = [f"{lab}:{kind}" if lab is not None and kind else lab for lab, kind in zip(labs, kinds)]
    if len(labs) != len(labels):
        raise ValueError(f"guard_groups needs a laboratory per label, got {len(labs)} and {len(labels)}")
    keys = [("" if lab is None else str(lab), int(y)) for lab, y in zip(labs, labels)]
    counts = Counter(keys)
    keys = [k if counts[k] >= MIN_GROUP or not k[0] else ("*", k[1]) for k in keys]
    counts = Counter(keys)
    for y in {y for lab, y in keys if lab == "*" and counts[("*", y)] < MIN_GROUP}:
        largest = max(sorted(k for k in counts if k[1] == y), key=lambda k: (counts[k], k[0] != "*"))  # ties: the first name
        keys = [largest if k == ("*", y) else k for k in keys]
    order = sorted(set(keys))
    index = {k: i for i, k in enumerate(order)}
    name = lambda y: class_names[y] if class_names is not None else str(y)  # noqa: E731
    return np.array([index[k] for k in keys], dtype=int), [f"{lab}/{name(y)}" if lab else name(y) for lab, y in order]


def fit_guard(features: np.ndarray, labels: np.ndarray, *, max_dims: int = MAX_DIMS, n_groups: int | None = None) -> GuardFit:
    """Fit the group-conditional Gaussian model with a shared covariance.

    Args:
        features: (N, D) penultimate-layer features of the training images (no augmentation).
        labels: (N,) group indices (classes, or :func:`guard_groups`); every group present needs at least two images.
        max_dims: principal components kept (fewer when N or D is small).
        n_groups: rows of the group means (default: the largest index present + 1); a group absent from
            ``labels`` keeps a mean of zeros, which callers mask.
    """
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels).astype(int)
    classes = np.unique(y)
    if x.ndim != 2 or len(x) != len(y) or len(classes) < 1 or min(np.bincount(y)[classes]) < 2:
        raise ValueError(f"fit_guard needs (N, D) features with at least two images per group, got {x.shape} and {np.bincount(y)}")
    center = x.mean(0)
    xc = x - center
    k = int(max(1, min(max_dims, x.shape[1], len(x) - 1)))
    # Principal axes of the whole set (the group means included), then the within-group covariance there.
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    axes = vt[:k].T  # (D, K)
    z = xc @ axes
    means = np.stack([z[y == c].mean(0) for c in classes])
    within = z - means[np.searchsorted(classes, y)]
    cov = LedoitWolf().fit(within).covariance_
    evals, evecs = np.linalg.eigh(cov)
    whiten = evecs / np.sqrt(np.maximum(evals, 1e-12))  # cov^(-1/2) up to a rotation
    projection = axes @ whiten
    class_means = means @ whiten
    rows = int(y.max()) + 1 if n_groups is None else n_groups
    if rows <= int(y.max()):
        raise ValueError(f"fit_guard: n_groups={n_groups} but a group index is {int(y.max())}")
    full = np.zeros((rows, k))
    full[classes] = class_means
    return GuardFit(center=center.astype(np.float32), projection=projection.astype(np.float32), class_means=full.astype(np.float32))


def guard_distances(features: np.ndarray, fit: GuardFit) -> np.ndarray:
    """Squared Mahalanobis distance to each group mean, (N, C), for (N, D) features (numpy reference)."""
    z = (np.asarray(features, dtype=np.float64) - fit.center) @ fit.projection
    return ((z[:, None, :] - fit.class_means[None].astype(np.float64)) ** 2).sum(-1)


def guard_scores(features: np.ndarray, fit: GuardFit, scales: np.ndarray | None = None) -> np.ndarray:
    """Squared Mahalanobis distance to the nearest group mean, for (N, D) features (numpy reference).

    With ``scales`` (C,), each group's distance is first divided by its own threshold
    (:func:`group_thresholds`), and the score is 1 at the edge of the nearest group.
    """
    d = guard_distances(features, fit)
    return (d if scales is None else d / np.asarray(scales, dtype=np.float64)[None]).min(1)


def guard_threshold(held_out_scores: np.ndarray, percentile: float = 97.5) -> float:
    """The score above which an image is flagged: a percentile of held-out in-distribution scores."""
    scores = np.asarray(held_out_scores, dtype=np.float64)
    if scores.size == 0:
        raise ValueError("the guard's threshold needs held-out in-distribution scores")
    if not 50 <= percentile < 100:
        raise ValueError(f"percentile must be in [50, 100), got {percentile}")
    return float(np.percentile(scores, percentile))


#: Fewest held-out images of a laboratory for its own percentile to count in the threshold.
MIN_LAB_HELD_OUT = 5


def lab_guard_threshold(scores: np.ndarray, labs: np.ndarray, percentile: float, *, min_lab: int = MIN_LAB_HELD_OUT) -> float:
    """The largest of the held-out scores' percentile, pooled and in each laboratory of at least ``min_lab`` images.

    A small laboratory thus keeps its own share of cells let through, rather than the pooled one.
    """
    scores, labs = np.asarray(scores, dtype=np.float64), np.asarray(labs)
    candidates = [guard_threshold(scores, percentile)]
    for lab in np.unique(labs):
        if (labs == lab).sum() >= min_lab:
            candidates.append(guard_threshold(scores[labs == lab], percentile))
    return max(candidates)


#: Fewest held-out images of a laboratory for its groups to get an edge of their own (:func:`group_thresholds`).
#: A percentile of n images is at most their largest, and about one new image in n + 1 lies beyond that:
#: under 20 images that is more than the guard's 5% of in-distribution images flagged.
MIN_LAB_OWN_EDGE = 20


def group_thresholds(held_distances: np.ndarray, labs: np.ndarray, group_labs: Sequence[str | None], percentile: float, *,
                     min_lab: int = MIN_LAB_OWN_EDGE) -> np.ndarray:
    """A threshold per group (C,): the percentile of its own laboratory's held-out images' distances.

    ``held_distances`` (N, C) are the held-out images' distances to every group mean
    (:func:`guard_distances`), ``labs`` (N,) their laboratories and ``group_labs`` (C,) each group's
    laboratory (None for a group of several). A laboratory of at least ``min_lab`` held-out images gets
    the percentile of their distances to the nearest of its own groups, and each of its groups that
    threshold: an image is then flagged when it is beyond every group's own edge, and a laboratory whose
    cells vary widely no longer widens every other laboratory's edge. At most ``100 - percentile``
    percent of a laboratory's held-out images lie beyond its own groups' edges, and so beyond the guard.
    Other groups (a laboratory with too few held-out images, a group of several) get
    :func:`lab_guard_threshold`'s single value (the largest of the percentiles pooled and per laboratory of
    at least :data:`MIN_LAB_HELD_OUT` images): the guard of before 2026-12-07 (06:31 UTC).
    """
    d, labs = np.asarray(held_distances, dtype=np.float64), np.asarray(labs)
    if d.ndim != 2 or len(d) != len(labs) or d.shape[1] != len(group_labs):
        raise ValueError(f"group_thresholds needs (N, C) distances, N laboratories and C group laboratories, "
                         f"got {d.shape}, {len(labs)} and {len(group_labs)}")
    fallback = lab_guard_threshold(d.min(1), labs, percentile)
    out = np.full(d.shape[1], fallback)
    owners = np.array(["" if g is None else str(g) for g in group_labs])
    for lab in np.unique(labs):
        own, rows = owners == str(lab), labs == lab
        if own.any() and rows.sum() >= min_lab:
            out[own] = guard_threshold(d[rows][:, own].min(1), percentile)
    return out


def out_of_fold_distances(features: np.ndarray, groups: np.ndarray, folds: np.ndarray, *, max_dims: int = MAX_DIMS) -> np.ndarray:
    """Each training image's distances to every group mean (N, C), the guard fitted without the image's fold.

    ``groups`` (N,) are :func:`guard_groups`' indices and ``folds`` (N,) a fold per image (whole photographs or
    patients in one fold). A group with fewer than two images outside a fold is left out of that fold's fit,
    and its distances there are infinite. The images then stand in for new ones of their laboratories when
    an edge is set (:func:`group_thresholds`), beside the few of the validation part.
    """
    x, y, folds = np.asarray(features, dtype=np.float64), np.asarray(groups).astype(int), np.asarray(folds)
    out = np.full((len(x), int(y.max()) + 1), np.inf)
    for fold in np.unique(folds):
        inside = folds == fold
        counts = np.bincount(y[~inside], minlength=out.shape[1])
        keep = ~inside & (counts[y] >= 2)
        d = guard_distances(x[inside], fit_guard(x[keep], y[keep], max_dims=max_dims, n_groups=out.shape[1]))
        d[:, counts < 2] = np.inf  # groups left out of this fold's fit
        out[inside] = d
    return out


def group_laboratories(groups: np.ndarray, labs: Sequence[str | None]) -> list[str | None]:
    """Each group's laboratory (:func:`guard_groups`' index per image, the images' laboratories); None for a mixed group."""
    groups = np.asarray(groups).astype(int)
    out: list[str | None] = []
    for g in range(int(groups.max()) + 1 if len(groups) else 0):
        found = {None if labs[i] is None else str(labs[i]) for i in np.flatnonzero(groups == g)}
        out.append(found.pop() if len(found) == 1 else None)
    return out
