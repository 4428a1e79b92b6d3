"""The cell scorer: what a located region's measurements add to the crop classifier's P(blast).

The crop classifier sees each white cell as a small picture (64 px for the shipped detector, so a
3-diameter crop is shrunk about four times). The locator has already measured each region at full
scale: its size in red-cell areas, its outline, its stain level and how much of it is condensed
chromatin, its texture (:mod:`.features`). Blasts are large with fine, evenly stained chromatin;
lymphocytes are small and dense; so those numbers carry evidence the crop classifier partly loses.

The scorer is a logistic regression on those measurements, trained on the located cells of the
training photographs (blast: paired one-to-one with an annotated blast within the evaluation
radius; every other located cell the smudge gate keeps: not a blast). It is combined with the
crop classifier as two pieces of evidence::

    logit P(blast) = logit P_crop + (logit P_features - logit prior)

where ``prior`` is the share of blasts among the scorer's training cells: the region measurements
shift the crop classifier's odds by their likelihood ratio. Absolute colours (mean red, green, blue
and grey inside the region and in the ring around it) are left out on purpose: they follow the
camera and the staining batch, not the cell, and would not travel to another lab's photographs.

A scorer may also weigh one measurement of the photograph rather than the cell (:data:`CONTEXT`;
``--photo-context``, off by default): how many white cells it holds per red-cell area of field,
the smear's white-cell density. A small lymphoid cell is a blast more often in a smear crowded
with white cells than in one with three: some ALL smears' blasts are small, with scant cytoplasm,
and look like lymphocytes cell by cell. The density is counted over the located cells the smudge
gate keeps, and the field in red-cell areas measured on the photograph, so it does not depend on
the camera's magnification. On ALL-IDB1 it made the healthy photographs' verdicts right more
often but called ALL photographs with few white cells healthy (docs/detection.md), which is why
it is not the default.

Stored as plain numbers under the detector checkpoint's ``"detection"`` entry, like the gate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression

from leukodetect.detection.features import FEATURE_NAMES
from leukodetect.detection.match import match_points
from leukodetect.errors import LeukoError

#: Region measurements that depend on the camera and the stain batch rather than on the cell.
ABSOLUTE_COLOUR = ("gray_mean", "red", "green", "blue", "ring_red", "ring_green", "ring_blue")
#: The measurements the scorer uses, in :data:`.features.FEATURE_NAMES` order.
SCORER_FEATURES = tuple(name for name in FEATURE_NAMES if name not in ABSOLUTE_COLOUR)
#: The photograph-level measurement: log of (white cells + 1) per red-cell area of the photograph's field.
CONTEXT = "log_white_density"
#: Every name a scorer may use: the region measurements, then the photograph's.
SCORER_INPUTS = (*FEATURE_NAMES, CONTEXT)
#: Inverse regularisation strength of the logistic regression (scikit-learn's default).
C = 1.0
_EPS = 1e-6


def white_density(n_white: int, width: int, height: int, rbc_diameter: float) -> float:
    """:data:`CONTEXT` of a photograph: log((white cells + 1) / field area in red-cell areas)."""
    field = width * height / (np.pi / 4 * rbc_diameter**2)
    return float(np.log((n_white + 1) / max(field, 1.0)))


def _columns(features: np.ndarray, names: Sequence[str], density=None) -> np.ndarray:
    """The ``names`` columns of rows of all :data:`.features.FEATURE_NAMES` plus the photograph's density, as float64."""
    x = np.asarray(features, dtype=np.float64).reshape(-1, len(FEATURE_NAMES))
    if CONTEXT in names:
        if density is None:
            raise LeukoError("This cell scorer needs the photograph's white-cell density (pass density=...).")
        x = np.hstack([x, np.broadcast_to(np.asarray(density, dtype=np.float64).reshape(-1, 1), (len(x), 1))])
    return x[:, [SCORER_INPUTS.index(name) for name in names]]


