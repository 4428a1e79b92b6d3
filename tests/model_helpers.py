"""Small models for tests, importable by one name from any test file."""

import torch
from torch import nn

from leukodetect.models import create_model


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
