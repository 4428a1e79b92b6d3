"""The learned white-cell locator at inference: a smear photograph in, white-cell centres out.

The photograph is resampled so that a red cell measures ``rbc_px`` pixels (its red-cell diameter is
measured first, :func:`~leukodetect.runtime.scale.estimate_rbc_diameter`), standardised channel by
channel with its own mean and spread (so a paler or bluer stain starts nearer the training images),
and run through :class:`~leukodetect.models.centres.CentreNet`. Local maxima of the heat map above
``threshold`` are the centres, mapped back to the photograph's pixels.

The weights file is safetensors with the settings as JSON under the ``leukodetect`` key and
``"format": "leukodetect.locator"``, so a file names what it is and how it was trained.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.nn import functional as F

from leukodetect.errors import BadCheckpointError
from leukodetect.models.centres import STRIDE, CentreNet
from leukodetect.utils import atomic_write

LOCATOR_FORMAT = "leukodetect.locator"
LOCATOR_KEY = "leukodetect"


@dataclass(frozen=True, kw_only=True)
class LocatorSettings:
    """How a locator sees an image and reads its heat map; stored in its weights file.

    Attributes:
        rbc_px: pixels per red-cell diameter of the network's input.
        width: the network's base width (:class:`CentreNet`).
        threshold: a heat-map peak at or above this probability is a white cell.
        peak_window: peaks are maxima over this many heat-map cells square (5 = 20 input pixels,
            1.25 red-cell diameters: a white cell is wider, so one cell gives one peak).
        trained_on: laboratories and image counts of its training data.
        recipe: the training settings (iterations, patch, augmentation).
    """

    rbc_px: float = 16.0
    width: int = 32
    threshold: float = 0.3
    peak_window: int = 5
    trained_on: dict = field(default_factory=dict)
    recipe: dict = field(default_factory=dict)


def standardise(rgb: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 to a (3, H, W) float tensor with each channel at mean 0 and spread 1 over the image."""
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float() / 255
    mean = x.mean(dim=(1, 2), keepdim=True)
    std = x.std(dim=(1, 2), keepdim=True)
    return (x - mean) / (std + 0.02)


def resample(rgb: np.ndarray, factor: float) -> np.ndarray:
    """The image scaled by ``factor`` (area averaging when shrinking), at least 8 pixels a side."""
    height, width = rgb.shape[:2]
    size = (max(8, round(width * factor)), max(8, round(height * factor)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR)


def peaks(heat: np.ndarray, threshold: float, window: int) -> list[tuple[int, int, float]]:
    """(row, col, value) of the local maxima of a 2-D map at or above ``threshold``, highest first."""
    t = torch.from_numpy(heat)[None, None]
    top = F.max_pool2d(t, window, stride=1, padding=window // 2)[0, 0].numpy()
    rows, cols = np.nonzero((heat == top) & (heat >= threshold))
    found = sorted(((int(r), int(c), float(heat[r, c])) for r, c in zip(rows, cols)), key=lambda p: -p[2])
    taken: set[tuple[int, int]] = set()
    out = []
    for r, c, v in found:  # equal neighbouring maxima (a flat top) give one peak
        if any((r + dr, c + dc) in taken for dr in (-1, 0, 1) for dc in (-1, 0, 1)):
            continue
        taken.add((r, c))
        out.append((r, c, v))
    return out


class WhiteCellLocator:
    """A trained :class:`CentreNet` and its :class:`LocatorSettings`."""

    def __init__(self, net: CentreNet, settings: LocatorSettings) -> None:
        self.net = net.eval()
        self.settings = settings

    def heatmap(self, rgb: np.ndarray, rbc_diameter: float) -> tuple[np.ndarray, float]:
        """The centre probability map of a photograph and the factor it was resampled by."""
        factor = self.settings.rbc_px / rbc_diameter
        small = resample(rgb, factor)
        x = standardise(small)[None]
        pad_h, pad_w = (-x.shape[2]) % 8, (-x.shape[3]) % 8
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect" if min(x.shape[2:]) > max(pad_h, pad_w) else "replicate")
        with torch.inference_mode():
            heat = torch.sigmoid(self.net(x))[0, 0].numpy()
        rows = -(-small.shape[0] // STRIDE)
        cols = -(-small.shape[1] // STRIDE)
        return heat[:rows, :cols], factor

    def locate(self, rgb: np.ndarray, rbc_diameter: float, *, threshold: float | None = None) -> list[tuple[float, float, float]]:
        """(x, y, score) of each white cell found, in the photograph's pixels, highest score first."""
        heat, factor = self.heatmap(rgb, rbc_diameter)
        return self.centres(heat, factor, rgb.shape[:2], threshold=threshold)

    def centres(self, heat: np.ndarray, factor: float, shape: tuple[int, int], *, threshold: float | None = None) -> list[tuple[float, float, float]]:
        """(x, y, score) of the peaks of a :meth:`heatmap` at or above ``threshold`` (default: the locator's), in the
        pixels of the photograph of ``shape`` (height, width) it was computed on, highest score first."""
        t = self.settings.threshold if threshold is None else threshold
        height, width = shape
        scale = STRIDE / factor
        return [
            (min(width - 1.0, (c + 0.5) * scale), min(height - 1.0, (r + 0.5) * scale), v)
            for r, c, v in peaks(heat, t, self.settings.peak_window)
        ]

    def save(self, path: Path) -> Path:
        meta = {"format": LOCATOR_FORMAT, "version": 1, **asdict(self.settings)}
        tensors = {k: v.detach().contiguous() for k, v in self.net.state_dict().items()}
        return atomic_write(Path(path), lambda p: save_file(tensors, str(p), metadata={LOCATOR_KEY: json.dumps(meta)}))

    @classmethod
    def load(cls, path: Path) -> WhiteCellLocator:
        """Read a locator written by :meth:`save`.

        Raises:
            BadCheckpointError: the file is missing, unreadable, or not a locator.
        """
        path = Path(path)
        if not path.is_file():
            raise BadCheckpointError(f"White-cell locator {path} does not exist: check the path given to --locator-weights.")
        try:
            with safe_open(str(path), framework="pt") as f:
                raw = (f.metadata() or {}).get(LOCATOR_KEY)
                meta = json.loads(raw) if raw else {}
                state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        except Exception as exc:
            raise BadCheckpointError(
                f"{path} is not a readable white-cell locator ({type(exc).__name__}): pass a locator.safetensors "
                "written by 'leukodetect train-locator'."
            ) from exc
        if meta.get("format") != LOCATOR_FORMAT:
            raise BadCheckpointError(
                f"{path} is not a white-cell locator (no '{LOCATOR_FORMAT}' description): pass a locator.safetensors "
                "written by 'leukodetect train-locator'."
            )
        known = {k: meta[k] for k in LocatorSettings.__dataclass_fields__ if k in meta}
        settings = LocatorSettings(**known)
        net = CentreNet(width=settings.width)
        try:
            net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
        except RuntimeError as exc:
            raise BadCheckpointError(f"The weights in {path} do not match the locator network: the file is damaged.") from exc
        return cls(net, settings)
