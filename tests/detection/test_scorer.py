"""The cell scorer: training labels, fitting, the combination with the crop classifier, storage and use."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from smear_images import synthetic_smear

from leukodetect.detection.features import FEATURE_NAMES
from leukodetect.detection.pipeline import analyze
from leukodetect.detection.scorer import (
    CONTEXT,
    SCORER_FEATURES,
    CellScorer,
    blast_labels,
    fit_scorer,
    white_density,
)
from leukodetect.errors import LeukoError
from leukodetect.runtime.checkpoint import load_checkpoint, save_checkpoint
from leukodetect.runtime.classifier import Classifier

AREA = FEATURE_NAMES.index("log_area")
RED = FEATURE_NAMES.index("red")


def _cells(n=60, seed=0):
    """Blasts (label 1) larger than the other cells; every other measurement noise."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = rng.normal(size=(n, len(FEATURE_NAMES)))
    x[:, AREA] += 2.0 * y
    return x, y


def test_blast_labels_pair_each_annotation_with_one_cell_within_the_radius():
    cells = [(0, 0), (3, 0), (50, 50), (100, 0)]
    labels = blast_labels(cells, [(1, 0), (52, 49), (200, 200)], radius=5)
    # (1, 0) is nearer both (0, 0) and (3, 0) but pairs with one only; (200, 200) has no cell near it.
    assert labels.tolist() in ([1, 0, 1, 0], [0, 1, 1, 0])
    assert blast_labels(cells, [], radius=5).tolist() == [0, 0, 0, 0]
    assert blast_labels(np.zeros((0, 2)), [(1, 0)], radius=5).tolist() == []


def test_fitted_scorer_is_scikit_learns_regression_without_the_colour_columns():
    from sklearn.linear_model import LogisticRegression

    x, y = _cells()
    scorer = fit_scorer(x, y)
    assert scorer.feature_names == SCORER_FEATURES and "red" not in SCORER_FEATURES and "log_area" in SCORER_FEATURES
    cols = [FEATURE_NAMES.index(n) for n in SCORER_FEATURES]
    z = (x[:, cols] - x[:, cols].mean(axis=0)) / x[:, cols].std(axis=0)
    reference = LogisticRegression(max_iter=5000).fit(z, y)
    assert np.allclose(scorer.feature_logit(x), reference.decision_function(z), atol=1e-6)
    assert scorer.prior_logit == pytest.approx(0.0)  # half the cells are blasts
    assert scorer.coef[SCORER_FEATURES.index("log_area")] > 1.0
    # A camera with other colours gives the same scores.
    shifted = x.copy()
    shifted[:, RED] += 40
    assert np.array_equal(scorer.feature_logit(shifted), scorer.feature_logit(x))


def test_combination_shifts_the_crop_odds_by_the_measurements_likelihood_ratio():
    x, y = _cells()
    scorer = fit_scorer(x, y)
    p_crop = np.full(len(y), 0.5)
    combined = scorer.combine(p_crop, x)
    assert combined[y == 1].mean() > 0.7 and combined[y == 0].mean() < 0.3
    # In log odds the combination is a sum: crop evidence plus the measurements' shift.
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    p_crop = np.linspace(0.05, 0.95, len(y))
    assert np.allclose(logit(scorer.combine(p_crop, x)), logit(p_crop) + scorer.feature_logit(x) - scorer.prior_logit)
    # Measurements that carry no evidence (at the prior) leave the crop classifier's probability as it is.
    neutral = CellScorer(feature_names=SCORER_FEATURES, mean=(0.0,) * len(SCORER_FEATURES), scale=(1.0,) * len(SCORER_FEATURES),
                         coef=(0.0,) * len(SCORER_FEATURES), intercept=0.4, prior_logit=0.4)
    assert np.allclose(neutral.combine(p_crop, x), p_crop)
    assert np.isfinite(scorer.combine([0.0, 1.0], x[:2])).all()  # certain crop probabilities stay finite
    assert scorer.combine([], np.zeros((0, len(FEATURE_NAMES)))).shape == (0,)


def test_scorer_round_trips_and_refuses_foreign_measurements_and_too_few_cells():
    x, y = _cells()
    scorer = fit_scorer(x, y)
    again = CellScorer.from_dict(json.loads(json.dumps(scorer.to_dict())))
    assert np.array_equal(again.combine(np.full(len(y), 0.3), x), scorer.combine(np.full(len(y), 0.3), x))
    with pytest.raises(LeukoError, match="nuclear_ratio.*retrain the detector"):
        CellScorer.from_dict(scorer.to_dict() | {"feature_names": ["nuclear_ratio", *SCORER_FEATURES[1:]]})
    with pytest.raises(LeukoError, match="3 blasts, 57 others"):
        fit_scorer(x, (np.arange(60) < 3).astype(int))


