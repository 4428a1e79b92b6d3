"""The network as the runtime runs it: logits and an out-of-distribution score from one forward pass.

A cell model that has never seen an image like its input (noise, a blank frame, text, another kind
of photograph, a cell from a very different laboratory) still answers with a confident class. The
guard stored in a checkpoint (fitted by :mod:`leukodetect.evaluation.ood`) measures how far the
image's penultimate-layer features lie from the training images'; above the stored threshold the
call becomes "review: unlike the images this model was trained on".

:class:`GuardedNetwork` computes both outputs from one pass, without hooks: it runs the model with
its classification head replaced by an identity (the features), then the head (the logits) and the
guard (the score). It shares the model's parameters, so it is exported to ONNX as one graph with two
outputs, and PyTorch and ONNX Runtime compute the same score.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

#: The call an input beyond the guard's threshold gets, and the reason shown with it.
REVIEW = "review"
UNLIKE_TRAINING = "unlike the images this model was trained on"


def pixel_statistics(x: torch.Tensor) -> torch.Tensor:
    """Thirteen numbers describing an RGB batch in [0, 1] (N, 3, S, S) as an image, not as a cell.

    Per channel the mean, the log standard deviation and the log mean gradient magnitude (how much
    fine detail); the log mean spread between the channels (how coloured); and the correlations of
    red with green, red with blue and green with blue over the image's pixels. A stained cell crop
    sits in a narrow region of this space; noise (detail everywhere), text and grey pictures (no
    colour) and flat or blank frames (no detail) lie far from it, whatever the network's features make
    of them; so do random colour blobs, smooth as they may be: in a stained smear, red and green rise
    and fall together (a dark nucleus is dark in both), in random colours they do not.

    The first ten are the statistics of guards fitted before 2026-12-06, which use only those.
    """
    x = x.float()
    mean = x.mean(dim=(2, 3))
    std = torch.log(x.std(dim=(2, 3)) + 1e-3)
    grad = (x[:, :, 1:, :-1] - x[:, :, :-1, :-1]).abs() + (x[:, :, :-1, 1:] - x[:, :, :-1, :-1]).abs()
    detail = torch.log(grad.mean(dim=(2, 3)) + 1e-3)
    spread = torch.log((x.amax(dim=1) - x.amin(dim=1)).mean(dim=(1, 2)) + 1e-3)
    centred = x - mean[:, :, None, None]
    cov = lambda a, b: (centred[:, a] * centred[:, b]).mean(dim=(1, 2))  # noqa: E731
    var = [cov(c, c) for c in range(3)]
    corr = torch.stack([cov(a, b) / torch.sqrt(var[a] * var[b] + 1e-8) for a, b in ((0, 1), (0, 2), (1, 2))], dim=1)
    return torch.cat([mean, std, detail, spread[:, None], corr], dim=1)


class _Distance(nn.Module):
    """``min_c || (v - center) @ projection - class_means[c] ||^2 / scales[c]`` for vectors ``v`` (N, D).

    ``scales`` are the groups' own thresholds where the guard has them (1 otherwise).
    """

    def __init__(self, center: torch.Tensor, projection: torch.Tensor, class_means: torch.Tensor, scales=None) -> None:
        super().__init__()
        self.register_buffer("center", torch.as_tensor(center).float())
        self.register_buffer("projection", torch.as_tensor(projection).float())
        self.register_buffer("class_means", torch.as_tensor(class_means).float())
        self.register_buffer("scales", torch.ones(len(self.class_means)) if scales is None else torch.as_tensor(scales).float())

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        z = (v.float() - self.center) @ self.projection
        return (((z[:, None, :] - self.class_means[None]) ** 2).sum(-1) / self.scales[None]).amin(1)


class Guard(nn.Module):
    """How unlike the training images an input is: the larger of two distances, each over its own threshold.

    One is the Mahalanobis distance of the penultimate-layer features (what the network makes of the
    image); the other that of :func:`pixel_statistics` (what the image is). Each is divided by its
    threshold (a high percentile of held-out in-distribution images), so the score is 1 at the edge of
    the training distribution whichever part decides, and the checkpoint's threshold is 1. Since
    2026-12-07 (06:31 UTC) each group of training images (laboratory, kind and class) has a threshold of
    its own laboratory's (``feature_group_thresholds``, ``pixel_group_thresholds``) and the distance to
    each group is divided by it before the nearest is taken; before, one threshold per part served every
    group. A guard fitted before the pixel part existed has the feature distance alone, in its own units.
    """

    def __init__(self, features: _Distance, pixels: _Distance | None = None, scales: tuple[float, float] = (1.0, 1.0),
                 mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)) -> None:
        super().__init__()
        self.features, self.pixels = features, pixels
        self.feature_scale, self.pixel_scale = float(scales[0]), float(scales[1])
        # The model's input is normalised; the pixel statistics are of the image itself.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, features: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        score = self.features(features) / self.feature_scale
        if self.pixels is not None and image is not None:
            rgb = image.float() * self.std + self.mean
            stats = pixel_statistics(rgb)[:, : self.pixels.center.shape[0]]  # a guard fitted on fewer statistics reads its own
            score = torch.maximum(score, self.pixels(stats) / self.pixel_scale)
        return score

    @classmethod
    def from_stats(cls, stats: dict, *, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)) -> Guard:
        """The guard stored in a checkpoint; ``mean``/``std`` are the checkpoint's input normalisation."""
        per_group = "feature_group_thresholds" in stats
        features = _Distance(*(np.asarray(stats[k]) for k in ("center", "projection", "class_means")),
                             scales=np.asarray(stats["feature_group_thresholds"]) if per_group else None)
        if "pixel_center" not in stats:
            return cls(features)
        pixels = _Distance(*(np.asarray(stats[k]) for k in ("pixel_center", "pixel_projection", "pixel_class_means")),
                           scales=np.asarray(stats["pixel_group_thresholds"]) if per_group else None)
        scales = (1.0, 1.0) if per_group else (stats["feature_threshold"], stats["pixel_threshold"])
        return cls(features, pixels, scales, mean=mean, std=std)


def without_head(model: nn.Module, head: str) -> tuple[nn.Module, nn.Module]:
    """(body, head): ``body(x)`` is the input of ``model``'s head, sharing every parameter with ``model``.

    The modules on the path to the head are shallow copies whose child lists are copied too, so
    ``model`` itself is left untouched (Grad-CAM, calibration and training keep using it).
    """
    parts = head.split(".")
    body = copy.copy(model)
    body._modules = dict(model._modules)
    parent = body
    for name in parts[:-1]:
        child = copy.copy(parent._modules[name])
        child._modules = dict(child._modules)
        parent._modules[name] = child
        parent = child
    head_module = parent._modules[parts[-1]]
    parent._modules[parts[-1]] = nn.Identity()
    return body, head_module


class GuardedNetwork(nn.Module):
    """``x -> (logits, score)``; the score is 0 where the checkpoint has no guard."""

    def __init__(self, model: nn.Module, head: str, guard: Guard | None = None) -> None:
        super().__init__()
        self.body, self.head = without_head(model, head)
        self.guard = guard

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(x)
        logits = self.head(features)
        score = self.guard(features, x) if self.guard is not None else torch.zeros(features.shape[0], device=features.device)
        return logits, score
