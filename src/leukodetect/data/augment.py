"""Offline expansion of a data set into a fixed number of balanced images, as the paper did.

Shalini & Angel Viji (2022) expanded ALL-IDB to 2470 images (1235 healthy, 1235 leukemic) by
writing augmented copies to disk *before* splitting. :func:`expand_dataset` reproduces that step
for ``leukodetect augment`` and ``--protocol paper``. Every written file records its source image
(in a PNG text chunk and in ``manifest.csv``) and keeps the source's group, so copies of one cell
can still be kept on one side of a split when that is wanted.

The geometry is the training preset's (reflect pad, random affine, crop back, flips; see
:class:`leukodetect.data.transforms.TrainPreset`), applied at each image's own size. Every copy
draws its randomness from its own seed, so a seed gives byte-identical files.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin
from torchvision.transforms import v2
from tqdm import tqdm

from leukodetect.config import AugmentConfig
from leukodetect.data.records import Record
from leukodetect.data.transforms import augment_geometry
from leukodetect.errors import BadImageError, LeukoError
from leukodetect.runtime.checkpoint import CLASS_NAMES
from leukodetect.runtime.images import open_rgb
from leukodetect.utils import atomic_write, write_csv

#: PNG text-chunk keys written into every expanded image.
SOURCE_KEY = "leukodetect:source"
SOURCE_GROUP_KEY = "leukodetect:source_group"

#: Name of the manifest written beside the class folders (header ``path,label,group,source``).
MANIFEST_NAME = "manifest.csv"

_MANIFEST_HEADER = ("path", "label", "group", "source")


def expand_dataset(
    records: Sequence[Record],
    out_dir: Path,
    *,
    total: int = 2470,
    augment: AugmentConfig,
    seed: int = 0,
    progress: bool = False,
    log: Callable[[str], object] = print,
) -> list[Record]:
    """Write a balanced, augmented copy of a data set: ``total // 2`` images per class.

    Each class gets its originals (re-saved as PNG) plus random augmented copies assigned
    round-robin over its sources, so every source gets the same number of copies give or take one.
    Files go to ``out_dir/<class name>/<source stem>__orig.png`` and ``__augNNNN.png``, with a
    ``manifest.csv`` (``path,label,group,source``) that :func:`~leukodetect.data.indexers.index_dataset`
    reads. Unreadable sources are logged and skipped.

    Args:
        records: labelled source images (label 0 or 1).
        out_dir: a new or empty folder; existing files are never overwritten.
        total: number of images to write, even (the paper used 2470).
        augment: the random geometry to apply.
        seed: same seed, same files.
        progress: show a progress bar.
        log: receives one sentence per skipped image.

    Returns:
        The records of the written files, sorted by path; each keeps its source's group.

    Raises:
        LeukoError: odd or too small ``total``, a non-empty ``out_dir``, an unlabelled record, a
            class with no readable image, or a class with more originals than its quota.
    """
    out_dir = Path(out_dir)
    if total < 2 or total % 2:
        raise LeukoError(
            f"Total {total} cannot be split evenly between the two classes; use an even number "
            "of at least 2 (the paper used 2470)."
        )
    _refuse_non_empty(out_dir)
    quota = total // 2
    sources = _readable_sources_by_class(records, log)
    for label, class_sources in sources.items():
        if len(class_sources) > quota:
            raise LeukoError(
                f"Class '{CLASS_NAMES[label]}' has {len(class_sources)} readable originals, more than "
                f"its quota of {quota} (total {total} / 2); raise the total to at least "
                f"{2 * len(class_sources)} or give fewer images."
            )

    written: list[tuple[Record, Path]] = []
    with tqdm(total=total, disable=not progress, desc="augment", unit="img") as bar:
        for label, class_sources in sources.items():
            class_dir = out_dir / CLASS_NAMES[label]
            stems = _unique_stems([record.path for record in class_sources])
            n_copies = quota - len(class_sources)
            for index, (record, stem) in enumerate(zip(class_sources, stems)):
                image = open_rgb(record.path)
                info = _png_info(record)
                target = class_dir / f"{stem}__orig.png"
                _save_png(image, target, info)
                written.append((record, target))
                bar.update()
                # Round-robin: class-wide copy k belongs to source k % n.
                for copy, k in enumerate(range(index, n_copies, len(class_sources))):
                    augmented = _augment_copy(image, augment, seed=(seed, label, k))
                    target = class_dir / f"{stem}__aug{copy:04d}.png"
                    _save_png(augmented, target, info)
                    written.append((record, target))
                    bar.update()

    _write_manifest(out_dir, written)
    results = [Record(path=target, label=record.label, group=record.group) for record, target in written]
    return sorted(results, key=lambda record: record.path)


def read_source(png_path: str | Path) -> str | None:
    """Return the source image path recorded in an expanded PNG, or None when it has none.

    Raises:
        BadImageError: the file cannot be opened as an image.
    """
    png_path = Path(png_path)
    try:
        with Image.open(png_path) as image:
            text = getattr(image, "text", None) or {}
            return text.get(SOURCE_KEY)
    except (OSError, SyntaxError, ValueError) as error:
        raise BadImageError(
            f"Image {png_path} could not be read ({error}); check that it is an expanded PNG."
        ) from error


def _augment_copy(image: Image.Image, augment: AugmentConfig, *, seed: tuple[int, int, int]) -> Image.Image:
    """One random copy of ``image``; its randomness comes only from ``seed`` (torch's RNG is restored)."""
    tensor = v2.functional.pil_to_tensor(image)  # uint8 (3, H, W)
    transform = augment_geometry(augment, image.height, image.width)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(np.random.SeedSequence(list(seed)).generate_state(1, np.uint64)[0]))
        out = transform(tensor)
    return v2.functional.to_pil_image(out)


