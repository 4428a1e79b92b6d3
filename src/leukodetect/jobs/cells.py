"""Cell banks: single cells of several laboratories, cut at one physical scale, with their lab recorded.

A cross-laboratory run starts here. Each source is ``LAB=PATH[:FORMAT][@PIXELS]``: a laboratory
name, its data (any indexed layout), optionally the layout and the red-cell diameter in pixels when
it cannot be measured. For every cell the bank holds a square window of ``field`` red-cell
diameters at ``size`` pixels (:func:`leukodetect.runtime.scale.canonical_crop`), so a lymphocyte is
as large in every laboratory's crops as it is under the microscope, and ``cells.csv`` lists them
(``path,label,group,lab,kind,parent``), readable by every command as a manifest.

Where the cells come from, by layout:

- single-cell images (``allidb2``, ``cnmc``, ``pbc``, ``folders``, ``manifest``): the image's centre;
- ``bccd`` smear fields: the centres of the white-cell boxes;
- ``aria`` smear fields: the white cells found by :func:`leukodetect.detection.locate.locate_nuclei`;
  every cell takes its field's label (a field of an ALL patient holds blasts, and may hold a
  normal cell too: a noisy label the per-field figures average out), and near-duplicate fields
  share one group.

The scale of a laboratory is one red-cell diameter for all its images: declared (``@PIXELS``, or
:data:`DECLARED` for C-NMC, whose cells are segmented on black), or the median of the confident
per-image measurements over up to :data:`SCALE_SAMPLE` of its images. ALL-IDB2's crops hold too
few whole red cells: its scale is measured on the ALL-IDB1 photographs of the same laboratory when
they sit beside it. Groups are prefixed with the laboratory, so no group spans two laboratories.
"""

from __future__ import annotations

import io
import json
import re
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.spatial.distance import cdist
from tqdm.auto import tqdm

from leukodetect.data.duplicates import split_groups
from leukodetect.data.indexers import (
    FORMATS,
    detect_format,
    find_allidb1,
    index_dataset,
)
from leukodetect.data.records import Record
from leukodetect.detection.locate import locate_cells, locate_nuclei
from leukodetect.errors import BadImageError, LeukoError
from leukodetect.runtime.images import open_rgb, pixel_hash
from leukodetect.runtime.scale import (
    CanonicalScale,
    canonical_crop,
    estimate_rbc_diameter,
)
from leukodetect.utils import atomic_write, write_csv, write_json

#: Red-cell diameters (pixels) declared for layouts whose images show no red cell. C-NMC's cells are
#: segmented on black. Its normal (hem) cells measure 183 pixels across (median of the 30 in the
#: subset, from their non-black area); PBC's normal lymphocytes measure 1.33 red-cell diameters
#: (median of 200, red cells measured in the same images): taking C-NMC's normal cells for cells of
#: that size gives 183 / 1.33 = 138 pixels per red-cell diameter (about 0.054 micrometre per pixel).
DECLARED = {"cnmc": 138.0}
#: Images measured to find a laboratory's red-cell diameter (evenly spaced over its sorted files).
SCALE_SAMPLE = 200
#: Fewest confidently measured images behind a laboratory's scale.
MIN_MEASURED = 5
#: Layouts whose images are smear fields; the others hold one cell each, in the middle.
FIELDS = ("aria", "bccd")
#: Layouts with several cells per image: the smear fields, and ALL-IDB1's photographs with their annotated cells.
MANY_CELLS = (*FIELDS, "allidb1")
BANK_VERSION = 1
_LAB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class LabSource:
    """One laboratory's data: ``LAB=PATH[:FORMAT][@PIXELS]``."""

    lab: str
    path: Path
    format: str = "auto"
    rbc_diameter: float | None = None

    @classmethod
    def parse(cls, spec: str) -> LabSource:
        """Read ``LAB=PATH[:FORMAT][@PIXELS]``; one sentence saying what is wrong otherwise."""
        lab, sep, rest = spec.partition("=")
        if not sep or not _LAB_NAME.match(lab) or not rest:
            raise LeukoError(f"--data {spec!r} is not LAB=PATH[:FORMAT][@PIXELS]: name the laboratory, e.g. "
                             "--data pbc=../shared/datasets/PBC-normal-subset.")
        diameter = None
        if "@" in rest:
            rest, _, pixels = rest.rpartition("@")
            try:
                diameter = float(pixels)
            except ValueError:
                raise LeukoError(f"--data {spec!r}: '@{pixels}' is not a red-cell diameter in pixels (e.g. @138).") from None
            if not diameter > 0:
                raise LeukoError(f"--data {spec!r}: the red-cell diameter must be positive.")
        path, fmt = rest, "auto"
        head, colon, tail = rest.rpartition(":")
        if colon and tail in FORMATS:
            path, fmt = head, tail
        return cls(lab=lab, path=Path(path), format=fmt, rbc_diameter=diameter)

    def __str__(self) -> str:
        return f"{self.lab}={self.path}" + (f":{self.format}" if self.format != "auto" else "") + (
            f"@{self.rbc_diameter:g}" if self.rbc_diameter else "")


