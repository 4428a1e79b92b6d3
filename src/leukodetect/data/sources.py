"""Find the ALL-IDB1 photograph every ALL-IDB2 crop was cut from, for honest cross-validation.

ALL-IDB2's 260 single-cell crops were cut out of ALL-IDB1's whole-smear photographs, several crops
per photograph, and the file numbers of the two parts do not correspond. Crops of one photograph
share its smear, stain and lighting, so a split that puts them on both sides leaks. This module
finds each crop's photograph by template matching (normalised cross-correlation, OpenCV's
``TM_CCOEFF_NORMED``) in two stages:

1. coarse: every crop, downscaled, against every photograph downscaled by the same factor
   (kept in memory), keeping the best few photographs per crop;
2. fine: each of those candidates again at full resolution, in a small window around the coarse
   location; the best full-resolution score decides, and a crop whose score stays below
   ``threshold`` is left unmatched.

Matching all of ALL-IDB2 takes a minute or two, so :func:`source_groups` caches the result in a
CSV (see :func:`cache_file`) and reuses it while the crop and photograph files keep their names
and sizes.
"""

from __future__ import annotations

import csv
import hashlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps
from rich.progress import track
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from leukodetect.data.indexers import index_dataset
from leukodetect.data.records import Record
from leukodetect.runtime.images import open_rgb
from leukodetect.utils import cache_dir, write_csv

#: Full-resolution score from which a crop counts as found in a photograph. On ALL-IDB2 every
#: crop scores >= 0.99999 in its source (the crops are exact pixel copies) and 0.979-0.995 in
#: the photographs that re-shot the same field; a different cell never scored above 0.921
#: (see docs/allidb2_sources.md).
DEFAULT_THRESHOLD = 0.95
#: Crop scales tried (photograph pixels per crop pixel). ALL-IDB2 crops are unscaled copies.
DEFAULT_SCALES: tuple[float, ...] = (1.0,)
#: Largest downscaling factor of the coarse stage; smaller crops get a smaller one.
MAX_COARSE_FACTOR = 8
#: Side (pixels) the smallest crop keeps after coarse downscaling, so its template stays usable.
MIN_COARSE_SIDE = 24
#: Photographs verified at full resolution per crop.
CANDIDATES = 4
CACHE_NAME = "allidb2_sources.csv"
_CACHE_COLUMNS = ["crop", "photo", "score", "x", "y", "scale", "also", "crop_bytes", "key"]


@dataclass(frozen=True)
class SourceMatch:
    """Where one crop was found.

    Attributes:
        crop: the crop file.
        photo: the photograph it was cut from, or None when no photograph scored above threshold.
        score: normalised cross-correlation at full resolution of the best photograph (1 = identical).
        x, y: the crop's top-left corner in that photograph, in full-resolution pixels.
        scale: photograph pixels per crop pixel (1.0 = cut without resampling).
        also: the other photographs where the crop was found above threshold too: copies of
            ``photo`` or photographs of an overlapping field. Their crops must share a group.
    """

    crop: Path
    photo: Path | None
    score: float
    x: int
    y: int
    scale: float
    also: tuple[Path, ...] = ()


