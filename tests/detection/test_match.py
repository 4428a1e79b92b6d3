"""Centroid matching on hand-made point sets, with the expected counts written out."""

import numpy as np

from leukodetect.detection.match import detection_scores, match_points, match_points_to_boxes, match_to_regions


def test_exact_and_near_matches_within_radius():
    detected = [(10, 10), (50, 52), (200, 200)]
    annotated = [(12, 10), (50, 50), (100, 100)]
    m = match_points(detected, annotated, radius=5)
    assert m.pairs == [(0, 0), (1, 1)]
    assert np.allclose(m.distances, [2.0, 2.0])
    assert (m.tp, m.fp, m.fn) == (2, 1, 1)


def test_pair_beyond_radius_is_rejected():
    m = match_points([(0, 0)], [(6, 8)], radius=9.99)  # distance 10
    assert (m.tp, m.fp, m.fn) == (0, 1, 1) and m.pairs == []
    assert match_points([(0, 0)], [(6, 8)], radius=10).tp == 1


def test_one_to_one_assignment_beats_greedy():
    # Greedy nearest-first would pair detection 0 with annotation 1 (distance 1) and leave
    # detection 1 and annotation 0 unmatched (8 apart). Hungarian pairs 0-0 (4) and 1-1 (3).
    detected = [(0, 0), (4, 0)]
    annotated = [(-4, 0), (1, 0)]
    m = match_points(detected, annotated, radius=5)
    assert (m.tp, m.fp, m.fn) == (2, 0, 0)
    assert sorted(m.pairs) == [(0, 0), (1, 1)]


def test_two_detections_one_annotation_counts_one_false_positive():
    m = match_points([(0, 0), (1, 1)], [(0, 0)], radius=3)
    assert (m.tp, m.fp, m.fn) == (1, 1, 0) and m.pairs == [(0, 0)]


def test_empty_inputs():
    assert (lambda m: (m.tp, m.fp, m.fn))(match_points([], [(1, 1), (2, 2)], 5)) == (0, 0, 2)
    assert (lambda m: (m.tp, m.fp, m.fn))(match_points([(1, 1)], [], 5)) == (0, 1, 0)


def test_scores_from_counts():
    assert detection_scores(tp=6, fp=2, fn=4) == {"recall": 0.6, "precision": 0.75, "f1": 12 / 18}
    assert detection_scores(0, 0, 0) == {"recall": None, "precision": None, "f1": None}


def test_regions_matched_at_most_once():
    regions = np.zeros((20, 20), int)
    regions[2:8, 2:8] = 1  # two touching cells merged into one region by the annotator
    regions[12:18, 12:18] = 2
    detected = [(3, 3), (6, 6), (15, 15), (10, 1)]  # two in region 1, one in 2, one outside
    assert match_to_regions(detected, regions) == {"tp": 2, "fn": 0, "fp": 1, "extra": 1, "regions": 2, "detections": 4}
    assert match_to_regions([(15, 15)], regions)["fn"] == 1


def test_a_point_inside_a_box_hits_it_once_and_overlapping_boxes_go_to_the_nearer_centre():
    boxes = [(0, 0, 40, 40), (30, 0, 70, 40), (100, 100, 120, 120)]  # the first two overlap over x 30-40
    m = match_points_to_boxes([(36, 20), (10, 20), (4, 30), (90, 90)], boxes)
    # (36, 20) lies in both overlapping boxes: one to one, box 0 goes to (10, 20), nearer its centre than (4, 30), which
    # is a second point in box 0 (false positive), and box 1 to (36, 20); (90, 90) is outside every box; box 2 is missed.
    assert m.pairs == [(0, 1), (1, 0)] and (m.tp, m.fp, m.fn) == (2, 2, 1)
    assert np.allclose(m.distances, [14.0, 10.0])
    far_corner = match_points_to_boxes([(39, 39)], [(0, 0, 40, 40)])  # 27 px from the centre: still inside
    assert (far_corner.tp, far_corner.fp, far_corner.fn) == (1, 0, 0)
    assert (lambda m: (m.tp, m.fp, m.fn))(match_points_to_boxes([], boxes)) == (0, 0, 3)
    assert (lambda m: (m.tp, m.fp, m.fn))(match_points_to_boxes([(1, 1)], [])) == (0, 1, 0)
