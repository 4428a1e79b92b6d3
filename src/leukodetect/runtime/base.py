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
from leukodetect.runtime.images import open_rgb
from leukodetect.runtime.preprocess import EvalPreset


@dataclass
class Prediction:
    """One image's result: a probability and call, or the reason it could not be read."""

    path: str
    prob_blast: float | None = None
    label: str | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"path": self.path, "label": self.label, "prob_blast": self.prob_blast, "error": self.error, "notes": self.notes}


class ImageClassifier:
    """What every classifier shares: preprocessing, threshold, class names, ``image_probabilities`` and ``predict_paths``.

    Subclasses set ``preset``, ``threshold`` and ``class_names`` and implement ``probabilities``; the
    PyTorch :class:`Classifier` and the exported models (:mod:`leukodetect.runtime.export`) both build on it,
    so files are read, batched and called the same way whatever runs the network.
    """

    preset: EvalPreset
    threshold: float
    class_names: list[str]
    #: How a whole-smear detector cuts and judges its crops (None for a plain cell classifier).
    detector: DetectorSettings | None = None

    def probabilities(self, batch: torch.Tensor) -> np.ndarray:
        """Blast probability for a preprocessed batch (N, 3, S, S), temperature applied."""
        raise NotImplementedError

    def call(self, prob: float) -> str:
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

    def image_probabilities(self, images: Sequence[Image.Image | np.ndarray | torch.Tensor], *, batch_size: int = 16) -> np.ndarray:
        """Blast probability (N,) of decoded images, temperature applied, ``batch_size`` at a time."""
        probs = [np.asarray(self.probabilities(batch)) for batch in self.preprocessed_batches(images, batch_size)]
        return np.concatenate(probs) if probs else np.zeros(0, dtype=np.float32)

    def predict_paths(self, paths: Sequence[Path], *, batch_size: int = 16, progress: bool = False, stain=None) -> list[Prediction]:
        """Classify files; an unreadable file gets an error entry and the others go on.

        ``stain`` (e.g. a :class:`~leukodetect.data.stain.MacenkoStain`) re-renders each decoded image
        before the model's own preprocessing; it notes, never raises, where it cannot.
        """
        results = [Prediction(path=str(p)) for p in paths]
        pending: list[tuple[int, Image.Image]] = []  # decoded images waiting for a full batch

        def flush() -> None:
            for (i, _), p in zip(pending, self.image_probabilities([image for _, image in pending], batch_size=batch_size)):
                results[i].prob_blast = float(p)
                results[i].label = self.call(float(p))
            pending.clear()

        for i, path in enumerate(tqdm(paths, desc="predict", disable=not progress)):
            try:
                image = open_rgb(path, notes=results[i].notes)
            except BadImageError as exc:
                results[i].error = str(exc)
                continue
            if stain is not None:
                image = stain(image, notes=results[i].notes)
            pending.append((i, image))
            if len(pending) >= batch_size:
                flush()
        flush()
        return results


