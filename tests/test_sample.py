"""The bundled C-NMC sample: present, balanced, indexable with patient groups, small, attributed."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from leukodetect.data.indexers import detect_format, index_dataset
from leukodetect.sample import sample_dir

MAX_BYTES = 15_000_000
SHARED_CNMC = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "C-NMC-2019-subset" / "Data Subset"


def test_sample_dir_exists_with_both_classes():
    folder = sample_dir()
    assert isinstance(folder, Path) and folder.is_dir()
    counts = {cls: len(list((folder / cls).glob("*.png"))) for cls in ("all", "hem")}
    assert counts["all"] > 0 and counts["all"] == counts["hem"]


def test_cnmc_indexer_finds_sample_with_patient_groups():
    records = index_dataset(sample_dir())
    assert detect_format(sample_dir()) == "cnmc"
    assert Counter(r.label for r in records) == {0: len(records) // 2, 1: len(records) // 2}
    assert all(r.group.startswith("patient:") for r in records)
    patients = {r.group for r in records}
    assert len(patients) > 10  # spread over many patients, not a few
    for record in records:
        assert record.group == f"patient:{record.path.stem.split('_')[1]}"
        assert (record.label == 1) == (record.path.parent.name == "all")


def test_sample_images_are_450px_rgb_png():
    for path in sorted(sample_dir().rglob("*.png")):
        with Image.open(path) as image:
            assert (image.format, image.mode, image.size) == ("PNG", "RGB", (450, 450)), path


def test_sample_is_small():
    root = sample_dir().parent
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert size < MAX_BYTES


def test_attribution_names_licence_and_doi():
    text = (sample_dir().parent / "ATTRIBUTION.md").read_text(encoding="utf-8")
    assert "CC BY 3.0" in text
    assert "10.7937/tcia.2019.dc64i46r" in text
    assert "ALL-IDB" in text and "NOT included" in text


def test_sample_pixels_equal_the_original_bmps():
    if not SHARED_CNMC.is_dir():
        pytest.skip(f"C-NMC source BMPs not found at {SHARED_CNMC} (they live beside the repo, not in it)")
    originals = {p.stem: p for p in SHARED_CNMC.rglob("*.bmp")}
    for png in sorted(sample_dir().rglob("*.png")):
        assert png.stem in originals, f"{png.name} has no C-NMC original of the same name"
        assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(originals[png.stem])))
