"""Repeated cross-validation summaries on hand-made runs whose errors are known."""

import pytest

from leukodetect.errors import LeukoError
from leukodetect.evaluation.repeats import read_predictions, repeat_summary

LABELS = {"a": 1, "b": 1, "c": 1, "d": 0, "e": 0, "f": 0}


def run(wrong: dict[str, float]) -> dict[str, tuple[int, float]]:
    """Confident correct calls, except the cells given (with their P(blast))."""
    return {cell: (y, wrong.get(cell, 0.9 if y else 0.1)) for cell, y in LABELS.items()}


def test_spread_errors_and_the_cells_wrong_every_time():
    runs = {"seed0": run({"a": 0.2, "d": 0.6}), "seed1": run({"a": 0.4}), "seed2": run({"a": 0.3, "e": 0.8, "b": 0.1})}
    s = repeat_summary(runs, target=0.8)
    assert [s["runs"][k]["errors"] for k in runs] == [2, 1, 3]
    assert s["runs"]["seed0"]["wrong"] == ["a", "d"]
    assert s["runs"]["seed1"]["accuracy"] == pytest.approx(5 / 6)
    assert s["runs"]["seed2"]["sensitivity"] == pytest.approx(1 / 3) and s["runs"]["seed2"]["specificity"] == pytest.approx(2 / 3)
    assert s["spread"]["errors"] == {"mean": 2.0, "sd": 1.0, "min": 1.0, "max": 3.0}
    assert s["spread"]["accuracy"]["mean"] == pytest.approx(4 / 6)
    assert s["wrong_in_every_run"] == ["a"]
    assert s["runs_reaching_target"] == {"target": 0.8, "count": 1}  # only seed1 (5/6)
    # Averaged per cell: a (0.2+0.4+0.3)/3 = 0.3 stays wrong; d, e and b are outvoted.
    assert s["mean_of_runs"]["wrong"] == ["a"]
    assert s["mean_of_runs"]["confusion"] == {"tn": 3, "fp": 0, "fn": 1, "tp": 2}


def test_runs_must_cover_the_same_cells_with_the_same_labels():
    with pytest.raises(LeukoError, match="at least two runs"):
        repeat_summary({"only": run({})})
    other = run({})
    other.pop("f")
    with pytest.raises(LeukoError, match="different cells"):
        repeat_summary({"x": run({}), "y": other})
    relabelled = run({})
    relabelled["f"] = (1, 0.9)
    with pytest.raises(LeukoError, match="different labels"):
        repeat_summary({"x": run({}), "y": relabelled})


def test_read_predictions_from_a_cv_folder(tmp_path):
    (tmp_path / "predictions.csv").write_text(
        "path,label,group,fold,prob_blast,predicted\n/data/Im001_1.tif,1,Im001_1,0,0.97,1\n/data/Im002_0.tif,0,Im002_0,1,0.2,0\n")
    assert read_predictions(tmp_path) == {"Im001_1": (1, 0.97), "Im002_0": (0, 0.2)}
    with pytest.raises(LeukoError, match="finished 'leukodetect cv' run"):
        read_predictions(tmp_path / "missing")
