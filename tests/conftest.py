"""Shared fixtures: a tiny labelled image tree and the path to the real data sets."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np
import pytest
import torch
from PIL import Image
from smear_images import synthetic_smear

from leukodetect.config import RunConfig
from leukodetect.data.indexers import index_dataset

# Tests use the tiny model on tiny images; one thread avoids oversubscribing a 2-core machine.
torch.set_num_threads(1)

# The CPU default backend exports every checkpoint to ONNX once (about 4 s for the tiny model here),
# and the suite makes dozens of checkpoints: backend "auto" runs PyTorch in tests unless the
# environment says otherwise. tests/test_inference_backends.py and the end-to-end predict test there
# run the real default (auto -> ONNX Runtime) by clearing this variable.
os.environ.setdefault("LEUKODETECT_BACKEND", "torch")
# Nothing the suite caches (ONNX exports, ALL-IDB2 source matches) lands in ~/.cache. Set on import,
# not in a fixture, because some test modules build their app while being collected.
os.environ["LEUKODETECT_CACHE"] = tempfile.mkdtemp(prefix="leukodetect-test-cache-")
atexit.register(shutil.rmtree, os.environ["LEUKODETECT_CACHE"], ignore_errors=True)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"real data not found at {SHARED} (a fresh clone has no ../shared/datasets)")
    return SHARED


def make_cell(rng: np.random.Generator, blast: bool, size: int = 24) -> Image.Image:
    """A crude synthetic 'cell': a dark disc (large for blasts) on a pink background, with noise."""
    yy, xx = np.mgrid[:size, :size]
    c = size / 2 + rng.uniform(-2, 2, 2)
    r = size * (0.38 if blast else 0.2)
    disc = (yy - c[0]) ** 2 + (xx - c[1]) ** 2 < r**2
    img = np.empty((size, size, 3), np.float64)
    img[:] = (230, 180, 190)
    img[disc] = (90, 40, 140) if blast else (150, 60, 120)
    img += rng.normal(0, 12, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


@pytest.fixture(scope="session")
def tiny_tree(tmp_path_factory) -> Path:
    """Class-per-folder data: 14 normal + 14 blast 24x24 PNGs, with one exact duplicate pair."""
    root = tmp_path_factory.mktemp("tiny") / "cells"
    rng = np.random.default_rng(0)
    for name, blast in (("normal", False), ("blast", True)):
        (root / name).mkdir(parents=True)
        for i in range(14):
            make_cell(rng, blast).save(root / name / f"{name}_{i:02d}.png")
    # An exact duplicate under another name: must never straddle a split.
    Image.open(root / "blast" / "blast_00.png").save(root / "blast" / "copy_of_blast_00.png")
    return root


# Synthetic smears with known cells (tests/smear_images.py), and a tiny crop classifier trained once per session.


@pytest.fixture(scope="session")
def smear_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("smear") / "smear.png"
    Image.fromarray(synthetic_smear()).save(path)
    return path


@pytest.fixture(scope="session")
def crop_checkpoint(tiny_tree, tmp_path_factory):
    """A tiny-model checkpoint (1 epoch on 24 px cells) with detection metadata."""
    from leukodetect.runtime.checkpoint import load_checkpoint, save_checkpoint
    from leukodetect.training.fit import train_model

    records = index_dataset(tiny_tree, "folders")
    cfg = RunConfig()
    cfg.model.arch, cfg.data.image_size = "tiny", 24
    cfg.train.epochs, cfg.train.batch_size, cfg.train.lr = 1, 8, 0.01
    result = train_model(cfg, records[::2], records[1::2], tmp_path_factory.mktemp("crop_model"), progress=False, log=lambda *_: None)
    bundle = load_checkpoint(result.best_path)
    bundle["detection"] = {"crop_factor": 3.0}
    save_checkpoint(bundle, result.best_path)
    return result.best_path


class StainedCells:
    """Synthetic cells drawn by Beer-Lambert from two stain vectors (optical density per R, G, B).

    Nucleus mostly stain 1, cytoplasm and a red-cell-like surround mostly stain 2, with concentration
    noise; outside the cell black (segmented data, as C-NMC) or light plasma. REFERENCE looks like
    ALL-IDB2's May-Grünwald-Giemsa (purple nucleus, pink red cells); OTHER is another lab's, bluer,
    with an orange counterstain; CNMC_LIKE has a nucleus stain with less red density than its
    cytoplasm's, as in C-NMC.
    """

    IO = 240
    REFERENCE = np.array([[0.39, 0.89, 0.25], [0.25, 0.65, 0.72]]).T
    OTHER = np.array([[0.70, 0.66, 0.27], [0.08, 0.45, 0.89]]).T
    CNMC_LIKE = np.array([[0.49, 0.80, 0.33], [0.59, 0.68, 0.44]]).T

    @classmethod
    def cell(cls, stains: np.ndarray, *, size: int = 64, seed: int = 0, black_background: bool = False,
             pad: int = 0, nucleus: float = 0.22) -> Image.Image:
        rng = np.random.default_rng(seed)
        yy, xx = np.mgrid[:size, :size]
        r = np.hypot(yy - size / 2, xx - size / 2)
        inner, cell = r < size * nucleus, r < size * 0.4
        c1 = np.where(inner, 1.5, np.where(cell, 0.25, 0.05)) + rng.normal(0, 0.12, r.shape)
        c2 = np.where(inner, 0.2, np.where(cell, 0.8, 0.45 * (np.sin(xx / 3) > 0))) + rng.normal(0, 0.12, r.shape)
        od = np.clip(np.stack([c1, c2], -1), 0, None) @ stains.T
        rgb = np.clip(cls.IO * np.exp(-od), 0, 255).astype(np.uint8)
        if black_background:
            rgb[~cell] = 0
        if pad:
            rgb = np.pad(rgb, ((pad, pad), (pad, pad), (0, 0)))
        return Image.fromarray(rgb)

    @staticmethod
    def nucleus_mask(size: int = 64) -> np.ndarray:
        """Pixels well inside the nucleus of a default cell."""
        yy, xx = np.mgrid[:size, :size]
        return np.hypot(yy - size / 2, xx - size / 2) < size * 0.18


@pytest.fixture(scope="session")
def stained() -> type[StainedCells]:
    return StainedCells


@pytest.fixture(scope="session")
def other_lab(tmp_path_factory) -> Path:
    """Another lab's cells in the C-NMC layout, in OTHER's stain on black (4 blast, 4 normal, larger
    nuclei for blasts), plus one all-black image that stain normalisation cannot handle."""
    root = tmp_path_factory.mktemp("other-lab") / "cnmc"
    for name in ("all", "hem"):
        (root / name).mkdir(parents=True)
    for i in range(4):
        StainedCells.cell(StainedCells.OTHER, size=32, seed=10 + i, black_background=True, nucleus=0.34).save(
            root / "all" / f"UID_{i}_1_1_all.png")
        StainedCells.cell(StainedCells.OTHER, size=32, seed=20 + i, black_background=True, nucleus=0.18).save(
            root / "hem" / f"UID_H{i}_1_1_hem.png")
    Image.new("RGB", (32, 32), (0, 0, 0)).save(root / "hem" / "UID_H9_1_1_hem.png")
    return root


def _write_image(path: Path, *, size: tuple[int, int] = (16, 12), seed: int = 0, mode: str = "RGB") -> Path:
    """Write a small random image (width, height) in ``mode`` at ``path``, creating folders."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).convert(mode).save(path)
    return path


@pytest.fixture
def write_image():
    """The function ``write_image(path, *, size=(16, 12), seed=0, mode="RGB") -> path``."""
    return _write_image
