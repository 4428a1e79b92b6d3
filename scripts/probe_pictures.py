"""Pictures that are not blood, bundled with scikit-image, scikit-learn and matplotlib (no download), and the
random crops of them that the guard probes show a model (``guard_probe.py``, ``guard_groups_probe.py``)."""
from pathlib import Path

import matplotlib
import numpy as np
import skimage.data
import sklearn.datasets
from PIL import Image


def pictures() -> dict[str, list[np.ndarray]]:
    """RGB arrays by kind: everyday photographs, stained tissue under a microscope (immunohistochemistry, the
    nearest thing to a smear among them) and, added 2026-12-06 (late evening), more photographs: scikit-image's
    other colour and grey samples, scikit-learn's two and matplotlib's portrait."""
    grey = lambda a: np.stack([a] * 3, -1)  # noqa: E731
    return {
        "photograph": [getattr(skimage.data, n)() for n in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina", "colorwheel")],
        "stained tissue": [skimage.data.immunohistochemistry()],
        "photograph, more": [skimage.data.stereo_motorcycle()[0], skimage.data.logo()[..., :3], *sklearn.datasets.load_sample_images().images,
                             np.asarray(Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").convert("RGB")),
                             grey(skimage.data.coins()), grey(skimage.data.horse().astype(np.uint8) * 255)],
    }


def crops(sources: list[np.ndarray], n: int, rng: np.random.Generator) -> list[Image.Image]:
    """``n`` random square crops (64-300 px) of the pictures, in turn, resized to 128 px."""
    out = []
    for i in range(n):
        a = sources[i % len(sources)]
        side = int(rng.integers(64, min(300, *a.shape[:2]) + 1))
        y, x = (int(rng.integers(0, a.shape[k] - side + 1)) for k in (0, 1))
        out.append(Image.fromarray(a[y:y + side, x:x + side, :3]).resize((128, 128), Image.BILINEAR))
    return out