def lab_scale(source: LabSource, fmt: str, records: Sequence[Record]) -> tuple[float, str]:
    """The laboratory's red-cell diameter in pixels and how it was found."""
    if source.rbc_diameter:
        return source.rbc_diameter, "declared"
    if fmt in DECLARED:
        return DECLARED[fmt], f"declared for the {fmt} layout (no red cells in its images)"
    paths = [r.path for r in records]
    where = "its images"
    if fmt == "allidb2" and (photos := find_allidb1(source.path)) is not None:
        paths = [r.path for r in index_dataset(photos, "allidb1")]
        where = f"the ALL-IDB1 photographs of the same laboratory ({photos})"
    picked = [paths[i] for i in np.unique(np.linspace(0, len(paths) - 1, min(SCALE_SAMPLE, len(paths))).round().astype(int))]
    measured = []
    for path in picked:
        try:
            estimate = estimate_rbc_diameter(np.asarray(open_rgb(path)))
        except BadImageError:
            continue
        if estimate.diameter is not None:
            measured.append(estimate.diameter)
    if len(measured) < MIN_MEASURED:
        raise LeukoError(f"The red-cell diameter of laboratory '{source.lab}' could not be measured ({len(measured)} of "
                         f"{len(picked)} images held enough whole red cells): declare it, e.g. --data {source.lab}=PATH@80 "
                         "(pixels per red-cell diameter).")
    return round(float(np.median(measured)), 2), f"measured: median over {len(measured)} of {len(picked)} of {where}"


def cell_centres(record: Record, fmt: str, rgb: np.ndarray, diameter: float) -> list[tuple[float, float, int]]:
    """Where the cells of one image are, with each one's label: its centre, its annotated boxes or points, or the
    located white cells.

    An ALL-IDB1 photograph gives its annotated blasts (label 1) and, as normal cells (label 0), those of its other
    annotated points (ALL-IDB-Patches' ``others`` centroids, where the data set has them) that sit on a white cell:
    within half a red-cell diameter of one that the colour locator (tuned on ALL-IDB1) finds. Most of those points
    mark platelets and debris; the rest are the normal white cells of ALL patients' photographs, which ALL-IDB2's
    crops do not hold (all its normal cells come from healthy people's photographs). Every other layout's cells
    carry the image's label.
    """
    if fmt == "allidb1":
        return [(x, y, 1) for x, y in record.blasts or ()] + [(x, y, 0) for x, y in white_cell_points(rgb, record.others or ())]
    if fmt == "bccd":
        points = list(record.cells or ())
    elif fmt == "aria":
        points = locate_nuclei(rgb, diameter)
    else:
        height, width = rgb.shape[:2]
        points = [((width - 1) / 2, (height - 1) / 2)]
    return [(x, y, record.label) for x, y in points]


