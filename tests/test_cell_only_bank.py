"""scripts/cell_only_bank.py: the central cell is kept, the rest painted black; a bank is copied row for row."""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "cell_only_bank.py"


def _script():
    spec = importlib.util.spec_from_file_location("cell_only_bank", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _crop() -> np.ndarray:
    """A 128-px bank crop on a slide: a bluish cell (radius 30) with a dark nucleus, and a red cell in a corner."""
    rgb = np.full((128, 128, 3), (235, 228, 232), np.uint8)
    cv2.circle(rgb, (64, 64), 30, (170, 180, 215), -1)
    cv2.circle(rgb, (64, 64), 20, (95, 45, 140), -1)
    cv2.circle(rgb, (20, 20), 18, (225, 160, 170), -1)
    noise = np.random.default_rng(0).normal(0, 3, rgb.shape)
    return np.clip(rgb + noise, 0, 255).astype(np.uint8)


def test_the_cell_is_kept_and_the_slide_and_red_cells_painted_black():
    rgb = _crop()
    painted, found = _script().painted(rgb)
    assert found
    yy, xx = np.mgrid[:128, :128]
    r = np.hypot(yy - 64, xx - 64)
    assert (painted[r < 28] == rgb[r < 28]).all()  # the cell, untouched
    assert (painted[r > 36] == 0).all()  # the slide and the red cell in the corner
    assert painted[20, 20].sum() == 0
    grey, _ = _script().painted(rgb, 235)
    assert (grey[r > 36] == 235).all() and (grey[r < 28] == rgb[r < 28]).all()


def test_a_crop_without_a_cell_keeps_a_central_disc():
    flat = np.full((128, 128, 3), 230, np.uint8)
    painted, found = _script().painted(flat)
    assert not found
    assert painted[64, 64].sum() > 0 and painted[0, 0].sum() == 0 and painted[64, 120].sum() == 0


def test_a_bank_is_copied_row_for_row_and_never_overwritten(tmp_path):
    bank = tmp_path / "bank"
    (bank / "cells" / "lab").mkdir(parents=True)
    Image.fromarray(_crop()).save(bank / "cells" / "lab" / "a.png")
    rows = [{"path": "cells/lab/a.png", "label": "1", "group": "lab:a", "lab": "lab"}]
    with (bank / "cells.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "painted"
    command = [sys.executable, str(SCRIPT), str(bank / "cells.csv"), str(out)]
    subprocess.run(command, check=True, capture_output=True)
    assert list(csv.DictReader((out / "cells.csv").open())) == rows
    assert np.asarray(Image.open(out / "cells" / "lab" / "a.png"))[0, 0].sum() == 0
    again = subprocess.run(command, capture_output=True, text=True)
    assert again.returncode != 0 and "exists" in again.stderr
