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
from tqdm.auto import tqdm

from leukodetect.errors import BadImageError
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
    """What every classifier shares: preprocessing, threshold and class names, and ``predict_paths``.

    Subclasses set ``preset``, ``threshold`` and ``class_names`` and implement ``probabilities``; the
    PyTorch :class:`Classifier` and the exported models (:mod:`leukodetect.runtime.export`) both build on it,
    so files are read, batched and called the same way whatever runs the network.
    """

    preset: EvalPreset
    threshold: float
    class_names: list[str]

    def probabilities(self, batch: torch.Tensor) -> np.ndarray:
        """Blast probability for a preprocessed batch (N, 3, S, S), temperature applied."""
        raise NotImplementedError

    def call(self, prob: float) -> str:
        return self.class_names[1] if prob >= self.threshold else self.class_names[0]

    def predict_paths(self, paths: Sequence[Path], *, batch_size: int = 16, progress: bool = False, stain=None) -> list[Prediction]:
        """Classify files; an unreadable file gets an error entry and the others go on.

        ``stain`` (e.g. a :class:`~leukodetect.data.stain.MacenkoStain`) re-renders each decoded image
        before the model's own preprocessing; it notes, never raises, where it cannot.
        """
        results = [Prediction(path=str(p)) for p in paths]
        pending: list[tuple[int, torch.Tensor]] = []

        def flush() -> None:
            if not pending:
                return
            probs = self.probabilities(torch.stack([t for _, t in pending]))
            for (i, _), p in zip(pending, probs):
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
            pending.append((i, self.preset(image)))
            if len(pending) >= batch_size:
                flush()
        flush()
        return results


