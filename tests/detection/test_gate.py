"""The smudge-cell gate: region features, training labels, fitting, storage and its use in detection."""

import json

import numpy as np
import pytest
from smear_images import WHITE, _disc, synthetic_smear

from leukodetect.detection.features import FEATURE_NAMES
from leukodetect.detection.gate import SmudgeGate, fit_gate, gate_labels
from leukodetect.detection.locate import locate_cells
from leukodetect.detection.pipeline import analyze, draw_overlay
from leukodetect.errors import LeukoError
from leukodetect.runtime.checkpoint import load_checkpoint, save_checkpoint
from leukodetect.runtime.classifier import Classifier

SMUDGE_XY = (302.0, 126.0)


def smear_with_smudge() -> np.ndarray:
    """The synthetic smear plus a pale, ragged stained object of white-cell size (a smudge cell)."""
    img = synthetic_smear().astype(float)
    for dx, dy in [(0, 0), (14, 6), (-8, 12)]:
        _disc(img, 300 + dx, 120 + dy, 30, (170, 120, 195))
    return np.clip(img, 0, 255).astype(np.uint8)


def _index(loc, x, y):
    return int(np.argmin([(c.x - x) ** 2 + (c.y - y) ** 2 for c in loc.cells]))


def stain_gate(threshold: float = 0.5) -> SmudgeGate:
    """A hand-set gate: P(white cell) = sigmoid(stain_mean - 65), stain above the photograph's threshold."""
    n = len(FEATURE_NAMES)
    column = [[1.0] if name == "stain_mean" else [0.0] for name in FEATURE_NAMES]
    return SmudgeGate(feature_names=FEATURE_NAMES, mean=(0.0,) * n, scale=(1.0,) * n, weights=(tuple(map(tuple, column)),),
                      biases=((-65.0,),), threshold=threshold, keep=0.99)


def test_features_tell_the_smudge_from_intact_cells():
    loc = locate_cells(smear_with_smudge())
    assert loc.features.shape == (len(loc.cells), len(FEATURE_NAMES)) == (4, len(FEATURE_NAMES))
    feats = {name: loc.features[:, i] for i, name in enumerate(FEATURE_NAMES)}
    smudge = _index(loc, *SMUDGE_XY)
    cells = [_index(loc, x, y) for x, y, _ in WHITE]
    assert smudge not in cells
    # Paler and more ragged than every intact cell.
    assert all(feats["stain_mean"][smudge] < feats["stain_mean"][i] - 15 for i in cells)
    assert all(feats["circularity"][smudge] < feats["circularity"][i] - 0.05 for i in cells)
    assert all(feats["eccentricity"][smudge] > feats["eccentricity"][i] + 0.2 for i in cells)
    assert not feats["touches_border"].any()


def test_gate_labels_from_annotations():
    d = 10.0
    cells = [(0, 0), (100, 0), (0, 100), (200, 200)]
    blasts, others = [(3, 0)], [(100, 7), (0, 109)]
    # blast at 0.3 d: intact; other at 0.7 d: intact; other at 0.9 d: left out; nothing near: unannotated.
    assert gate_labels(cells, blasts, others, d).tolist() == [1, 1, -1, 0]
    assert gate_labels(cells, [], [], d).tolist() == [0, 0, 0, 0]
    assert gate_labels([], blasts, others, d).tolist() == []


def _two_kinds(n=240, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, len(FEATURE_NAMES)))
    y = (np.arange(n) % 3 != 0).astype(int)  # two thirds intact cells
    x[y == 1, 5] += 3.0  # intact cells stain more
    x[y == 0, 2] += 2.0  # smudges are elongated
    groups = np.array([f"photo{i % 12}" for i in range(n)])
    return x, y, groups


