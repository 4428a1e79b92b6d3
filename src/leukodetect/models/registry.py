"""One registry of architectures: every model is built by name through :func:`create_model`.

Each entry knows where its classification head is (to swap it for a 2-way layer when published
weights are used) and which layer Grad-CAM should look at.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file
from torch import nn

from leukodetect.errors import BadCheckpointError, LeukoError


@dataclass(frozen=True)
class ModelSpec:
    """How to build one architecture.

    Attributes:
        name: registry name.
        build: ``build(num_classes, pretrained) -> nn.Module``; with ``pretrained`` it returns the
            model carrying torchvision's published ImageNet weights and its original head.
        head: dotted path of the final ``nn.Linear``.
        cam_layer: dotted path of the layer whose activations Grad-CAM uses.
        description: one line for ``leukodetect models``.
        scratch_lr: the peak AdamW learning rate used when training from scratch and no ``--lr`` is
            given. 1e-3 suits the batch-normalised networks; the VGGs have no batch norm and
            diverge at 1e-3 from scratch, so theirs is 1e-4.
        style_stages: the child modules whose outputs ``--mixstyle`` mixes (early stages, where style is);
            empty where the option is not offered.
    """

    name: str
    build: Callable[[int, bool], nn.Module]
    head: str
    cam_layer: str
    description: str
    scratch_lr: float = 1e-3
    style_stages: tuple[str, ...] = ()


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"A model named '{spec.name}' is already registered.")
    _REGISTRY[spec.name] = spec
    return spec


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise LeukoError(f"Unknown architecture '{name}': choose one of {', '.join(list_models())}.") from None


def _replace_head(model: nn.Module, head: str, num_classes: int) -> None:
    parent_name, _, attr = head.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    setattr(parent, attr, nn.Linear(old.in_features, num_classes))


def create_model(name: str = "resnet50", num_classes: int = 2, weights: str | Path | None = None) -> nn.Module:
    """Build an architecture by name.

    Args:
        name: one of :func:`list_models`.
        num_classes: size of the output layer (2: normal, blast).
        weights: None trains from scratch (as in the paper); ``"imagenet"`` starts from
            torchvision's published weights (downloaded by torchvision if not cached); a path loads
            a local state dict or leukodetect checkpoint without unpickling code.
    """
    spec = get_spec(name)
    if weights == "imagenet":
        try:
            model = spec.build(num_classes, True)
        except Exception as exc:  # network or cache problems surface in many types
            raise LeukoError(
                f"Could not get torchvision's ImageNet weights for {name} ({exc}); "
                "download them on a machine with internet access or pass --weights PATH."
            ) from exc
        _replace_head(model, spec.head, num_classes)
        return model
    model = spec.build(num_classes, False)
    if weights is not None:
        load_weights(model, Path(weights), spec)
    return model


#: Prefix of the out-of-distribution guard's arrays in a leukodetect safetensors file (beside the weights).
GUARD_PREFIX = "guard."


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read tensors from a .safetensors file, a state dict or a leukodetect checkpoint.

    ``torch.load`` runs with ``weights_only=True``, so a file can never execute code on load.
    """
    path = Path(path)
    if not path.is_file():
        raise BadCheckpointError(f"Weights file {path} does not exist: check the path given to --weights.")
    try:
        if path.suffix == ".safetensors":
            # A leukodetect safetensors file (the shipped model) also holds its guard's arrays: not weights.
            return {k: v for k, v in load_file(str(path)).items() if not k.startswith(GUARD_PREFIX)}
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BadCheckpointError(
            f"{path} is not a readable weights file ({type(exc).__name__}): "
            "pass a .safetensors file, a PyTorch state dict or a leukodetect checkpoint."
        ) from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BadCheckpointError(f"{path} holds no state dict of tensors: pass a state dict or checkpoint.")
    return obj


def load_weights(model: nn.Module, path: Path, spec: ModelSpec) -> None:
    """Load a state dict into ``model``; a head of another size is left freshly initialised."""
    state = read_state_dict(path)
    own = model.state_dict()
    head_keys = {k for k in state if k.startswith(spec.head + ".")}
    mismatched = {k for k in head_keys if k in own and own[k].shape != state[k].shape}
    if mismatched:
        state = {k: v for k, v in state.items() if k not in head_keys}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (mismatched and k.startswith(spec.head + "."))]
    if missing or unexpected:
        raise BadCheckpointError(
            f"{path} does not fit architecture '{spec.name}' "
            f"({len(missing)} missing, {len(unexpected)} unexpected keys, e.g. "
            f"{(missing or unexpected)[0]}): pass weights saved from the same architecture."
        )
