"""Offline expansion (the paper's 2470-image step) on a tiny tree of 24x24 images."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from leukodetect.config import AugmentConfig
from leukodetect.data.augment import SOURCE_GROUP_KEY, expand_dataset, read_source
from leukodetect.data.indexers import index_dataset
from leukodetect.data.records import Record
from leukodetect.errors import LeukoError


def _image(path: Path, seed: int, size: tuple[int, int] = (24, 24)) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def sources(tmp_path: Path) -> list[Record]:
    """3 blasts (one 24x20, not square) and 2 normals, each its own patient group."""
    src = tmp_path / "src"
    return [
        Record(path=_image(src / "b1.png", 1), label=1, group="p1"),
        Record(path=_image(src / "b2.png", 2), label=1, group="p2"),
        Record(path=_image(src / "b3.png", 3, size=(24, 20)), label=1, group="p3"),
        Record(path=_image(src / "n1.png", 4), label=0, group="p4"),
        Record(path=_image(src / "n2.png", 5), label=0, group="p5"),
    ]


def _expand(sources, out_dir, *, total=12, seed=0, log=None):
    return expand_dataset(
        sources, out_dir, total=total, augment=AugmentConfig(), seed=seed, log=log or (lambda _: None)
    )


def _pixels(folder: Path) -> dict[str, np.ndarray]:
    return {
        p.relative_to(folder).as_posix(): np.asarray(Image.open(p)) for p in sorted(folder.rglob("*.png"))
    }


def test_totals_balance_and_round_robin(sources, tmp_path):
    out = tmp_path / "out"
    records = _expand(sources, out, total=12)
    assert len(records) == 12
    assert Counter(r.label for r in records) == {0: 6, 1: 6}
    assert sorted(p.name for p in (out / "blast").iterdir()) == [
        "b1__aug0000.png", "b1__orig.png",
        "b2__aug0000.png", "b2__orig.png",
        "b3__aug0000.png", "b3__orig.png",
    ]
    copies_per_source = Counter(p.name.split("__")[0] for p in (out / "normal").glob("*__aug*.png"))
    assert copies_per_source == {"n1": 2, "n2": 2}
    for record in records:
        with Image.open(record.path) as image:
            image.load()
            assert image.format == "PNG" and image.mode == "RGB"
            assert image.size == (24, 20 if record.path.name.startswith("b3") else 24)


def test_originals_are_lossless(sources, tmp_path):
    out = tmp_path / "out"
    _expand(sources, out)
    for record in sources:
        folder = "blast" if record.label == 1 else "normal"
        original = np.asarray(Image.open(record.path))
        assert np.array_equal(np.asarray(Image.open(out / folder / f"{record.path.stem}__orig.png")), original)


def test_sources_recorded_in_png_and_manifest(sources, tmp_path):
    out = tmp_path / "out"
    records = _expand(sources, out)
    by_stem = {r.path.stem: r for r in sources}
    for record in records:
        source = by_stem[record.path.name.split("__")[0]]
        assert read_source(record.path) == str(source.path.resolve())
        assert Image.open(record.path).text[SOURCE_GROUP_KEY] == source.group
        assert record.group == source.group
    with (out / "manifest.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["path", "label", "group", "source"]
    assert len(rows) == 12
    for row in rows:
        source = by_stem[Path(row["path"]).name.split("__")[0]]
        assert (row["label"], row["group"], row["source"]) == (
            str(source.label), source.group, str(source.path.resolve())
        )


def test_manifest_is_indexable(sources, tmp_path):
    out = tmp_path / "out"
    records = _expand(sources, out)
    assert index_dataset(out / "manifest.csv") == records


def test_deterministic_for_a_seed(sources, tmp_path):
    first = _pixels_after(sources, tmp_path / "a", seed=3)
    again = _pixels_after(sources, tmp_path / "b", seed=3)
    other = _pixels_after(sources, tmp_path / "c", seed=4)
    assert first.keys() == again.keys() == other.keys()
    assert all(np.array_equal(first[name], again[name]) for name in first)
    augmented = [name for name in first if "__aug" in name]
    assert any(not np.array_equal(first[name], other[name]) for name in augmented)
    # Copies of one source differ from each other and from the original.
    assert not np.array_equal(first["normal/n1__aug0000.png"], first["normal/n1__aug0001.png"])
    assert not np.array_equal(first["normal/n1__aug0000.png"], first["normal/n1__orig.png"])


def _pixels_after(sources, out, *, seed):
    _expand(sources, out, seed=seed)
    return _pixels(out)


def test_global_torch_rng_untouched(sources, tmp_path):
    import torch

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    _expand(sources, tmp_path / "out")
    assert torch.equal(torch.rand(3), expected)


def test_refuses_non_empty_out_dir(sources, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(LeukoError, match="is not empty: choose a new output folder"):
        _expand(sources, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_empty_existing_out_dir_is_fine(sources, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    assert len(_expand(sources, out, total=6)) == 6


@pytest.mark.parametrize("total", [11, 0])
def test_odd_or_zero_total_rejected(sources, tmp_path, total):
    with pytest.raises(LeukoError, match="even"):
        _expand(sources, tmp_path / "out", total=total)


def test_quota_below_originals_rejected(sources, tmp_path):
    with pytest.raises(LeukoError, match="blast.*3 readable originals.*quota of 2"):
        _expand(sources, tmp_path / "out", total=4)


def test_missing_class_rejected(sources, tmp_path):
    with pytest.raises(LeukoError, match="'normal' has no images"):
        _expand([r for r in sources if r.label == 1], tmp_path / "out")


def test_broken_source_reported_and_skipped(sources, tmp_path):
    broken = tmp_path / "src" / "b4.png"
    broken.write_bytes(b"not a png at all")
    messages: list[str] = []
    records = _expand([*sources, Record(path=broken, label=1, group="p6")], tmp_path / "out", log=messages.append)
    assert len(messages) == 1 and str(broken) in messages[0]
    assert len(records) == 12
    assert not any(r.path.name.startswith("b4") for r in records)


def test_no_readable_source_in_a_class(sources, tmp_path):
    broken = tmp_path / "src" / "empty.png"
    broken.write_bytes(b"")
    with pytest.raises(LeukoError, match="None of the 1 'normal' images could be read"):
        _expand([*sources[:3], Record(path=broken, label=0, group="x")], tmp_path / "out")


def test_same_stem_in_two_folders_does_not_collide(tmp_path):
    records = [
        Record(path=_image(tmp_path / "a" / "x.png", 1), label=1, group="a"),
        Record(path=_image(tmp_path / "b" / "x.png", 2), label=1, group="b"),
        Record(path=_image(tmp_path / "n.png", 3), label=0, group="n"),
    ]
    written = _expand(records, tmp_path / "out", total=4)
    assert sorted(r.path.name for r in written if r.label == 1) == ["x-2__orig.png", "x__orig.png"]
