"""The smudge-cell gate: which located objects are intact white cells.

The locator finds every stained object of white-cell size, smudge (broken) cells included; ALL
smears hold many, and ALL-IDB1 annotates none of them. The gate is a small neural network
(scikit-learn's ``MLPClassifier``, two hidden layers of 32 and 16) on the :mod:`.features` of each
located region, trained on the annotations of the training photographs:

* positive (intact white cell): a located cell within ``match`` red-cell diameters of an annotated
  blast or "other" centroid;
* negative: a located cell farther than ``far`` diameters from every annotation (mostly smudge
  cells); cells in between are left out, and so are all the cells of a photograph without the
  "other" annotations (there an unannotated cell may be an intact white cell).

Its threshold is set to keep a chosen share (``keep``, default 99%) of the intact cells, measured
by cross-validation by photograph inside the training photographs, so the gate costs about 1% of
the white cells by construction. A cell the gate rejects is called ``smudge``: it is kept in the
output (a reviewer can see it) but not counted as a white cell, and never as a blast.

The fitted gate is stored as plain numbers (layer weights, feature scaling, threshold) under the
detector checkpoint's ``"detection"`` entry, so it travels in .pt and safetensors files alike and
runs without scikit-learn's pickles.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy.spatial.distance import cdist
from sklearn.model_selection import GroupKFold, cross_val_predict
from sklearn.neural_network import MLPClassifier

from leukodetect.detection.features import FEATURE_NAMES
from leukodetect.errors import LeukoError

#: Hidden layer sizes and L2 penalty of the gate's network.
HIDDEN = (32, 16)
ALPHA = 0.01


@dataclass(frozen=True)
class SmudgeGate:
    """A fitted gate: P(intact white cell) = network(standardised features); below ``threshold``: smudge."""

    feature_names: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    weights: tuple[tuple[tuple[float, ...], ...], ...]  # one (inputs x outputs) matrix per layer
    biases: tuple[tuple[float, ...], ...]
    threshold: float
    keep: float

    def probability(self, features: np.ndarray) -> np.ndarray:
        """P(intact white cell) of each row of ``features`` (columns :attr:`feature_names`)."""
        x = (np.asarray(features, dtype=np.float64).reshape(-1, len(self.mean)) - self.mean) / self.scale
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = x @ np.asarray(w) + np.asarray(b)
            if i < len(self.weights) - 1:
                x = np.maximum(x, 0.0)
        return (1.0 / (1.0 + np.exp(-x))).ravel()

    def is_cell(self, features: np.ndarray) -> np.ndarray:
        return self.probability(features) >= self.threshold

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> SmudgeGate:
        names = tuple(raw["feature_names"])
        if names != FEATURE_NAMES:
            raise LeukoError("The checkpoint's smudge gate was trained on other region features than this leukodetect "
                             "measures: retrain the detector with 'leukodetect train-detector'.")
        return cls(
            feature_names=names, mean=tuple(raw["mean"]), scale=tuple(raw["scale"]),
            weights=tuple(tuple(tuple(row) for row in w) for w in raw["weights"]),
            biases=tuple(tuple(b) for b in raw["biases"]), threshold=float(raw["threshold"]), keep=float(raw["keep"]),
        )


def gate_labels(cells_xy, blasts, others, rbc_diameter: float, *, match: float = 0.75, far: float = 1.0) -> np.ndarray:
    """1 (intact white cell), 0 (unannotated object) or -1 (left out) for each located cell."""
    cells = np.asarray(cells_xy, dtype=float).reshape(-1, 2)
    annotated = np.concatenate([np.asarray(blasts, dtype=float).reshape(-1, 2), np.asarray(others, dtype=float).reshape(-1, 2)])
    if len(cells) == 0:
        return np.zeros(0, dtype=int)
    if len(annotated) == 0:
        return np.zeros(len(cells), dtype=int)
    nearest = cdist(cells, annotated).min(axis=1)
    return np.where(nearest <= match * rbc_diameter, 1, np.where(nearest > far * rbc_diameter, 0, -1))


def _network(seed: int):
    return MLPClassifier(HIDDEN, alpha=ALPHA, max_iter=2000, random_state=seed)


def fit_gate(features: np.ndarray, labels: Sequence[int], groups: Sequence[str], *, keep: float = 0.99, seed: int = 0) -> SmudgeGate:
    """Fit the gate on located cells with :func:`gate_labels` (rows labelled -1 are ignored).

    The threshold keeps ``keep`` of the intact cells, measured on predictions for photographs the
    network did not see (group k-fold by photograph inside ``features``).

    Raises:
        LeukoError: too little to learn from (fewer than 10 cells of a kind, or fewer than 3 photographs).
    """
    if not 0 < keep < 1:
        raise LeukoError(f"The smudge gate's kept share must be between 0 and 1 (e.g. 0.99), got {keep}.")
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    g = np.asarray(groups)
    use = y >= 0
    x, y, g = x[use], y[use], g[use]
    n_groups = len(set(g.tolist()))
    if min((y == 1).sum(), (y == 0).sum()) < 10 or n_groups < 3:
        raise LeukoError(
            f"Too few located cells to train the smudge gate ({(y == 1).sum()} annotated, {(y == 0).sum()} unannotated, "
            f"{n_groups} photographs; at least 10, 10 and 3 are needed)."
        )
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale[scale == 0] = 1.0
    z = (x - mean) / scale
    held = cross_val_predict(_network(seed), z, y, groups=g, cv=GroupKFold(min(4, n_groups)), method="predict_proba")[:, 1]
    threshold = float(np.quantile(held[y == 1], 1 - keep))
    net = _network(seed).fit(z, y)
    return SmudgeGate(
        feature_names=FEATURE_NAMES, mean=tuple(map(float, mean)), scale=tuple(map(float, scale)),
        weights=tuple(tuple(tuple(map(float, row)) for row in w) for w in net.coefs_),
        biases=tuple(tuple(map(float, b)) for b in net.intercepts_), threshold=threshold, keep=keep,
    )
