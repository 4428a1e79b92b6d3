"""The out-of-distribution guard: Mahalanobis distance to the nearest group (a laboratory and class), with a shared covariance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from leukodetect.evaluation.ood import (fit_guard, group_laboratories, group_thresholds, guard_distances, guard_groups, guard_scores,
                                       guard_threshold, lab_guard_threshold, out_of_fold_distances)
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


def test_the_runtime_module_divides_each_group_by_its_own_threshold():
    x, y, _ = two_classes()
    fit = fit_guard(x, y)
    scales = np.array([2.0, 30.0])
    stats = {"center": fit.center, "projection": fit.projection, "class_means": fit.class_means, "feature_group_thresholds": scales,
             "pixel_center": fit.center, "pixel_projection": fit.projection, "pixel_class_means": fit.class_means,
             "pixel_group_thresholds": scales, "feature_threshold": 30.0, "pixel_threshold": 30.0}
    probe = np.random.default_rng(3).normal(0, 2, (50, 8)).astype(np.float32)
    expected = (guard_distances(probe, fit) / scales).min(1)
    np.testing.assert_allclose(guard_scores(probe, fit, scales), expected)
    module = Guard.from_stats(stats)
    assert module.feature_scale == module.pixel_scale == 1.0
    np.testing.assert_allclose(module.features(torch.from_numpy(probe)).numpy(), expected, rtol=1e-4, atol=1e-4)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError):
        fit_guard(np.zeros((3, 2)), np.array([0, 1, 1]))  # one image of class 0
    with pytest.raises(ValueError):
        guard_threshold(np.array([]))


def test_groups_are_a_laboratory_and_a_class_and_small_ones_are_pooled():
    labs = ["milan", "milan", "milan", "delhi", "delhi", "delhi", "tehran", "barcelona", "barcelona"]
    labels = [0, 0, 1, 0, 1, 1, 1, 0, 0]
    groups, names = guard_groups(labs, labels, ["normal", "blast"])
    # milan/blast and tehran/blast have one image each: they make "*/blast"; delhi/normal alone pools into
    # "*/normal"; with one image there, it joins normal's largest group, barcelona/normal (2, before milan's 2).
    assert names == ["*/blast", "barcelona/normal", "delhi/blast", "milan/normal"]
    assert [names[g] for g in groups] == ["milan/normal", "milan/normal", "*/blast", "barcelona/normal", "delhi/blast",
                                          "delhi/blast", "*/blast", "barcelona/normal", "barcelona/normal"]
    plain, plain_names = guard_groups([None] * 4, [0, 1, 1, 0])  # one data set: the classes
    assert plain.tolist() == [0, 1, 1, 0] and plain_names == ["0", "1"]
    with pytest.raises(ValueError):
        guard_groups(["a"], [0, 1])


def test_a_kind_makes_a_group_of_its_own_within_its_laboratory_and_class():
    labs = ["pbc"] * 6 + ["milan"] * 3
    labels = [0, 0, 0, 0, 0, 0, 1, 1, 0]
    kinds = ["lymphocyte", "lymphocyte", "lymphocyte", "eosinophil", "eosinophil", "basophil", None, "", None]
    groups, names = guard_groups(labs, labels, ["normal", "blast"], kinds)
    # The one basophil and Milan's one normal cell are too few for a group: they pool into "*/normal" (2 images).
    assert names == ["*/normal", "milan/blast", "pbc:eosinophil/normal", "pbc:lymphocyte/normal"]
    assert [names[g] for g in groups] == ["pbc:lymphocyte/normal"] * 3 + ["pbc:eosinophil/normal"] * 2 + ["*/normal", "milan/blast",
                                                                                                          "milan/blast", "*/normal"]
    # Without kinds, the laboratory and class as before.
    assert guard_groups(labs, labels, ["normal", "blast"])[1] == ["milan/blast", "pbc/normal"]
    with pytest.raises(ValueError):
        guard_groups(["a", "b"], [0, 1], kinds=["x"])


def test_a_point_between_two_laboratories_is_flagged_only_with_a_group_per_laboratory():
    """Two laboratories' cells, far apart: pooled by class, the shared covariance spans the gap between them."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, (500, 2)), rng.normal(0, 1, (500, 2)) + [12.0, 0.0]
    x, labels, labs = np.vstack([a, b]), np.zeros(1000, int), ["a"] * 500 + ["b"] * 500
    held = np.vstack([rng.normal(0, 1, (200, 2)), rng.normal(0, 1, (200, 2)) + [12.0, 0.0]])
    between = np.array([[6.0, 0.0]])
    pooled = fit_guard(x, labels)
    per_lab = fit_guard(x, guard_groups(labs, labels)[0])
    assert guard_scores(between, pooled)[0] < guard_threshold(guard_scores(held, pooled), 97.5)
    assert guard_scores(between, per_lab)[0] > 5 * guard_threshold(guard_scores(held, per_lab), 97.5)


def test_lab_threshold_keeps_the_largest_percentile_of_laboratories_large_enough_to_say():
    # By hand: the median of 0..9 and 100..104 is the 8th of those 15 scores, 7; with 1000 added, (7 + 8) / 2.
    scores = np.r_[np.arange(10.0), np.arange(100.0, 105.0), 1000.0]
    labs = np.array(["big"] * 10 + ["small"] * 5 + ["tiny"])
    assert guard_threshold(scores[:15], 50) == 7.0
    # "small" (5 images) counts: its median is 102; "tiny" (1 image) does not, whatever its score.
    assert lab_guard_threshold(scores, labs, 50) == 102.0
    # With a minimum of 6, "small" no longer counts either: only the pooled median of all 16 is left.
    assert lab_guard_threshold(scores, labs, 50, min_lab=6) == guard_threshold(scores, 50) == 7.5


