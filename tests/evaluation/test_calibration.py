"""Calibration: hand-computed ECE and thresholds, temperature recovery, and a calibrated checkpoint."""

import hashlib

import numpy as np
import pytest
import torch
from model_helpers import with_scale
from PIL import Image
from sklearn.calibration import calibration_curve
from typer.testing import CliRunner

from leukodetect.cli import app
from leukodetect.data.indexers import index_dataset
from leukodetect.errors import LeukoError
from leukodetect.evaluation.calibration import (
    expected_calibration_error,
    fit_temperature,
    margin_threshold,
    nll,
    per_smear,
    reliability_curve,
    threshold_for_sensitivity,
)
from leukodetect.jobs.calibrate import calibrate_checkpoint, validation_logits
from leukodetect.models import create_model
from leukodetect.reporting.calibration_plots import plot_reliability
from leukodetect.runtime.checkpoint import load_checkpoint, make_bundle, save_checkpoint
from leukodetect.runtime.classifier import Classifier
from leukodetect.runtime.images import open_rgb

# Hand example, 10 equal-width bins:
#   bin (0.1, 0.2]: p = 0.15, 0.15, labels 0, 1 -> |0.50 - 0.15| * 2/5 = 0.14
#   bin (0.7, 0.8]: p = 0.72, 0.78, labels 0, 1 -> |0.50 - 0.75| * 2/5 = 0.10
#   bin (0.9, 1.0]: p = 0.95,       label  1    -> |1.00 - 0.95| * 1/5 = 0.01
#   ECE = 0.25
Y_HAND = np.array([0, 1, 0, 1, 1])
P_HAND = np.array([0.15, 0.15, 0.72, 0.78, 0.95])


@pytest.fixture
def close_figures():
    import matplotlib.pyplot as plt

    yield
    plt.close("all")


def test_ece_of_a_hand_example():
    assert expected_calibration_error(Y_HAND, P_HAND) == pytest.approx(0.25)
    prob_true, prob_pred, counts = reliability_curve(Y_HAND, P_HAND)
    np.testing.assert_allclose(prob_true, [0.5, 0.5, 1.0])
    np.testing.assert_allclose(prob_pred, [0.15, 0.75, 0.95])
    np.testing.assert_array_equal(counts, [2, 2, 1])


def test_ece_of_a_perfectly_calibrated_set_is_zero():
    # 1 blast in 4 at p = 0.25, 3 in 4 at p = 0.75
    y = np.array([1, 0, 0, 0, 1, 1, 1, 0])
    p = np.array([0.25] * 4 + [0.75] * 4)
    assert expected_calibration_error(y, p) == pytest.approx(0.0, abs=1e-12)


def test_reliability_curve_bins_like_sklearn():
    rng = np.random.default_rng(1)
    p = rng.random(200)
    y = (rng.random(200) < p).astype(int)
    prob_true, prob_pred, counts = reliability_curve(y, p, n_bins=7)
    ref_true, ref_pred = calibration_curve(y, p, n_bins=7)
    np.testing.assert_allclose(prob_true, ref_true)
    np.testing.assert_allclose(prob_pred, ref_pred)
    assert counts.sum() == 200 and len(counts) == len(prob_true)


def test_fit_temperature_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    z = rng.normal(0.0, 2.0, 4000)
    y = (rng.random(4000) < 1.0 / (1.0 + np.exp(-z))).astype(int)  # labels drawn from a calibrated model
    calibrated = np.stack([np.zeros_like(z), z], axis=1)
    assert fit_temperature(calibrated, y) == pytest.approx(1.0, abs=0.1)
    t = fit_temperature(3.0 * calibrated, y)  # an over-confident model: logits 3x too large
    assert t == pytest.approx(3.0, rel=0.05)
    assert nll(3.0 * calibrated, y, t) < nll(3.0 * calibrated, y, 1.0)


def test_nll_by_hand():
    # softmax([0, ln 3]) = [0.25, 0.75]: NLL of label 1 is -ln 0.75, of label 0 is -ln 0.25
    logits = np.array([[0.0, np.log(3.0)], [0.0, np.log(3.0)]])
    assert nll(logits, [1, 0]) == pytest.approx(-(np.log(0.75) + np.log(0.25)) / 2)


