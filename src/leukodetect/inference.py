"""Load a checkpoint once and classify images with the preprocessing it carries."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .data.io import open_rgb
from .data.transforms import EvalPreset
from .errors import BadImageError
from .training.checkpoint import load_checkpoint, model_from_checkpoint
from .training.device import autocast, autocast_dtype, channels_last, resolve_device


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
    PyTorch :class:`Classifier` and the exported models (:mod:`leukodetect.export`) both build on it,
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


class Classifier(ImageClassifier):
    """A checkpoint ready for inference: model in eval mode plus its preprocessing and threshold."""

    def __init__(self, bundle: dict, *, device: str = "auto", precision: str = "auto", source: str = "checkpoint") -> None:
        self.bundle = bundle
        self.device = resolve_device(device)
        self.amp_dtype = autocast_dtype(self.device, precision)
        self.channels_last = channels_last(self.device)
        self.model = model_from_checkpoint(bundle, source).to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # ``model`` stays the checkpoint's module (Grad-CAM hooks its layers);
        # ``inference_model`` (used by ``probabilities`` and calibration) is a copy with batch norm folded
        # into the convolutions.
        self.inference_model = fuse_batch_norm(self.model)
        self.preset = EvalPreset(image_size=bundle["image_size"], mean=tuple(bundle["mean"]), std=tuple(bundle["std"]))
        self.threshold = float(bundle["threshold"])
        self.temperature = float(bundle["temperature"])
        self.class_names = list(bundle["class_names"])

    @classmethod
    def from_checkpoint(cls, path: Path, **kwargs) -> Classifier:
        return cls(load_checkpoint(path), source=str(path), **kwargs)

    @torch.inference_mode()
    def probabilities(self, batch: torch.Tensor) -> np.ndarray:
        """Blast probability for a preprocessed batch (N, 3, S, S), temperature applied."""
        x = batch.to(self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.amp_dtype):
            logits = self.inference_model(x)
        return torch.softmax(logits.float() / self.temperature, dim=1)[:, 1].cpu().numpy()


def fuse_batch_norm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with every batch norm folded into the convolution before it.

    Inference only (the folded weights use the running statistics). One pass less over each
    activation map: ResNet-50 at 224x224 on the 2-core AVX2 EPYC ran 8% faster at batch 32 and 4%
    at batch 1 together with ``inference_mode`` (see docs/benchmarks.md). P(blast) agrees with the
    unfused model to float32 rounding (tests/test_benchmark.py checks 1e-5). A model torch.fx cannot
    trace is returned unfused, in eval mode.
    """
    from torch.fx.experimental.optimization import fuse

    model.eval()
    try:
        return fuse(copy.deepcopy(model)).eval()
    except Exception:  # tracing limits of torch.fx are not the user's problem: run the plain module
        return model
