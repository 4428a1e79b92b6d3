"""Fixtures for the data tests: the shared real data (write_image is in tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

#: Real data sets beside the repository (never inside it: ALL-IDB may not be redistributed).
REAL_DATASETS = Path(__file__).resolve().parents[2] / ".." / "shared" / "datasets"


@pytest.fixture
def real_datasets() -> Path:
    """The shared real data sets, or a skip saying why they are missing."""
    if not REAL_DATASETS.is_dir():
        pytest.skip(f"real data sets not found at {REAL_DATASETS} (they live beside the repo, not in it)")
    return REAL_DATASETS.resolve()