@pytest.mark.parametrize(
    ("target", "threshold", "sensitivity", "specificity"),
    [
        # ranked: 0.9 B, 0.8 B, 0.7 n, 0.6 B, 0.4 n, 0.3 B, 0.2 n, 0.1 n
        (0.50, 0.8, 0.50, 1.00),  # 2 of 4 blasts, no normal cell above 0.8
        (0.75, 0.6, 0.75, 0.75),  # 3 of 4 blasts, costs the normal cell at 0.7
        (0.99, 0.3, 1.00, 0.50),  # all 4 blasts, costs 0.7 and 0.4
    ],
)
def test_threshold_for_sensitivity_by_hand(target, threshold, sensitivity, specificity):
    y = [1, 1, 1, 1, 0, 0, 0, 0]
    p = [0.9, 0.8, 0.6, 0.3, 0.7, 0.4, 0.2, 0.1]
    assert threshold_for_sensitivity(y, p, target) == pytest.approx(
        {"threshold": threshold, "sensitivity": sensitivity, "specificity": specificity}
    )


def test_margin_threshold_splits_the_scores_the_same_way_halfway_to_the_next_lower_one():
    p = [0.9, 0.8, 0.6, 0.3, 0.7, 0.4, 0.2, 0.1]
    assert margin_threshold(p, 0.6) == pytest.approx(0.5)  # between 0.6 (kept above) and 0.4
    assert margin_threshold(p, 0.3) == pytest.approx(0.25)
    assert margin_threshold(p, 0.1) == 0.1  # nothing below: the cut itself
    for cut in (0.9, 0.8, 0.7, 0.6, 0.4, 0.3, 0.2, 0.1):
        assert [x >= margin_threshold(p, cut) for x in p] == [x >= cut for x in p]


def test_threshold_for_sensitivity_needs_both_classes():
    with pytest.raises(ValueError, match="both classes"):
        threshold_for_sensitivity([1, 1], [0.2, 0.9])


def test_plot_reliability_draws_the_curve(close_figures):
    fig = plot_reliability(Y_HAND, P_HAND)
    ax = fig.axes[0]
    (model,) = [ln for ln in ax.get_lines() if ln.get_label().startswith("model")]
    np.testing.assert_allclose(model.get_xdata(), [0.15, 0.75, 0.95])
    np.testing.assert_allclose(model.get_ydata(), [0.5, 0.5, 1.0])
    assert "ECE = 0.250" in model.get_label()
    assert ax.get_xlabel() == "Mean predicted probability of blast" and ax.get_ylabel() == "Fraction of blasts"


# --- A calibrated copy of a (briefly) trained tiny checkpoint. ---


@pytest.fixture(scope="module")
def trained_checkpoint(tiny_tree, tmp_path_factory):
    """The tiny model trained a few steps on images 0-8 of each class: good, not perfect."""
    records = index_dataset(tiny_tree)
    train = [r for r in records if int(r.path.stem[-2:]) < 9]
    bundle = make_bundle(create_model("tiny"), arch="tiny", image_size=24, mean=[0.6] * 3, std=[0.25] * 3, config={})
    clf = Classifier(bundle, device="cpu", precision="fp32")
    x = torch.stack([clf.preset(open_rgb(r.path)) for r in train])
    y = torch.tensor([r.label for r in train])
    torch.manual_seed(0)
    model = create_model("tiny")
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    for _ in range(15):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    bundle = make_bundle(model.eval(), arch="tiny", image_size=24, mean=[0.6] * 3, std=[0.25] * 3, config={}, temperature=1.0)
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    save_checkpoint(bundle, path)
    return path


def _val(tiny_tree):
    """(path, label) of images 9-13 of each class; image 9's labels are swapped so that the validation
    set is not separated perfectly (else the fitted temperature runs to the edge of its range)."""
    swapped = {"normal_09": 1, "blast_09": 0}
    return [(r.path, swapped.get(r.path.stem, r.label)) for r in index_dataset(tiny_tree) if int(r.path.stem[-2:]) >= 9]


def test_calibrate_checkpoint_writes_a_new_checkpoint_the_classifier_uses(trained_checkpoint, tiny_tree, tmp_path):
    original = hashlib.sha256(trained_checkpoint.read_bytes()).hexdigest()
    val = _val(tiny_tree)
    result = calibrate_checkpoint(trained_checkpoint, val, tmp_path / "calibrated.pt", target_sensitivity=0.99, log=lambda m: None)
    assert hashlib.sha256(trained_checkpoint.read_bytes()).hexdigest() == original  # never modified

    bundle = load_checkpoint(tmp_path / "calibrated.pt")
    cal = bundle["calibration"]
    assert bundle["temperature"] == result["temperature"] > 0 and bundle["temperature"] != 1.0
    assert bundle["threshold"] == result["threshold"] and 0.0 <= bundle["threshold"] <= 1.0
    assert cal["n_val"] == len(val) == 10 and cal["n_blast"] == 5 and cal["target_sensitivity"] == 0.99
    assert cal["sensitivity"] == 1.0 and 0.0 <= cal["specificity"] <= 1.0
    assert not cal["temperature_at_bound"] and 0.0 <= cal["ece_after"] <= 1.0 and 0.0 <= cal["ece_before"] <= 1.0

    clf = Classifier.from_checkpoint(tmp_path / "calibrated.pt")
    assert clf.temperature == result["temperature"] and clf.threshold == result["threshold"]
    # Deployed, the new threshold still finds every validation blast and gives the same specificity.
    preds = clf.predict_paths([path for path, _ in val])
    called = np.array([p.label == "blast" for p in preds])
    labels = np.array([label for _, label in val])
    assert called[labels == 1].all()
    assert (~called[labels == 0]).mean() == pytest.approx(cal["specificity"])


