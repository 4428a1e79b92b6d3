"""Finding the photograph each crop was cut from: synthetic photographs, the cache, real ALL-IDB."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter

from leukodetect.data import sources
from leukodetect.data.records import Record
from leukodetect.data.sources import cached_find_sources, find_sources, source_groups

pytest.importorskip("cv2", reason="crop matching needs opencv-python-headless")


def _texture(seed: int, size=(300, 400)) -> np.ndarray:
    """A smooth random RGB texture (height, width, 3), uint8: blobby like a smear, never flat."""
    rng = np.random.default_rng(seed)
    noise = gaussian_filter(rng.normal(size=(*size, 3)), sigma=(3, 3, 0))
    noise = (noise - noise.min()) / (noise.max() - noise.min())
    return (noise * 255).astype(np.uint8)


def _save(pixels: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def synthetic(tmp_path):
    """Two photographs, crops cut from them (x, y, side, resampled side) and one foreign crop."""
    photos = [_texture(1), _texture(2)]
    photo_paths = [_save(p, tmp_path / "im" / f"Im00{i + 1}_0.png") for i, p in enumerate(photos)]
    # (photo index, x, y, side in the photograph, side of the saved crop)
    cuts = [(0, 10, 20, 72, 72), (0, 300, 200, 72, 72), (1, 150, 100, 72, 72), (1, 0, 226, 72, 72),
            (1, 231, 31, 88, 80)]  # the last one was resampled: scale 88 / 80 = 1.1
    crops = []
    for n, (index, x, y, side, saved) in enumerate(cuts):
        region = Image.fromarray(photos[index][y : y + side, x : x + side])
        crops.append(_save(np.asarray(region.resize((saved, saved), Image.Resampling.BICUBIC)),
                           tmp_path / "img" / f"Im{n:03d}_0.png"))
    foreign = _save(_texture(3)[50:122, 60:132], tmp_path / "img" / "Im099_0.png")
    return photo_paths, crops, cuts, foreign


def test_every_crop_found_in_its_photo_at_its_place(synthetic):
    photos, crops, cuts, foreign = synthetic
    matches = find_sources([*crops, foreign], photos, scales=(0.9, 1.0, 1.1))
    assert [m.crop for m in matches] == [*crops, foreign]
    for match, (index, x, y, side, saved) in zip(matches, cuts):
        assert match.photo == photos[index], match
        assert abs(match.x - x) <= 2 and abs(match.y - y) <= 2, match
        assert match.scale == pytest.approx(side / saved, abs=0.01)
        assert match.score > 0.95
    assert matches[-1].photo is None and matches[-1].score < sources.DEFAULT_THRESHOLD


def test_cache_is_reused_and_an_unwritable_cache_is_ignored(synthetic, tmp_path, monkeypatch):
    photos, crops, _, foreign = synthetic
    monkeypatch.setenv("LEUKODETECT_CACHE", str(tmp_path / "cache"))
    first = cached_find_sources(crops[:3], photos)
    assert (tmp_path / "cache" / "allidb2_sources.csv").is_file()

    def no_matching(*args, **kwargs):
        raise AssertionError("the cache should have answered")

    monkeypatch.setattr(sources, "find_sources", no_matching)
    assert cached_find_sources(crops[:3], photos) == first

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.undo()
    again = cached_find_sources(crops[:3], photos, cache=blocker / "sub" / "sources.csv")
    assert again == first


def test_source_groups_merge_identical_photos(synthetic, tmp_path, monkeypatch):
    photos, crops, cuts, foreign = synthetic
    monkeypatch.setenv("LEUKODETECT_CACHE", str(tmp_path / "cache"))
    root = tmp_path  # im/ already holds the photographs; give it the ALL-IDB1 xyc folder
    (root / "xyc").mkdir()
    for photo in photos:
        (root / "xyc" / f"{photo.stem}.xyc").write_text("")
    # A byte-identical copy of photograph 1, named after it: crops of photo 1 may match either.
    copy = root / "im" / "Im003_0.png"
    copy.write_bytes(photos[1].read_bytes())
    (root / "xyc" / "Im003_0.xyc").write_text("")
    records = [Record(path=c, label=0, group=c.stem) for c in [*crops[:4], foreign]]
    groups = source_groups(records, root)
    assert groups == ["photo:Im001_0", "photo:Im001_0", "photo:Im002_0", "photo:Im002_0", "Im099_0"]


def test_real_allidb2_crops_found_in_their_allidb1_photos(real_datasets, tmp_path):
    """Three crops against five photographs (about 5 s): known sources and locations."""
    img = real_datasets / "ALL-IDB2" / "ALL_IDB2" / "img"
    im = real_datasets / "ALL-IDB1" / "ALL_IDB1" / "im"
    crops = [img / f"{name}.tif" for name in ("Im001_1", "Im201_0", "Im260_0")]
    photos = [im / f"{name}.jpg" for name in ("Im063_1", "Im001_1", "Im088_0", "Im093_0", "Im108_0")]
    matches = find_sources(crops, photos)
    found = [(m.photo.stem, m.x, m.y, m.scale) for m in matches]
    # Im093_0 and Im108_0 are byte-identical: the tie goes to the first listed.
    assert found == [("Im001_1", 1341, 542, 1.0), ("Im088_0", 1304, 503, 1.0), ("Im093_0", 398, 1103, 1.0)]
    assert all(m.score > 0.999 for m in matches)
    assert matches[2].also == (photos[4],)
    names = sources._photo_group_names(photos, matches)
    assert names[photos[3]] == names[photos[4]] == "Im093_0" and names[photos[1]] == "Im001_1"
