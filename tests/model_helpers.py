"""Small models for tests, importable by one name from any test file."""

from pathlib import Path

import torch
from torch import nn

from leukodetect.models import create_model
from leukodetect.runtime.checkpoint import load_checkpoint, save_checkpoint
from leukodetect.runtime.scale import CanonicalScale


def tiny_with_batchnorm_statistics(seed: int = 0) -> nn.Module:
    """The untrained tiny model with non-trivial batch-norm statistics and affine terms, as after training."""
    torch.manual_seed(seed)
    model = create_model("tiny")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


def with_scale(checkpoint: Path, folder: Path) -> Path:
    """A copy of a 24-pixel tiny checkpoint, in ``folder``, with a physical scale: inputs of 3 red-cell diameters."""
    bundle = load_checkpoint(checkpoint)
    bundle["scale"] = CanonicalScale(field=3.0, size=24).to_dict()
    return save_checkpoint(bundle, Path(folder) / "best.pt")