def white_cell_points(rgb: np.ndarray, points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points that sit on a white cell: within half a red-cell diameter of one the colour locator finds."""
    if not points:
        return []
    found = locate_cells(rgb)
    if not found.cells:
        return []
    near = cdist(np.asarray(points, float), np.array([(c.x, c.y) for c in found.cells])).min(axis=1) <= 0.5 * found.rbc_diameter
    return [tuple(pt) for pt, keep in zip(points, near) if keep]


def photograph_scales(records: Sequence[Record]) -> dict[Path, float | None]:
    """Each photograph's own red-cell diameter in pixels (None where it cannot be measured or read)."""
    out: dict[Path, float | None] = {}
    for record in records:
        try:
            out[record.path] = estimate_rbc_diameter(np.asarray(open_rgb(record.path))).diameter
        except BadImageError:
            out[record.path] = None
    return out


def build_bank(sources: Sequence[LabSource], out_dir: Path, scale: CanonicalScale, *, max_per_field: int = 0,
               jpeg_quality: int = 0, progress: bool = False, log=print) -> Path:
    """Cut every source's cells into ``out_dir`` at one scale; return ``out_dir/cells.csv``.

    ``max_per_field`` (0: all) keeps at most that many located cells of each smear field, drawn at
    random (seeded by the field's name): the Aria fields hold 9 located cells each on average, and
    without a cap they outnumber every other laboratory's cells several times over. Crops are PNG
    (lossless) unless ``jpeg_quality`` (1-100) asks for JPEG, a quarter of the size: JPEG artefacts
    on a flat background are detail a model and its guard learn, which lossless inputs lack.

    ALL-IDB1 photographs give their annotated cells (:func:`cell_centres`), each cut at the red-cell
    diameter measured on its own photograph unless the source declares one: ALL-IDB1 was taken with
    two cameras at two magnifications.

    A bank already in ``out_dir`` with the same sources and scale is reused as it is; another bank
    there is an error (nothing is overwritten).
    """
    out_dir = Path(out_dir)
    settings = {"version": BANK_VERSION, "scale": scale.to_dict(), "sources": [str(s) for s in sources], "max_per_field": max_per_field,
                "jpeg_quality": jpeg_quality}
    manifest, described = out_dir / "cells.csv", out_dir / "cells.json"
    if described.is_file():
        stored = json.loads(described.read_text())
        if {k: stored.get(k) for k in settings} == settings and manifest.is_file():
            log(f"Reusing the cell bank in {out_dir}.")
            return manifest
        raise LeukoError(f"{out_dir} holds a cell bank of other sources or another scale: choose another folder.")
    labs = [s.lab for s in sources]
    if len(set(labs)) != len(labs):
        raise LeukoError(f"Each laboratory may be named once, got {', '.join(labs)}.")
    rows, summary = [], {}
    for source in sources:
        fmt = source.format if source.format != "auto" else detect_format(source.path)
        records = [r for r in index_dataset(source.path, fmt) if r.label is not None]
        per_photograph = photograph_scales(records) if fmt == "allidb1" and not source.rbc_diameter else {}
        if [d for d in per_photograph.values() if d is not None]:
            measured = [d for d in per_photograph.values() if d is not None]
            diameter, how = round(float(np.median(measured)), 2), f"measured: median over {len(measured)} of {len(records)} of its images"
        else:
            diameter, how = lab_scale(source, fmt, records)
        log(f"{source.lab}: {len(records)} images ({fmt}); red-cell diameter {diameter:g} px ({how}).")
        groups = split_groups(records, near_duplicates=fmt == "aria")
        n_cells, unreadable = 0, 0
        for record, group in tqdm(list(zip(records, groups)), desc=f"cells of {source.lab}", disable=not progress):
            try:
                rgb = np.asarray(open_rgb(record.path))
            except BadImageError as exc:
                log(f"skipped: {exc}")
                unreadable += 1
                continue
            here = per_photograph.get(record.path) or diameter
            centres = list(enumerate(cell_centres(record, fmt, rgb, here)))
            if max_per_field and fmt in FIELDS and len(centres) > max_per_field:
                rng = np.random.default_rng(zlib.crc32(record.path.stem.encode()))
                centres = [centres[i] for i in sorted(rng.choice(len(centres), max_per_field, replace=False))]
            for k, (x, y, label) in centres:
                suffix = ".jpg" if jpeg_quality else ".png"
                name = f"{record.path.stem}_{k}{suffix}" if fmt in MANY_CELLS else f"{record.path.stem}{suffix}"
                target = out_dir / "cells" / source.lab / (record.kind or "") / name
                crop = canonical_crop(rgb, scale, here, centre=(x, y))
                options = _crop_format(jpeg_quality)
                atomic_write(target, lambda tmp, crop=crop, options=options: Image.fromarray(crop).save(tmp, **options))
                rows.append({"path": target.relative_to(out_dir).as_posix(), "label": label,
                             "group": f"{source.lab}:{group}", "lab": source.lab, "kind": record.kind or "",
                             "parent": f"{source.lab}:{record.path.stem}", "x": round(x, 1), "y": round(y, 1)})
                n_cells += 1
        labels = Counter(r["label"] for r in rows if r["lab"] == source.lab)
        if per_photograph:
            found = [d for d in per_photograph.values() if d is not None]
            how = (f"measured on each photograph ({min(found, default=diameter):g}-{max(found, default=diameter):g} px); "
                   f"{diameter:g} px, the laboratory's median, where one could not be")
        summary[source.lab] = {"source": str(source), "format": fmt, "rbc_diameter": diameter, "scale": how,
                               "images": len(records), "unreadable": unreadable, "cells": n_cells,
                               "normal": labels.get(0, 0), "blast": labels.get(1, 0)}
        log(f"{source.lab}: {n_cells} cells ({labels.get(1, 0)} labelled blast / ALL, {labels.get(0, 0)} normal).")
    write_csv(manifest, rows, ["path", "label", "group", "lab", "kind", "parent", "x", "y"])
    write_json(described, {**settings, "labs": summary})
    return manifest


def _crop_format(jpeg_quality: int) -> dict:
    """How a bank's crops are saved: PNG, or JPEG at ``jpeg_quality`` (1-100)."""
    return {"format": "JPEG", "quality": jpeg_quality} if jpeg_quality else {"format": "PNG"}


#: JPEG qualities a cell bank's crops may have been written in (0: lossless, as PNG); the shipped model's bank was JPEG 95.
BANK_JPEG_QUALITIES = (0, 95)


def written_hashes(image: Image.Image | np.ndarray, jpeg_qualities: Sequence[int] = (0,)) -> set[str]:
    """The pixel hashes of ``image`` as a bank writes it: lossless (quality 0) and as JPEG of each other quality."""
    image = Image.fromarray(image) if isinstance(image, np.ndarray) else image.convert("RGB")
    hashes = set()
    for quality in jpeg_qualities:
        if not quality:
            hashes.add(pixel_hash(image))
            continue
        buffer = io.BytesIO()
        image.save(buffer, **_crop_format(quality))
        buffer.seek(0)
        with Image.open(buffer) as written:
            hashes.add(pixel_hash(written))
    return hashes


def bank_hashes(records: Sequence[Record], jpeg_qualities: Sequence[int] = BANK_JPEG_QUALITIES) -> dict[Path, set[str]]:
    """Each cell-bank crop's pixel hashes, as it is and as the JPEG a bank may be written in (empty where unreadable).

    What tells a bank's crop among a model's ``trained_on`` hashes, whichever way its bank was written.
    """
    out = {}
    for record in records:
        try:
            out[record.path] = written_hashes(open_rgb(record.path), jpeg_qualities)
        except BadImageError:
            out[record.path] = set()
    return out


def crop_hashes(image: Image.Image | np.ndarray, scale: CanonicalScale, diameter: float, jpeg_qualities: Sequence[int] = (0,)) -> set[str]:
    """The pixel hashes of a single-cell image's crop as :func:`build_bank` writes it, for each of ``jpeg_qualities`` (0: PNG).

    A model trained on a cell bank lists the pixel hashes of the bank's crops (its ``trained_on``), not
    those of the original files: this is how to tell whether an original image was among its cells.
    """
    return written_hashes(canonical_crop(image, scale, diameter), jpeg_qualities)


#: Red-cell diameters across a cell model's input when a run across laboratories does not say (--field).
DEFAULT_FIELD = 3.0


def is_bank(path: str | Path) -> bool:
    """Whether ``path`` is a cell bank's ``cells.csv`` (its ``cells.json`` beside it)."""
    path = Path(path)
    return path.is_file() and path.suffix == ".csv" and path.with_name("cells.json").is_file()


def bank_summary(manifest: Path) -> dict:
    """The ``cells.json`` written beside a bank's ``cells.csv`` (labs, counts, scale)."""
    path = Path(manifest).with_name("cells.json")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise LeukoError(f"{path} cannot be read ({exc}): rebuild the cell bank with 'leukodetect cells'.") from exc


def labs_of(records: Sequence[Record]) -> dict[str, dict[str, int]]:
    """Images per laboratory and label: what a checkpoint records it was trained on."""
    counts: dict[str, dict[str, int]] = {}
    for r in records:
        entry = counts.setdefault(r.lab or "unnamed", {"normal": 0, "blast": 0})
        entry["blast" if r.label == 1 else "normal"] += 1
    return counts
