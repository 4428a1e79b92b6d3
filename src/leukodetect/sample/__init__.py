"""A small bundled sample of real cells, so every command can be tried without downloading data.

66 single-cell images (33 blasts, 33 normal) from the C-NMC 2019 challenge data (ISBI 2019, via
TCIA), licensed CC BY 3.0, converted losslessly from BMP to PNG with their original names; see
``ATTRIBUTION.md`` beside this file. ALL-IDB images are not shipped: their terms forbid it.

The folder is in the C-NMC layout (``cnmc/all`` = blast, ``cnmc/hem`` = normal, patient id in
``UID_<patient>_...``), so ``index_dataset(sample_dir())`` reads it with patient groups.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from leukodetect.errors import LeukoError


def sample_dir() -> Path:
    """Return the folder of the bundled C-NMC sample (``cnmc/{all,hem}/*.png``) as a real path.

    Raises:
        LeukoError: the package is installed in a form (e.g. a zip) that has no folder on disk.
    """
    resource = files("leukodetect") / "sample" / "cnmc"
    path = Path(str(resource))
    if not path.is_dir():
        raise LeukoError(
            f"The bundled sample is not a folder on disk ({resource}); reinstall leukodetect "
            "from a wheel or source checkout (not a zip) to use it."
        )
    return path