def test_calibrate_checkpoint_refuses_to_overwrite(trained_checkpoint, tiny_tree, tmp_path):
    with pytest.raises(LeukoError, match="already exists"):
        calibrate_checkpoint(trained_checkpoint, _val(tiny_tree), trained_checkpoint)
    with pytest.raises(LeukoError, match="both classes"):
        calibrate_checkpoint(trained_checkpoint, [(path, label) for path, label in _val(tiny_tree) if label == 1], tmp_path / "x.pt")


def test_calibrate_cli_round_trip(trained_checkpoint, tiny_tree, tmp_path):
    runner = CliRunner()
    args = ["calibrate", "--checkpoint", str(trained_checkpoint), "--data", str(tiny_tree), "--out", str(tmp_path / "cal.pt"),
            "--target-sensitivity", "0.9"]
    result = runner.invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "temperature" in result.output and "threshold" in result.output
    assert load_checkpoint(tmp_path / "cal.pt")["calibration"]["target_sensitivity"] == 0.9
    again = runner.invoke(app, args, catch_exceptions=False)
    assert again.exit_code == 2 and "already exists" in again.output and "Traceback" not in again.output


@pytest.fixture(scope="module")
def scaled_checkpoint(trained_checkpoint, tmp_path_factory):
    """The briefly trained tiny model with a physical scale: 24-pixel inputs of 3 red-cell diameters."""
    return with_scale(trained_checkpoint, tmp_path_factory.mktemp("scaled"))


def test_calibration_shows_a_scaled_model_the_images_as_predict_does(scaled_checkpoint, tiny_tree, tmp_path):
    """A model with a physical scale sees a window of its red-cell diameters: the threshold must be chosen on that window."""
    val = _val(tiny_tree)
    clf = Classifier.from_checkpoint(scaled_checkpoint, backend="torch")
    diameter = 5.0  # declared: a 15-pixel window of each 24-pixel image, enlarged to 24
    logits, labels, _, kept = validation_logits(clf, val, rbc_diameter=diameter, log=lambda m: None)
    assert kept.tolist() == list(range(len(val)))  # every image readable
    windows = [clf.view(open_rgb(path), rbc_diameter=diameter)[0] for path, _ in val]
    np.testing.assert_allclose(logits, clf.image_logits(windows), atol=1e-6)
    assert not np.allclose(logits, clf.image_logits([open_rgb(path) for path, _ in val]), atol=1e-3)  # not the whole image

    result = calibrate_checkpoint(scaled_checkpoint, val, tmp_path / "cal.pt", target_sensitivity=0.99, rbc_diameter=diameter,
                                  log=lambda m: None)
    deployed = Classifier.from_checkpoint(tmp_path / "cal.pt", backend="torch", precision="fp32")  # as calibration computes
    preds = deployed.predict_paths([path for path, _ in val], rbc_diameter=diameter)
    called = np.array([p.label == "blast" for p in preds])
    assert called[labels == 1].all()  # deployed at the same scale, the threshold finds every validation blast
    assert (~called[labels == 0]).mean() == pytest.approx(result["calibration"]["specificity"])

    said = []
    validation_logits(clf, val, log=said.append)  # no red cells to measure in these images, no diameter declared
    assert len(said) == 1 and said[0].startswith(f"{len(val)} of {len(val)} images") and "no measurable red cells" in said[0]


def test_calibrate_cli_declares_the_pixel_size(scaled_checkpoint, tiny_tree, tmp_path):
    runner = CliRunner()
    args = ["calibrate", "--checkpoint", str(scaled_checkpoint), "--data", str(tiny_tree), "--out", str(tmp_path / "cal.pt"),
            "--pixel-size", "1.5"]  # 7.5 um red cells = 5 pixels
    result = runner.invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "no measurable red cells" not in result.output  # declared, not measured
    assert load_checkpoint(tmp_path / "cal.pt")["scale"] == load_checkpoint(scaled_checkpoint)["scale"]


