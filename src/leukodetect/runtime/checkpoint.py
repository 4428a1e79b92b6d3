"""Self-describing checkpoints.

A checkpoint is a dict of plain Python values and tensors saved with ``torch.save`` and read with
``weights_only=True`` (no code is ever unpickled). It holds everything needed downstream: the
architecture, class names, input size, mean/std, decision threshold and temperature, the config
that made it, its training history, library versions, and the pixel hashes of the images it was
trained and validated on (so ``evaluate`` can refuse to score a model on its own training images).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from leukodetect.errors import BadCheckpointError
from leukodetect.models import create_model
from leukodetect.models.registry import GUARD_PREFIX
from leukodetect.utils import atomic_write, environment_facts

#: Class names in label order. Label 1 is the positive class: a blast (cell level) or an ALL
#: photograph (whole-smear level).
CLASS_NAMES: tuple[str, str] = ("normal", "blast")

#: Crop side, in red-cell diameters, of detector checkpoints that do not record one (the first recipe).
LEGACY_CROP_FACTOR = 3.0


@dataclass(frozen=True, kw_only=True)
class DetectorSettings:
    """What a crop classifier for whole-smear detection was trained with, stored under ``"detection"``.

    ``detect``, ``serve`` and the exported models read these from the checkpoint (or the export's
    metadata) and never restate them, so a detector is always run at the scale and with the
    localisation, gate and scorer it was evaluated with. The runtime only carries the last three; the
    detection package gives them meaning (``LocateParams``, ``SmudgeGate``, ``CellScorer``).

    Attributes:
        crop_factor: crop side in red-cell diameters, measured on each photograph.
        crop_size: the crop's side in pixels when it was cut for training (None: not recorded).
        locate: the localisation settings as a dict (None: the defaults of the day it was trained).
        gate: the smudge gate's numbers (None: no gate).
        scorer: the cell scorer's numbers (None: no scorer).
    """

    crop_factor: float = LEGACY_CROP_FACTOR
    crop_size: int | None = None
    locate: Mapping[str, Any] | None = None
    gate: Mapping[str, Any] | None = None
    scorer: Mapping[str, Any] | None = None

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> DetectorSettings | None:
        """The settings stored in a checkpoint or export (None where it is no detector); unknown keys are ignored."""
        if raw is None:
            return None
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

    @classmethod
    def of(cls, bundle: Mapping[str, Any]) -> DetectorSettings | None:
        """The settings of a checkpoint bundle, or None for a plain cell classifier."""
        return cls.from_dict(bundle.get("detection"))

    def to_dict(self) -> dict[str, Any]:
        """Plain values for a checkpoint or an export's JSON; unset entries are left out."""
        return {k: v for k, v in asdict(self).items() if v is not None}


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


SAFETENSORS_KEY = "leukodetect"
#: The out-of-distribution guard's arrays (``bundle["guard"]``, see :mod:`leukodetect.runtime.guard`),
#: stored as tensors under these names with this prefix in a safetensors file.
GUARD_TENSORS = ("center", "projection", "class_means", "pixel_center", "pixel_projection", "pixel_class_means",
                 "feature_group_thresholds", "pixel_group_thresholds")


def save_safetensors(bundle: dict[str, Any], path: Path, *, half: bool = True) -> Path:
    """Write a checkpoint as safetensors: weights (float16 when ``half``) plus the description as JSON.

    Used for the shipped default model: half the size of a float32 .pt, and a format that holds
    tensors and strings only.
    """

    meta = {k: v for k, v in bundle.items() if k not in ("state_dict", "optimizer", "scheduler")}
    tensors = {
        k: (v.half() if half and v.is_floating_point() else v).contiguous()
        for k, v in bundle["state_dict"].items()
    }
    if "guard" in bundle:  # the guard's arrays are tensors (kept in float32: its distances are sensitive)
        meta["guard"] = {k: v for k, v in bundle["guard"].items() if k not in GUARD_TENSORS}
        tensors.update({f"{GUARD_PREFIX}{k}": torch.as_tensor(bundle["guard"][k]).float().contiguous() for k in GUARD_TENSORS
                        if k in bundle["guard"]})
    return atomic_write(Path(path), lambda p: save_file(tensors, str(p), metadata={SAFETENSORS_KEY: json.dumps(meta)}))


def _load_safetensors(path: Path) -> dict[str, Any]:

    with safe_open(str(path), framework="pt") as f:
        meta = (f.metadata() or {}).get(SAFETENSORS_KEY)
        if meta is None:
            raise BadCheckpointError(
                f"{path} is a safetensors file without leukodetect's description: pass it with --weights "
                "to start a new training run, or pass a leukodetect checkpoint."
            )
        obj = json.loads(meta)
        # Computation runs in float32 whatever precision the weights were stored in.
        obj["state_dict"] = {k: (t.float() if t.is_floating_point() else t) for k in f.keys() if not k.startswith(GUARD_PREFIX)
                             for t in [f.get_tensor(k)]}
        if "guard" in obj:
            obj["guard"].update({k: f.get_tensor(f"{GUARD_PREFIX}{k}") for k in GUARD_TENSORS if f"{GUARD_PREFIX}{k}" in f.keys()})
    return obj


def load_checkpoint(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise BadCheckpointError(f"Checkpoint {path} does not exist: check the path given to --checkpoint.")
    try:
        obj = _load_safetensors(path) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu", weights_only=True)
    except BadCheckpointError:
        raise
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
