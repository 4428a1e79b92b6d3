"""scripts/morphology_probe.py: its measurements of a drawn cell are the cell's; a held-out laboratory never trains."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "morphology_probe.py"


def _script():
    spec = importlib.util.spec_from_file_location("morphology_probe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _crop(background, nucleus_r: int, cell_r: int, seed: int = 0) -> np.ndarray:
    """A 128-px bank crop: a bluish cell with a dark purple nucleus, on a slide or on black, slightly noisy."""
    rgb = np.zeros((128, 128, 3), np.uint8)
    rgb[:] = background
    cv2.circle(rgb, (64, 64), cell_r, (170, 180, 215), -1)  # cytoplasm: bluer than red
    cv2.circle(rgb, (64, 64), nucleus_r, (95, 45, 140), -1)  # nucleus: dark in green
    cv2.circle(rgb, (20, 20), 18, (225, 160, 170), -1)  # a red cell in a corner: redder than blue
    noise = np.random.default_rng(seed).normal(0, 3, rgb.shape)
    return np.clip(rgb + noise, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("background", [(235, 228, 232), (0, 0, 0)], ids=["slide", "black"])
def test_the_nucleus_and_the_cell_are_measured_in_red_cell_areas(background):
    script = _script()
    values = dict(zip(script.FEATURES, script.features(_crop(background, nucleus_r=20, cell_r=30)), strict=True))
    nucleus, cell = math.pi * 20**2 / script.RBC_AREA, math.pi * 30**2 / script.RBC_AREA
    assert math.exp(values["log_nucleus_area"]) == pytest.approx(nucleus, rel=0.15)
    assert math.exp(values["log_cell_area"]) == pytest.approx(cell, rel=0.15)
    assert values["nc_ratio"] == pytest.approx((20 / 30) ** 2, rel=0.2)
    assert values["nucleus_circularity"] > 0.8 and values["nucleus_offset"] < 0.1


def test_a_larger_nucleus_measures_larger():
    script = _script()
    small, large = (script.features(_crop((235, 228, 232), r, r + 8))[0] for r in (14, 26))
    assert large - small == pytest.approx(2 * math.log(26 / 14), abs=0.25)


def test_each_laboratory_and_class_weighs_alike():
    script = _script()
    labs = np.array(["a"] * 90 + ["a"] * 10 + ["b"] * 5)
    labels = np.array([1] * 90 + [0] * 10 + [0] * 5)
    w = script.weights(labs, labels)
    totals = {(lab, y): w[(labs == lab) & (labels == y)].sum() for lab, y in {("a", 1), ("a", 0), ("b", 0)}}
    assert len({round(t, 9) for t in totals.values()}) == 1
    assert w.sum() == pytest.approx(len(labs))


def test_a_held_out_laboratory_never_trains():
    script = _script()
    rng = np.random.default_rng(0)
    labs = np.repeat(np.array(["a", "b", "c"]), 40)
    labels = np.tile([0, 1], 60)
    x = rng.normal(size=(120, 3)) + labels[:, None]
    seen = {}

    class Recorder:
        def fit(self, rows, y, sample_weight):
            seen["rows"], seen["weights"] = rows, sample_weight
            return self

    script.fit(Recorder(), x, labels, labs, labs != "b")
    assert len(seen["rows"]) == 80 and not any((row == x[labs == "b"]).all(axis=1).any() for row in seen["rows"])
    for name, model in script.classifiers().items():  # both real classifiers take the weights this way
        script.fit(model, x, labels, labs, labs != "b")
        assert model.predict_proba(x[labs == "b"]).shape == (40, 2), name
