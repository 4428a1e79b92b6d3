"""add_guard: both distances fitted on training cells, thresholds on held-out ones, stored and applied."""

from __future__ import annotations

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
    assert stats.shape == (2, 10)
    assert stats[0, 6:9].min() > stats[1, 6:9].max() + 5  # noise: detail everywhere; a flat frame: none (log scale)
    grey = torch.rand(1, 1, 32, 32).expand(1, 3, 32, 32)
    assert pixel_statistics(grey)[0, 9] < -6  # no spread between the channels: no colour


def test_add_guard_flags_odd_images_and_passes_most_held_out_cells(tiny_tree, tmp_path):
    records = index_dataset(tiny_tree, "folders")
    fit, held = records[::2], records[1::2]
    cfg = RunConfig()
    cfg.data.image_size, cfg.model.arch = 24, "tiny"
    cfg.train.epochs, cfg.train.batch_size, cfg.train.lr, cfg.train.device = 2, 8, 0.01, "cpu"
    best = train_model(cfg, fit, held, tmp_path / "run", progress=False, log=lambda *_: None).best_path
    stored = add_guard(best, fit, held, percentile=90, device="cpu", log=lambda *_: None)
    assert stored["threshold"] == 1.0 and stored["feature_threshold"] > 0 and stored["pixel_threshold"] > 0
    assert stored["fitted_on"] == len(fit) and stored["threshold_on"] == len(held)
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
