"""Build the bundled sample: a balanced, lossless PNG subset of the C-NMC 2019 cells.

C-NMC 2019 (CC BY 3.0) is the only data set the project may ship; see
``src/leukodetect/sample/ATTRIBUTION.md``. The script picks N images per class, spread over as many
patients as possible (round-robin over patients), converts each BMP to PNG without changing a
pixel (checked after writing) and keeps the original ``UID_<patient>_...`` name.

Usage (from the repository root):

    python scripts/make_sample.py [SOURCE] [--per-class N] [--max-bytes BYTES]

The output folder ``src/leukodetect/sample/cnmc/{all,hem}`` is rebuilt: PNGs already there are removed.
"""

from __future__ import annotations

import argparse
import io
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = ROOT / ".." / "shared" / "datasets" / "C-NMC-2019-subset" / "Data Subset"
DEFAULT_OUT = ROOT / "src" / "leukodetect" / "sample" / "cnmc"
NAME = re.compile(r"^UID_(?P<patient>[^_]+)_.*_(?P<cls>all|hem)$", re.IGNORECASE)
CLASSES = ("all", "hem")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", nargs="?", type=Path, default=DEFAULT_SOURCE, help="C-NMC folder (searched recursively)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: the package's sample/cnmc)")
    parser.add_argument("--per-class", type=int, default=None, help="images per class (default: as many as fit --max-bytes)")
    parser.add_argument("--max-bytes", type=int, default=10_000_000, help="size budget of the whole sample (default 10 MB)")
    args = parser.parse_args(argv)

    by_class = find_images(args.source)
    for cls in CLASSES:
        if not by_class[cls]:
            sys.exit(f"No C-NMC '{cls}' images (UID_..._{cls}.bmp) found under {args.source}.")
    picks = {cls: patient_round_robin(by_class[cls]) for cls in CLASSES}
    available = min(len(picks[cls]) for cls in CLASSES)
    per_class = min(args.per_class or available, available)

    encoded = {cls: [encode_lossless(path) for path in picks[cls][:per_class]] for cls in CLASSES}
    if args.per_class is None:
        # Shrink N until the whole sample fits the budget (taking the n first picks keeps patients spread).
        while per_class > 1 and sum(len(data) for cls in CLASSES for _, data in encoded[cls][:per_class]) > args.max_bytes:
            per_class -= 1
    size = sum(len(data) for cls in CLASSES for _, data in encoded[cls][:per_class])
    if size > args.max_bytes:
        sys.exit(f"{per_class} images per class take {size:,} bytes, more than --max-bytes {args.max_bytes:,}.")

    for cls in CLASSES:
        folder = args.out / cls
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.png"):
            old.unlink()
        for path, data in encoded[cls][:per_class]:
            target = folder / f"{path.stem}.png"
            target.write_bytes(data)
            check_same_pixels(path, target)
        patients = {patient_of(path) for path, _ in encoded[cls][:per_class]}
        print(f"{cls}: {per_class} images from {len(patients)} patients (of {len(by_class[cls])} images available)")
    print(f"wrote {2 * per_class} PNGs, {size:,} bytes, to {args.out}")
    return 0


def find_images(source: Path) -> dict[str, list[Path]]:
    """C-NMC BMPs under ``source`` by class, sorted by name."""
    by_class: dict[str, list[Path]] = {cls: [] for cls in CLASSES}
    for path in sorted(source.rglob("*.bmp"), key=lambda p: p.name):
        match = NAME.match(path.stem)
        if match is not None:
            by_class[match["cls"].lower()].append(path)
    return by_class


def patient_of(path: Path) -> str:
    return NAME.match(path.stem)["patient"]


def patient_round_robin(paths: list[Path]) -> list[Path]:
    """Order images so that the first n cover as many patients as possible: one per patient per round."""
    queues: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(paths, key=lambda p: p.name):
        queues[patient_of(path)].append(path)
    order = []
    while any(queues.values()):
        for patient in sorted(queues):
            if queues[patient]:
                order.append(queues[patient].pop(0))
    return order


def encode_lossless(path: Path) -> tuple[Path, bytes]:
    """The BMP as an optimised PNG (RGB, no metadata)."""
    with Image.open(path) as image:
        if image.mode != "RGB":
            sys.exit(f"{path} is {image.mode}, not RGB; the sample expects the C-NMC RGB BMPs.")
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", optimize=True)
    return path, buffer.getvalue()


def check_same_pixels(bmp: Path, png: Path) -> None:
    """Stop if the PNG's pixels differ from the BMP's in any way."""
    with Image.open(bmp) as a, Image.open(png) as b:
        if a.size != b.size or a.mode != b.mode or not np.array_equal(np.asarray(a), np.asarray(b)):
            sys.exit(f"{png} does not hold the same pixels as {bmp}; the conversion is not lossless.")


if __name__ == "__main__":
    raise SystemExit(main())
