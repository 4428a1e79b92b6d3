"""The indexers and checker on the real shared data sets (skipped where ../shared is missing)."""

from __future__ import annotations

from collections import Counter

from leukodetect.data.check import check_dataset
from leukodetect.data.duplicates import hash_records
from leukodetect.data.indexers import detect_format, index_dataset
from leukodetect.runtime.images import open_rgb


def test_allidb2_index(real_datasets):
    records = index_dataset(real_datasets / "ALL-IDB2")
    assert len(records) == 260
    assert Counter(r.label for r in records) == {0: 130, 1: 130}
    assert len({r.group for r in records}) == 260


def test_allidb2_check_finds_the_known_duplicate(real_datasets):
    report = check_dataset(real_datasets / "ALL-IDB2" / "ALL_IDB2" / "img")
    assert report["format"] == "allidb2" and report["ok"] is True
    assert report["n_images"] == 260 and report["counts"] == {"normal": 130, "blast": 130}
    assert report["duplicate_sets"] == [["Im223_0.tif", "Im257_0.tif"]]
    assert report["sizes"]["257x257"] == 250


def test_allidb1_index_with_centroids(real_datasets):
    path = real_datasets / "ALL-IDB1"
    assert detect_format(path) == "allidb1"
    records = index_dataset(path)
    assert len(records) == 108
    assert Counter(r.label for r in records) == {0: 59, 1: 49}
    assert sum(len(r.blasts) for r in records) == 510
    assert all((len(r.blasts) > 0) == (r.label == 1) for r in records)
    assert sum(len(r.others) for r in records) == 1430


def test_cnmc_subset_index_by_patient(real_datasets):
    records = index_dataset(real_datasets / "C-NMC-2019-subset" / "Data Subset")
    assert len(records) == 70
    assert Counter(r.label for r in records) == {1: 37, 0: 33}
    patients = {label: {r.group for r in records if r.label == label} for label in (0, 1)}
    assert len(patients[1]) == 26 and len(patients[0]) == 16
    assert len({r.group for r in records}) == 42
    assert all(r.group.startswith("patient:") for r in records)


def test_allidb1_known_duplicate_photographs_hash_alike(real_datasets):
    """Two 5-megapixel photographs only: decoding all 108 would make the suite slow."""
    im = real_datasets / "ALL-IDB1" / "ALL_IDB1" / "im"
    records = [r for r in index_dataset(im) if r.path.stem in {"Im093_0", "Im108_0", "Im001_1"}]
    hashes = hash_records(records)
    assert len(records) == 3
    assert hashes[im / "Im093_0.jpg"] == hashes[im / "Im108_0.jpg"] != hashes[im / "Im001_1.jpg"]
    assert open_rgb(im / "Im001_1.jpg").size == (1712, 1368)
