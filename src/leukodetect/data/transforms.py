"""Preprocessing and augmentation presets (torchvision transforms v2).

Evaluation: resize to a square of ``image_size`` and normalise with the mean/std stored in the
checkpoint. Training adds the paper's random geometry (rotation, width/height shift, zoom, shear,
flips). The affine step runs on a reflect-padded image and is cropped back, so corners show tissue
rather than black wedges (the paper's Keras generator filled with nearest pixels for the same reason).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torchvision.transforms import v2

from leukodetect.config import AugmentConfig
from leukodetect.runtime.preprocess import IMAGENET_MEAN, IMAGENET_STD, EvalPreset


@dataclass(frozen=True, kw_only=True)
class TrainPreset(EvalPreset):
    """Evaluation preprocessing plus random geometry; draws from torch's global RNG."""

    augment: AugmentConfig

    def random(self) -> v2.Transform:
        return augment_geometry(self.augment, self.image_size, self.image_size)

    def __call__(self, image):
        return self.finish()(self.random()(self.resize()(image)))


def augment_geometry(augment: AugmentConfig, height: int, width: int) -> v2.Transform:
    """The training geometry at an image's own size: reflect pad, random affine, crop back, flips.

    The pad (a quarter of the smaller side) gives the affine step real tissue to pull into the
    frame instead of black corners. Bilinear interpolation, as Keras' generator used in the paper.
    """
    pad = min(height, width) // 4
    steps: list[v2.Transform] = [
        v2.Pad(pad, padding_mode="reflect"),
        v2.RandomAffine(
            degrees=augment.rotation,
            translate=(augment.shift, augment.shift) if augment.shift else None,
            scale=(1 - augment.zoom, 1 + augment.zoom) if augment.zoom else None,
            shear=augment.shear or None,
            interpolation=v2.InterpolationMode.BILINEAR,
        ),
        v2.CenterCrop((height, width)),
    ]
    if augment.hflip:
        steps.append(v2.RandomHorizontalFlip())
    if augment.vflip:
        steps.append(v2.RandomVerticalFlip())
    return v2.Compose(steps)


def channel_stats(images) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 image tensors (3, H, W), as fractions of 255.

    Computed on the training part only, so nothing about the test images leaks into preprocessing.
    """
    total = np.zeros(3)
    total_sq = np.zeros(3)
    count = 0
    for img in images:
        x = img.reshape(3, -1).double() / 255.0
        total += x.sum(1).numpy()
        total_sq += (x * x).sum(1).numpy()
        count += x.shape[1]
    if count == 0:
        return IMAGENET_MEAN, IMAGENET_STD
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 1e-12))
    return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)