def test_fitted_gate_keeps_the_chosen_share_and_round_trips():
    from sklearn.neural_network import MLPClassifier

    x, y, groups = _two_kinds()
    gate = fit_gate(x, y, groups, keep=0.95)
    kept = gate.is_cell(x)
    assert kept[y == 1].mean() >= 0.93  # in-sample, so at least the held-out share
    assert (~kept[y == 0]).mean() >= 0.8
    # The stored numbers compute what scikit-learn's network computes.
    net = MLPClassifier((32, 16), alpha=0.01, max_iter=2000, random_state=0)
    z = (x - x.mean(axis=0)) / x.std(axis=0)
    net.fit(z, y)
    assert np.allclose(gate.probability(x), net.predict_proba(z)[:, 1], atol=1e-6)
    again = SmudgeGate.from_dict(json.loads(json.dumps(gate.to_dict())))
    assert np.array_equal(again.probability(x), gate.probability(x)) and again.threshold == gate.threshold


def test_gate_refuses_too_little_data_and_foreign_features():
    x, y, groups = _two_kinds(n=24)
    with pytest.raises(LeukoError, match="Too few located cells"):
        fit_gate(x, y, groups)
    x, y, groups = _two_kinds()
    with pytest.raises(LeukoError, match="between 0 and 1"):
        fit_gate(x, y, groups, keep=99)
    raw = stain_gate().to_dict() | {"feature_names": ["area", "colour"]}
    with pytest.raises(LeukoError, match="retrain the detector"):
        SmudgeGate.from_dict(raw)


@pytest.fixture
def gated_checkpoint(crop_checkpoint, tmp_path):
    bundle = load_checkpoint(crop_checkpoint)
    bundle["detection"] = {**bundle["detection"], "gate": stain_gate().to_dict()}
    return save_checkpoint(bundle, tmp_path / "gated.pt")


def test_detection_calls_the_smudge_and_leaves_it_out_of_the_counts(gated_checkpoint, crop_checkpoint):
    image = smear_with_smudge()
    result = analyze(image, Classifier.from_checkpoint(gated_checkpoint, device="cpu"))
    smudges = [c for c in result["cells"] if c["call"] == "smudge"]
    assert len(smudges) == 1 and abs(smudges[0]["x"] - SMUDGE_XY[0]) < 10 and smudges[0]["p_white_cell"] < 0.5
    assert result["smudge_gate"] and result["n_smudge"] == 1 and result["n_cells"] == 3 and len(result["cells"]) == 4
    assert result["n_blast"] + result["n_review"] + result["n_normal"] == 3
    assert result["blast_fraction"] == result["n_blast"] / 3
    draw_overlay(image, result)  # smudge cells have a colour
    # Without the gate (switched off, or a checkpoint without one) every located object is a white cell.
    off = analyze(image, Classifier.from_checkpoint(gated_checkpoint, device="cpu"), use_gate=False)
    plain = analyze(image, Classifier.from_checkpoint(crop_checkpoint, device="cpu"))
    for r in (off, plain):
        assert r["n_cells"] == 4 and r["n_smudge"] == 0 and not r["smudge_gate"]
        assert all(c["p_white_cell"] is None for c in r["cells"])


def test_detect_command_reports_smudge_cells_and_can_switch_the_gate_off(gated_checkpoint, tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from leukodetect.cli import app

    smear = tmp_path / "smear.png"
    Image.fromarray(smear_with_smudge()).save(smear)
    runner = CliRunner()
    on = runner.invoke(app, ["detect", str(smear), "--checkpoint", str(gated_checkpoint), "--locator", "colour", "--out", str(tmp_path / "on"), "--backend", "torch"])
    assert on.exit_code == 0, on.output
    assert "3 white cells, 1 smudge" in on.output.replace("\n", " ")
    saved = json.loads((tmp_path / "on" / "smear.json").read_text())
    assert saved["n_smudge"] == 1 and [c["call"] for c in saved["cells"]].count("smudge") == 1
    off = runner.invoke(app, ["detect", str(smear), "--checkpoint", str(gated_checkpoint), "--locator", "colour", "--out", str(tmp_path / "off"),
                              "--no-smudge-gate", "--json", "--backend", "torch"])
    assert off.exit_code == 0, off.output
    row = json.loads(off.stdout.splitlines()[0])
    assert row["n_cells"] == 4 and row["n_smudge"] == 0
