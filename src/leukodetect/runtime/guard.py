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


class Guard(nn.Module):
    """``min_c || (f - center) @ projection - class_means[c] ||^2`` for features ``f`` (N, D)."""

    def __init__(self, center: torch.Tensor, projection: torch.Tensor, class_means: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("center", center.float())
        self.register_buffer("projection", projection.float())
        self.register_buffer("class_means", class_means.float())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        z = (features.float() - self.center) @ self.projection
        return ((z[:, None, :] - self.class_means[None]) ** 2).sum(-1).amin(1)

    @classmethod
    def from_stats(cls, stats: dict) -> Guard:
        return cls(*(torch.as_tensor(np.asarray(stats[k])) for k in ("center", "projection", "class_means")))


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
        score = self.guard(features) if self.guard is not None else torch.zeros(features.shape[0], device=features.device)
        return logits, score
