"""Self-describing checkpoints.

A checkpoint is a dict of plain Python values and tensors saved with ``torch.save`` and read with
``weights_only=True`` (no code is ever unpickled). It holds everything needed downstream: the
architecture, class names, input size, mean/std, decision threshold and temperature, the config
that made it, its training history, library versions, and the pixel hashes of the images it was
trained and validated on (so ``evaluate`` can refuse to score a model on its own training images).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.records import CLASS_NAMES
from ..errors import BadCheckpointError
from ..models import create_model
from ..utils import atomic_write, environment_facts

FORMAT = "leukodetect.checkpoint"
FORMAT_VERSION = 1
REQUIRED = ("arch", "class_names", "image_size", "mean", "std", "threshold", "temperature", "state_dict")


def make_bundle(
    model: nn.Module,
    *,
    arch: str,
    image_size: int,
    mean,
    std,
    config: dict[str, Any],
    history: list[dict[str, Any]] | None = None,
    trained_on: list[str] | None = None,
    threshold: float = 0.5,
    temperature: float = 1.0,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    bundle = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": arch,
        "class_names": list(CLASS_NAMES),
        "image_size": int(image_size),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "threshold": float(threshold),
        "temperature": float(temperature),
        "config": config,
        "history": history or [],
        "trained_on": sorted(trained_on or []),
        "versions": environment_facts(),
        "state_dict": state,
    }
    bundle.update(extra or {})
    return bundle


def save_checkpoint(obj: dict[str, Any], path: Path) -> Path:
    """Write atomically: an interruption never leaves a half-written checkpoint."""
    return atomic_write(Path(path), lambda p: torch.save(obj, p))


def load_checkpoint(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise BadCheckpointError(f"Checkpoint {path} does not exist: check the path given to --checkpoint.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BadCheckpointError(
            f"{path} is not a readable leukodetect checkpoint ({type(exc).__name__}): "
            "pass a best.pt written by 'leukodetect train' or 'cv'."
        ) from exc
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise BadCheckpointError(
            f"{path} is not a leukodetect checkpoint (a plain state dict?): pass a best.pt written by "
            "'leukodetect train', or use it as --weights for a new training run."
        )
    missing = [k for k in REQUIRED if k not in obj]
    if missing:
        raise BadCheckpointError(f"{path} lacks {missing}: it is damaged or from an incompatible version.")
    if obj.get("format_version", 0) > FORMAT_VERSION:
        raise BadCheckpointError(f"{path} was written by a newer leukodetect: upgrade leukodetect to read it.")
    return obj


def model_from_checkpoint(bundle: dict[str, Any], path: Path | str = "checkpoint") -> nn.Module:
    model = create_model(bundle["arch"], num_classes=len(bundle["class_names"]))
    try:
        model.load_state_dict(bundle["state_dict"])
    except RuntimeError as exc:
        raise BadCheckpointError(
            f"The weights in {path} do not match architecture '{bundle['arch']}': the file is damaged."
        ) from exc
    return model.eval()