def test_fit_cell_scorer_labels_training_cells_by_the_blast_annotations(tmp_path):
    from leukodetect.jobs.detect_eval import fit_cell_scorer

    x, y = _cells(n=80)
    photos = np.array([f"Im{i % 4:03d}_1" for i in range(80)])
    xy = np.column_stack([np.arange(80) * 50.0, np.zeros(80)])
    records = [SimpleNamespace(path=Path(f"{stem}.jpg"), blasts=[tuple(p) for p in xy[(photos == stem) & (y == 1)] + 3])
               for stem in sorted(set(photos))]
    (tmp_path / "crops.json").write_text(json.dumps({"photos": {r.path.stem: {"rbc_diameter": 20.0} for r in records}}))
    for i, r in enumerate(records):  # photographs of two sizes: the density is read off each one's size
        r.path = tmp_path / r.path.name
        Image.new("RGB", (200, 100 * (1 + i % 2))).save(r.path)
    logged = []
    scorer = fit_cell_scorer(tmp_path, records, x, photos, xy, None, 0.5, logged.append, context=True)
    assert "80 located cells (40 blasts) of 4 photographs" in logged[0]
    assert scorer.coef[SCORER_FEATURES.index("log_area")] > 1.0
    # The photograph's white-cell density is the last input: 20 kept cells on 200 x 100 or 200 x 200 pixels.
    assert scorer.feature_names == (*SCORER_FEATURES, CONTEXT) and scorer.uses_density
    densities = sorted({white_density(20, 200, h, 20.0) for h in (100, 200)})
    assert scorer.mean[-1] == pytest.approx(np.mean(densities)) and scorer.scale[-1] == pytest.approx(np.std(densities))
    with pytest.raises(LeukoError, match="white-cell density"):
        scorer.combine(np.full(len(y), 0.5), x)
    scorer = fit_cell_scorer(tmp_path, records, x, photos, xy, None, 0.5, logged.append, context=False)
    assert tuple(scorer.to_dict()["feature_names"]) == SCORER_FEATURES
    # Annotations farther than the radius (0.5 x 20 px) label nothing: no scorer, and a note why.
    for r in records:
        r.blasts = [(bx + 30, by) for bx, by in r.blasts]
    assert fit_cell_scorer(tmp_path, records, x, photos, xy, None, 0.5, logged.append) is None
    assert "no cell scorer: Too few" in logged[-1]


def _scored_checkpoint(crop_checkpoint, tmp_path):
    """The tiny crop model with a hand-set scorer: every located cell's odds multiplied by e^2."""
    bundle = load_checkpoint(crop_checkpoint)
    n = len(SCORER_FEATURES)
    scorer = CellScorer(feature_names=SCORER_FEATURES, mean=(0.0,) * n, scale=(1.0,) * n, coef=(0.0,) * n, intercept=2.0, prior_logit=0.0)
    bundle["detection"] = {**bundle["detection"], "scorer": scorer.to_dict()}
    return save_checkpoint(bundle, tmp_path / "scored.pt")


def test_detection_applies_the_stored_scorer_and_keeps_the_crop_probability(crop_checkpoint, tmp_path):
    image = synthetic_smear()
    scored = analyze(image, Classifier.from_checkpoint(_scored_checkpoint(crop_checkpoint, tmp_path), device="cpu"))
    plain = analyze(image, Classifier.from_checkpoint(crop_checkpoint, device="cpu"))
    assert scored["cell_scorer"] and not plain["cell_scorer"] and len(scored["cells"]) == len(plain["cells"]) == 3
    for s, p in zip(scored["cells"], plain["cells"]):
        assert s["prob_crop"] == pytest.approx(p["prob_blast"], abs=1e-4) and "prob_crop" not in p
        odds = p["prob_blast"] / (1 - p["prob_blast"]) * np.exp(2.0)
        assert s["prob_blast"] == pytest.approx(odds / (1 + odds), abs=1e-4)
    off = analyze(image, Classifier.from_checkpoint(_scored_checkpoint(crop_checkpoint, tmp_path), device="cpu"), use_scorer=False)
    assert not off["cell_scorer"] and [c["prob_blast"] for c in off["cells"]] == [c["prob_blast"] for c in plain["cells"]]


def test_white_density_counts_cells_per_red_cell_area_whatever_the_magnification():
    base = white_density(9, 1000, 800, 50.0)
    assert base == pytest.approx(np.log(10 / (1000 * 800 / (np.pi / 4 * 50.0**2))))
    assert white_density(9, 2000, 1600, 100.0) == pytest.approx(base)  # the same field photographed at twice the scale
    assert white_density(19, 1000, 800, 50.0) > base > white_density(9, 2000, 1600, 50.0)  # more cells; a larger field
    assert np.isfinite(white_density(0, 10, 10, 50.0))  # a field smaller than one red cell, no white cell


def test_detection_gives_the_scorer_the_photographs_white_cell_density(crop_checkpoint, tmp_path):
    bundle = load_checkpoint(crop_checkpoint)
    names = (*SCORER_FEATURES, CONTEXT)
    n = len(names)
    # Only the density counts: the crop odds are multiplied by e^density.
    scorer = CellScorer(feature_names=names, mean=(0.0,) * n, scale=(1.0,) * n, coef=(0.0,) * (n - 1) + (1.0,), intercept=0.0, prior_logit=0.0)
    bundle["detection"] = {**bundle["detection"], "scorer": scorer.to_dict()}
    image = synthetic_smear()
    result = analyze(image, Classifier.from_checkpoint(save_checkpoint(bundle, tmp_path / "dense.pt"), device="cpu"))
    height, width = np.asarray(image).shape[:2]
    assert result["white_density"] == pytest.approx(white_density(3, width, height, result["rbc_diameter"]), abs=1e-4)
    for cell in result["cells"]:
        odds = cell["prob_crop"] / (1 - cell["prob_crop"]) * np.exp(result["white_density"])
        assert cell["prob_blast"] == pytest.approx(odds / (1 + odds), abs=1e-4)
