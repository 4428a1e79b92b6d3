"""Preprocessing and augmentation presets (torchvision transforms v2).

Evaluation: resize to a square of ``image_size`` and normalise with the mean/std stored in the
checkpoint. Training adds the paper's random geometry (rotation, width/height shift, zoom, shear,
flips) and, for runs across laboratories, stain and camera variation (:func:`augment_colour`). The affine step runs on a reflect-padded image and is cropped back, so corners show tissue
rather than black wedges (the paper's Keras generator filled with nearest pixels for the same reason).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from skimage.color import hed2rgb, rgb2hed
from torchvision import tv_tensors
from torchvision.transforms import v2

from leukodetect.config import AugmentConfig
from leukodetect.runtime.preprocess import IMAGENET_MEAN, IMAGENET_STD, EvalPreset


@dataclass(frozen=True, kw_only=True)
class TrainPreset(EvalPreset):
    """Evaluation preprocessing plus random geometry; draws from torch's global RNG."""

    augment: AugmentConfig

    def random(self) -> v2.Transform:
        geometry = augment_geometry(self.augment, self.image_size, self.image_size)
        colour = augment_colour(self.augment)
        return v2.Compose([geometry, colour]) if colour is not None else geometry

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


class HedJitter(torch.nn.Module):
    """Random stain variation in haematoxylin-eosin-DAB space (Tellez et al., 2019).

    The image is unmixed into stain densities with scikit-image's ``rgb2hed`` (Ruifrok and Johnston's
    matrix), each density is scaled by ``1 + U(-sigma, sigma)`` and shifted by ``U(-sigma, sigma) / 10``,
    and the image is mixed back with ``hed2rgb``. Romanowsky stains (May-Grunwald-Giemsa, Wright) are not
    H&E, but their two dyes load the same two unmixed channels (nuclei: the haematoxylin-like blue-purple;
    red cells and eosinophil granules: the eosin-like pink), so the jitter changes how strongly a smear
    took each dye, which is what differs most between laboratories. Draws from torch's global RNG.
    """

    def __init__(self, sigma: float) -> None:
        super().__init__()
        self.sigma = float(sigma)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        rgb = image.permute(1, 2, 0).numpy()
        alpha = 1 + (torch.rand(3).numpy() * 2 - 1) * self.sigma
        beta = (torch.rand(3).numpy() * 2 - 1) * self.sigma / 10
        hed = rgb2hed(rgb) * alpha + beta
        out = np.clip(hed2rgb(hed) * 255 + 0.5, 0, 255).astype(np.uint8)
        return tv_tensors.Image(torch.from_numpy(out).permute(2, 0, 1).contiguous())


class ResolutionDrop(torch.nn.Module):
    """Fewer pixels per cell: shrink by a random factor in ``factors`` (antialiased) and enlarge back (bilinear).

    A laboratory photographing at a lower magnification or with a coarser camera gives a cell fewer pixels;
    shown at the canonical scale, it comes out soft (Aria's fields hold 14.7 pixels per red cell, shown
    at 42.7). Without this, softness itself can tell laboratories, and so labels, apart.
    """

    def __init__(self, factors: tuple[float, float] = (1.5, 4.0)) -> None:
        super().__init__()
        self.factors = factors

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        lo, hi = self.factors
        factor = lo + float(torch.rand(())) * (hi - lo)
        height, width = image.shape[-2:]
        small = v2.functional.resize(image, [max(1, round(height / factor)), max(1, round(width / factor))], antialias=True)
        return tv_tensors.Image(v2.functional.resize(small, [height, width], antialias=False))


def augment_colour(augment: AugmentConfig) -> v2.Transform | None:
    """Stain and camera variation, or None when every one is off: HED jitter, colour jitter, resolution drop, blur, JPEG.

    torchvision's ``ColorJitter``, ``GaussianBlur`` and ``JPEG`` (transforms v2) and scikit-image's
    stain unmixing; the order follows the light path: the stain, then the camera's colour response,
    then its optics, then the file's compression.
    """
    steps: list = []
    if augment.hed:
        steps.append(HedJitter(augment.hed))
    if augment.colour:
        # No hue step: it costs 1.3 ms of about 4 ms per 128-pixel image (2-core EPYC, 2026-12-04), and the
        # HED jitter already moves the stains' hues.
        c = augment.colour
        steps.append(v2.ColorJitter(brightness=c, contrast=c, saturation=c))
    if augment.lowres:
        steps.append(v2.RandomApply([ResolutionDrop()], p=augment.lowres))
    if augment.blur:
        steps.append(v2.RandomApply([v2.GaussianBlur(kernel_size=7, sigma=(0.1, 1.5))], p=augment.blur))
    if augment.jpeg:
        steps.append(v2.RandomApply([v2.JPEG(quality=(50, 95))], p=augment.jpeg))
    return v2.Compose(steps) if steps else None


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
