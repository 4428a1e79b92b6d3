"""Grad-CAM: where in a cell image the model looked when it scored it.

Grad-CAM (Selvaraju et al., 2017) weights the activations of one convolutional layer by the
gradient of a class score and keeps the positive part. The layer comes from the model registry
(``ModelSpec.cam_layer``: ``layer4`` for the ResNets, ``features`` for VGG and the tiny model), so
every architecture is explained the same way. The computation is pytorch-grad-cam's; this module
only feeds it the checkpoint's preprocessing and draws the overlay that reports, the ``explain``
command and the service show.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import cv2
import numpy as np
import torch
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import scale_cam_image, show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from leukodetect.errors import LeukoError
from leukodetect.models import get_spec
from leukodetect.runtime.classifier import Classifier


def gradcam(classifier: Classifier, image: Image.Image, target_class: int = 1) -> np.ndarray:
    """Grad-CAM heatmap of ``target_class`` (1 = blast) for one RGB image.

    Returns:
        float32 array (H, W) of the image's own size, scaled to [0, 1] (all zeros where no
        location raises the class score).
    """
    heatmaps, _, _ = gradcam_batch(classifier, [image], target_class)
    return heatmaps[0]


def overlay(image: Image.Image, heatmap: np.ndarray, *, image_weight: float = 0.5) -> Image.Image:
    """The heatmap in the jet colour map blended over the image (red = looked at most).

    A heatmap of another size than the image is resized to it first.
    """

    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    heatmap = np.asarray(heatmap, dtype=np.float32)
    if heatmap.shape != rgb.shape[:2]:

        heatmap = cv2.resize(heatmap, image.size, interpolation=cv2.INTER_LINEAR)
    return Image.fromarray(show_cam_on_image(rgb, np.clip(heatmap, 0.0, 1.0), use_rgb=True, image_weight=image_weight))


class _LogitsKeepingScore(torch.nn.Module):
    """The classifier's guarded network as Grad-CAM wants a model: logits out; the guard's score kept aside.

    The network shares the model's modules, so the hooks Grad-CAM sets on the model's layer fire in it.
    """

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network
        self.score: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits, score = self.network(x)
        self.score = score.detach()
        return logits


def gradcam_batch(clf: Classifier, images: Sequence[Image.Image], target_class: int) -> tuple[list[np.ndarray], np.ndarray, np.ndarray | None]:
    """Heatmaps (each at its image's size), blast probabilities and guard scores (None without a guard) for a batch.

    One float32 forward pass gives all three.
    """

    n_classes = len(clf.class_names)
    if not 0 <= target_class < n_classes:
        names = ", ".join(f"{i} = {name}" for i, name in enumerate(clf.class_names))
        raise LeukoError(f"Target class {target_class} does not exist: this model's classes are {names}.")
    layer = clf.model.get_submodule(get_spec(clf.bundle["arch"]).cam_layer)
    x = torch.stack([clf.preset(image) for image in images]).to(clf.device, torch.float32)
    # Grad-CAM needs gradients: enable them even if a caller runs under no_grad, and keep float32
    # (no autocast) so low-precision gradients do not blur the map. A channels-last model is fine.
    autocast_off = torch.autocast(clf.device.type, enabled=False) if clf.device.type in ("cpu", "cuda") else contextlib.nullcontext()
    model = _LogitsKeepingScore(clf.network)
    with torch.enable_grad(), autocast_off, GradCAM(model=model, target_layers=[layer]) as cam:
        maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(target_class)] * len(images))
        logits = cam.outputs.detach().float()
    clf.model.zero_grad(set_to_none=True)
    probs = torch.softmax(logits / clf.temperature, dim=1)[:, 1].cpu().numpy()
    scores = model.score.float().cpu().numpy() if clf.guard_threshold is not None else None
    # Back from the model's square input to each image's own size (and rescaled to [0, 1]).
    heatmaps = [scale_cam_image(m[None], target_size=image.size)[0] for m, image in zip(maps, images)]
    return heatmaps, probs, scores
