"""add_guard: both distances fitted on training cells, thresholds on held-out ones, stored and applied."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from PIL import Image, ImageDraw

from leukodetect.config import RunConfig
from leukodetect.data.indexers import index_dataset
from leukodetect.jobs.guard import add_guard
from leukodetect.runtime.checkpoint import load_checkpoint, save_safetensors
from leukodetect.runtime.classifier import Classifier
from leukodetect.runtime.guard import pixel_statistics
from leukodetect.training.fit import train_model


def test_pixel_statistics_tell_noise_text_and_flat_frames_from_cells():
    rng = np.random.default_rng(0)
    noise = torch.from_numpy(rng.normal(0, 1, (1, 3, 32, 32)).astype(np.float32))
    flat = torch.zeros(1, 3, 32, 32)
    stats = pixel_statistics(torch.cat([noise, flat]))
    assert stats.shape == (2, 13)
    assert stats[0, 6:9].min() > stats[1, 6:9].max() + 5  # noise: detail everywhere; a flat frame: none (log scale)
    grey = torch.rand(1, 1, 32, 32).expand(1, 3, 32, 32)
    assert pixel_statistics(grey)[0, 9] < -6  # no spread between the channels: no colour


def test_pixel_statistics_tell_random_colour_blobs_from_stained_cells():
    """Stained cells: the channels rise and fall together; smooth random colours: they do not."""
    rng = np.random.default_rng(0)
    shade = torch.nn.functional.interpolate(torch.rand(1, 1, 8, 8), size=32, mode="bilinear")
    stained = torch.cat([0.9 * shade, 0.6 * shade + 0.1, 0.8 * shade + 0.15], dim=1)  # purple where dark, pale elsewhere
    blobs = torch.nn.functional.interpolate(torch.from_numpy(rng.random((1, 3, 8, 8), dtype=np.float32)), size=32, mode="bilinear")
    corr = pixel_statistics(torch.cat([stained, blobs]))[:, 10:]
    assert corr[0].min() > 0.99 and corr[1, 0].abs() < 0.5


def test_a_guard_fitted_on_the_first_ten_statistics_still_scores():
    """Checkpoints shipped before the correlations were added keep working, on the statistics they were fitted on."""
    from leukodetect.runtime.guard import Guard, _Distance

    features = _Distance(torch.zeros(4), torch.eye(4), torch.zeros(1, 4))
    pixels = _Distance(torch.zeros(10), torch.eye(10), torch.zeros(1, 10))
    guard = Guard(features, pixels, (1.0, 1.0))
    image = torch.rand(2, 3, 16, 16)
    expected = torch.maximum(features(torch.ones(2, 4)), pixels(pixel_statistics(image)[:, :10]))
    assert torch.allclose(guard(torch.ones(2, 4), image), expected)


def tiny_model(tree, tmp_path, *, epochs: int):
    """A tiny network trained on every other image of ``tree``: (training records, held-out records, best.pt)."""
    records = index_dataset(tree, "folders")
    fit, held = records[::2], records[1::2]
    cfg = RunConfig()
    cfg.data.image_size, cfg.model.arch = 24, "tiny"
    cfg.train.epochs, cfg.train.batch_size, cfg.train.lr, cfg.train.device = epochs, 8, 0.01, "cpu"
    return fit, held, train_model(cfg, fit, held, tmp_path / "run", progress=False, log=lambda *_: None).best_path


def test_add_guard_flags_odd_images_and_passes_most_held_out_cells(tiny_tree, tmp_path):
    fit, held, best = tiny_model(tiny_tree, tmp_path, epochs=2)
    stored = add_guard(best, fit, held, percentile=90, device="cpu", log=lambda *_: None)
    assert stored["threshold"] == 1.0 and stored["feature_threshold"] > 0 and stored["pixel_threshold"] > 0
    assert stored["fitted_on"] == len(fit) and stored["threshold_on"] == len(held)
    assert stored["groups"] == ["normal", "blast"]  # one data set, no laboratories: a group per class
    clf = Classifier.from_checkpoint(best, backend="torch", precision="fp32")
    cells = clf.predict_paths([r.path for r in held])
    assert sum(p.label == "review" for p in cells) <= 0.2 * len(held) + 1  # about 10% by construction
    rng = np.random.default_rng(1)
    text = Image.new("RGB", (24, 24), "white")
    ImageDraw.Draw(text).text((1, 6), "ALL", fill="black")
    odd = {"noise.png": Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)), "text.png": text,
           "white.png": Image.new("RGB", (24, 24), "white"), "black.png": Image.new("RGB", (24, 24), "black"),
           "grey.png": Image.fromarray(rng.integers(0, 256, (6, 6), dtype=np.uint8)).resize((24, 24)).convert("RGB")}
    for name, image in odd.items():
        image.save(tmp_path / name)
    flagged = clf.predict_paths([tmp_path / name for name in odd])
    assert [p.label for p in flagged] == ["review"] * 5 and all(p.ood_score > 1 for p in flagged)
    # The shipped format keeps both parts.
    again = Classifier.from_checkpoint(save_safetensors(load_checkpoint(best), tmp_path / "m.safetensors"), backend="torch", precision="fp32")
    assert [p.label for p in again.predict_paths([tmp_path / name for name in odd])] == ["review"] * 5


def test_add_guard_groups_a_cell_banks_cells_by_laboratory_kind_and_class(tiny_tree, tmp_path):
    fit, held, best = tiny_model(tiny_tree, tmp_path, epochs=1)

    def banked(rs):  # as a cell bank gives them: a laboratory, and what each cell is within it
        return [replace(r, lab="pbc", kind="eosinophil" if i % 2 else "lymphocyte") for i, r in enumerate(rs)]

    stored = add_guard(best, banked(fit), banked(held), percentile=90, device="cpu", log=lambda *_: None)
    assert stored["groups"] == ["pbc:eosinophil/normal", "pbc:eosinophil/blast", "pbc:lymphocyte/normal", "pbc:lymphocyte/blast"]
    assert len(load_checkpoint(best)["guard"]["class_means"]) == 4


def test_each_laboratory_gets_its_own_edge_and_onnx_computes_the_same_score(tiny_tree, tmp_path):
    """Two laboratories: a threshold per group from its own laboratory's held-out cells, exported with the graph."""
    from leukodetect.runtime.export import ExportedClassifier, export_model

    fit, held, best = tiny_model(tiny_tree, tmp_path, epochs=1)

    def two_labs(rs):
        return [replace(r, lab="a" if i % 2 else "b") for i, r in enumerate(rs)]

    stored = add_guard(best, two_labs(fit), two_labs(held), percentile=50, device="cpu", log=lambda *_: None)
    guard = load_checkpoint(best)["guard"]
    assert len(guard["feature_group_thresholds"]) == len(guard["class_means"]) == len(stored["groups"])
    # The pixel part's edges also read the training cells out of fold (the features' do not: the network fitted them).
    assert stored["crossfit_folds"] == (5 if len({r.group for r in fit}) >= 5 else 0)
    assert set(stored["lab_thresholds"]) == {"a", "b"}
    assert stored["feature_threshold"] == max(v["features"] for v in stored["lab_thresholds"].values())
    paths = [r.path for r in held]
    torch_scores = [p.ood_score for p in Classifier.from_checkpoint(best, backend="torch", precision="fp32").predict_paths(paths)]
    onnx = ExportedClassifier.from_file(export_model(best, tmp_path / "m.onnx", fmt="onnx")["path"])
    # float32 in both; the pixel statistics (a log of a small spread) differ in the fourth digit between the runtimes
    np.testing.assert_allclose([p.ood_score for p in onnx.predict_paths(paths)], torch_scores, rtol=5e-3)
    # The shipped format (weights in float16, the guard's arrays in float32) keeps the thresholds.
    shipped = load_checkpoint(save_safetensors(load_checkpoint(best), tmp_path / "m.safetensors"))["guard"]
    for key in ("feature_group_thresholds", "pixel_group_thresholds"):
        np.testing.assert_array_equal(np.asarray(shipped[key]), np.asarray(guard[key]))
