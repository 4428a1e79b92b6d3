"""Confidence intervals, the per-run report dict and the fold summary."""

import json
import math

import numpy as np
import pytest

from leukodetect.evaluation import intervals as iv
from leukodetect.evaluation import metrics as m

Z95 = 1.959963984540054  # standard normal quantile at 0.975


def wilson_by_formula(k, n, z=Z95):
    p = k / n
    denom = 1 + z**2 / n
    centre = (p + z**2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / denom
    return centre - half, centre + half


@pytest.mark.parametrize("k, n", [(8, 10), (0, 20), (42, 45), (50, 55)])
def test_wilson_matches_formula(k, n):
    low, high = iv.wilson_interval(k, n)
    exp_low, exp_high = wilson_by_formula(k, n)
    assert low == pytest.approx(exp_low, abs=1e-6)
    assert high == pytest.approx(exp_high, abs=1e-6)


def test_wilson_known_value_and_edge_cases():
    low, high = iv.wilson_interval(8, 10)
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)
    assert all(math.isnan(x) for x in iv.wilson_interval(0, 0))
    w90 = iv.wilson_interval(8, 10, confidence=0.90)
    assert low < w90[0] < w90[1] < high  # a lower confidence gives a narrower interval


def _example(n=300, seed=1):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = np.clip(0.5 * y + 0.5 * rng.random(n) + 0.1 * rng.standard_normal(n), 0, 1)
    return y, p


def test_bootstrap_deterministic_and_contains_estimate():
    y, p = _example()
    boot = dict(n_resamples=500, vectorized=True)
    a = iv.bootstrap_interval(y, p, iv.auc_rows, seed=3, **boot)
    b = iv.bootstrap_interval(y, p, iv.auc_rows, seed=3, **boot)
    c = iv.bootstrap_interval(y, p, iv.auc_rows, seed=4, **boot)
    assert a == b
    assert a != c
    assert a[0] < m.roc_auc(y, p) < a[1]


def test_bootstrap_scalar_and_vectorised_paths_agree():
    y, p = _example(80)
    scalar = iv.bootstrap_interval(y, p, m.roc_auc, n_resamples=40, seed=5)
    vector = iv.bootstrap_interval(y, p, iv.auc_rows, n_resamples=40, seed=5, vectorized=True)
    assert scalar == pytest.approx(vector)


def test_bootstrap_resamples_keep_both_classes():
    y = np.array([1] + [0] * 9)  # a plain bootstrap would miss the one positive ~35% of the time
    s = np.arange(10) / 10
    seen = []

    def statistic(yy, ss):
        seen.append((int(yy.sum()), yy.size))
        return float(ss.mean())

    iv.bootstrap_interval(y, s, statistic, n_resamples=100)
    assert len(seen) == 100
    assert set(seen) == {(1, 10)}


def test_bootstrap_ignores_nan_and_all_nan():
    y, p = np.array([0, 1, 0, 1]), np.array([0.1, 0.9, 0.2, 0.8])
    calls = iter(range(10**6))
    low, high = iv.bootstrap_interval(
        y, p, lambda yy, ss: math.nan if next(calls) % 2 else 1.0, n_resamples=50
    )
    assert (low, high) == (1.0, 1.0)
    assert all(math.isnan(x) for x in iv.bootstrap_interval(y, p, lambda a, b: math.nan, n_resamples=5))


def test_vectorised_statistics_match_scalar_ones():
    y, p = _example(60)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 60, size=(20, 60))
    aucs = iv.auc_rows(y[idx], p[idx])
    f1s = iv.f1_rows(0.5)(y[idx], p[idx])
    for row, auc, f in zip(idx, aucs, f1s):
        assert auc == pytest.approx(m.roc_auc(y[row], p[row]))
        assert f == pytest.approx(m.f1(m.confusion(y[row], (p[row] >= 0.5).astype(int))))
    assert math.isnan(iv.auc_rows(np.ones((1, 3)), np.array([[0.1, 0.2, 0.3]]))[0])


def test_binary_report_tiny_example():
    y = [0, 0, 0, 0, 1, 1, 1]
    prob = [0.1, 0.2, 0.6, 0.3, 0.7, 0.5, 0.4]
    # threshold 0.5: predictions 0 0 1 0 1 1 0 -> tn=3 fp=1 fn=1 tp=2
    r = iv.binary_report(y, prob, n_resamples=200)
    json.dumps(r, allow_nan=False)  # strict JSON
    assert r["n"] == 7 and r["threshold"] == 0.5
    assert r["confusion"] == {"tn": 3, "fp": 1, "fn": 1, "tp": 2}
    assert list(r["metrics"]) == [
        "accuracy", "sensitivity", "specificity", "precision", "npv", "f1", "fpr", "fnr", "roc_auc",
    ]
    met = r["metrics"]
    assert met["accuracy"]["value"] == pytest.approx(5 / 7)
    assert met["sensitivity"]["value"] == pytest.approx(2 / 3)
    assert met["specificity"]["value"] == pytest.approx(3 / 4)
    assert met["precision"]["value"] == pytest.approx(2 / 3)
    assert met["npv"]["value"] == pytest.approx(3 / 4)
    assert met["f1"]["value"] == pytest.approx(4 / 6)
    assert met["fpr"]["value"] == pytest.approx(1 / 4)
    assert met["fnr"]["value"] == pytest.approx(1 / 3)
    # positive scores 0.7, 0.5, 0.4 vs negatives 0.1, 0.2, 0.6, 0.3: 4 + 3 + 3 wins of 12 pairs
    assert met["roc_auc"]["value"] == pytest.approx(10 / 12)
    assert met["sensitivity"]["method"] == "wilson"
    assert (met["f1"]["method"], met["roc_auc"]["method"]) == ("bootstrap", "bootstrap")
    lo, hi = wilson_by_formula(2, 3)
    assert met["sensitivity"]["ci_low"] == pytest.approx(lo, abs=1e-6)
    assert met["sensitivity"]["ci_high"] == pytest.approx(hi, abs=1e-6)
    for entry in met.values():
        assert entry["ci_low"] <= entry["value"] <= entry["ci_high"]


def test_binary_report_undefined_values_are_none():
    r = iv.binary_report([0, 0, 0], [0.1, 0.2, 0.3], n_resamples=20)
    assert r["metrics"]["sensitivity"] == {
        "value": None, "ci_low": None, "ci_high": None, "method": "wilson",
    }
    assert r["metrics"]["roc_auc"]["value"] is None
    assert r["metrics"]["specificity"]["value"] == 1.0


def _fold(**values):
    return {"metrics": {k: {"value": v} for k, v in values.items()}}


def test_summarize_folds_mean_and_sample_sd():
    folds = [_fold(accuracy=0.90, roc_auc=0.95), _fold(accuracy=0.80, roc_auc=None),
             _fold(accuracy=0.85, roc_auc=0.97)]
    s = iv.summarize_folds(folds)
    assert s["accuracy"]["mean"] == pytest.approx(0.85)
    # deviations 0.05, -0.05, 0 -> variance (0.0025 + 0.0025) / 2 = 0.0025 -> sd 0.05
    assert s["accuracy"]["sd"] == pytest.approx(0.05)
    assert s["accuracy"]["n_folds"] == 3
    assert s["roc_auc"]["mean"] == pytest.approx(0.96)
    assert s["roc_auc"]["sd"] == pytest.approx(math.sqrt(2 * 0.01**2))
    assert s["roc_auc"]["n_folds"] == 2
    one = iv.summarize_folds([_fold(f1=0.5)])
    assert one["f1"] == {"mean": 0.5, "sd": None, "n_folds": 1}
