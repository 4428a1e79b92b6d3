"""Duplicate detection and group merging: duplicates and shared groups end up in one split group."""

from __future__ import annotations

from pathlib import Path

from leukodetect.data.duplicates import duplicate_sets, effective_groups, hash_records
from leukodetect.data.records import Record


def _records(*groups: str) -> list[Record]:
    return [Record(path=Path(f"/x/{i}.png"), label=0, group=g) for i, g in enumerate(groups)]


def test_hash_records_finds_duplicates_and_tolerates_bad_files(tmp_path, write_image):
    a = write_image(tmp_path / "a.png", seed=1)
    b = write_image(tmp_path / "b.bmp", seed=1)
    c = write_image(tmp_path / "c.png", seed=2)
    bad = tmp_path / "bad.png"
    bad.write_text("nope")
    records = [Record(path=p, label=0, group=p.stem) for p in (a, b, c, bad)]
    hashes = hash_records(records)
    assert hashes[bad] is None and hashes[a] == hashes[b] != hashes[c]
    assert duplicate_sets(records, hashes) == [[records[0], records[1]]]


def test_duplicates_with_different_groups_are_merged():
    records = _records("p2", "p1", "p3")
    hashes = {records[0].path: "h", records[1].path: "h", records[2].path: "other"}
    assert effective_groups(records, hashes) == ["p1", "p1", "p3"]


def test_merges_are_transitive_through_groups_and_hashes():
    # 0 ~ 1 by pixels, 1 ~ 2 by group, 2 ~ 3 by pixels: all four become one group; 4 stays alone.
    records = _records("d", "c", "c", "b", "a")
    hashes = {
        records[0].path: "h1",
        records[1].path: "h1",
        records[2].path: "h2",
        records[3].path: "h2",
        records[4].path: None,
    }
    assert effective_groups(records, hashes) == ["b", "b", "b", "b", "a"]


def test_no_duplicates_keeps_groups_and_unhashed_records_never_merge():
    records = _records("a", "b", "a")
    hashes = {record.path: None for record in records}
    assert effective_groups(records, hashes) == ["a", "b", "a"]
    assert duplicate_sets(records, hashes) == []
    assert effective_groups([], {}) == []