def _readable_sources_by_class(records: Sequence[Record], log: Callable[[str], object]) -> dict[int, list[Record]]:
    """Sort records into classes (by path), logging and dropping those whose image cannot be read."""
    by_class: dict[int, list[Record]] = {label: [] for label in range(len(CLASS_NAMES))}
    for record in sorted(records, key=lambda record: record.path):
        if record.label not in by_class:
            raise LeukoError(
                f"Image {record.path} has label {record.label!r}; the expansion needs every image "
                "labelled 0 (normal) or 1 (blast)."
            )
        by_class[record.label].append(record)
    for label, class_records in by_class.items():
        if not class_records:
            raise LeukoError(
                f"Class '{CLASS_NAMES[label]}' has no images; the expansion balances two classes, "
                "so give images of both."
            )
    readable: dict[int, list[Record]] = {}
    for label, class_records in by_class.items():
        readable[label] = []
        for record in class_records:
            try:
                open_rgb(record.path)
            except BadImageError as error:
                log(f"Skipping unreadable image: {error}")
                continue
            readable[label].append(record)
        if not readable[label]:
            raise LeukoError(
                f"None of the {len(class_records)} '{CLASS_NAMES[label]}' images could be read "
                "(see the messages above); fix or replace them."
            )
    return readable


def _refuse_non_empty(out_dir: Path) -> None:
    """Refuse an output folder that exists and holds anything (or is a file)."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise LeukoError(
            f"{out_dir} is not empty: choose a new output folder (the expansion never overwrites files)."
        )


def _unique_stems(paths: Sequence[Path]) -> list[str]:
    """File stems made unique within one class (``x``, ``x-2``, ``x-3`` ...) so no output collides."""
    seen: dict[str, int] = {}
    stems = []
    for path in paths:
        count = seen.get(path.stem, 0) + 1
        seen[path.stem] = count
        stems.append(path.stem if count == 1 else f"{path.stem}-{count}")
    return stems


def _png_info(record: Record) -> PngImagePlugin.PngInfo:
    """Text chunks naming the source image and its group."""
    info = PngImagePlugin.PngInfo()
    info.add_text(SOURCE_KEY, str(Path(record.path).resolve()))
    info.add_text(SOURCE_GROUP_KEY, record.group)
    return info


def _save_png(image: Image.Image, target: Path, info: PngImagePlugin.PngInfo) -> None:
    """Save a lossless PNG atomically."""
    atomic_write(target, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def _write_manifest(out_dir: Path, written: Sequence[tuple[Record, Path]]) -> None:
    """Write ``manifest.csv``: path (relative to out_dir), label, group, source."""
    rows = [
        dict(zip(_MANIFEST_HEADER, (target.relative_to(out_dir).as_posix(), record.label, record.group,
                                    str(Path(record.path).resolve()))))
        for record, target in sorted(written, key=lambda item: item[1])
    ]
    write_csv(out_dir / MANIFEST_NAME, rows, _MANIFEST_HEADER, lineterminator="\n")