def find_sources(
    crops: Sequence[Path],
    photos: Sequence[Path],
    *,
    threshold: float = DEFAULT_THRESHOLD,
    scales: Sequence[float] = DEFAULT_SCALES,
    progress: bool = False,
) -> list[SourceMatch]:
    """Match every crop against every photograph; one :class:`SourceMatch` per crop, in order.

    Photographs with identical pixels tie exactly; the tie goes to the first in ``photos``
    order and the others are listed in ``also``. Only the best few photographs of the coarse
    stage (:data:`CANDIDATES`) are verified, so ``also`` may miss a photograph when more than
    that many hold the crop.

    Args:
        crops: the crop images (any format :func:`open_rgb` reads).
        photos: the candidate photographs.
        threshold: smallest full-resolution score accepted as a match.
        scales: crop scales to try (photograph pixels per crop pixel).
        progress: show progress bars.
    """
    crops, photos = [Path(c) for c in crops], [Path(p) for p in photos]
    if not crops:
        return []
    crop_images = [_gray(open_rgb(c)) for c in crops]
    min_side = min(min(img.shape) for img in crop_images) * min(scales)
    factor = int(max(1, min(MAX_COARSE_FACTOR, min_side // MIN_COARSE_SIDE)))

    small_photos = [
        _small_gray(p, factor)
        for p in track(photos, description="Loading photographs", disable=not progress)
    ]
    # candidates[i] = [(coarse score, photo index, scale, x, y)] best first, (x, y) at full scale.
    candidates: list[list[tuple[float, int, float, int, int]]] = []
    for img in track(crop_images, description="Matching crops (coarse)", disable=not progress):
        best: dict[int, tuple[float, int, float, int, int]] = {}
        for scale in scales:
            size = (round(img.shape[1] * scale / factor), round(img.shape[0] * scale / factor))
            template = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
            for index, photo in enumerate(small_photos):
                if photo.shape[0] < size[1] or photo.shape[1] < size[0]:
                    continue
                result = cv2.matchTemplate(photo, template, cv2.TM_CCOEFF_NORMED)
                _, score, _, (x, y) = cv2.minMaxLoc(result)
                if index not in best or score > best[index][0]:
                    best[index] = (score, index, scale, x * factor, y * factor)
        ranked = sorted(best.values(), key=lambda c: (-c[0], c[1]))
        candidates.append(ranked[:CANDIDATES])

    # Fine stage, photograph by photograph, so each full-resolution photograph is decoded once.
    by_photo: dict[int, list[int]] = defaultdict(list)
    for crop_index, ranked in enumerate(candidates):
        for candidate in ranked:
            by_photo[candidate[1]].append(crop_index)
    fine: dict[int, list[tuple[float, int, float, int, int]]] = defaultdict(list)
    for photo_index in track(
        sorted(by_photo), description="Verifying matches (fine)", disable=not progress
    ):
        photo = _gray(open_rgb(photos[photo_index]))
        for crop_index in by_photo[photo_index]:
            coarse = next(c for c in candidates[crop_index] if c[1] == photo_index)
            fine[crop_index].append(
                _refine(cv2, photo, crop_images[crop_index], coarse, scales, factor, photo_index)
            )

    matches = []
    for crop_index, crop in enumerate(crops):
        ranked = sorted(fine[crop_index], key=lambda c: (-c[0], c[1]))
        if not ranked:
            matches.append(SourceMatch(crop, None, float("nan"), 0, 0, 1.0))
            continue
        score, photo_index, scale, x, y = ranked[0]
        photo = photos[photo_index] if score >= threshold else None
        also = tuple(photos[c[1]] for c in ranked[1:] if photo is not None and c[0] >= threshold)
        matches.append(SourceMatch(crop, photo, round(float(score), 6), x, y, scale, also))
    return matches


def source_groups(
    records: Sequence[Record],
    allidb1_root: str | Path,
    *,
    cache: Path | None = None,
    progress: bool = False,
) -> list[str]:
    """One split group per ALL-IDB2 record: its source photograph, or its own group if none.

    Matched crops get ``"photo:<ALL-IDB1 stem>"``. Photographs are merged into one group, named
    after the smallest stem, when they are byte-identical (ALL-IDB1 Im093_0 == Im108_0) or when a
    crop was found in both (re-shot, overlapping fields such as Im039_0 and Im044_0), transitively.
    Unmatched crops keep ``record.group``. Feed the result (as the records' groups) to
    :func:`leukodetect.data.duplicates.effective_groups` so identical crops are merged too.

    Args:
        records: ALL-IDB2 records (from ``index_dataset(path, "allidb2")``).
        allidb1_root: the ALL-IDB1 folder (anything ``index_dataset(..., "allidb1")`` accepts).
        cache: the cache CSV; default :func:`cache_file`.
        progress: show progress bars while matching.
    """
    photos = [record.path for record in index_dataset(allidb1_root, "allidb1")]
    matches = cached_find_sources([r.path for r in records], photos, cache=cache, progress=progress)
    canonical = _photo_group_names(photos, matches)
    return [
        f"photo:{canonical[match.photo]}" if match.photo is not None else record.group
        for record, match in zip(records, matches)
    ]


def cached_find_sources(
    crops: Sequence[Path],
    photos: Sequence[Path],
    *,
    cache: Path | None = None,
    progress: bool = False,
) -> list[SourceMatch]:
    """:func:`find_sources` with default settings, reusing the rows of a cache CSV.

    A cached row is reused when the crop's file name and size and the key (names and sizes of all
    photographs, and the matcher settings) are unchanged; only the other crops are matched. The
    cache is then rewritten. An unreadable or unwritable cache is ignored: matching just reruns.
    """
    crops, photos = [Path(c) for c in crops], [Path(p) for p in photos]
    cache = cache_file() if cache is None else Path(cache)
    key = _photos_key(photos)
    photo_by_name = {p.name: p for p in photos}
    cached = _read_cache(cache, key)
    results: dict[Path, SourceMatch] = {}
    for crop in crops:
        row = cached.get((crop.name, crop.stat().st_size))
        names = [row["photo"], *row["also"].split(";")] if row is not None else []
        if row is not None and all(name in photo_by_name for name in names if name):
            results[crop] = SourceMatch(
                crop=crop,
                photo=photo_by_name[row["photo"]] if row["photo"] else None,
                score=float(row["score"]),
                x=int(row["x"]),
                y=int(row["y"]),
                scale=float(row["scale"]),
                also=tuple(photo_by_name[name] for name in row["also"].split(";") if name),
            )
    missing = [crop for crop in crops if crop not in results]
    if missing:
        for match in find_sources(missing, photos, progress=progress):
            results[match.crop] = match
        _write_cache(cache, key, [results[crop] for crop in crops])
    return [results[crop] for crop in crops]


def cache_file() -> Path:
    """The cache CSV: in ``$LEUKODETECT_CACHE`` if set, else ``~/.cache/leukodetect``."""
    return cache_dir() / CACHE_NAME


# --- helpers --------------------------------------------------------------------------------------


def _gray(image: Image.Image) -> np.ndarray:
    """An RGB image as a float32 grayscale array (matchTemplate wants float32 or uint8)."""
    return np.asarray(image.convert("L"), dtype=np.float32)


def _small_gray(path: Path, factor: int) -> np.ndarray:
    """A photograph downscaled ``factor`` times (box average), as float32 grayscale.

    JPEGs are decoded straight at reduced size (Pillow's draft mode), which is several times
    faster than decoding the full photograph and makes no difference to the coarse match.
    """
    if factor == 1:
        return _gray(open_rgb(path))
    with Image.open(path) as image:
        size = (image.width // factor, image.height // factor)
        image.draft("RGB", size)
        image = ImageOps.exif_transpose(image).convert("L")
        if image.size != size:
            image = image.resize(size, Image.Resampling.BOX)
        return np.asarray(image, dtype=np.float32)


def _refine(cv2, photo, crop, coarse, scales, factor, photo_index):
    """Best full-resolution (score, photo, scale, x, y) in a window around a coarse match."""
    _, _, coarse_scale, cx, cy = coarse
    margin = 2 * factor + 4
    best = (-1.0, photo_index, coarse_scale, cx, cy)
    for scale in scales:
        if scale == 1.0:
            template = crop
        else:
            size = (round(crop.shape[1] * scale), round(crop.shape[0] * scale))
            template = cv2.resize(crop, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        th, tw = template.shape
        # Scaling about the crop centre moves its corner: widen the window by that shift.
        shift = int(abs(scale - coarse_scale) * max(crop.shape)) + 1
        x0, y0 = max(0, cx - margin - shift), max(0, cy - margin - shift)
        x1 = min(photo.shape[1], cx + tw + margin + shift)
        y1 = min(photo.shape[0], cy + th + margin + shift)
        if x1 - x0 < tw or y1 - y0 < th:
            continue
        result = cv2.matchTemplate(photo[y0:y1, x0:x1], template, cv2.TM_CCOEFF_NORMED)
        _, score, _, (x, y) = cv2.minMaxLoc(result)
        if score > best[0]:
            best = (score, photo_index, float(scale), x0 + x, y0 + y)
    return best


def _photo_group_names(photos: Sequence[Path], matches: Sequence[SourceMatch]) -> dict[Path, str]:
    """Map each photograph to the smallest stem of its group: byte-identical copies and
    photographs sharing a crop are linked, transitively (connected components)."""
    index = {photo: i for i, photo in enumerate(photos)}
    rows, cols = [], []
    first_by_digest: dict[str, int] = {}
    for i, photo in enumerate(photos):
        rows.append(first_by_digest.setdefault(hashlib.sha256(photo.read_bytes()).hexdigest(), i))
        cols.append(i)
    for match in matches:
        if match.photo is not None:
            for other in match.also:
                rows.append(index[match.photo])
                cols.append(index[other])
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(photos), len(photos)))
    _, component = connected_components(graph, directed=False)
    names: dict[int, str] = {}
    for photo, comp in zip(photos, component):
        names[comp] = min(names.get(comp, photo.stem), photo.stem)
    return {photo: names[comp] for photo, comp in zip(photos, component)}


def _photos_key(photos: Sequence[Path]) -> str:
    """A short digest of the photographs' names and sizes and the matcher settings."""
    parts = [f"{p.name}:{p.stat().st_size}" for p in sorted(photos, key=lambda p: p.name)]
    parts.append(f"threshold={DEFAULT_THRESHOLD};scales={DEFAULT_SCALES};factor={MAX_COARSE_FACTOR}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _read_cache(cache: Path, key: str) -> dict[tuple[str, int], dict[str, str]]:
    """Cached rows with this key, by (crop name, crop size); empty if the file is missing or bad."""
    try:
        with cache.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        return {(row["crop"], int(row["crop_bytes"])): row for row in rows if row["key"] == key}
    except (OSError, KeyError, ValueError, csv.Error):
        return {}


def _write_cache(cache: Path, key: str, matches: Sequence[SourceMatch]) -> None:
    """Write the matches to the cache CSV atomically; silently skip when that is impossible."""
    try:
        rows = [
            dict(zip(_CACHE_COLUMNS, (m.crop.name, m.photo.name if m.photo else "", f"{m.score:.6f}", m.x, m.y,
                                      m.scale, ";".join(p.name for p in m.also), m.crop.stat().st_size, key)))
            for m in matches
        ]
        write_csv(cache, rows, _CACHE_COLUMNS)
    except OSError:
        pass  # a read-only home or cache folder: the next run simply matches again
