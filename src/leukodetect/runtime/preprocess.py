"""The deterministic preprocessing that travels with every checkpoint: resize, scale, normalise.

Evaluation, serving and export all apply :class:`EvalPreset` with the size, mean and std stored in
the checkpoint; training adds random geometry on top of it (:mod:`leukodetect.data.transforms`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True, kw_only=True)
class EvalPreset:
    """PIL RGB image -> normalised float tensor (3, S, S)."""

    image_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def resize(self) -> v2.Transform:
        return v2.Compose([v2.ToImage(), v2.Resize((self.image_size, self.image_size), antialias=True)])

    def finish(self) -> v2.Transform:
        return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(self.mean), list(self.std))])

    def __call__(self, image):
        return self.finish()(self.resize()(image))
