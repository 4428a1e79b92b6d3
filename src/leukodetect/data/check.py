"""Check a data set before training: read every image once and report what is in it and what is wrong.

:func:`check_dataset` never stops at a bad image: it lists every unreadable, empty, truncated or
oversized file with the reason, plus stray non-image files sitting among the images, so a user
can fix everything in one pass. :func:`render_check` prints the report for humans.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from rich.progress import track

from leukodetect.data.duplicates import duplicate_sets, effective_groups
from leukodetect.data.indexers import detect_format, index_dataset
from leukodetect.data.records import Record
from leukodetect.runtime.checkpoint import CLASS_NAMES
from leukodetect.runtime.images import IMAGE_SUFFIXES, open_rgb, pixel_hash

#: Files expected beside images (annotations, readmes, label lists): not reported as skipped.
_COMPANION_SUFFIXES = frozenset({".md", ".csv", ".txt", ".xyc"})
SKIPPED_REASON = "skipped (not an image suffix)"


def check_dataset(path: str | Path, fmt: str = "auto", *, progress: bool = False) -> dict:
    """Index a data set, decode every image, and summarise it as a JSON-serialisable dict.

    Keys: ``format``, ``root``, ``n_images``, ``counts`` (per class name, plus "unlabelled" if
    any), ``n_groups``, ``n_effective_groups`` (after merging duplicates), ``sizes`` ("WxH" ->
    count), ``modes`` (original mode -> count), ``duplicate_sets`` (lists of relative paths),
    ``notes`` ({path, note} for converted images), ``bad_files`` ({path, reason}) and ``ok``
    (True when there is no bad file). Paths are relative to the data-set folder.

    Raises:
        LeukoError: only when the data set cannot be indexed at all; bad images are reported.
    """
    path = Path(path).expanduser()
    fmt = detect_format(path) if fmt == "auto" and path.exists() else fmt
    records = index_dataset(path, fmt)
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
    bad_files.extend(
        {"path": relative(file), "reason": SKIPPED_REASON} for file in _stray_files(records)
    )

    return {
        "format": fmt,
        "root": str(path),
        "n_images": len(records),
        "counts": _class_counts(records),
        "n_groups": len({record.group for record in records}),
        "n_effective_groups": len(set(effective_groups(records, hashes))),
        "sizes": dict(sorted(sizes.items())),
        "modes": dict(sorted(modes.items())),
        "duplicate_sets": [
            [relative(record.path) for record in same] for same in duplicate_sets(records, hashes)
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


def _stray_files(records: list[Record]) -> list[Path]:
    """Files among the images (same folders) that are neither images nor known companion files."""
    folders = sorted({record.path.parent for record in records})
    stray = []
    for folder in folders:
        for file in sorted(folder.iterdir()):
            suffix = file.suffix.lower()
            if (
                file.is_file()
                and not file.name.startswith(".")
                and suffix not in IMAGE_SUFFIXES
                and suffix not in _COMPANION_SUFFIXES
            ):
                stray.append(file)
    return stray


def _most_common(counter: dict[str, int], shown: int = 5) -> list[tuple[str, int]]:
    """The most frequent entries of a count dict, for a short summary line."""
    return Counter(counter).most_common(shown)