def test_group_thresholds_give_each_laboratory_its_own_edge_and_the_rest_the_largest():
    # Rows: three held-out images of "a", two of "b", one of "c"; columns: groups of a, b, c and of several laboratories.
    far = 100.0
    d = np.array([[1, far, far, far], [2, far, far, far], [3, far, far, far],
                  [far, 10, far, far], [far, 20, far, far], [far, far, 50, far]], dtype=float)
    labs = np.array(["a", "a", "a", "b", "b", "c"])
    # Medians by hand: a's images to a's group 1, 2, 3 -> 2; b's 10, 20 -> 15. "c" has one image (fewer than 2)
    # and the mixed group none of its own: both get lab_guard_threshold's value, here the median of the
    # nearest distances 1, 2, 3, 10, 20, 50 (no laboratory has the 5 images to count alone): 6.5.
    edges = group_thresholds(d, labs, ["a", "b", "c", None], 50, min_lab=2)
    np.testing.assert_allclose(edges, [2.0, 15.0, 6.5, 6.5])
    assert lab_guard_threshold(d.min(1), labs, 50) == 6.5
    with pytest.raises(ValueError):
        group_thresholds(d, labs, ["a", "b"], 50)


def test_a_widely_spread_laboratory_no_longer_widens_a_narrow_ones_edge():
    """A point beside the narrow laboratory's cloud, inside the wide one's spread: flagged only with per-laboratory edges."""
    rng = np.random.default_rng(0)
    narrow, wide = rng.normal(0, 1, (600, 2)), rng.normal(0, 6, (600, 2)) + [100.0, 0.0]
    x, labs = np.vstack([narrow, wide]), ["narrow"] * 600 + ["wide"] * 600
    groups = guard_groups(labs, [0] * 1200)[0]
    fit = fit_guard(x, groups)
    held = np.vstack([rng.normal(0, 1, (300, 2)), rng.normal(0, 6, (300, 2)) + [100.0, 0.0]])
    held_labs = np.array(["narrow"] * 300 + ["wide"] * 300)
    owners = group_laboratories(groups, labs)
    assert owners == ["narrow", "wide"]
    edges = group_thresholds(guard_distances(held, fit), held_labs, owners, 97.5)
    single = lab_guard_threshold(guard_scores(held, fit), held_labs, 97.5)
    assert edges[1] == pytest.approx(single) and edges[0] < single / 5
    beside = np.array([[8.0, 0.0]])  # eight of the narrow laboratory's standard deviations from its mean
    assert guard_scores(beside, fit)[0] < single and guard_scores(beside, fit, edges)[0] > 1
    # Each laboratory's held-out cells: about 2.5% beyond, as before.
    for lab in ("narrow", "wide"):
        assert np.mean(guard_scores(held[held_labs == lab], fit, edges) > 1) < 0.06


def test_group_laboratories_names_a_groups_laboratory_or_none_when_mixed():
    assert group_laboratories(np.array([0, 1, 1, 2, 2]), ["a", "b", "b", "c", "d"]) == ["a", "b", None]


def test_out_of_fold_distances_come_from_a_fit_without_the_images_fold():
    rng = np.random.default_rng(0)
    x = np.vstack([rng.normal(0, 1, (40, 6)), rng.normal(3, 1, (40, 6)), rng.normal(-3, 1, (4, 6))])
    groups = np.array([0] * 40 + [1] * 40 + [2] * 4)
    folds = np.arange(len(x)) % 4
    folds[80:] = 0  # every image of group 2 in fold 0: no fit of fold 0 has that group
    d = out_of_fold_distances(x, groups, folds)
    assert d.shape == (84, 3)
    for fold in range(4):
        inside = folds == fold
        expected = guard_distances(x[inside], fit_guard(x[~inside], groups[~inside]))
        got = d[inside][:, : expected.shape[1]]  # a fit without group 2 has no column for it
        np.testing.assert_allclose(got[np.isfinite(got)], expected[np.isfinite(got)], rtol=1e-6)
    assert np.isinf(d[folds == 0][:, 2]).all() and np.isfinite(d[folds == 1]).all()
    # In-sample distances understate a new image's: out of fold, each image is as far as a new one would be.
    in_sample = guard_distances(x[:80], fit_guard(x[:80], groups[:80]))[np.arange(80), groups[:80]]
    assert d[np.arange(80), groups[:80]].mean() > in_sample.mean()


def test_fit_guard_sizes_its_means_for_every_group_when_told_how_many():
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.normal(0, 1, (20, 6)), rng.normal(4, 1, (20, 6))])
    y = np.repeat([0, 2], 20)  # group 1 absent
    small, wide = fit_guard(x, y), fit_guard(x, y, n_groups=5)
    assert small.class_means.shape[0] == 3 and wide.class_means.shape[0] == 5
    np.testing.assert_allclose(guard_distances(x, wide)[:, :3], guard_distances(x, small), rtol=1e-6)
    with pytest.raises(ValueError, match="n_groups"):
        fit_guard(x, y, n_groups=2)
