"""The out-of-distribution guard: Mahalanobis distance to the nearer class, with a shared covariance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from leukodetect.evaluation.ood import fit_guard, guard_scores, guard_threshold
from leukodetect.runtime.guard import Guard


def two_classes(n=400, d=8, seed=0):
    rng = np.random.default_rng(seed)
    cov = np.diag(np.linspace(0.5, 4.0, d))
    x0 = rng.multivariate_normal(np.zeros(d), cov, n)
    x1 = rng.multivariate_normal(np.r_[3.0, np.zeros(d - 1)], cov, n)
    return np.vstack([x0, x1]), np.r_[np.zeros(n), np.ones(n)].astype(int), cov


def test_score_is_the_mahalanobis_distance_to_the_nearer_class_mean():
    x, y, cov = two_classes(n=4000)
    fit = fit_guard(x, y, max_dims=8)
    probe = np.array([[0.0, 2.0, 0, 0, 0, 0, 0, 0.0], [3.0, 0, 0, 0, 0, 0, 0, 4.0]])
    inv = np.linalg.inv(cov)
    expected = [min((p - m) @ inv @ (p - m) for m in (np.zeros(8), np.r_[3.0, np.zeros(7)])) for p in probe]
    np.testing.assert_allclose(guard_scores(probe, fit), expected, rtol=0.1)


def test_far_inputs_score_above_the_held_out_threshold_and_near_ones_below():
    x, y, _ = two_classes()
    held_x, held_y, _ = two_classes(seed=1)
    fit = fit_guard(x, y)
    threshold = guard_threshold(guard_scores(held_x, fit), 97.5)
    assert np.mean(guard_scores(held_x, fit) > threshold) == pytest.approx(0.025, abs=0.005)
    far = np.random.default_rng(2).normal(0, 1, (100, 8)) * 10 + 20
    assert (guard_scores(far, fit) > threshold).all()


def test_the_runtime_module_computes_the_numpy_reference():
    x, y, _ = two_classes()
    fit = fit_guard(x, y)
    module = Guard.from_stats({"center": fit.center, "projection": fit.projection, "class_means": fit.class_means})
    probe = np.random.default_rng(3).normal(0, 2, (50, 8)).astype(np.float32)
    np.testing.assert_allclose(module(torch.from_numpy(probe)).numpy(), guard_scores(probe, fit), rtol=1e-4, atol=1e-4)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError):
        fit_guard(np.zeros((3, 2)), np.array([0, 1, 1]))  # one image of class 0
    with pytest.raises(ValueError):
        guard_threshold(np.array([]))
