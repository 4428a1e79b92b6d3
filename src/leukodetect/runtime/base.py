"""What every classifier runtime shares: preprocessing, threshold, class names, batched probabilities.

:class:`ImageClassifier` is the one interface the rest of the project calls. The PyTorch
:class:`~leukodetect.runtime.classifier.Classifier` and the exported models
(:class:`~leukodetect.runtime.export.ExportedClassifier`) both build on it, so files are read,
batched and called the same way whatever runs the network. It lives in a module of its own so that
the PyTorch runtime may use the ONNX one (its default CPU backend) without an import circle.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from leukodetect.errors import BadImageError
from leukodetect.runtime.checkpoint import DetectorSettings
from leukodetect.runtime.guard import REVIEW, UNLIKE_TRAINING
from leukodetect.runtime.images import open_rgb
from leukodetect.runtime.preprocess import EvalPreset
from leukodetect.runtime.scale import (
    CanonicalScale,
    ScaleEstimate,
    canonical_crop,
    estimate_rbc_diameter,
)


@dataclass
class Prediction:
    """One image's result: a probability and call, or the reason it could not be read.

    ``label`` is the class, or ``"review"`` when the image is beyond the model's out-of-distribution
    guard (``reason`` then says so, and ``prob_blast`` keeps the raw probability beside it).
    """

    path: str
    prob_blast: float | None = None
    label: str | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    ood_score: float | None = None
    reason: str | None = None
    rbc_diameter: float | None = None
    scale: str | None = None  # where the red-cell diameter came from: declared, measured or unknown

    def to_dict(self) -> dict:
        out = {"path": self.path, "label": self.label, "prob_blast": self.prob_blast, "error": self.error, "notes": self.notes}
        if self.ood_score is not None:
            out.update(ood_score=self.ood_score, reason=self.reason)
        if self.scale is not None:
            out.update(rbc_diameter=self.rbc_diameter, scale=self.scale)
        return out


class ImageClassifier:
    """What every classifier shares: preprocessing, threshold, class names, the guard, the scale, batched calls.

    Subclasses set ``preset``, ``threshold`` and ``class_names`` (and, where the checkpoint has
    them, ``guard_threshold`` and ``scale``) and implement ``outputs``; the PyTorch
    :class:`~leukodetect.runtime.classifier.Classifier` and the exported models
    (:mod:`leukodetect.runtime.export`) both build on it, so files are read, scaled, batched and
    called the same way whatever runs the network.
    """

    preset: EvalPreset
    threshold: float
    class_names: list[str]
    #: How a whole-smear detector cuts and judges its crops (None for a plain cell classifier).
    detector: DetectorSettings | None = None
    #: Out-of-distribution score above which a call becomes "review" (None: the model has no guard).
    guard_threshold: float | None = None
    #: The window of red-cell diameters the model sees (None: images are used at their own size).
    scale: CanonicalScale | None = None

    def outputs(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """Blast probability (temperature applied) and out-of-distribution score (None without a guard)
        for a preprocessed batch (N, 3, S, S)."""
        raise NotImplementedError

    def probabilities(self, batch: torch.Tensor) -> np.ndarray:
        """Blast probability for a preprocessed batch (N, 3, S, S), temperature applied."""
        return self.outputs(batch)[0]

    def beyond_guard(self, ood_score: float | None) -> bool:
        """Whether an image with this out-of-distribution score is unlike the model's training images."""
        return self.guard_threshold is not None and ood_score is not None and ood_score > self.guard_threshold

    def call(self, prob: float, ood_score: float | None = None) -> str:
        """The class, or "review" where the image is beyond the guard."""
        if self.beyond_guard(ood_score):
            return REVIEW
        return self.class_names[1] if prob >= self.threshold else self.class_names[0]

    def preprocessed_batches(self, images: Sequence[Image.Image | np.ndarray | torch.Tensor], batch_size: int = 16):
        """Yield float tensors (n, 3, S, S) of at most ``batch_size`` images, with the checkpoint's preprocessing.

        Images may be PIL images, (H, W, 3) uint8 arrays or (3, H, W) uint8 tensors (one already
        resized to the input size is left as it is). Only one batch of preprocessed tensors exists
        at a time, which bounds memory whatever the number of images.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        for i in range(0, len(images), batch_size):
            yield torch.stack([self.preset(image) for image in images[i:i + batch_size]])

    def image_outputs(self, images: Sequence[Image.Image | np.ndarray | torch.Tensor], *,
                      batch_size: int = 16) -> tuple[np.ndarray, np.ndarray | None]:
        """Blast probabilities (N,) and out-of-distribution scores (N,) or None, ``batch_size`` at a time.

        The images must already be what the model takes (for a model with a scale, canonical crops:
        see :meth:`view`).
        """
        probs, scores = [], []
        for batch in self.preprocessed_batches(images, batch_size):
            p, s = self.outputs(batch)
            probs.append(np.asarray(p))
            scores.append(None if s is None else np.asarray(s))
        if not probs:
            return np.zeros(0, dtype=np.float32), (None if self.guard_threshold is None else np.zeros(0, dtype=np.float32))
        return np.concatenate(probs), (None if scores[0] is None else np.concatenate(scores))

    def image_probabilities(self, images: Sequence[Image.Image | np.ndarray | torch.Tensor], *, batch_size: int = 16) -> np.ndarray:
        """Blast probability (N,) of decoded images, temperature applied, ``batch_size`` at a time."""
        return self.image_outputs(images, batch_size=batch_size)[0]

    @property
    def bank_diameter(self) -> float | None:
        """The red-cell diameter of a cell bank's crops for this model: they are cut at its own scale already."""
        return self.scale.pixels_per_rbc if self.scale is not None else None

    def view(self, image: Image.Image, *, rbc_diameter: float | None = None, name: str = "the image",
             notes: list[str] | None = None) -> tuple[Image.Image, ScaleEstimate | None]:
        """What the model is shown of a single-cell image: with a scale, the canonical window around
        its centre (red-cell diameter declared, else measured, else unknown); without one, the image.

        Every command that shows the model an image goes through here (predict, calibrate, explain, the
        service), so each sees what the others see. Where ``notes`` is given, a scale that cannot be known
        is said there, naming the image ``name``.
        """
        if self.scale is None:
            return image, None
        estimate = ScaleEstimate(rbc_diameter, "declared") if rbc_diameter else estimate_rbc_diameter(np.asarray(image))
        if notes is not None and (note := estimate.note(name)) is not None:
            notes.append(note)
        return Image.fromarray(canonical_crop(image, self.scale, estimate.diameter)), estimate

    def predict_paths(self, paths: Sequence[Path], *, batch_size: int = 16, progress: bool = False, stain=None,
                      rbc_diameter: float | None = None) -> list[Prediction]:
        """Classify files; an unreadable file gets an error entry and the others go on.

        ``stain`` (e.g. a :class:`~leukodetect.data.stain.MacenkoStain`) re-renders each decoded image
        before the model's own preprocessing; it notes, never raises, where it cannot.
        ``rbc_diameter`` declares the red-cell diameter in pixels of every image (from ``--pixel-size``);
        without it a model with a scale measures each image's red cells.
        """
        results = [Prediction(path=str(p)) for p in paths]
        pending: list[tuple[int, Image.Image | np.ndarray]] = []  # model inputs waiting for a full batch

        def flush() -> None:
            probs, scores = self.image_outputs([image for _, image in pending], batch_size=batch_size)
            for k, ((i, _), p) in enumerate(zip(pending, probs)):
                score = None if scores is None else float(scores[k])
                results[i].prob_blast = float(p)
                results[i].label = self.call(float(p), score)
                if score is not None:
                    results[i].ood_score = round(score, 4)
                    results[i].reason = UNLIKE_TRAINING if results[i].label == REVIEW else None
            pending.clear()

        for i, path in enumerate(tqdm(paths, desc="predict", disable=not progress)):
            try:
                image = open_rgb(path, notes=results[i].notes)
            except BadImageError as exc:
                results[i].error = str(exc)
                continue
            if stain is not None:
                image = stain(image, notes=results[i].notes)
            shown, estimate = self.view(image, rbc_diameter=rbc_diameter, name=Path(path).name, notes=results[i].notes)
            if estimate is not None:
                results[i].rbc_diameter, results[i].scale = estimate.diameter, estimate.source
            pending.append((i, shown))
            if len(pending) >= batch_size:
                flush()
        flush()
        return results
