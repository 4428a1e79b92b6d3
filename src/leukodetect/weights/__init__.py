"""The default model shipped with leukodetect (see MODEL_CARD.md beside this file)."""

from __future__ import annotations

from pathlib import Path

from leukodetect.errors import LeukoError

#: The cell model: ResNet-50 trained on five laboratories at one physical scale, with a guard (see MODEL_CARD.md).
DEFAULT_MODEL = Path(__file__).resolve().parent / "resnet50_5labs.safetensors"
#: The crop classifier of whole-smear detection, trained on ALL-IDB1 photographs (see DETECTOR_CARD.md).
DEFAULT_DETECTOR = Path(__file__).resolve().parent / "detector_allidb1.safetensors"
#: The learned white-cell locator of whole-smear detection, trained on ALL-IDB1, BCCD and PBC (see LOCATOR_CARD.md).
DEFAULT_LOCATOR = Path(__file__).resolve().parent / "locator_wbc.safetensors"


def default_model_path() -> Path:
    """The shipped default checkpoint; used by predict, explain, serve when no --checkpoint is given."""
    if not DEFAULT_MODEL.is_file():
        raise LeukoError(
            f"The default model {DEFAULT_MODEL} is missing from this installation: "
            "pass --checkpoint runs/NAME/best.pt or reinstall leukodetect."
        )
    return DEFAULT_MODEL


def resolve_checkpoint(checkpoint: Path | None) -> Path:
    """The checkpoint given, else the shipped default model."""
    return Path(checkpoint) if checkpoint is not None else default_model_path()


def resolve_detector(checkpoint: Path | None, locator: str = "learned") -> Path | None:
    """The cell model that classifies a smear's located cells: the one given, else the shipped one that goes with ``locator``.

    With the learned locator (the default), the five-laboratory cell model: on other laboratories' smears the
    pair is right where the ALL-IDB1 pipeline is not (docs/detection.md, "Smear verdicts per laboratory").
    With the colour locator, the ALL-IDB1 detector, whose smudge gate and cell scorer read the colour
    locator's region measurements. None where this installation lacks the file.
    """
    if checkpoint is not None:
        return Path(checkpoint)
    path = DEFAULT_MODEL if locator == "learned" else DEFAULT_DETECTOR
    return path if path.is_file() else None


def resolve_locator(weights: Path | None) -> Path:
    """The learned white-cell locator given, else the shipped one."""
    if weights is not None:
        return Path(weights)
    if not DEFAULT_LOCATOR.is_file():
        raise LeukoError(
            f"The shipped white-cell locator {DEFAULT_LOCATOR} is missing from this installation: pass "
            "--locator-weights FILE from 'leukodetect train-locator', or --locator colour."
        )
    return DEFAULT_LOCATOR
