"""Fixtures for the data tests: tiny image trees written in tmp_path, and the shared real data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

#: Real data sets beside the repository (never inside it: ALL-IDB may not be redistributed).
REAL_DATASETS = Path(__file__).resolve().parents[2] / ".." / "shared" / "datasets"


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


@pytest.fixture
def real_datasets() -> Path:
    """The shared real data sets, or a skip saying why they are missing."""
    if not REAL_DATASETS.is_dir():
        pytest.skip(f"real data sets not found at {REAL_DATASETS} (they live beside the repo, not in it)")
    return REAL_DATASETS.resolve()