def _logit(p) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(p / (1 - p))


@dataclass(frozen=True)
class CellScorer:
    """A fitted scorer: standardised measurements -> log odds of a blast, and its training prior."""

    feature_names: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    coef: tuple[float, ...]
    intercept: float
    prior_logit: float

    @property
    def uses_density(self) -> bool:
        return CONTEXT in self.feature_names

    def feature_logit(self, features: np.ndarray, density=None) -> np.ndarray:
        """Log odds of a blast from the measurements alone, one per row of ``features`` (all FEATURE_NAMES columns).

        ``density``: the photograph's :func:`white_density` (one value, or one per row); needed when
        the scorer uses it (:attr:`uses_density`), ignored otherwise.
        """
        z = (_columns(features, self.feature_names, density) - np.asarray(self.mean)) / np.asarray(self.scale)
        return z @ np.asarray(self.coef) + self.intercept

    def combine(self, p_crop: Sequence[float], features: np.ndarray, density=None) -> np.ndarray:
        """P(blast) of each cell from the crop classifier's probability and the measurements."""
        p_crop = np.asarray(p_crop, dtype=np.float64).ravel()
        if len(p_crop) == 0:
            return p_crop
        shifted = _logit(p_crop) + self.feature_logit(features, density) - self.prior_logit
        return 1.0 / (1.0 + np.exp(-shifted))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> CellScorer:
        names = tuple(raw["feature_names"])
        unknown = [name for name in names if name not in SCORER_INPUTS]
        if unknown or not (len(names) == len(raw["mean"]) == len(raw["scale"]) == len(raw["coef"])):
            raise LeukoError("The checkpoint's cell scorer uses region measurements this leukodetect does not make "
                             f"({', '.join(unknown) or 'mismatched lengths'}): retrain the detector with 'leukodetect train-detector'.")
        return cls(feature_names=names, mean=tuple(map(float, raw["mean"])), scale=tuple(map(float, raw["scale"])),
                   coef=tuple(map(float, raw["coef"])), intercept=float(raw["intercept"]), prior_logit=float(raw["prior_logit"]))


def blast_labels(cells_xy, blasts, radius: float) -> np.ndarray:
    """1 for each located cell paired with an annotated blast (one-to-one, within ``radius`` pixels), else 0."""
    cells = np.asarray(cells_xy, dtype=float).reshape(-1, 2)
    labels = np.zeros(len(cells), dtype=int)
    if len(cells) and len(blasts):
        for i, _ in match_points(cells, list(blasts), radius).pairs:
            labels[i] = 1
    return labels


def fit_scorer(features: np.ndarray, labels: Sequence[int], density=None) -> CellScorer:
    """Fit the scorer on located cells (rows of all :data:`.features.FEATURE_NAMES`) labelled 1 (blast) or 0.

    ``density``: each row's photograph's :func:`white_density`; given, the scorer uses it besides the
    :data:`SCORER_FEATURES`.

    Raises:
        LeukoError: fewer than 10 cells of either kind.
    """
    y = np.asarray(labels, dtype=int)
    if min((y == 1).sum(), (y == 0).sum()) < 10:
        raise LeukoError(f"Too few located cells to train the cell scorer ({(y == 1).sum()} blasts, {(y == 0).sum()} others; "
                         "at least 10 of each are needed).")
    names = SCORER_FEATURES if density is None else (*SCORER_FEATURES, CONTEXT)
    x = _columns(features, names, density)
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale[scale == 0] = 1.0
    model = LogisticRegression(C=C, max_iter=5000).fit((x - mean) / scale, y)
    return CellScorer(feature_names=names, mean=tuple(map(float, mean)), scale=tuple(map(float, scale)),
                      coef=tuple(map(float, model.coef_[0])), intercept=float(model.intercept_[0]),
                      prior_logit=float(_logit(y.mean())))
