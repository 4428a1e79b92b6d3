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
