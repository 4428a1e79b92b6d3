"""Check a data set before training: read every image once and report what is in it and what is wrong.

:func:`check_dataset` never stops at a bad image: it lists every unreadable, empty, truncated or
oversized file with the reason, plus stray non-image files sitting among the images (GIFs with the
rule that refuses them), so a user can fix everything in one pass. Any folder can be checked: one in
none of the known layouts is checked as unlabelled images. :func:`render_check` prints the report for humans.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from rich.progress import track

from leukodetect.data.duplicates import duplicate_sets, effective_groups
from leukodetect.data.indexers import detect_format, index_dataset
from leukodetect.data.records import Record
from leukodetect.errors import LeukoError
from leukodetect.runtime.checkpoint import CLASS_NAMES
from leukodetect.runtime.images import (
    GIF_RULE,
    IMAGE_SUFFIXES,
    REFUSED_SUFFIXES,
    open_rgb,
    pixel_hash,
)

#: Files expected beside images (annotations, readmes, label lists): not reported as skipped.
_COMPANION_SUFFIXES = frozenset({".md", ".csv", ".txt", ".xyc"})
SKIPPED_REASON = "skipped (not an image suffix)"
GIF_REASON = f"skipped: a GIF is {GIF_RULE}"
#: The format of a folder in no known layout: its images, searched recursively, without labels.
UNLABELLED = "unlabelled"


def check_dataset(path: str | Path, fmt: str = "auto", *, progress: bool = False) -> dict:
    """Index a data set (or any folder of images), decode every image, and summarise it as a JSON-serialisable dict.

    A folder in none of the known layouts is checked as unlabelled images (format ``unlabelled``),
    searched recursively. Only the images that decode are counted, grouped, sized and compared.

    Keys: ``format``, ``root``, ``n_images`` (readable images), ``counts`` (readable images per class
    name, plus "unlabelled" if any), ``labelled`` (False where the layout gives no label),
    ``n_groups``, ``n_effective_groups`` (after merging duplicates), ``sizes`` ("WxH" -> count),
    ``modes`` (original mode -> count), ``duplicate_sets`` (lists of relative paths), ``notes``
    ({path, note} for converted images), ``bad_files`` ({path, reason}: unreadable images, GIFs and
    other stray files) and ``ok`` (True when there is no bad file). Paths are relative to the data-set folder.

    Raises:
        LeukoError: only when the path cannot be indexed at all (missing, or no image file in it); bad images are reported.
    """
    path = Path(path).expanduser()
    fmt = _format(path, fmt)
    records = _unlabelled_images(path) if fmt == UNLABELLED else index_dataset(path, fmt)
    base = path.parent if path.is_file() else path

    def relative(file: Path) -> str:
        return Path(os.path.relpath(file, base)).as_posix()

    hashes: dict[Path, str | None] = {}
    sizes: Counter[str] = Counter()
    modes: Counter[str] = Counter()
    notes: list[dict[str, str]] = []
    bad_files: list[dict[str, str]] = []
    for record in track(records, description="Checking images", disable=not progress):
        image_notes: list[str] = []
        try:
            image = open_rgb(record.path, notes=image_notes)
        except Exception as error:  # a checker reports every failure instead of stopping at one
            hashes[record.path] = None
            bad_files.append({"path": relative(record.path), "reason": str(error)})
            continue
        hashes[record.path] = pixel_hash(image)
        sizes[f"{image.width}x{image.height}"] += 1
        modes[image.info.get("original_mode", image.mode)] += 1
        notes.extend({"path": relative(record.path), "note": note} for note in image_notes)
        image.close()
    stray = _stray_files(path) if fmt == UNLABELLED else _stray_files_beside(records)
    bad_files.extend(
        {"path": relative(file), "reason": GIF_REASON if file.suffix.lower() in REFUSED_SUFFIXES else SKIPPED_REASON}
        for file in stray
    )
    readable = [record for record in records if hashes[record.path] is not None]

    return {
        "format": fmt,
        "root": str(path),
        "n_images": len(readable),
        "counts": {UNLABELLED: len(readable)} if fmt == UNLABELLED else _class_counts(readable),
        "labelled": any(record.label is not None for record in records),
        "n_groups": len({record.group for record in readable}),
        "n_effective_groups": len(set(effective_groups(readable, hashes))),
        "sizes": dict(sorted(sizes.items())),
        "modes": dict(sorted(modes.items())),
        "duplicate_sets": [
            [relative(record.path) for record in same] for same in duplicate_sets(readable, hashes)
        ],
        "notes": notes,
        "bad_files": sorted(bad_files, key=lambda bad: bad["path"]),
        "ok": not bad_files,
    }


def render_check(report: dict) -> str:
    """A compact, human-readable summary of a :func:`check_dataset` report."""
    counts = ", ".join(f"{name} {n}" for name, n in report["counts"].items())
    sizes = ", ".join(f"{size} ({n})" for size, n in _most_common(report["sizes"]))
    modes = ", ".join(f"{mode} ({n})" for mode, n in _most_common(report["modes"]))
    lines = [
        f"{report['root']} [{report['format']}]: {report['n_images']} images ({counts}), "
        f"{report['n_groups']} groups ({report['n_effective_groups']} after merging duplicates)",
        f"  sizes: {sizes}",
        f"  modes: {modes}",
    ]
    for same in report["duplicate_sets"]:
        lines.append(f"  duplicate: {' == '.join(same)}")
    for note in report["notes"]:
        lines.append(f"  converted: {note['path']}: {note['note']}")
    if not report.get("labelled", True):
        lines.append("  labels: absent (a folder in no known layout); train, cv and evaluate need labelled data (see --format)")
    for bad in report["bad_files"]:
        lines.append(f"  BAD {bad['path']}: {bad['reason']}")
    verdict = "OK" if report["ok"] else f"{len(report['bad_files'])} bad file(s)"
    lines.append(f"  result: {verdict}")
    return "\n".join(lines)


def _class_counts(records: list[Record]) -> dict[str, int]:
    """Images per class name, with "unlabelled" only when some record has no label."""
    counts = {name: 0 for name in CLASS_NAMES}
    for record in records:
        name = "unlabelled" if record.label is None else CLASS_NAMES[record.label]
        counts[name] = counts.get(name, 0) + 1
    return counts


def _format(path: Path, fmt: str) -> str:
    """The layout to check ``path`` as: the one given, the one detected, or :data:`UNLABELLED` for a folder in none."""
    if fmt != "auto" or not path.exists():
        return fmt  # a missing path is named by index_dataset
    try:
        return detect_format(path)
    except LeukoError:
        if path.is_dir():
            return UNLABELLED
        raise  # a file that is not a manifest


def _visible_files(root: Path) -> list[Path]:
    """Every file under ``root``, searched recursively, outside hidden files and folders; sorted."""
    return sorted(
        file for file in root.rglob("*")
        if file.is_file() and not any(part.startswith(".") for part in file.relative_to(root).parts)
    )


def _unlabelled_images(root: Path) -> list[Record]:
    """The images of a folder in no known layout, searched recursively: no label, each image its own group."""
    files = _visible_files(root)
    images = [file for file in files if file.suffix.lower() in IMAGE_SUFFIXES]
    if not images and not any(file.suffix.lower() in REFUSED_SUFFIXES for file in files):
        raise LeukoError(f"{root} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in any folder: check the path.")
    return [Record(path=file, label=None, group=str(file)) for file in images]


def _is_stray(file: Path) -> bool:
    suffix = file.suffix.lower()
    return suffix not in IMAGE_SUFFIXES and suffix not in _COMPANION_SUFFIXES


def _stray_files(root: Path) -> list[Path]:
    """Files under a folder of unlabelled images that are neither images nor known companion files."""
    return [file for file in _visible_files(root) if _is_stray(file)]


def _stray_files_beside(records: list[Record]) -> list[Path]:
    """Files among the images (same folders) that are neither images nor known companion files."""
    folders = sorted({record.path.parent for record in records})
    stray = []
    for folder in folders:
        for file in sorted(folder.iterdir()):
            if file.is_file() and not file.name.startswith(".") and _is_stray(file):
                stray.append(file)
    return stray


def _most_common(counter: dict[str, int], shown: int = 5) -> list[tuple[str, int]]:
    """The most frequent entries of a count dict, for a short summary line."""
    return Counter(counter).most_common(shown)
