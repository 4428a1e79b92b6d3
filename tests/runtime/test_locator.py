"""The learned white-cell locator: heat-map peaks, targets, training on synthetic smears, its file, and the smear pipeline with it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from leukodetect.detection.match import match_points
from leukodetect.detection.pipeline import CANNOT_ASSESS, analyze
from leukodetect.errors import BadCheckpointError, LeukoError
from leukodetect.models.centres import STRIDE, CentreNet, focal_loss
from leukodetect.runtime.locator import LocatorSettings, WhiteCellLocator, peaks
from leukodetect.runtime.scale import estimate_rbc_diameter
from leukodetect.training.locator import LocatorRecipe, PatchSampler, Smear, fit_locator, heat_target, ignore_weight

SLIDE = (232, 226, 214)
STAINS = {  # red cell, white-cell cytoplasm, nucleus: two laboratories' colours
    "a": ((214, 150, 150), (170, 120, 190), (95, 35, 145)),
    "b": ((225, 170, 140), (150, 140, 200), (60, 50, 130)),
}


def synthetic_field(seed: int, rbc: float, stain: str, size: int = 320) -> tuple[np.ndarray, np.ndarray]:
    """Red cells on a jittered grid and 2-4 white cells (1.6 red cells wide) at random places; and their centres."""
    rng = np.random.default_rng(seed)
    red, cyto, nucleus = STAINS[stain]
    img = np.empty((size, size, 3), np.float64)
    img[:] = SLIDE
    yy, xx = np.mgrid[:size, :size]
    whites = []
    for _ in range(int(rng.integers(2, 5))):
        for _try in range(50):
            x, y = rng.uniform(rbc, size - rbc, 2)
            if all((x - a) ** 2 + (y - b) ** 2 > (2.2 * rbc) ** 2 for a, b in whites):
                whites.append((x, y))
                break
    step = rbc * 1.25
    for gy in np.arange(step / 2, size, step):
        for gx in np.arange(step / 2, size, step):
            x, y = gx + rng.uniform(-0.1, 0.1) * rbc, gy + rng.uniform(-0.1, 0.1) * rbc
            if all((x - a) ** 2 + (y - b) ** 2 > (1.35 * rbc) ** 2 for a, b in whites):
                img[(yy - y) ** 2 + (xx - x) ** 2 <= (rbc / 2) ** 2] = red
    for x, y in whites:
        img[(yy - y) ** 2 + (xx - x) ** 2 <= (0.8 * rbc) ** 2] = cyto
        img[(yy - y) ** 2 + (xx - x) ** 2 <= (0.55 * rbc) ** 2] = nucleus
    img += rng.normal(0, 3, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), np.array(whites)


def canonical(rgb: np.ndarray, points: np.ndarray, rbc: float, rbc_px: float, lab: str) -> Smear:
    import cv2

    f = rbc_px / rbc
    small = cv2.resize(rgb, (round(rgb.shape[1] * f), round(rgb.shape[0] * f)), interpolation=cv2.INTER_AREA)
    return Smear(name=f"{lab}", lab=lab, image=small, points=points * f, factor=f, rbc_diameter=rbc, scale_source="declared")


@pytest.fixture(scope="module")
def trained() -> WhiteCellLocator:
    settings = LocatorSettings(width=8)
    smears = [canonical(*synthetic_field(seed, rbc, stain)[:2], rbc, settings.rbc_px, stain)
              for seed, (rbc, stain) in enumerate([(22, "a"), (30, "a"), (22, "b"), (30, "b")] * 3)]
    recipe = LocatorRecipe(iterations=220, batch_size=8, patch=64, lr=5e-3, hed=0.0, jpeg=0.0)
    return fit_locator(smears, recipe, settings, log=lambda m: None)


def test_heat_target_is_one_at_each_centre_and_falls_off_around_it():
    target = heat_target(np.array([[10.0, 21.0], [40.0, 40.0]]), 64)
    assert target.shape == (64 // STRIDE, 64 // STRIDE)
    assert target[21 // STRIDE, 10 // STRIDE] == 1.0 and target[10, 10] == 1.0
    assert (target == 1).sum() == 2 and 0 < target[10, 11] < 1
    assert heat_target(np.zeros((0, 2)), 64).sum() == 0


def test_peaks_are_local_maxima_above_the_threshold_and_a_flat_top_gives_one():
    heat = np.zeros((20, 20), np.float32)
    heat[5, 5] = 0.9
    heat[12, 12] = heat[12, 13] = 0.6  # flat top
    heat[18, 2] = 0.2  # below threshold
    found = peaks(heat, 0.3, 5)
    assert found[0][:2] == (5, 5)
    assert len(found) == 2


def test_focal_loss_is_lower_for_a_map_that_agrees_with_the_target():
    target = torch.from_numpy(heat_target(np.array([[20.0, 20.0]]), 64))[None, None]
    good = torch.logit(target.clamp(0.01, 0.99))
    bad = torch.zeros_like(good)
    assert focal_loss(good, target) < focal_loss(bad, target)


def test_a_zero_weight_leaves_a_cell_out_of_the_loss():
    target = torch.from_numpy(heat_target(np.array([[20.0, 20.0]]), 64))[None, None]
    wrong = torch.logit(target.clamp(0.01, 0.99))
    wrong[..., 12, 12] = 6.0  # a confident peak where nothing is annotated
    weight = torch.ones_like(target)
    assert focal_loss(wrong, target, weight) > focal_loss(torch.logit(target.clamp(0.01, 0.99)), target) + 0.5
    weight[..., 12, 12] = 0.0
    assert focal_loss(wrong, target, weight).item() == pytest.approx(focal_loss(torch.logit(target.clamp(0.01, 0.99)), target).item(), abs=1e-5)


def test_ignore_weight_is_zero_within_the_radius_only():
    w = ignore_weight(np.array([[32.0, 32.0]]), 64, 8.0)
    assert w[8, 8] == 0 and w[7, 7] == 0 and w[0, 0] == 1 and w[8, 11] == 1
    assert (w == 0).sum() == 12  # cell centres 2 or 6 px off on each axis, not (6, 6): sqrt(72) > 8
    assert ignore_weight(np.zeros((0, 2)), 64, 8.0).min() == 1 and ignore_weight(np.array([[32.0, 32.0]]), 64, 0.0).min() == 1


def test_patches_leave_unannotated_objects_out_of_the_loss_and_keep_the_annotated_centres():
    rgb, whites = synthetic_field(3, 16, "a", size=256)
    base = canonical(rgb, whites[:1], 16, 16, "a")
    smear = Smear(**{**base.__dict__, "ignore": whites[1:].astype(np.float32)})
    off = PatchSampler([smear], LocatorRecipe(patch=256, scale_jitter=1.0, near_cell=0.0, hed=0, colour=0, blur=0, jpeg=0,
                                              ignore_radius=0.0))
    on = PatchSampler([smear], LocatorRecipe(patch=256, scale_jitter=1.0, near_cell=0.0, hed=0, colour=0, blur=0, jpeg=0,
                                             ignore_radius=1.0))
    x_off, t_off, w_off = off.patch()
    x_on, t_on, w_on = on.patch()
    assert torch.equal(x_off, x_on) and np.array_equal(t_off, t_on)  # the same draw: ignoring changes only the weight
    assert w_off.min() == 1
    assert (t_on == 1).sum() == 1 and (w_on[t_on == 1] == 1).all()  # the annotated centre counts
    zeros = (w_on == 0).sum()
    assert 0 < zeros <= len(whites[1:]) * 60  # about pi * 4^2 heat-map cells around each unannotated cell


def test_network_output_is_a_quarter_of_the_input():
    net = CentreNet(width=8).eval()
    with torch.no_grad():
        assert net(torch.zeros(1, 3, 64, 96)).shape == (1, 1, 16, 24)


@pytest.mark.parametrize("rbc,stain", [(26, "a"), (26, "b")])
def test_trained_locator_finds_white_cells_not_red_ones_on_unseen_fields(trained, rbc, stain):
    tp = fp = fn = 0
    for seed in (100, 101):
        rgb, whites = synthetic_field(seed, rbc, stain)
        found = [(x, y) for x, y, _ in trained.locate(rgb, rbc)]
        m = match_points(found, whites, 0.5 * rbc)
        tp, fp, fn = tp + m.tp, fp + m.fp, fn + m.fn
    assert tp / (tp + fn) >= 0.8, (tp, fp, fn)
    assert tp / max(1, tp + fp) >= 0.8, (tp, fp, fn)


def test_locator_file_round_trips_and_names_itself(trained, tmp_path):
    path = trained.save(tmp_path / "locator.safetensors")
    again = WhiteCellLocator.load(path)
    rgb, _ = synthetic_field(7, 26, "a")
    assert np.allclose(again.heatmap(rgb, 26)[0], trained.heatmap(rgb, 26)[0], atol=1e-5)
    assert again.settings.trained_on == {"a": 6, "b": 6} and again.settings.recipe["iterations"] == 220


def test_a_file_that_is_not_a_locator_is_refused_with_a_sentence(tmp_path):
    from safetensors.torch import save_file

    other = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a file of tensors")
    for path, words in ((other, "not a white-cell locator"), (junk, "not a readable white-cell locator"),
                        (tmp_path / "missing.safetensors", "does not exist")):
        with pytest.raises(BadCheckpointError, match=words) as info:
            WhiteCellLocator.load(path)
        assert str(path) in str(info.value)


def test_packed_red_cells_are_measured_when_none_is_isolated():
    rng = np.random.default_rng(0)
    size, d = 480, 60
    img = np.full((size, size, 3), SLIDE, np.float64)
    yy, xx = np.mgrid[:size, :size]
    for gy in np.arange(d / 2, size, 1.3 * d):  # rows of overlapping red cells: none stands alone
        for gx in np.arange(d / 2, size, 0.85 * d):
            x, y = gx + rng.uniform(-3, 3), gy + rng.uniform(-3, 3)
            img[(yy - y) ** 2 + (xx - x) ** 2 <= (d / 2) ** 2] = STAINS["a"][0]
    rgb = np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)
    assert estimate_rbc_diameter(rgb).diameter is None
    packed = estimate_rbc_diameter(rgb, packed=True)
    assert packed.source == "packed" and packed.diameter == pytest.approx(d, rel=0.25)


@pytest.mark.parametrize("kind", ["blank", "black", "grey", "noise"])
def test_no_smear_is_cannot_assess_with_the_learned_locator(trained, kind):
    rng = np.random.default_rng(1)
    image = {
        "blank": np.full((200, 300, 3), 250, np.uint8),
        "black": np.zeros((200, 300, 3), np.uint8),
        "grey": np.repeat(rng.integers(0, 255, (200, 300, 1), dtype=np.uint8), 3, axis=2),
        "noise": rng.integers(0, 255, (200, 300, 3), dtype=np.uint8),
    }[kind]
    result = analyze(image, None, locator=trained)
    assert result["verdict"] == CANNOT_ASSESS and result["reason"] and result["locator"] == "learned"
    declared = analyze(image, None, locator=trained, rbc_diameter=26.0)  # a declared pixel size makes no smear of it
    assert declared["verdict"] == CANNOT_ASSESS and declared["reason"]


def test_a_declared_red_cell_diameter_is_used_instead_of_the_measured_one(trained):
    rgb, whites = synthetic_field(5, 26, "a")
    result = analyze(rgb, None, locator=trained, rbc_diameter=26.0)
    assert result["scale"] == "declared" and result["rbc_diameter"] == 26.0
    assert match_points([(c["x"], c["y"]) for c in result["cells"]], whites, 13).tp >= len(whites) - 1
    wrong = analyze(rgb, None, locator=trained, rbc_diameter=80.0)  # about three times too large: every crop too
    assert wrong["rbc_diameter"] == 80.0 and wrong["crop_side"] == pytest.approx(result["crop_side"] * 80 / 26, rel=0.01)
    with pytest.raises(LeukoError, match="learned locator"):
        analyze(rgb, None, rbc_diameter=26.0)  # the colour locator measures its own


def test_analyze_with_the_learned_locator_reports_cells_scale_and_locator(trained):
    rgb, whites = synthetic_field(5, 26, "a")
    result = analyze(rgb, None, locator=trained)
    assert result["locator"] == "learned" and result["scale"] in ("measured", "packed")
    assert result["rbc_diameter"] == pytest.approx(26, rel=0.2)
    found = [(c["x"], c["y"]) for c in result["cells"]]
    assert match_points(found, whites, 13).tp >= len(whites) - 1
    assert result["verdict"] == "not classified"


def test_the_shipped_locator_loads_and_was_trained_with_train_locators_defaults():
    import inspect

    from leukodetect.cli import train_locator
    from leukodetect.training.locator import LocatorRecipe
    from leukodetect.weights import resolve_locator

    shipped = WhiteCellLocator.load(resolve_locator(None))
    assert set(shipped.settings.trained_on) == {"allidb1", "bccd", "pbc"}
    command = {name: p.default.default for name, p in inspect.signature(train_locator).parameters.items()}
    recipe = LocatorRecipe(iterations=command["iterations"], seed=command["seed"], ignore_radius=command["ignore_radius"])
    assert recipe == LocatorRecipe()  # the command's defaults are the library's
    assert shipped.settings.recipe == {**recipe.__dict__}
    assert shipped.settings == LocatorSettings(trained_on=shipped.settings.trained_on, recipe=shipped.settings.recipe)


def test_detect_command_runs_with_the_learned_locator(tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from leukodetect.cli import app

    rgb, _ = synthetic_field(3, 26, "a")
    Image.fromarray(rgb).save(tmp_path / "field.png")
    Image.fromarray(np.full((100, 100, 3), 250, np.uint8)).save(tmp_path / "blank.png")
    result = CliRunner().invoke(app, ["detect", str(tmp_path), "--locator", "learned", "--locate-only", "--json",
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    rows = {r["image"].rsplit("/", 1)[-1]: r for r in map(__import__("json").loads, [x for x in result.output.splitlines() if x.startswith("{")])}
    assert rows["blank.png"]["verdict"] == CANNOT_ASSESS and rows["field.png"]["locator"] == "learned"
    bad = CliRunner().invoke(app, ["detect", str(tmp_path), "--locator", "magic", "--out", str(tmp_path / "o2")])
    assert bad.exit_code != 0 and "choose learned or colour" in bad.output
