"""Synthetic smear photographs with known cells (whole-smear detection and the service's /v1/analyze).

A plain module (not a conftest) so that test files can import it by one unambiguous name.
"""

import numpy as np

RBC_D = 30  # red-cell diameter of the synthetic smear, pixels
#: White cells (x, y, diameter): one alone, two touching (centres 0.9 diameters apart).
WHITE = [(90.0, 90.0, 45), (250.0, 260.0, 45), (290.5, 260.0, 45)]
PLATELETS = [(200.0, 60.0), (60.0, 330.0), (330.0, 80.0)]


def _disc(canvas, x, y, d, colour):
    yy, xx = np.ogrid[: canvas.shape[0], : canvas.shape[1]]
    canvas[(yy - y) ** 2 + (xx - x) ** 2 <= (d / 2) ** 2] = colour


def synthetic_smear(seed: int = 0, size: int = 400) -> np.ndarray:
    """Pale background, pink red cells on a jittered grid, 3 purple white cells, tiny platelets."""
    rng = np.random.default_rng(seed)
    img = np.empty((size, size, 3), np.float64)
    img[:] = (225, 222, 205)
    for gy in range(20, size, 42):
        for gx in range(20, size, 42):
            x, y = gx + rng.uniform(-4, 4), gy + rng.uniform(-4, 4)
            if all((x - wx) ** 2 + (y - wy) ** 2 > (wd / 2 + RBC_D / 2 + 2) ** 2 for wx, wy, wd in WHITE):
                _disc(img, x, y, RBC_D * rng.uniform(0.93, 1.07), (215, 150, 150))
    for x, y in PLATELETS:
        _disc(img, x, y, 6, (150, 90, 170))
    for x, y, d in WHITE:
        _disc(img, x, y, d, (120, 60, 160))
        _disc(img, x, y, d * 0.6, (90, 30, 140))  # darker nucleus
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)