def test_calibrate_says_how_many_images_its_guard_will_still_send_to_review(tmp_path):
    """Calibration leaves the guard alone: images beyond it are counted and the user is told, not silently kept."""
    from leukodetect.sample import sample_dir
    from leukodetect.weights import DEFAULT_MODEL

    sample = sample_dir()  # the bundled C-NMC cells
    rng = np.random.default_rng(0)
    for folder, cells in (("blast", sorted((sample / "all").glob("*.png"))[:2]), ("normal", sorted((sample / "hem").glob("*.png"))[:2])):
        (tmp_path / "data" / folder).mkdir(parents=True)
        for cell in cells:
            (tmp_path / "data" / folder / cell.name).write_bytes(cell.read_bytes())
        Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(tmp_path / "data" / folder / "noise.png")
    said = []
    records = index_dataset(tmp_path / "data", "folders")
    result = calibrate_checkpoint(DEFAULT_MODEL, records, tmp_path / "cal.pt", target_sensitivity=0.9,
                                  rbc_diameter=138.0, log=said.append)  # C-NMC's declared red-cell diameter
    # The count is the images the shipped model's own guard flags (the two noise images, and any of the four cells
    # beyond its C-NMC edge), measured apart from calibrate.
    clf = Classifier.from_checkpoint(DEFAULT_MODEL, backend="torch", precision="fp32")
    expected = [p.label == "review" for p in clf.predict_paths([r.path for r in records], rbc_diameter=138.0)]
    noise = [r.path.name == "noise.png" for r in records]
    assert all(flag for flag, n in zip(expected, noise) if n)
    assert result["calibration"]["guard_flagged"] == sum(expected) >= 2
    assert any(f"{sum(expected)} of 6 of these images are beyond the model's guard" in line and "--guard" in line for line in said)


def test_per_smear_scores_each_smear_by_its_most_blast_like_cell():
    labels, best = per_smear([1, 1, 0, 0, 1], [0.2, 0.9, 0.4, 0.1, 0.3], ["a", "a", "b", "b", "c"])
    assert labels.tolist() == [1, 0, 1] and best.tolist() == [0.9, 0.4, 0.3]
    # finding both ALL smears takes 0.3; finding all three cells labelled ALL would take 0.2 (smear a's normal-looking cell)
    assert threshold_for_sensitivity(labels, best, 1.0)["threshold"] == 0.3
    assert threshold_for_sensitivity([1, 1, 0, 0, 1], [0.2, 0.9, 0.4, 0.1, 0.3], 1.0)["threshold"] == 0.2
    with pytest.raises(ValueError, match="both labels"):
        per_smear([1, 0], [0.5, 0.5], ["a", "a"])
    with pytest.raises(ValueError, match="a smear per cell"):
        per_smear([1, 0], [0.5, 0.5], ["a"])


def test_calibrating_per_smear_finds_the_share_of_all_smears_by_their_most_blast_like_cell(trained_checkpoint, tiny_tree, tmp_path):
    from dataclasses import replace

    by_name = {r.path.stem: r for r in index_dataset(tiny_tree)}
    # Four smears of three cells, labelled as a cell bank cut from labelled smears labels them, by the smear: two ALL
    # smears holding one blast and two normal cells each, two healthy smears.
    layout = {"a": ["blast_04", "normal_04", "normal_05"], "b": ["blast_05", "normal_06", "normal_07"],
              "c": ["normal_08", "normal_09", "normal_10"], "d": ["normal_11", "normal_12", "normal_13"]}
    smears = [replace(by_name[name], parent=smear, label=int(smear in "ab")) for smear, names in layout.items() for name in names]
    records = [by_name[name] for names in layout.values() for name in names]
    result = calibrate_checkpoint(trained_checkpoint, smears, tmp_path / "smear.pt", target_sensitivity=1.0, per="smear", log=lambda m: None)
    cal = result["calibration"]
    assert cal["per"] == "smear" and cal["n_smears"] == 4 and cal["n_val"] == 12 and cal["sensitivity"] == 1.0
    calibrated = Classifier.from_checkpoint(tmp_path / "smear.pt", backend="torch")
    labels, best = per_smear([r.label for r in smears], calibrated.image_outputs([open_rgb(r.path) for r in smears])[0],
                             [r.parent for r in smears])
    assert (best[labels == 1] >= result["threshold"]).all()  # every ALL smear's most blast-like cell reaches it
    with pytest.raises(LeukoError, match="cell bank cut from labelled smears"):
        calibrate_checkpoint(trained_checkpoint, records, tmp_path / "x.pt", per="smear", log=lambda m: None)  # no smears named
    mixed = [replace(r, parent="one photograph") for r in records]  # cells labelled one by one, as ALL-IDB1's are
    with pytest.raises(LeukoError, match="has cells of both labels.*calibrate these per cell"):
        calibrate_checkpoint(trained_checkpoint, mixed, tmp_path / "y.pt", per="smear", log=lambda m: None)
