"""A small bundled sample of real cells and smears, so every command can be tried without downloading data.

- ``cnmc/``: 66 single-cell images (33 blasts, 33 normal) from the C-NMC 2019 challenge data (ISBI
  2019, via TCIA), licensed CC BY 3.0, converted losslessly from BMP to PNG with their original names.
  The folder is in the C-NMC layout (``cnmc/all`` = blast, ``cnmc/hem`` = normal, patient id in
  ``UID_<patient>_...``), so ``index_dataset(sample_dir())`` reads it with patient groups.
- ``bccd/``: two normal smear fields from BCCD (MIT licence, ``bccd/LICENSE`` beside them), byte for
  byte as published, each with one white cell, for whole-smear analysis (``detect``).

See ``ATTRIBUTION.md`` beside this file. ALL-IDB images are not shipped: their terms forbid it.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from leukodetect.errors import LeukoError

#: What is known of each bundled smear field: BCCD's white-cell boxes, and that BCCD holds no leukemia.
SMEAR_TRUTH = {
    "BloodImage_00055.jpg": {"diagnosis": "normal", "white_cells": 1},
    "BloodImage_00066.jpg": {"diagnosis": "normal", "white_cells": 1},
}


def _bundled(name: str) -> Path:
    """The bundled folder ``sample/<name>`` as a real path; one sentence if the installation has none on disk."""
    resource = files("leukodetect") / "sample" / name
    path = Path(str(resource))
    if not path.is_dir():
        raise LeukoError(
            f"The bundled sample is not a folder on disk ({resource}); reinstall leukodetect "
            "from a wheel or source checkout (not a zip) to use it."
        )
    return path


def sample_dir() -> Path:
    """Return the folder of the bundled C-NMC sample (``cnmc/{all,hem}/*.png``) as a real path.

    Raises:
        LeukoError: the package is installed in a form (e.g. a zip) that has no folder on disk.
    """
    return _bundled("cnmc")


def sample_smear_dir() -> Path:
    """Return the folder of the bundled BCCD smear fields (``bccd/*.jpg``, its ``LICENSE`` beside them)."""
    return _bundled("bccd")


def sample_smears() -> list[Path]:
    """The bundled BCCD smear fields, sorted by name (the keys of :data:`SMEAR_TRUTH`)."""
    return [sample_smear_dir() / name for name in sorted(SMEAR_TRUTH)]
