"""Seconds per smear photograph: the colour locator against the learned one, measured in one process.

    python benchmarks/smear_locators.py [--photos 10] [--rounds 2] [--locator FILE] [--classify]

Reads ALL-IDB1's 2592x1944 photographs from ../shared/datasets (exits with a sentence if they are
missing), decodes each once, then times each path on the same arrays, alternating the order each
round so that a background job skews both alike. The learned path is ``detect``'s: the red-cell diameter
measured on the photograph, then the locator; "declared" is the same with one diameter given for all
(``--pixel-size``), which skips the stain-free check. ``--classify`` adds the whole pipeline with the
shipped cell model on every cell found. Prints the CPU's model and flags, the load average, medians
and the learned/colour and declared/learned ratios; not a test (the machine is shared and noisy).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from leukodetect.detection.locate import LocateParams, locate_cells
from leukodetect.detection.pipeline import analyze, locate_learned
from leukodetect.runtime.locator import WhiteCellLocator
from leukodetect.runtime.scale import estimate_smear_diameter
from leukodetect.weights import resolve_locator

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "ALL-IDB1" / "ALL_IDB1" / "im"


def cpu_facts() -> str:
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
                    flags = " ".join(f for f in value.split() if f in wanted)
                    break
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, flags: {flags or 'unknown'}"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--photos", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--locator", type=Path, default=None)
    parser.add_argument("--classify", action="store_true")
    args = parser.parse_args()
    if not DATA.is_dir():
        print(f"ALL-IDB1 is not at {DATA}: this benchmark needs its 2592x1944 photographs.")
        return 1
    photos = []
    for path in sorted(DATA.glob("*.jpg")):
        with Image.open(path) as im:
            if im.size == (2592, 1944):
                photos.append(np.asarray(im.convert("RGB")))
        if len(photos) == args.photos:
            break
    locator = WhiteCellLocator.load(resolve_locator(args.locator))
    classifier = None
    if args.classify:
        from leukodetect.runtime.classifier import Classifier
        from leukodetect.weights import default_model_path

        classifier = Classifier.from_checkpoint(default_model_path(), backend="torch")

    def colour(rgb):
        return len(locate_cells(rgb, LocateParams()).cells)

    declared = float(np.median([estimate_smear_diameter(rgb).diameter for rgb in photos]))

    def learned(rgb):
        return len(locate_learned(rgb, locator)[0].cells)

    def given(rgb):
        return len(locate_learned(rgb, locator, declared)[0].cells)

    paths = {"colour": colour, "learned": learned, "learned, declared": given}
    if classifier is not None:
        paths["learned+classify"] = lambda rgb: analyze(rgb, classifier, locator=locator)["n_cells"]
    times: dict[str, list[float]] = {k: [] for k in paths}
    print(f"{len(photos)} photographs of 2592x1944; {cpu_facts()}; torch threads {torch.get_num_threads()}; "
          f"load average before: {os.getloadavg()[0]:.2f}")
    for r in range(args.rounds):
        order = list(paths) if r % 2 == 0 else list(reversed(paths))
        for rgb in photos:
            for name in order:
                t0 = time.perf_counter()
                paths[name](rgb)
                times[name].append(time.perf_counter() - t0)
    for name, values in times.items():
        print(f"{name:18s} median {statistics.median(values):.3f} s, max {max(values):.3f} s per photograph")
    ratio = statistics.median(times["learned"]) / statistics.median(times["colour"])
    given_ratio = statistics.median(times["learned, declared"]) / statistics.median(times["learned"])
    print(f"learned / colour: {ratio:.2f}; declared ({declared:.1f} px) / learned: {given_ratio:.2f}; "
          f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
